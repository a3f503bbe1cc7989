"""The official FlowDPS Gaussian deblurring operator (``deblur_gauss``), for reproducing paper numbers only.

FlowDPS uses DDRM's ``Deblurring`` SVD operator. Its definition (flowdps.md §3), re-implemented here:

* 1-D taps ``exp(-k^2 / (2 sigma^2))`` for ``k = -(K//2 + 1) .. K//2 - 1`` (for K = 61: k = -31..29), normalised
  over those K taps. The peak sits at index K//2 + 1, **one off the centre**;
* the 1-D n x n matrix ``A[i, j] = taps[j - i + K//2]`` for ``j`` in ``[i - K//2, i + K//2)`` inside the image,
  **zero boundary** (only K - 1 taps are used). Row i peaks at column i + 1: a **one-pixel shift**;
* separable: ``A_2d = A (x) A`` (rows and columns);
* **truncated SVD**: ``A = U diag(s) V^T`` and every 1-D singular value ``s < 0.03`` is set to zero before the
  2-D singular values are formed as products ``s_i s_j`` (DDRM's ``singulars_small[singulars_small < ZERO]
  = 0``). So the threshold applies to the 1-D factor, not to the 2-D products. With the taps normalised as
  above this zeroes 552 of the 768 singular values at 768 px (normalising by the 60 used taps instead gives
  the same count; leaving them unnormalised gives 496), which matches the documented "552 of 768".

Forward, adjoint and pseudo-inverse all use the truncated matrices ``A_t = U diag(s_t) V^T``, so the adjoint
is exact for the truncated operator and ``A^+ = V diag(1/s_t on s_t > 0) U^T`` is closed form. The result is
an approximation of a blur (about 11 % off an exact blur at 768 px) shifted by a pixel: never a default; use
:func:`~.blur.gaussian_blur` for an exact centred Gaussian.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from .base import LinearOperator, check_finite_float, check_positive_int
from .separable import apply_separable

PAPER_GAUSSIAN_KERNEL_SIZE = 61
"""Kernel size of the official Gaussian deblurring task."""

PAPER_GAUSSIAN_SIGMA = 3.0
"""Standard deviation (pixels) of the official Gaussian deblurring taps, ``exp(-k^2 / 18)``."""

PAPER_SVD_THRESHOLD = 0.03
"""DDRM's ``ZERO = 3e-2``: 1-D singular values below it are set to zero."""


def paper_gaussian_taps(
    kernel_size: int = PAPER_GAUSSIAN_KERNEL_SIZE, sigma: float = PAPER_GAUSSIAN_SIGMA
) -> Tensor:
    """The official 1-D taps (float64, length ``kernel_size``, peak at index ``kernel_size // 2 + 1``)."""
    k = torch.arange(-(kernel_size // 2) - 1, kernel_size // 2, dtype=torch.float64)
    taps = torch.exp(-(k**2) / (2 * sigma**2))
    return taps / taps.sum()


def paper_gaussian_matrix(
    n: int, kernel_size: int = PAPER_GAUSSIAN_KERNEL_SIZE, sigma: float = PAPER_GAUSSIAN_SIGMA
) -> Tensor:
    """The untruncated official 1-D blur matrix ``(n, n)`` (float64), zero boundary, off-centre by one."""
    taps = paper_gaussian_taps(kernel_size, sigma)
    half = kernel_size // 2
    d = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # j - i
    inside = (d >= -half) & (d < half)
    return torch.where(
        inside, taps[(d + half).clamp(0, kernel_size - 1)], torch.zeros((), dtype=torch.float64)
    )


@functools.lru_cache(maxsize=8)
def paper_gaussian_matrices(
    n: int,
    kernel_size: int = PAPER_GAUSSIAN_KERNEL_SIZE,
    sigma: float = PAPER_GAUSSIAN_SIGMA,
    threshold: float = PAPER_SVD_THRESHOLD,
) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated 1-D matrix ``A_t``, its pseudo-inverse and the truncated singular values (float64, cached)."""
    with torch.inference_mode(False):
        u, s, vh = torch.linalg.svd(paper_gaussian_matrix(n, kernel_size, sigma))
        s = torch.where(s < threshold, torch.zeros_like(s), s)
        inverse = torch.where(s > 0, 1 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
        return (u * s) @ vh, (vh.T * inverse) @ u.T, s


@dataclasses.dataclass(frozen=True, eq=False)
class PaperGaussianBlur(LinearOperator):
    """Paper-compatible FlowDPS Gaussian blur: off-centre taps, zero boundary, truncated SVD (see module doc).

    x: (B, C, H, W), any H and W -> y: (B, C, H, W). Only for reproducing the paper's measurements.
    """

    kernel_size: int = PAPER_GAUSSIAN_KERNEL_SIZE
    sigma: float = PAPER_GAUSSIAN_SIGMA
    threshold: float = PAPER_SVD_THRESHOLD

    def __post_init__(self) -> None:
        size = check_positive_int(self.kernel_size, "kernel size")
        if size % 2 == 0:
            raise ValueError(f"kernel size {size} is even; it must be odd")
        sigma = check_finite_float(self.sigma, "sigma")
        if sigma <= 0:
            raise ValueError(f"sigma {sigma} must be > 0")
        threshold = check_finite_float(self.threshold, "threshold")
        if threshold < 0:
            raise ValueError(f"threshold {threshold} must be >= 0")
        object.__setattr__(self, "kernel_size", size)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "threshold", threshold)

    def describe(self) -> str:
        return f"paper Gaussian blur, kernel {self.kernel_size}, sigma {self.sigma:g}"

    def _matrices(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        return paper_gaussian_matrices(n, self.kernel_size, self.sigma, self.threshold)

    def _forward(self, x: Tensor) -> Tensor:
        return apply_separable(x, self._matrices(x.shape[-2])[0], self._matrices(x.shape[-1])[0])

    def _adjoint(self, y: Tensor) -> Tensor:
        return apply_separable(y, self._matrices(y.shape[-2])[0].T, self._matrices(y.shape[-1])[0].T)

    def _pinv(self, y: Tensor) -> Tensor:
        return apply_separable(y, self._matrices(y.shape[-2])[1], self._matrices(y.shape[-1])[1])
