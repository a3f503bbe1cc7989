"""Helpers every sampling loop of the pack shares (FlowDPS / FlowChef / PSLD and AFDPS).

* :func:`check_sigmas`: the noise schedule as Python floats, validated once before the loop;
* :func:`fresh_noise`: ``N(0, I)`` from the run's generator, the same draw for every dtype;
* :class:`NonFiniteError` and :func:`check_finite`: stop a run that produced NaN or Inf, naming the step;
* :func:`compute_dtype` and :func:`batch_view`: the numeric conventions: gradients and weighted sums run in
  float32 (float64 stays float64) whatever the model's dtype, and per-sample values ``(B,)`` broadcast against
  batches ``(B, ...)``;
* :func:`gradient`: one vector-Jacobian product that says when the output does not depend on the input.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

__all__ = [
    "NonFiniteError",
    "batch_view",
    "check_finite",
    "check_sigmas",
    "compute_dtype",
    "fresh_noise",
    "gradient",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def batch_view(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1): one value per sample, broadcasting against ``like: (B, ...)`` (dtype kept)."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def gradient(output: Tensor, wrt: Tensor) -> Tensor | None:
    """``d output / d wrt`` (``output`` a scalar, or with a vector-Jacobian product already folded in), or
    ``None`` when ``output`` does not depend on ``wrt``: ``torch.autograd.grad(..., allow_unused=True)``, whose
    annotation promises tensors although it gives ``None`` for an unused input."""
    grads: tuple[Tensor | None, ...] = torch.autograd.grad(output, wrt, allow_unused=True)
    return grads[0]


def check_sigmas(sigmas: Tensor) -> list[float]:
    """Validate a noise schedule and return it as Python floats.

    sigmas: 1-D, at least 2 values in [0, 1] (up to 1e-4 above 1 is taken as 1, for rounding), non-increasing,
    with only the last value allowed to be 0 (no step starts at ``s = 0``).
    """
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        shape = tuple(sigmas.shape) if isinstance(sigmas, Tensor) else type(sigmas).__name__
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 values, got {shape}")
    levels = sigmas.detach().double().cpu().tolist()
    shown = "[" + ", ".join(f"{s:.6g}" for s in levels) + "]"
    if not all(math.isfinite(s) and 0.0 <= s <= 1.0 + 1e-4 for s in levels):
        raise ValueError(f"sigmas must lie in [0, 1], got {shown}")
    if any(b > a for a, b in itertools.pairwise(levels)):
        raise ValueError(f"sigmas must be non-increasing, got {shown}")
    if levels[-2] <= 0.0:
        raise ValueError(f"only the last sigma may be 0, got {shown}")
    return [min(s, 1.0) for s in levels]


def fresh_noise(like: Tensor, generator: torch.Generator) -> Tensor:
    """``xi ~ N(0, I)`` shaped like ``like``: ``torch.randn(shape, generator=generator, device=like.device,
    dtype=torch.float32)`` cast to ``like``'s dtype, so a seed gives the same noise for every dtype."""
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32).to(like.dtype)


class NonFiniteError(ValueError):
    """A sampling step produced NaN or Inf values; the message names the step and where they appeared."""


def check_finite(x: Tensor, what: str, i: int, n_steps: int, sigma: float) -> Tensor:
    """``x`` unchanged, or :class:`NonFiniteError` naming step ``i`` (1-based in the text), its sigma and the
    batch items."""
    finite = torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(1)
    if not bool(finite.all()):
        bad = [int(j) for j in torch.nonzero(~finite).flatten()]
        raise NonFiniteError(
            f"step {i + 1} of {n_steps} (sigma {sigma:.4g}): {what} has NaN or Inf values in batch item(s) "
            f"{bad}; the run is stopped. Usual causes: a step size too large for the image size, or a model or "
            f"VAE in a precision that overflows (try float32 or a smaller step size).")
    return x
