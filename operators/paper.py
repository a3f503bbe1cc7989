"""The official FlowDPS Gaussian deblurring operator (``deblur_gauss``), only to reproduce paper numbers.

This is **not a Gaussian blur** and not a recommended operator: it reproduces what the official FlowDPS code
computes for its Gaussian-deblurring task (an SVD operator taken from DDRM), mistakes included, so that the
paper's Gaussian-deblurring numbers can be reproduced. For restoring photos use the exact, centred
:func:`~.blur.gaussian_blur`.

What the official operator computes, re-implemented here from its behaviour:

1. **1-D factor.** Taps ``exp(-k^2 / (2 sigma^2))`` for ``k = -(K//2 + 1) .. K//2 - 1`` (K = 61: k = -31..29),
   normalised over those K taps, so the peak sits one tap off the centre. The n x n matrix is
   ``A[i, j] = taps[j - i + K//2]`` for ``j`` in ``[i - K//2, i + K//2)`` inside the image (zero boundary);
   row i peaks at column i + 1, a one-pixel shift.
2. **Truncated SVD.** ``A = U diag(s) V^T``; every 1-D singular value ``s < 0.03`` is set to zero (552 of 768
   at 768 px), giving ``s_t``. The threshold applies to the 1-D values, before any product is formed.
3. **2-D spectrum in sorted order.** The 2-D basis vectors are ``v_i (x) v_j`` (row index i, column index j,
   flat index ``q = i * W + j``) with "singular values" ``P[q] = s_t[i] * s_t[j]``. These are sorted in
   descending order: ``S[p] = P[perm[p]]`` (sorted position p -> flat index ``perm[p]``).
4. **The tiling mismatch.** The coefficients of a ``C``-channel image are laid out channel-interleaved
   (entry ``p * C + c`` for sorted position p, channel c) but multiplied by ``S`` repeated C times end to end
   (entry k gets ``S[k mod (H W)]``) instead of each value repeated C times. So the coefficient of channel c
   at sorted position p is scaled by ``d_c(p) = S[(C p + c) mod (H W)]``: every channel gets its own, wrong
   spectrum, and channel c only ever reads the values ``S[k]`` with ``k = c mod C`` when ``C`` divides H W.
   At 768 px with C = 3 each channel keeps only the 15 552 largest of the 46 656 non-zero products (two
   thirds of the blur's spectrum are dropped, the rest decays three times faster than it should), while
   31 104 coefficients whose true singular value is zero (row index 256..276 and 512..532, any column index)
   get weights up to ``s_0^2 ~ 1``: frequencies the blur should remove are let through, some at full
   strength. So it is not a blur; only for grey images (C = 1) is it the truncated separable blur
   ``A_t (x) A_t`` with ``A_t = U diag(s_t) V^T``.

Per channel the operator is therefore ``A_c = (U_h (x) U_w) diag(e_c) (V_h (x) V_w)^T`` with
``e_c[perm[p]] = d_c(p)``. There is no term from one channel into another: the layout is a permutation that
is undone exactly, and the scaling is elementwise. The official adjoint and pseudo-inverse use the same
tiled vector, so :meth:`PaperGaussianBlur.adjoint` is the exact transpose and :meth:`PaperGaussianBlur.pinv`
the exact Moore-Penrose pseudo-inverse (``1 / e_c`` where ``e_c > 0``, else 0) of this same operator.

**Choices where the official code leaves a gap** (both reduce to it exactly for square C-channel images):

* *Non-square images.* The official operator only exists for n x n images. Here an H x W image uses the SVDs
  of the H x H and the W x W factors, products ``s_h[i] * s_w[j]`` flattened as ``i * W + j``, and the same
  sort and tiling rule with period H W.
* *Ties.* The order of equal products decides which basis vector gets which weight, and exact ties are
  everywhere (``s_i s_j == s_j s_i``, and the block of exact zeros left by the truncation). The official
  code asks for a descending sort without requesting stability; PyTorch sorts a tensor of this size on a GPU
  with a radix sort, which is stable, so tied entries keep their flat-index order. This module sorts the
  float64 products with a stable descending sort: ties keep the order ``i * W + j``. PyTorch's default
  (unstable) CPU sort would instead scramble the block of zeros (566 212 of the 589 824 positions at 768 px
  differ from the stable order; output change 1e-3 on a smooth image, 8e-2 on 1/f noise).

**How well this pins the official operator down** (measured at 768 px, RGB, relative L2 change of the
forward; ``benchmarks/paper_blur_ordering.py``):

* *Sort order.* Sorting float32 products (as the official run did) instead of float64 ones moves 67 of the
  589 824 sorted positions (near-ties that float32 rounds differently; the truncation count stays 552): the
  output changes by 5e-5 on a smooth image and 2e-4 on 1/f noise.
* *SVD.* Larger: the mismatched weights fall on singular vectors whose 1-D singular values are far below
  working precision (3e-9 at index 512, 2e-16 at index 700), and such vectors are not determined by
  the matrix, only by the SVD routine's round-off (float32 leaves the vectors from index ~390 on
  undetermined; two float64 LAPACK drivers, gesdd and gesvd, already disagree from index ~660). A float32
  construction throughout changes the output by 5e-5 on a smooth image, 5e-2 on 1/f noise and 0.9 on white
  noise; the other float64 driver by 1e-12, 8e-3 and 0.19. So on smooth content this operator is the
  official one to round-off, but its response to fine detail (noise included) depends on the SVD
  implementation, and no CPU construction can reproduce the official GPU float32 one there.

All matrices are built once per size in float64 on the CPU (1-D factors of size n x n, the sort of H W
values and a gather; no (H W) x (H W) matrix) and cached; at call time they are cast to the input's device
and dtype (at least float32). The caches hold at most a few sizes but are not bounded in bytes: the
per-channel weights of a 768 px RGB image take 14 MB, of a 4096 px one 400 MB.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .base import LinearOperator, check_finite_float, check_odd_size, work_dtype
from .cache import tensor_cache
from .interrupt import check_interrupt, run_interruptible
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


PAPER_CACHE_BYTES = 512 * 2**20
"""Byte bound of each cache of the paper blur (:func:`paper_gaussian_svd`: 150 MiB for a 3072 px side)."""


@tensor_cache(PAPER_CACHE_BYTES)
def paper_gaussian_svd(
    n: int,
    kernel_size: int = PAPER_GAUSSIAN_KERNEL_SIZE,
    sigma: float = PAPER_GAUSSIAN_SIGMA,
    threshold: float = PAPER_SVD_THRESHOLD,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, s_t, V)`` of the official 1-D matrix (float64, cached): ``U, V: (n, n)``, ``s_t: (n,)``.

    ``paper_gaussian_matrix(n) = U diag(s) V^T`` with ``s`` in descending order, and ``s_t`` is ``s`` with
    every value below ``threshold`` set to zero, so ``U diag(s_t) V^T`` is the truncated 1-D blur. A pending
    interrupt (:func:`~.interrupt.check_interrupt`) raises before the matrix and before its SVD are computed,
    and one that arrives during the SVD raises within :data:`~.interrupt.POLL_S` seconds
    (:func:`~.interrupt.run_interruptible`).
    """
    check_interrupt()
    with torch.inference_mode(False):
        matrix = paper_gaussian_matrix(n, kernel_size, sigma)
        check_interrupt()
        u, s, vh = run_interruptible(torch.linalg.svd, matrix, key=("paper svd", n, kernel_size, sigma))
        return u, torch.where(s < threshold, torch.zeros_like(s), s), vh.T.contiguous()


def sorted_products(s_rows: Tensor, s_cols: Tensor) -> tuple[Tensor, Tensor]:
    """The 2-D spectrum in the official order: ``(S, perm)``, both of length ``H W``.

    s_rows: (H,), s_cols: (W,) non-negative. ``P[i * W + j] = s_rows[i] * s_cols[j]``; ``perm`` sorts P in
    descending order, stably (equal products keep the order of their flat index), and ``S = P[perm]``.
    """
    products = (s_rows[:, None] * s_cols[None, :]).flatten()
    perm = torch.argsort(products, descending=True, stable=True)
    return products[perm], perm


def tiled_channel_scales(
    sorted_values: Tensor, perm: Tensor, channels: int, height: int, width: int
) -> Tensor:
    """The weights ``e: (channels, height, width)`` that the official tiling gives each 2-D coefficient.

    sorted_values, perm: from :func:`sorted_products` (length ``N = height * width``). The coefficient of
    channel c at sorted position p is scaled by ``sorted_values[(channels * p + c) mod N]``; ``e[c]`` holds
    that weight at the coefficient's flat index ``perm[p]``.
    """
    count = height * width
    position = torch.empty_like(perm)
    position[perm] = torch.arange(count, device=perm.device)  # flat index -> sorted position
    return torch.stack(
        [sorted_values[(channels * position + c) % count] for c in range(channels)]
    ).view(channels, height, width)


@tensor_cache(PAPER_CACHE_BYTES)
def paper_channel_scales(
    height: int,
    width: int,
    channels: int,
    kernel_size: int = PAPER_GAUSSIAN_KERNEL_SIZE,
    sigma: float = PAPER_GAUSSIAN_SIGMA,
    threshold: float = PAPER_SVD_THRESHOLD,
) -> Tensor:
    """Per-channel weights ``(channels, height, width)`` (float64, cached) of the official operator."""
    check_interrupt()
    with torch.inference_mode(False):
        s_rows = paper_gaussian_svd(height, kernel_size, sigma, threshold)[1]
        s_cols = paper_gaussian_svd(width, kernel_size, sigma, threshold)[1]
        sorted_values, perm = sorted_products(s_rows, s_cols)
        return tiled_channel_scales(sorted_values, perm, channels, height, width)


def _reciprocal(scales: Tensor) -> Tensor:
    """``1 / scales`` where ``scales > 0``, else 0 (the pseudo-inverse of a diagonal)."""
    positive = scales > 0
    safe = torch.where(positive, scales, torch.ones_like(scales))
    return torch.where(positive, 1 / safe, torch.zeros_like(scales))


@dataclasses.dataclass(frozen=True, eq=False)
class PaperGaussianBlur(LinearOperator):
    """The official FlowDPS ``deblur_gauss`` operator, channel-dependent spectra included (see module doc).

    x: (B, C, H, W), any C, H and W -> y: (B, C, H, W). Per channel c,
    ``y_c = U_h (e_c * (V_h^T x_c V_w)) U_w^T`` with the weights ``e_c`` of :func:`paper_channel_scales`.
    Only for reproducing the paper's Gaussian-deblurring numbers: not a Gaussian blur.
    """

    kernel_size: int = PAPER_GAUSSIAN_KERNEL_SIZE
    sigma: float = PAPER_GAUSSIAN_SIGMA
    threshold: float = PAPER_SVD_THRESHOLD

    def __post_init__(self) -> None:
        size = check_odd_size(self.kernel_size, "kernel size")
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

    def _svd(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        return paper_gaussian_svd(n, self.kernel_size, self.sigma, self.threshold)

    def _sandwich(self, t: Tensor, transposed: bool, inverse: bool) -> Tensor:
        """``out_basis (w * (in_basis^T t)) out_basis^T`` per channel, computed in float32 at least.

        Forward: in = V, out = U, w = e. Adjoint: in = U, out = V, w = e. Pinv: in = U, out = V, w = 1/e.
        """
        _, channels, height, width = t.shape
        u_h, _, v_h = self._svd(height)
        u_w, _, v_w = self._svd(width)
        scales = paper_channel_scales(height, width, channels, self.kernel_size, self.sigma, self.threshold)
        if inverse:
            scales = _reciprocal(scales)
        (in_h, in_w), (out_h, out_w) = ((u_h, u_w), (v_h, v_w)) if transposed else ((v_h, v_w), (u_h, u_w))
        work = t.to(work_dtype(t.dtype))
        coefficients = apply_separable(work, in_h.T, in_w.T)
        weighted = coefficients * scales.to(device=t.device, dtype=work.dtype)
        return apply_separable(weighted, out_h, out_w).to(t.dtype)

    def _forward(self, x: Tensor) -> Tensor:
        return self._sandwich(x, transposed=False, inverse=False)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._sandwich(y, transposed=True, inverse=False)

    def _pinv(self, y: Tensor) -> Tensor:
        return self._sandwich(y, transposed=True, inverse=True)
