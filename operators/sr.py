"""Super-resolution operators: downsampling by an integer factor (average pool, antialiased bicubic).

Both require H and W divisible by the factor (the official code only runs 768 / 12).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LinearOperator, Shape, check_image_shape, check_positive_int
from .cache import tensor_cache
from .interrupt import check_interrupt, run_interruptible
from .separable import apply_separable

PAPER_SR_FACTOR = 12
"""FlowDPS's super-resolution factor (768 -> 64) for both ``sr_avgpool`` and ``sr_bicubic``."""

BICUBIC_A = -0.5
"""Keys cubic-convolution parameter of the official ``SRConv`` kernel (and of PyTorch/PIL antialiasing)."""


def _check_divisible(shape: Shape, factor: int) -> None:
    height, width = shape[2], shape[3]
    if factor > min(height, width):
        raise ValueError(f"SR factor {factor} is larger than the image ({height}x{width}, H x W): the image must be "
                         f"at least {factor}x{factor}, and its sides multiples of {factor}")
    for name, size in (("height", height), ("width", width)):
        if size % factor:
            raise ValueError(f"{name} {size} is not divisible by the scale factor {factor}")


def _upsample_nearest(y: Tensor, factor: int) -> Tensor:
    return y.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class _IntegerFactorSR(LinearOperator):
    factor: int = PAPER_SR_FACTOR
    method: ClassVar[str] = "downsampling"

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", check_positive_int(self.factor, "scale factor"))

    def validate_input_shape(self, shape: Sequence[int]) -> Shape:
        shape = check_image_shape(shape, "x")
        _check_divisible(shape, self.factor)
        return shape

    def _output_shape(self, shape: Shape) -> Shape:
        b, c, h, w = shape
        return (b, c, h // self.factor, w // self.factor)

    def describe(self) -> str:
        return f"SR x{self.factor}, {self.method}"

    def _input_shape(self, output_shape: Shape) -> Shape:
        b, c, h, w = output_shape
        return (b, c, h * self.factor, w * self.factor)

    @property
    def auto_residual(self) -> str:
        """``"pinv"``: the official code compares ``A^+ y`` with ``A^+ A x`` for super-resolution (closed form)."""
        return "pinv"


@dataclasses.dataclass(frozen=True, eq=False)
class AvgPoolSR(_IntegerFactorSR):
    """Average-pool downsampling: each output pixel is the mean of a ``factor x factor`` block.

    x: (B, C, H, W) with H, W divisible by ``factor`` -> y: (B, C, H/f, W/f). Equals
    ``F.avg_pool2d(x, factor)`` exactly (the official ``sr_avgpool``). ``A A^T = I / f^2``, so the
    pseudo-inverse is closed form: ``A^+ = f^2 A^T``, nearest-neighbour upsampling.
    """

    method: ClassVar[str] = "average pool"

    def _forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.factor)

    def _adjoint(self, y: Tensor) -> Tensor:
        return _upsample_nearest(y, self.factor) / self.factor**2

    def _pinv(self, y: Tensor) -> Tensor:
        return _upsample_nearest(y, self.factor)


def _cubic(t: Tensor, a: float = BICUBIC_A) -> Tensor:
    """Keys cubic convolution kernel with parameter ``a`` (support |t| < 2)."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = a * (((t - 5) * t + 8) * t - 4)
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def symmetric_index(index: Tensor, n: int) -> Tensor:
    """Half-sample symmetric reflection into [0, n): ``-1 -> 0``, ``n -> n - 1``, periodic with period 2n."""
    m = index.remainder(2 * n)
    return torch.where(m >= n, 2 * n - 1 - m, m)


BICUBIC_CACHE_BYTES = 512 * 2**20
"""Byte bound of the cache of :func:`bicubic_matrices` (one 4096 px side with factor 1: 256 MiB)."""


@tensor_cache(BICUBIC_CACHE_BYTES)
def bicubic_matrices(n: int, factor: int) -> tuple[Tensor, Tensor]:
    """The 1-D antialiased bicubic downsampling matrix ``(n / factor, n)`` and its pseudo-inverse (float64).

    Output pixel m has its centre at input coordinate ``(m + 0.5) f`` (pixel centres at ``j + 0.5``); input
    pixel j gets the weight ``cubic((j + 0.5 - (m + 0.5) f) / f)`` with a = -0.5 (support 2f on each side,
    4f taps for even f as in the official ``SRConv``), normalised to sum 1, and indices outside [0, n) are
    folded back by half-sample symmetric reflection. In the interior this is exactly PyTorch's
    ``F.interpolate(..., mode="bicubic", antialias=True)``; PyTorch instead truncates and renormalises the
    taps at the border. A pending interrupt (:func:`~.interrupt.check_interrupt`) raises before the matrix and
    before its pseudo-inverse (an SVD) are computed, and one that arrives during the pseudo-inverse raises
    within :data:`~.interrupt.POLL_S` seconds (:func:`~.interrupt.run_interruptible`).
    """
    check_interrupt()
    with torch.inference_mode(False):
        h = n // factor
        centres = (torch.arange(h, dtype=torch.float64) + 0.5) * factor
        taps = torch.arange(-2 * factor, n + 2 * factor)
        weights = _cubic((taps.to(torch.float64)[None, :] + 0.5 - centres[:, None]) / factor)
        weights = weights / weights.sum(dim=1, keepdim=True)
        cols = symmetric_index(taps, n).expand(h, -1)
        rows = torch.arange(h)[:, None].expand_as(cols)
        matrix = torch.zeros(h, n, dtype=torch.float64).index_put_((rows, cols), weights, accumulate=True)
        check_interrupt()
        return matrix, run_interruptible(torch.linalg.pinv, matrix, key=("bicubic pinv", n, factor))


@dataclasses.dataclass(frozen=True, eq=False)
class BicubicSR(_IntegerFactorSR):
    """Antialiased bicubic downsampling by an integer factor (the official ``sr_bicubic``).

    x: (B, C, H, W) with H, W divisible by ``factor`` -> y: (B, C, H/f, W/f). Separable cubic kernel
    (a = -0.5) stretched by f, half-sample symmetric boundary (see :func:`bicubic_matrices`); equal to
    ``F.interpolate(x, scale_factor=1/f, mode="bicubic", antialias=True)`` away from a 2-output-pixel
    border. The operator is a Kronecker product of two 1-D matrices of full row rank, so the adjoint and
    the pseudo-inverse ``A_h^+ (x) A_w^+`` are exact (closed form, no CG).
    """

    method: ClassVar[str] = "bicubic"

    def _forward(self, x: Tensor) -> Tensor:
        rows, _ = bicubic_matrices(x.shape[-2], self.factor)
        cols, _ = bicubic_matrices(x.shape[-1], self.factor)
        return apply_separable(x, rows, cols)

    def _adjoint(self, y: Tensor) -> Tensor:
        rows, _ = bicubic_matrices(y.shape[-2] * self.factor, self.factor)
        cols, _ = bicubic_matrices(y.shape[-1] * self.factor, self.factor)
        return apply_separable(y, rows.T, cols.T)

    def _pinv(self, y: Tensor) -> Tensor:
        _, rows = bicubic_matrices(y.shape[-2] * self.factor, self.factor)
        _, cols = bicubic_matrices(y.shape[-1] * self.factor, self.factor)
        return apply_separable(y, rows, cols)
