"""Measurements in ComfyUI terms: an IMAGE read in the operator's output space, and what it leaves unknown.

Pure helpers over the pack's operators (no node classes), shared by the operator, sampler and restore nodes.
"""

from __future__ import annotations

import torch

from ..operators import LinearOperator
from .convert import image_to_pixels

UNKNOWN_ATOL = 1e-6  # |A A^T 1| below this marks a measurement pixel that carries no information


def measurement_pixels(operator: LinearOperator, image: torch.Tensor, *, name: str = "measurement") -> torch.Tensor:
    """ComfyUI IMAGE ``(B, h, w, C)`` -> the measurement ``(B, C', h, w)`` in [-1, 1] the operator produces.

    IMAGEs are RGB, while an operator may measure one channel (colour-to-grey): then the channels are
    averaged. Raises ValueError, before any expensive work, when no image maps to a measurement of this size
    (the operator's message names the sizes: a mask of another size, a kernel larger than the image, ...).
    """
    pixels = image_to_pixels(image, name=name)
    try:
        operator.input_shape(pixels.shape)
        return pixels
    except ValueError as rgb_error:
        grey = pixels.mean(dim=1, keepdim=True)
        try:
            operator.input_shape(grey.shape)
        except ValueError:
            raise ValueError(f"{name} ({pixels.shape[3]}x{pixels.shape[2]} pixels, W x H) does not fit the operator: "
                             f"{rgb_error}") from None
        return grey


def image_shape_for(operator: LinearOperator, measurement: torch.Tensor) -> tuple[int, int, int, int]:
    """Shape ``(B, C, H, W)`` of the image behind a measurement ``(B, C', h, w)`` (e.g. x12 for SR x12)."""
    return tuple(operator.input_shape(measurement.shape))  # type: ignore[return-value]


def unknown_mask(operator: LinearOperator, image_shape: tuple[int, ...]) -> torch.Tensor:
    """ComfyUI MASK ``(B, h, w)`` in the measurement's size: 1 where the measurement carries no information.

    A measurement pixel is unknown when every image pixel's weight on it is zero, i.e. ``A A^T 1 = 0`` there
    (the holes of an inpainting mask, alone or inside a composition); all zeros for SR and blur.
    """
    ones = torch.ones(operator.output_shape(image_shape), dtype=torch.float64)
    energy = operator.forward(operator.adjoint(ones).abs()).abs().amax(dim=1)
    return (energy < UNKNOWN_ATOL).float()
