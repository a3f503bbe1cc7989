"""Pointwise operators: identity (denoising) and colour-to-grey (colourisation)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import LinearOperator, Shape, check_finite_float, check_image_shape

MEAN_WEIGHTS = (1 / 3, 1 / 3, 1 / 3)
"""Default grey weights: the channel mean. The DDRM-family ``Colorization`` operator that FlowDPS's
``svd_operators`` derives from uses ``(0.3333, 0.3334, 0.3333)``, i.e. the mean up to rounding (the FlowDPS
file itself was not checked)."""

BT601_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights, an alternative for photographs."""


@dataclasses.dataclass(frozen=True, eq=False)
class Identity(LinearOperator):
    """``y = x`` (the denoising task: only the measurement noise degrades the image). A = A^T = A^+ = I."""

    def describe(self) -> str:
        return "identity"

    def _forward(self, x: Tensor) -> Tensor:
        return x

    def _adjoint(self, y: Tensor) -> Tensor:
        return y

    def _pinv(self, y: Tensor) -> Tensor:
        return y


@dataclasses.dataclass(frozen=True, eq=False)
class Grayscale(LinearOperator):
    """Colour to grey: ``y = sum_c w_c x_c``. x: (B, C, H, W) with C = len(weights) -> y: (B, 1, H, W).

    Adjoint ``x_c = w_c y``; closed-form pseudo-inverse ``x_c = w_c y / |w|^2`` (with the mean weights: the
    grey value copied to every channel).
    """

    weights: tuple[float, ...] = MEAN_WEIGHTS

    def __post_init__(self) -> None:
        weights = tuple(check_finite_float(w, "grey weight") for w in self.weights)
        if not weights or not any(weights):
            raise ValueError(f"grey weights {weights} must contain a non-zero value")
        object.__setattr__(self, "weights", weights)

    def validate_input_shape(self, shape: Sequence[int]) -> Shape:
        shape = check_image_shape(shape, "x")
        self.output_channels(shape[1])
        return shape

    def output_channels(self, channels: int) -> int:
        """1: the grey measurement of an image with one channel per weight (raises ValueError otherwise)."""
        if channels != len(self.weights):
            raise ValueError(f"colour-to-grey needs {len(self.weights)} channels, got {channels}")
        return 1

    def describe(self) -> str:
        return "colour to grey"

    def _output_shape(self, shape: Shape) -> Shape:
        return (shape[0], 1, shape[2], shape[3])

    def _input_shape(self, output_shape: Shape) -> Shape:
        if output_shape[1] != 1:
            raise ValueError(f"colour-to-grey measurements have 1 channel, got {output_shape[1]}")
        return (output_shape[0], len(self.weights), output_shape[2], output_shape[3])

    def _w(self, like: Tensor) -> Tensor:
        return torch.tensor(self.weights, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)

    def _forward(self, x: Tensor) -> Tensor:
        return (x * self._w(x)).sum(dim=1, keepdim=True)

    def _adjoint(self, y: Tensor) -> Tensor:
        if y.shape[1] != 1:
            raise ValueError(f"colour-to-grey measurements have 1 channel, got {y.shape[1]}")
        return y * self._w(y)

    def _pinv(self, y: Tensor) -> Tensor:
        return self._adjoint(y) / math.fsum(w * w for w in self.weights)
