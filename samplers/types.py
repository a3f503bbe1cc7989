"""Callable protocols shared by the samplers (what ComfyUI's sampler bridge passes in)."""

from __future__ import annotations

from typing import Protocol, TypedDict

from torch import Tensor

__all__ = ["DataLoss", "Denoiser", "StepInfo"]


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
