"""Callable protocols and types shared by the samplers (what ComfyUI's sampler bridge passes in), and the error
of a config field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypedDict

from torch import Tensor

__all__ = ["ConfigError", "DataLoss", "Denoiser", "StepInfo", "TensorMap"]

TensorMap = Callable[[Tensor], Tensor]
"""A map of batched tensors, ``(B, ...) -> (B, ...)``: a degradation ``A``, a decoder, a projection."""


class ConfigError(ValueError):
    """A config field breaks its rule: ``"<field> <rule>, got <value>"``.

    ``field`` names the field, so that a caller who fed it from an input of another name (a node's widget) can
    re-raise :meth:`message` with that name. ``owner`` prefixes the field in this error's own text
    (``"Schedule.end must be finite, got nan"``).
    """

    def __init__(self, field: str, rule: str, value: object, *, owner: str = "") -> None:
        self.field, self.rule, self.value = field, rule, value
        super().__init__(self.message(f"{owner}.{field}" if owner else field))

    def message(self, name: str) -> str:
        """The error's text with ``name`` in place of the field."""
        return f"{name} {self.rule}, got {self.value!r}"


class Denoiser(Protocol):
    """``denoise(z, sigma) -> z0_hat``: the x0 estimate (ComfyUI's model call, CFG already applied).

    z: (B, ...) latent at noise level ``sigma``; sigma: (B,) tensor; returns (B, ...) like ``z``.
    """

    def __call__(self, z: Tensor, sigma: Tensor, /) -> Tensor: ...


class DataLoss(Protocol):
    """``data_loss(z0) -> (B,)``: per-sample loss, differentiable w.r.t. ``z0: (B, ...)``.

    It includes the decoder (identity for pixel-space problems); see :func:`measurement_loss`.
    """

    def __call__(self, z0: Tensor, /) -> Tensor: ...


class StepInfo(TypedDict):
    """The k-diffusion callback payload (what ComfyUI's preview callback consumes)."""

    x: Tensor
    i: int
    sigma: Tensor
    sigma_hat: Tensor
    denoised: Tensor
