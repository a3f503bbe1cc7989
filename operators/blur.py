"""Blur by a point-spread function (any user kernel, Gaussian, motion) with an exact adjoint.

Convention: ``Blur`` is a true convolution with the kernel as point-spread function (PSF): blurring a
single bright pixel reproduces the kernel image centred on it. The official code applies ``nn.Conv2d``
(a correlation, i.e. the flipped kernel); for symmetric kernels such as the Gaussian the two agree.

The boundary says what lies outside the image: ``"reflect"`` mirrors it about the edge pixels (PyTorch's
``reflect`` = scipy's ``mirror``, the official ``ReflectionPad2d``), ``"circular"`` wraps around, ``"zero"``
pads with zeros. The operator is ``A = C P`` with P the padding and C a valid correlation, so
``A^T = P^T C^T``; ``P^T`` of the reflect and circular paddings folds the padded border back onto the
pixels it was copied from (scatter-add), which makes the adjoint exact for every boundary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (
    RESIDUAL_SPACES,
    LinearOperator,
    Shape,
    check_finite_float,
    check_image_shape,
    check_odd_size,
    work_dtype,
)
from .motion import MOTION_INTENSITY, MOTION_KERNEL_SIZE, motion_kernel

BOUNDARIES = ("reflect", "circular", "zero")
"""Supported boundary conditions of :class:`Blur`."""

GAUSSIAN_KERNEL_SIZE = 61
"""FlowDPS's Gaussian deblurring kernel size (``--deg_scale 61``)."""

GAUSSIAN_SIGMA = 3.0
"""FlowDPS's Gaussian blur standard deviation, in pixels."""

FFT_PINV_RTOL = 1e-3
"""Truncation of the circular blur's closed-form pseudo-inverse: frequencies whose transfer-function
magnitude is below ``FFT_PINV_RTOL`` times the largest one are treated as zero singular values (the same
as ``torch.linalg.pinv(dense, rtol=FFT_PINV_RTOL)``)."""


def validate_kernel(kernel: Tensor) -> Tensor:
    """Return ``kernel`` checked and normalised to sum 1 (a new tensor).

    Rules: a 2-D ``(kh, kw)`` tensor with odd kh and kw (so that it has a centre pixel), finite,
    non-negative (a PSF is a distribution of light) and with a positive sum. Integer or boolean kernels
    are converted to float32; floating kernels keep their dtype.
    """
    if not isinstance(kernel, Tensor):
        raise TypeError(f"kernel must be a torch.Tensor, got {type(kernel).__name__}")
    if kernel.dim() != 2:
        raise ValueError(f"kernel must be 2-D (kh, kw), got shape {tuple(kernel.shape)}")
    for name, size in (("height", kernel.shape[0]), ("width", kernel.shape[1])):
        check_odd_size(size, f"kernel {name}")
    k = kernel.detach()
    if not k.is_floating_point():
        k = k.to(torch.float32)
    bad = k[~torch.isfinite(k)]
    if bad.numel():
        raise ValueError(f"kernel contains non-finite values ({bad[0].item()})")
    if k.min() < 0:
        raise ValueError(f"kernel has negative entries (min {k.min().item():.4g}); a PSF must be >= 0")
    total = k.sum()
    if total <= 0:
        raise ValueError(f"kernel sums to {total.item():.4g}; it needs a positive sum to be normalised")
    return k / total


def _pad_index(n: int, r: int, boundary: str, device: torch.device) -> Tensor:
    """Source index of each of the ``n + 2r`` padded positions (reflect: needs r <= n - 1)."""
    i = torch.arange(-r, n + r, device=device)
    if boundary == "circular":
        return i.remainder(n)
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def _pad(x: Tensor, rh: int, rw: int, boundary: str) -> Tensor:
    if boundary == "zero":
        return F.pad(x, (rw, rw, rh, rh))
    ih = _pad_index(x.shape[-2], rh, boundary, x.device)
    iw = _pad_index(x.shape[-1], rw, boundary, x.device)
    return x.index_select(-2, ih).index_select(-1, iw)


def _pad_adjoint(y: Tensor, height: int, width: int, rh: int, rw: int, boundary: str) -> Tensor:
    """Transpose of :func:`_pad`: crop (zero) or fold the border back by scatter-add (reflect, circular)."""
    if boundary == "zero":
        return y[..., rh : rh + height, rw : rw + width]
    ih = _pad_index(height, rh, boundary, y.device)
    iw = _pad_index(width, rw, boundary, y.device)
    rows = y.new_zeros((*y.shape[:-2], height, y.shape[-1])).index_add(-2, ih, y)
    return y.new_zeros((*y.shape[:-2], height, width)).index_add(-1, iw, rows)


def _correlate_valid(xp: Tensor, k: Tensor) -> Tensor:
    """Valid cross-correlation of each plane of ``xp (…, P, Q)`` with ``k (kh, kw)`` by FFT."""
    size = xp.shape[-2:]
    c: Tensor = torch.fft.irfft2(torch.fft.rfft2(xp) * torch.fft.rfft2(k, s=size).conj(), s=size)
    return c[..., : size[0] - k.shape[0] + 1, : size[1] - k.shape[1] + 1]


def _correlate_valid_adjoint(y: Tensor, k: Tensor, size: tuple[int, int]) -> Tensor:
    """Transpose of :func:`_correlate_valid` (a full convolution), output ``(…, *size)``."""
    full: Tensor = torch.fft.irfft2(torch.fft.rfft2(y, s=size) * torch.fft.rfft2(k, s=size), s=size)
    return full


@dataclasses.dataclass(frozen=True, eq=False)
class Blur(LinearOperator):
    """Blur every channel by one point-spread function ``kernel`` with a given boundary condition.

    x: (B, C, H, W) -> y: (B, C, H, W); the kernel ``(kh, kw)`` (odd sizes, no larger than the image) is
    validated and normalised to sum 1 by :func:`validate_kernel`. Computed by FFT in float32 at least.
    ``pinv``: closed form for ``"circular"`` (Fourier inverse filter truncated at :data:`FFT_PINV_RTOL`),
    conjugate gradients on the normal equations otherwise (:meth:`LinearOperator.pinv_cg`).
    """

    kernel: Tensor = dataclasses.field(repr=False)
    boundary: str = "reflect"
    auto_residual: str = "measurement"
    """What a data term's ``"auto"`` residual means for this blur (:attr:`LinearOperator.auto_residual`): the
    official code compares ``y`` with ``A x`` directly for its convolution blurs (motion, any kernel), whose
    "adjoint" there is the identity; :func:`gaussian_blur` says ``"adjoint"``, as the paper's Gaussian task
    (a true adjoint) does."""

    def __post_init__(self) -> None:
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"boundary {self.boundary!r} is not one of {BOUNDARIES}")
        if self.auto_residual not in RESIDUAL_SPACES:
            raise ValueError(f"auto_residual {self.auto_residual!r} is not one of {RESIDUAL_SPACES}")
        object.__setattr__(self, "kernel", validate_kernel(self.kernel))

    def validate_input_shape(self, shape: Sequence[int]) -> Shape:
        shape = check_image_shape(shape, "x")
        kh, kw = self.kernel.shape
        if kh > shape[2] or kw > shape[3]:
            raise ValueError(f"kernel {kh}x{kw} is larger than the image {shape[2]}x{shape[3]} (H x W)")
        return shape

    def describe(self) -> str:
        return f"blur, kernel {self.kernel.shape[0]}x{self.kernel.shape[1]}, {self.boundary} boundary"

    def _radius(self) -> tuple[int, int]:
        return self.kernel.shape[0] // 2, self.kernel.shape[1] // 2

    def _correlation_kernel(self, like: Tensor) -> Tensor:
        # true convolution with the PSF = correlation with the flipped kernel
        return self.kernel.to(device=like.device, dtype=like.dtype).flip(-2, -1)

    def _forward(self, x: Tensor) -> Tensor:
        xw = x.to(work_dtype(x.dtype))
        rh, rw = self._radius()
        y = _correlate_valid(_pad(xw, rh, rw, self.boundary), self._correlation_kernel(xw))
        return y.to(x.dtype)

    def _adjoint(self, y: Tensor) -> Tensor:
        _, _, height, width = self.validate_input_shape(y.shape)
        yw = y.to(work_dtype(y.dtype))
        rh, rw = self._radius()
        size = (height + 2 * rh, width + 2 * rw)
        yp = _correlate_valid_adjoint(yw, self._correlation_kernel(yw), size)
        return _pad_adjoint(yp, height, width, rh, rw, self.boundary).to(y.dtype)

    def transfer_function(self, height: int, width: int, *, device: torch.device | str | None = None,
                          dtype: torch.dtype = torch.float64) -> Tensor:
        """``rfft2`` of the kernel centred at pixel (0, 0) of an ``height x width`` torus: the eigenvalues of
        the circular blur, ``A x = irfft2(rfft2(x) * T)``. Shape ``(height, width // 2 + 1)``, complex."""
        k = self.kernel.to(device=device, dtype=dtype)
        kh, kw = k.shape
        k = F.pad(k, (0, width - kw, 0, height - kh)).roll((-(kh // 2), -(kw // 2)), dims=(0, 1))
        spectrum: Tensor = torch.fft.rfft2(k)
        return spectrum

    @property
    def closed_form_pinv(self) -> bool:
        return self.boundary == "circular"

    def _pinv(self, y: Tensor) -> Tensor:
        if self.boundary != "circular":
            return self.pinv_cg(y)
        _, _, height, width = self.validate_input_shape(y.shape)
        yw = y.to(work_dtype(y.dtype))
        t = self.transfer_function(height, width, device=y.device, dtype=yw.dtype)
        magnitude = t.abs()
        keep = magnitude > FFT_PINV_RTOL * magnitude.max()
        inverse = torch.where(keep, t.conj() / torch.where(keep, magnitude, 1) ** 2, 0)
        x: Tensor = torch.fft.irfft2(torch.fft.rfft2(yw) * inverse, s=(height, width))
        return x.to(y.dtype)


def gaussian_kernel(
    kernel_size: int = GAUSSIAN_KERNEL_SIZE,
    sigma: float = GAUSSIAN_SIGMA,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Centred, normalised, separable Gaussian kernel ``(kernel_size, kernel_size)``.

    Taps ``exp(-d^2 / (2 sigma^2))`` at integer offsets ``d = -r..r`` (r = kernel_size // 2), normalised to
    sum 1: the same kernel as ``kornia.filters.get_gaussian_kernel2d`` and ``scipy.ndimage.gaussian_filter``
    with ``truncate = r / sigma``. kernel_size: odd >= 1; sigma: > 0 pixels.
    """
    kernel_size = check_odd_size(kernel_size, "kernel size")
    sigma = check_finite_float(sigma, "sigma")
    if sigma <= 0:
        raise ValueError(f"sigma {sigma} must be > 0")
    d = torch.arange(kernel_size, dtype=dtype) - kernel_size // 2
    g = torch.exp(-(d**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def gaussian_blur(
    kernel_size: int = GAUSSIAN_KERNEL_SIZE, sigma: float = GAUSSIAN_SIGMA, boundary: str = "reflect"
) -> Blur:
    """Exact centred Gaussian blur (our default for Gaussian deblurring; paper size 61, sigma 3.0); its
    ``"auto"`` residual is the adjoint, as in the paper's Gaussian-deblurring task."""
    return Blur(gaussian_kernel(kernel_size, sigma), boundary, auto_residual="adjoint")


def motion_blur(
    size: int = MOTION_KERNEL_SIZE,
    intensity: float = MOTION_INTENSITY,
    generator: torch.Generator | None = None,
    boundary: str = "reflect",
) -> Blur:
    """Blur by a random-trajectory kernel ``k`` from :func:`motion_kernel` (paper: size 61, intensity 0.5),
    applied as the official code applies its motion kernels: by correlation with ``k``, i.e. a blur whose
    point-spread function (``Blur.kernel``) is ``k`` rotated by 180 degrees. ``"auto"`` residual: the
    measurement (the official loss for motion blur is ``||y - A x||``)."""
    return Blur(motion_kernel(size, intensity, generator).flip(-2, -1), boundary)
