"""Exact image-scale test problems: Gaussian priors with closed-form rectified-flow denoisers and exact posteriors.

The derivations are in ``docs/exact_gaussian_problems.md``. Summary:

* **Prior** (:class:`GaussianImagePrior`): ``z0 ~ N(m, C)`` on a code of shape ``(C, H, W)`` (a pixel image, or
  a latent), with ``C`` diagonal in a fixed orthonormal basis: a ``C x C`` orthogonal colour (channel) basis
  ``Q`` times the unitary 2-D Fourier basis of the ``H x W`` torus (periodic boundary). Its eigenvalues are the
  ``spectrum: (C, H, W)``: ``C = U diag(lambda) U^T``. Spatially white priors (``N(m, c^2 I)``, or a colour
  covariance shared by every pixel) are the constant-spectrum case; :meth:`GaussianImagePrior.power_law` gives
  a natural-image-like stationary prior, power ``~ 1 / (f0^2 + |f|^2)^a`` times a colour covariance.
  Every action of a function of ``C`` costs two real FFTs and two ``C x C`` channel mixes: O(d log d).
* **Denoiser** (rectified flow, ``z_s = (1 - s) z0 + s eps``)::

      E[z0 | z_s] = m + (1 - s) C ((1 - s)^2 C + s^2 I)^{-1} (z_s - (1 - s) m)

  i.e. the gain ``(1 - s) lambda / ((1 - s)^2 lambda + s^2)`` per eigenvector (:meth:`GaussianImagePrior.denoise`).
* **Problem** (:class:`LinearGaussianProblem`): ``y = A D z0 + sigma_y n``, ``n ~ N(0, I)``, ``A`` a linear operator
  of the pack (``operators/``) on images, ``D`` a fixed linear decoder (:class:`PatchDecoder`) or the identity.
  The posterior of ``z0`` is ``N(mu, Sigma)``, ``Sigma^{-1} = C^{-1} + D^T A^T A D / sigma_y^2``,
  ``mu = Sigma (C^{-1} m + D^T A^T y / sigma_y^2)``; the image posterior is ``N(D mu, D Sigma D^T)``.

  How it is computed (``method``):

  - ``"closed"``: closed forms where the problem is diagonal in a known basis, no decoder: a circular blur
    (or the identity) with any prior (Fourier x colour basis); a spatially white prior with inpainting
    (per pixel) or with average-pool super-resolution (per block);
  - ``"dense"``: code dimension <= :data:`DENSE_MAX`: the precision matrix, Cholesky (exact to rounding);
  - ``"cg"``: preconditioned conjugate gradients on ``P v = b``, ``P = Sigma^{-1}``, with
    ``B = (C^{-1} + G_hat / sigma_y^2)^{-1} ~ P^{-1}``, ``G_hat`` a per-frequency ``C x C`` approximation of
    ``G = D^T A^T A D`` in the prior's basis (the Fourier diagonal of ``A^T A`` in pixel space, exact for circular
    blurs, the identity and the separable SR operators; the measured symbol of ``G`` on latents, exact when ``A``
    commutes with shifts by the patch size), split by the mask for inpainting (:attr:`LinearGaussianProblem.
    preconditioner`). The per-pixel std comes from perturb-and-MAP draws (exact posterior samples, one CG solve
    each): with ``K`` draws around the exact mean, the per-pixel variance estimate is ``chi^2_K / K`` times the
    truth, so the std's relative standard error is ``1 / sqrt(2 K)`` per pixel (:attr:`PosteriorStd.rel_se`).

Conventions: everything is float64 by default; shapes ``(B, C, H, W)`` for batches of codes or images, ``(1, ...)``
for one measurement; randomness only from explicit ``torch.Generator`` arguments (CPU). ``decoder=None`` means
pixel space (the code is the image). Used by ``tests/samplers/test_exact_gaussian.py`` and
``benchmarks/posterior_quality.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:   # mypy checks operators/ and samplers/ as top-level packages, where '..' would leave them
    from operators import (  # noqa: TID251  (type checking only; the pack imports relatively, below)
        AvgPoolSR,
        BicubicSR,
        Blur,
        Composed,
        Identity,
        Inpainting,
        bicubic_matrices,
    )
else:
    from ..operators import AvgPoolSR, BicubicSR, Blur, Composed, Identity, Inpainting, bicubic_matrices

__all__ = [
    "CG_MAX_ITER",
    "CG_TOL",
    "DENSE_MAX",
    "DRAW_TOL",
    "GaussianImagePrior",
    "LinearGaussianProblem",
    "Observation",
    "PatchDecoder",
    "PosteriorStd",
    "SolveInfo",
    "equicorrelated",
    "fourier_normal_diagonal",
    "pcg",
]

DENSE_MAX = 4096
"""Largest code dimension for which ``method="dense"`` (explicit precision matrix and Cholesky) is allowed."""

CG_TOL = 1e-10
"""Default stopping rule of the posterior-mean CG solve: ``||P v - b|| <= CG_TOL ||b||`` (relative residual of the
precision system; measured relative error of the mean: 1e-9 to 3e-8 on the 64 px problems,
docs/exact_gaussian_problems.md §4.3)."""

DRAW_TOL = 1e-8
"""Default stopping rule of the perturb-and-MAP solves (their error is far below the Monte-Carlo error)."""

CG_MAX_ITER = 5000
"""Default iteration cap of the posterior CG solves (a solve that reaches it without converging raises
RuntimeError: its result would not be exact)."""

DEFAULT_DRAWS = 64
"""Default number of perturb-and-MAP draws for the per-pixel std (relative standard error 1/sqrt(128) = 8.8 %
per pixel)."""

Shape3 = tuple[int, int, int]


class LinearMap(Protocol):
    """What a problem needs of its operator ``A`` (an ``operators.LinearOperator``, or any object with these)."""

    def forward(self, x: Tensor) -> Tensor: ...

    def adjoint(self, y: Tensor) -> Tensor: ...


def _f64(x: Tensor | float, shape: Shape3 | None = None) -> Tensor:
    t = x.detach().to(torch.float64) if isinstance(x, Tensor) else torch.tensor(float(x), dtype=torch.float64)
    if shape is None:
        return t.clone()
    c = shape[0]
    if t.ndim == 1:                                      # one value per channel
        t = t.view(c, 1, 1)
    return t.expand(shape).clone()


def _frequencies(height: int, width: int) -> Tensor:
    """(H, W) squared radial frequency ``|f|^2`` in cycles per pixel (``fftfreq`` on both axes), float64."""
    fh = torch.fft.fftfreq(height, dtype=torch.float64)
    fw = torch.fft.fftfreq(width, dtype=torch.float64)
    squared: Tensor = fh[:, None] ** 2 + fw[None, :] ** 2
    return squared


def _half_weights(height: int, width: int) -> Tensor:
    """(H, W//2+1) weights that turn a sum over the ``rfft2`` half plane of a symmetric function into the sum
    over the full ``H x W`` frequency grid (1 for column 0 and, for even W, the Nyquist column; 2 otherwise)."""
    w = torch.full((width // 2 + 1,), 2.0, dtype=torch.float64)
    w[0] = 1.0
    if width % 2 == 0:
        w[-1] = 1.0
    return w.expand(height, -1)


def _colour_basis(colour_cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (C,) and orthonormal eigenvectors (C, C) (columns) of a symmetric positive definite matrix."""
    k = _f64(colour_cov)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"colour_cov must be a square (C, C) matrix, got shape {tuple(k.shape)}")
    if not torch.allclose(k, k.T, rtol=1e-12, atol=1e-12 * float(k.abs().max())):
        raise ValueError("colour_cov must be symmetric")
    values, vectors = torch.linalg.eigh(k)
    if float(values.min()) <= 0:
        raise ValueError(f"colour_cov must be positive definite, smallest eigenvalue {float(values.min()):.3g}")
    return values, vectors


def equicorrelated(channels: int, std: float, correlation: float) -> Tensor:
    """``std^2 ((1 - rho) I + rho 11^T)``: (C, C) colour covariance with equal variances and correlations."""
    eye = torch.eye(channels, dtype=torch.float64)
    return std**2 * ((1 - correlation) * eye + correlation * torch.ones(channels, channels, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- the prior


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianImagePrior:
    """``N(mean, C)`` on codes ``(C, H, W)``, ``C = U diag(spectrum) U^T`` with ``U`` = colour basis x 2-D DFT.

    mean: (C, H, W) float64. colour: (C, C) orthogonal, column ``c`` the channel mix of eigen-channel ``c``.
    spectrum: (C, H, W) float64, > 0, the eigenvalue of ``colour[:, c]`` times the unitary Fourier mode
    ``(kh, kw)`` (FFT index order); it must be symmetric, ``spectrum[c, k] = spectrum[c, -k]`` (mod H, W), so
    that ``C`` is real. Build with :meth:`white` or :meth:`power_law`.
    """

    mean: Tensor
    colour: Tensor
    spectrum: Tensor

    def __post_init__(self) -> None:
        spectrum = _f64(self.spectrum)
        if spectrum.ndim != 3:
            raise ValueError(f"spectrum must be (C, H, W), got shape {tuple(spectrum.shape)}")
        shape = tuple(spectrum.shape)
        colour = _f64(self.colour)
        c = shape[0]
        if tuple(colour.shape) != (c, c):
            raise ValueError(f"colour must be ({c}, {c}), got {tuple(colour.shape)}")
        if not torch.allclose(colour.T @ colour, torch.eye(c, dtype=torch.float64), atol=1e-10):
            raise ValueError("colour must be an orthogonal matrix (orthonormal columns)")
        if not bool(torch.isfinite(spectrum).all()) or float(spectrum.min()) <= 0:
            raise ValueError("spectrum must be finite and > 0 (a positive definite covariance)")
        flipped = spectrum.flip(-2, -1).roll((1, 1), dims=(-2, -1))          # spectrum[c, -k]
        if not torch.allclose(spectrum, flipped, rtol=1e-10, atol=0):
            raise ValueError("spectrum must be symmetric under k -> -k (a real covariance)")
        object.__setattr__(self, "spectrum", spectrum)
        object.__setattr__(self, "colour", colour)
        object.__setattr__(self, "mean", _f64(self.mean, (shape[0], shape[1], shape[2])))

    # ---- constructors -----------------------------------------------------------------------------------
    @classmethod
    def from_colour_spectrum(cls, shape: Shape3, colour_cov: Tensor, spatial: Tensor | None,
                             mean: Tensor | float = 0.0) -> GaussianImagePrior:
        """``colour_cov (x) S``: pixel covariance ``colour_cov`` (C, C) at every pixel, spatial correlation with
        the (H, W) spectrum ``spatial`` normalised to mean 1 (unit per-pixel variance; ``None``: white)."""
        c, h, w = shape
        kappa, q = _colour_basis(colour_cov)
        if kappa.shape[0] != c:
            raise ValueError(f"colour_cov is {kappa.shape[0]}x{kappa.shape[0]} for {c} channels")
        s = torch.ones(h, w, dtype=torch.float64) if spatial is None else _f64(spatial)
        s = s / s.mean()
        return cls(_f64(mean), q, kappa[:, None, None] * s[None])

    @classmethod
    def white(cls, shape: Shape3, std: float = 1.0, mean: Tensor | float = 0.0, *,
              colour_cov: Tensor | None = None) -> GaussianImagePrior:
        """``N(mean, std^2 I)`` (or, with ``colour_cov``, the same (C, C) covariance at every pixel, independent
        pixels). shape: (C, H, W)."""
        cov = std**2 * torch.eye(shape[0], dtype=torch.float64) if colour_cov is None else colour_cov
        return cls.from_colour_spectrum(shape, cov, None, mean)

    @classmethod
    def power_law(cls, shape: Shape3, std: float = 0.5, *, exponent: float = 1.0, f0: float = 0.01,
                  correlation: float = 0.8, colour_cov: Tensor | None = None,
                  mean: Tensor | float = 0.0) -> GaussianImagePrior:
        """Stationary prior with power ``~ 1 / (f0^2 + |f|^2)^exponent`` (f in cycles per pixel, periodic), per-pixel
        covariance ``colour_cov`` (default: every channel of std ``std``, pairwise ``correlation``).

        exponent 1 is the ``1/f^2`` power spectrum of natural images; ``f0`` sets the correlation length
        (about ``1 / (2 pi f0)`` pixels).
        """
        c, h, w = shape
        if not (f0 > 0 and exponent >= 0):
            raise ValueError(f"power_law needs f0 > 0 and exponent >= 0, got f0={f0}, exponent={exponent}")
        spatial = (f0**2 + _frequencies(h, w)) ** (-exponent)
        cov = equicorrelated(c, std, correlation) if colour_cov is None else colour_cov
        return cls.from_colour_spectrum(shape, cov, spatial, mean)

    # ---- shapes and the basis -----------------------------------------------------------------------------
    @property
    def shape(self) -> Shape3:
        """(C, H, W) of one code."""
        return tuple(self.spectrum.shape)  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def is_white(self) -> bool:
        """True when every eigen-channel's spectrum is constant (spatially white; colours may correlate)."""
        s = self.spectrum
        return bool(torch.allclose(s, s[:, :1, :1].expand_as(s), rtol=1e-12, atol=0))

    @property
    def colour_eigenvalues(self) -> Tensor:
        """(C,) the mean eigenvalue of each eigen-channel (its per-pixel variance)."""
        return self.spectrum.mean((-2, -1))

    def half(self, values: Tensor) -> Tensor:
        """The ``rfft2`` half plane ``(..., W//2+1)`` of a full (..., H, W) symmetric spectrum."""
        return values[..., : self.shape[2] // 2 + 1]

    def to_eigen(self, x: Tensor) -> Tensor:
        """Coordinates of ``x: (B, C, H, W)`` in the eigenbasis: (B, C, H, W//2+1) complex (unitary rfft2 of
        ``Q^T x``)."""
        xc = torch.einsum("dc,bdhw->bchw", self.colour.to(x.dtype), x)
        coeffs: Tensor = torch.fft.rfft2(xc, norm="ortho")
        return coeffs

    def from_eigen(self, coeffs: Tensor) -> Tensor:
        """Inverse of :meth:`to_eigen`: (B, C, H, W//2+1) complex -> (B, C, H, W) real."""
        xc = torch.fft.irfft2(coeffs, s=self.shape[1:], norm="ortho")
        return torch.einsum("dc,bchw->bdhw", self.colour.to(xc.dtype), xc)

    def apply(self, x: Tensor, values: Tensor) -> Tensor:
        """``U diag(values) U^T x``. x: (B, C, H, W) float; values: full spectrum (C, H, W) or (B, C, H, W)
        (real, symmetric), or a half-plane (..., W//2+1) tensor (complex allowed, Hermitian-consistent)."""
        if values.shape[-1] == self.shape[2] and self.shape[2] != self.shape[2] // 2 + 1:
            values = self.half(values)
        return self.from_eigen(self.to_eigen(x) * values.to(x.device))

    def covariance(self, x: Tensor) -> Tensor:
        """``C x``. x: (B, C, H, W)."""
        return self.apply(x, self.spectrum)

    def precision(self, x: Tensor) -> Tensor:
        """``C^{-1} x``."""
        return self.apply(x, 1.0 / self.spectrum)

    def sqrt_covariance(self, x: Tensor) -> Tensor:
        """``C^{1/2} x`` (the symmetric square root)."""
        return self.apply(x, self.spectrum.sqrt())

    # ---- what the samplers use ------------------------------------------------------------------------
    def denoise(self, z: Tensor, sigma: Tensor | float) -> Tensor:
        """Exact ``E[z0 | z_s = z]`` for ``z_s = (1 - s) z0 + s eps`` (module docstring).

        z: (B, C, H, W) any float dtype; sigma: float, 0-d or (B,) tensor in [0, 1] (one level per sample).
        Computed in float64 and returned in z's dtype and device, differentiable in ``z`` (PSLD back-propagates
        through it). O(d log d).
        """
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        if s.numel() not in (1, z.shape[0]):
            raise ValueError(f"sigma must be a number or one value per sample ({z.shape[0]}), got {s.numel()}")
        s = s.view(-1, 1, 1, 1)
        a = 1.0 - s
        lam = self.half(self.spectrum)[None]
        gain = a * lam / (a * a * lam + s * s)                                 # (B or 1, C, H, W//2+1)
        z64 = z.to(torch.float64)                                              # differentiable (PSLD)
        mean = self.mean[None].to(z.device)
        return (mean + self.apply(z64 - a * mean, gain)).to(z.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, C, H, W) float64 exact draws ``m + C^{1/2} xi``."""
        xi = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        return self.mean[None] + self.sqrt_covariance(xi)

    def pixel_variance(self) -> Tensor:
        """(C,) marginal variance of each channel at every pixel (the diagonal of the colour covariance)."""
        return (self.colour**2) @ self.colour_eigenvalues

    def dense_covariance(self) -> Tensor:
        """(d, d) covariance matrix in row-major (C, H, W) order (small codes only, d <= :data:`DENSE_MAX`)."""
        if self.dim > DENSE_MAX:
            raise ValueError(f"code dimension {self.dim} exceeds DENSE_MAX={DENSE_MAX}")
        eye = torch.eye(self.dim, dtype=torch.float64).view(self.dim, *self.shape)
        return self.covariance(eye).reshape(self.dim, -1).T.contiguous()


# ---------------------------------------------------------------------------------------------- decoder


def _dct_1d(n: int) -> Tensor:
    """(n, n) orthonormal DCT-II basis, row p = frequency p."""
    u = torch.arange(n, dtype=torch.float64)
    p = torch.arange(n, dtype=torch.float64)[:, None]
    basis = torch.cos(math.pi * (u + 0.5) * p / n) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis


def _colour_rows(channels: int) -> Tensor:
    """Orthonormal colour directions (rows): luma and two chroma directions for 3 channels, else the identity."""
    if channels == 3:
        return torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, -1.0], [1.0, -2.0, 1.0]], dtype=torch.float64) / \
            torch.tensor([[math.sqrt(3.0)], [math.sqrt(2.0)], [math.sqrt(6.0)]], dtype=torch.float64)
    return torch.eye(channels, dtype=torch.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class PatchDecoder:
    """A fixed linear "decoder" ``x = D z``: each latent pixel's ``latent_channels`` values become one
    ``factor x factor`` patch of a ``image_channels`` image (a stride-``factor`` transposed convolution).

    The ``latent_channels`` patch patterns are ``gain`` times orthonormal vectors of the patch space: the
    lowest-frequency products (colour direction) x (2-D DCT pattern), luma first and chroma counted as two
    frequency steps, mixed by a fixed random orthogonal ``latent_channels x latent_channels`` matrix (seeded),
    so that every latent channel touches every colour. Hence ``D^T D = gain^2 I``: ``D^+ = D^T / gain^2`` (the
    linear analogue of a VAE encoder, used for PSLD). z: (B, Cz, h, w) -> x: (B, 3, factor h, factor w).
    """

    latent_channels: int = 16
    factor: int = 8
    image_channels: int = 3
    gain: float = math.sqrt(3.0)
    """Scale of the patterns; ``sqrt(3)`` gives unit-variance latents of 16 channels at 8x an image variance of
    ``gain^2 * 16 / 192 = 0.25`` (pixel std 0.5)."""
    seed: int = 0
    weight: Tensor = dataclasses.field(init=False, repr=False)
    """(Cz, C, factor, factor) float64: the transposed-convolution kernel."""

    def __post_init__(self) -> None:
        cz, f, ci = self.latent_channels, self.factor, self.image_channels
        if not (1 <= cz <= ci * f * f):
            raise ValueError(f"latent_channels must be in 1..{ci * f * f} (the patch size), got {cz}")
        colours, dct = _colour_rows(ci), _dct_1d(f)
        candidates = sorted((p + q + 2 * c, c, p + q, p, q) for c in range(ci) for p in range(f) for q in range(f))
        columns = [torch.einsum("c,u,v->cuv", colours[c], dct[p], dct[q]).reshape(-1)
                   for _, c, _, p, q in candidates[:cz]]
        basis = torch.stack(columns, dim=1)                                     # (ci f f, cz) orthonormal
        g = torch.Generator().manual_seed(self.seed)
        mix, r = torch.linalg.qr(torch.randn(cz, cz, generator=g, dtype=torch.float64))
        mix = mix * torch.sign(torch.diagonal(r))[None]
        weight = (self.gain * basis @ mix).T.reshape(cz, ci, f, f)
        object.__setattr__(self, "weight", weight)

    def image_shape(self, code_shape: Shape3) -> Shape3:
        c, h, w = code_shape
        if c != self.latent_channels:
            raise ValueError(f"the decoder takes {self.latent_channels} latent channels, got {c}")
        return (self.image_channels, h * self.factor, w * self.factor)

    def forward(self, z: Tensor) -> Tensor:
        """``D z``: (B, Cz, h, w) -> (B, C, factor h, factor w), differentiable, z's dtype."""
        b, _, h, w = z.shape
        f = self.factor
        x = torch.einsum("bkhw,kcuv->bchuwv", z, self.weight.to(device=z.device, dtype=z.dtype))
        return x.reshape(b, self.image_channels, h * f, w * f)

    def adjoint(self, x: Tensor) -> Tensor:
        """``D^T x``: (B, C, factor h, factor w) -> (B, Cz, h, w)."""
        b, c, hf, wf = x.shape
        f = self.factor
        patches = x.reshape(b, c, hf // f, f, wf // f, f)
        return torch.einsum("bchuwv,kcuv->bkhw", patches, self.weight.to(device=x.device, dtype=x.dtype))

    def pinv(self, x: Tensor) -> Tensor:
        """``D^+ x = D^T x / gain^2`` (exact: ``D^T D = gain^2 I``); ``pinv(forward(z)) == z``."""
        return self.adjoint(x) / self.gain**2

    __call__ = forward


# ----------------------------------------------------------------------------------------- linear algebra


class SolveInfo(NamedTuple):
    """How a batched (P)CG solve ended."""

    iterations: int
    """Iterations of the slowest sample."""
    rel_residual: float
    """Largest final ``||H u - b|| / ||b||`` over the batch."""
    converged: bool


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.ndim - 1)))


def pcg(matvec: Callable[[Tensor], Tensor], rhs: Tensor, precondition: Callable[[Tensor], Tensor] | None = None,
        *, tol: float = CG_TOL, max_iter: int = CG_MAX_ITER) -> tuple[Tensor, SolveInfo]:
    """Solve ``H u = rhs`` for symmetric positive definite ``H`` by batched preconditioned conjugate gradients.

    rhs: (B, ...), each sample its own system and its own stop ``||r|| <= tol ||rhs||``; ``precondition``
    applies ``M^{-1}`` (symmetric positive definite), identity when None. Returns ``(u, SolveInfo)``.
    """
    precondition = precondition or (lambda r: r)
    u = torch.zeros_like(rhs)
    r = rhs.clone()
    bnorm = _dot(rhs, rhs).sqrt()
    z = precondition(r)
    p = z.clone()
    rz = _dot(r, z)
    iterations = 0
    for _ in range(max_iter):
        active = _dot(r, r).sqrt() > tol * bnorm
        if not bool(active.any()):
            break
        iterations += 1
        hp = matvec(p)
        php = _dot(p, hp)
        alpha = torch.where(active, rz / torch.where(active, php, torch.ones_like(php)), torch.zeros_like(php))
        u = u + alpha * p
        r = r - alpha * hp
        z = precondition(r)
        rz_new = _dot(r, z)
        beta = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = z + beta * p
        rz = torch.where(active, rz_new, rz)
    rel = (_dot(r, r).sqrt() / bnorm.clamp_min(torch.finfo(rhs.dtype).tiny)).flatten()
    worst = float(rel.max()) if rel.numel() else 0.0
    return u, SolveInfo(iterations, worst, worst <= tol)


# ------------------------------------------------------------------------------------ Fourier diagonals


def _dft(n: int) -> Tensor:
    """(n, n) unitary DFT synthesis matrix, column k = exp(2 pi i k u / n) / sqrt(n)."""
    u = torch.arange(n, dtype=torch.float64)
    return torch.exp(2j * math.pi * torch.outer(u, u) / n) / math.sqrt(n)


def _avgpool_matrix(n: int, factor: int) -> Tensor:
    return torch.kron(torch.eye(n // factor, dtype=torch.float64),
                      torch.full((1, factor), 1.0 / factor, dtype=torch.float64))


def _axis_gain(matrix: Tensor) -> Tensor:
    """(n,) ``||A_1 phi_k||^2`` for the unitary Fourier vectors phi_k of a 1-D operator matrix (m, n)."""
    return (matrix.to(torch.complex128) @ _dft(matrix.shape[1])).abs().square().sum(0)


def fourier_normal_diagonal(operator: object, shape: Shape3) -> Tensor | float | None:
    """The diagonal of ``F A^T A F^*`` (unitary 2-D DFT, same for every channel): (H, W) tensor, a number, or
    ``None`` when no formula is known for this operator.

    Exact for the identity, circular blurs (``|T|^2``) and the separable SR operators (product of the two
    axes' ``||A_1 phi_k||^2``), and for inpainting (the mask's mean: ``|phi_k|^2 = 1 / N`` at every pixel). A
    reflect/zero blur gets its circular ``|T|^2`` and a composition the product of its parts' diagonals: both
    approximations, which is all a preconditioner needs.
    """
    _, h, w = shape
    if isinstance(operator, Identity):
        return 1.0
    if isinstance(operator, Blur):
        return _full_from_half(operator.transfer_function(h, w).abs().square(), w)
    if isinstance(operator, AvgPoolSR | BicubicSR):
        f = operator.factor
        if isinstance(operator, AvgPoolSR):
            mh, mw = _avgpool_matrix(h, f), _avgpool_matrix(w, f)
        else:
            mh, mw = bicubic_matrices(h, f)[0], bicubic_matrices(w, f)[0]
        return torch.outer(_axis_gain(mh), _axis_gain(mw))
    if isinstance(operator, Inpainting) and operator.mask.shape[0] == 1:
        return float(operator.mask.to(torch.float64).mean())
    if isinstance(operator, Composed):
        outer = fourier_normal_diagonal(operator.outer, shape)
        inner = fourier_normal_diagonal(operator.inner, shape)
        if outer is None or inner is None:
            return None
        # outer acts on the inner's output; for a same-size inner (blur, mask) the product is the circulant
        # approximation; a size-changing inner has no such simple rule
        if isinstance(operator.inner, Blur | Inpainting | Identity):
            return outer * inner
        return None
    return None


def _full_from_half(half: Tensor, width: int) -> Tensor:
    """Full (H, W) symmetric spectrum from its rfft2 half plane (H, W//2+1)."""
    h = half.shape[0]
    full = torch.empty(h, width, dtype=half.dtype)
    n_half = width // 2 + 1
    full[:, :n_half] = half
    if width > n_half:                                        # columns W//2+1..W-1 mirror columns W-k
        cols = torch.arange(n_half, width)
        rows = (-torch.arange(h)) % h
        full[:, n_half:] = half[rows][:, (width - cols)]
    return full


@dataclasses.dataclass(frozen=True, eq=False)
class _Preconditioner:
    """``B r = M0 C M0 r + M1 F M1 r`` (without a split: ``F r``), ``F`` one ``C x C`` matrix per frequency in the
    prior's eigenbasis. Symmetric positive definite: each term is a compression of one."""

    prior: GaussianImagePrior
    inverse: Tensor
    """(H, W//2+1, C, C) complex: ``F`` per frequency."""
    split: Tensor | None
    """(1, 1, h, w) float 0/1: the code pixels ``M0`` that no measurement reaches; ``None``: no split."""

    def fourier(self, r: Tensor) -> Tensor:
        coeffs = self.prior.to_eigen(r)                                           # (B, C, H, Wh)
        return self.prior.from_eigen(torch.einsum("hwcd,bdhw->bchw", self.inverse, coeffs))

    def __call__(self, r: Tensor) -> Tensor:
        if self.split is None:
            return self.fourier(r)
        m0 = self.split
        m1 = 1.0 - m0
        return m0 * self.prior.covariance(m0 * r) + m1 * self.fourier(m1 * r)


def _check_converged(info: SolveInfo, what: str, tol: float) -> None:
    if not info.converged:
        raise RuntimeError(f"CG for the {what} stopped after {info.iterations} iterations at a relative residual "
                           f"of {info.rel_residual:.3g} > tol {tol:g}: the result would not be exact (raise "
                           f"max_iter)")


# ----------------------------------------------------------------------------------------------- problem


class Observation(NamedTuple):
    """A simulated problem instance."""

    z: Tensor
    """(1, C, h, w) the true code, drawn from the prior."""
    x: Tensor
    """(1, 3, H, W) the true image ``D z`` (= ``z`` in pixel space)."""
    y: Tensor
    """(1, ...) the measurement ``A x + sigma_y n``."""


class PosteriorStd(NamedTuple):
    """The per-pixel posterior standard deviation of the image ``x = D z0`` and how it was obtained."""

    std: Tensor
    """(C, H, W) float64."""
    method: str
    """``"closed"``, ``"dense"`` or ``"cg"`` (perturb-and-MAP)."""
    n_draws: int
    """Perturb-and-MAP draws (0 for the exact methods)."""
    rel_se: float
    """Relative standard error of each pixel's std, ``1 / sqrt(2 K)`` for K draws around the exact mean (0 for the
    exact methods). A region average of the variance has a much smaller error (pixels average out)."""
    draws: Tensor | None
    """(K, C, H, W) the draws' image deviations from the exact mean ``D (z_k - mu)`` (``None`` when exact)."""
    solve: SolveInfo | None


@dataclasses.dataclass(frozen=True, eq=False)
class LinearGaussianProblem:
    """``y = A D z0 + sigma_y n``: prior ``z0 ~`` :class:`GaussianImagePrior`, a linear ``operator`` A on images
    (an ``operators.LinearOperator``, or any object with ``forward`` and ``adjoint``), Gaussian noise of std
    ``sigma_y`` (on the scale of ``A x``), an optional linear ``decoder`` D (:class:`PatchDecoder`, or any object
    with ``forward``, ``adjoint`` and ``image_shape``); ``None`` is pixel space (module docstring)."""

    prior: GaussianImagePrior
    operator: LinearMap
    sigma_y: float
    decoder: PatchDecoder | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma_y) and self.sigma_y > 0):
            raise ValueError(f"sigma_y must be > 0, got {self.sigma_y}")
        object.__setattr__(self, "sigma_y", float(self.sigma_y))

    # ---- the maps -------------------------------------------------------------------------------------
    @property
    def code_shape(self) -> Shape3:
        return self.prior.shape

    @property
    def image_shape(self) -> Shape3:
        return self.code_shape if self.decoder is None else self.decoder.image_shape(self.code_shape)

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        return tuple(self.operator.output_shape((1, *self.image_shape))) if hasattr(
            self.operator, "output_shape") else tuple(self.observe(self.prior.mean[None]).shape)

    @property
    def measurement_support(self) -> Tensor:
        """(1, ...) bool: the measurement entries whose row of ``A`` is not zero (all of them, except the
        missing pixels of inpainting, which hold pure noise: ``A x`` is 0 there whatever ``x``)."""
        support = torch.ones(self.measurement_shape, dtype=torch.bool)
        if isinstance(self.operator, Inpainting):
            support = support & (self.operator.mask > 0)
        return support

    @property
    def measurement_size(self) -> int:
        """m, the number of measurement entries that depend on ``x`` (:attr:`measurement_support`)."""
        return int(self.measurement_support.sum())

    def image(self, z: Tensor) -> Tensor:
        """``D z``: (B, C, h, w) codes -> (B, 3, H, W) images (z itself in pixel space)."""
        return z if self.decoder is None else self.decoder.forward(z)

    def image_adjoint(self, x: Tensor) -> Tensor:
        return x if self.decoder is None else self.decoder.adjoint(x)

    def observe(self, z: Tensor) -> Tensor:
        """``A D z`` (no noise)."""
        return self.operator.forward(self.image(z))

    def observe_adjoint(self, r: Tensor) -> Tensor:
        """``D^T A^T r``."""
        return self.image_adjoint(self.operator.adjoint(r))

    def normal(self, v: Tensor) -> Tensor:
        """``G v = D^T A^T A D v`` on codes (B, C, h, w)."""
        return self.observe_adjoint(self.observe(v))

    def measure(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``A D z + sigma_y n``: (1, ...) float64 measurement of the code ``z: (1, C, h, w)``."""
        clean = self.observe(z.to(torch.float64))
        return clean + self.sigma_y * torch.randn(clean.shape, generator=generator, dtype=torch.float64)

    def simulate(self, generator: torch.Generator | None = None) -> Observation:
        """A problem instance: ``z ~ prior``, then ``y`` (two draws from ``generator``, in that order)."""
        z = self.prior.sample(1, generator)
        return Observation(z, self.image(z), self.measure(z, generator))

    # ---- the precision system ------------------------------------------------------------------------
    def precision(self, v: Tensor) -> Tensor:
        """``P v = C^{-1} v + D^T A^T A D v / sigma_y^2``: the posterior precision on codes (B, C, h, w)."""
        return self.prior.precision(v) + self.normal(v) / self.sigma_y**2

    @functools.cached_property
    def preconditioner(self) -> _Preconditioner:
        """The approximation ``B ~ P^{-1}`` used by CG (docs/exact_gaussian_problems.md, "Preconditioning").

        ``F = (C^{-1} + G_hat / sigma_y^2)^{-1}`` with ``G_hat`` a latent/pixel shift-invariant approximation of
        ``G`` (one ``C x C`` matrix per frequency in the prior's colour basis): the Fourier diagonal of ``A^T A``
        in pixel space (:func:`fourier_normal_diagonal`), the response of ``G`` to channel impulses at the
        centre of the code otherwise. Inpainting splits the code into the pixels without any measured image
        pixel (``M0``), where the posterior precision is the prior's, and the rest (``M1``):
        ``B = M0 C M0 + M1 F M1`` with ``G_hat`` the unmasked ``D^T D`` times the rest's mean known fraction.
        """
        op, prior = self.operator, self.prior
        split = None
        if isinstance(op, Inpainting) and op.mask.shape[0] == 1:
            known = op.mask.to(torch.float64)
            if self.decoder is not None:
                known = F.avg_pool2d(known, self.decoder.factor)
            split = (known == 0).to(torch.float64)
            rest = known[split == 0]
            fraction = float(rest.mean()) if rest.numel() else 1.0
            symbol = fraction * self._impulse_symbol(lambda v: self.image_adjoint(self.image(v)))
            if not bool(split.any()):
                split = None
        else:
            beta = fourier_normal_diagonal(op, self.code_shape) if self.decoder is None else None
            if beta is not None:
                c, h, w = self.code_shape
                beta_half = prior.half(torch.as_tensor(beta, dtype=torch.float64).expand(h, w))
                symbol = beta_half[..., None, None] * torch.eye(c, dtype=torch.complex128)
            else:
                symbol = self._impulse_symbol(self.normal)
        lam = prior.half(prior.spectrum).permute(1, 2, 0)                       # (H, Wh, C)
        matrix = torch.diag_embed((1.0 / lam).to(torch.complex128)) + symbol / self.sigma_y**2
        return _Preconditioner(prior, torch.linalg.inv(matrix), split)

    def _impulse_symbol(self, normal: Callable[[Tensor], Tensor]) -> Tensor:
        """(H, W//2+1, C, C) complex: the Fourier symbol of a code-shift-invariant map, from its responses to one
        impulse per channel at the centre of the code, in the prior's colour eigenbasis (exact when the map is
        shift-invariant on the periodic code grid)."""
        c, h, w = self.code_shape
        impulses = torch.zeros(c, c, h, w, dtype=torch.float64)
        impulses[torch.arange(c), torch.arange(c), h // 2, w // 2] = 1.0
        response = normal(impulses).roll((-(h // 2), -(w // 2)), dims=(-2, -1))   # (C_in, C_out, H, W)
        symbol = torch.fft.rfft2(response).permute(2, 3, 1, 0)                      # (H, Wh, C_out, C_in)
        q = self.prior.colour.to(torch.complex128)
        symbol = q.T @ symbol @ q
        # a map that is not exactly shift-invariant (reflect boundaries, masks) gives a symbol that need not be
        # Hermitian positive semi-definite: keep its nearest one, so that the preconditioner stays SPD
        symbol = 0.5 * (symbol + symbol.mH)
        values, vectors = torch.linalg.eigh(symbol)
        nearest: Tensor = (vectors * values.clamp_min(0).to(vectors.dtype)[..., None, :]) @ vectors.mH
        return nearest

    def solve(self, rhs: Tensor, *, tol: float = CG_TOL, max_iter: int = CG_MAX_ITER,
              precondition: bool = True) -> tuple[Tensor, SolveInfo]:
        """``P^{-1} rhs`` by :func:`pcg` (rhs: (B, C, h, w) codes), preconditioned by :attr:`preconditioner`."""
        return pcg(self.precision, rhs, self.preconditioner if precondition else None, tol=tol,
                   max_iter=max_iter)

    # ---- the posterior --------------------------------------------------------------------------------
    @property
    def closed_form(self) -> str | None:
        """Which closed form applies: ``"fourier"`` (circular blur or identity, any prior), ``"pixel"`` (white
        prior, inpainting with one mask), ``"block"`` (white prior, average-pool SR), or ``None``; always
        ``None`` with a decoder."""
        if self.decoder is not None:
            return None
        op = self.operator
        if isinstance(op, Identity) or (isinstance(op, Blur) and op.boundary == "circular"):
            return "fourier"
        if self.prior.is_white:
            if isinstance(op, Inpainting) and op.mask.shape[0] == 1:
                return "pixel"
            if isinstance(op, AvgPoolSR):
                return "block"
        return None

    def _method(self, method: str) -> str:
        if method == "auto":
            if self.closed_form is not None:
                return "closed"
            return "dense" if self.prior.dim <= DENSE_MAX else "cg"
        if method not in ("closed", "dense", "cg"):
            raise ValueError(f"method must be 'auto', 'closed', 'dense' or 'cg', got {method!r}")
        if method == "closed" and self.closed_form is None:
            raise ValueError("no closed form for this problem (see LinearGaussianProblem.closed_form)")
        if method == "dense" and self.prior.dim > DENSE_MAX:
            raise ValueError(f"code dimension {self.prior.dim} exceeds DENSE_MAX={DENSE_MAX}")
        return method

    def posterior_mean(self, y: Tensor, *, method: str = "auto", tol: float = CG_TOL,
                       max_iter: int = CG_MAX_ITER) -> Tensor:
        """(1, C, h, w) float64 exact posterior mean of the code (the image's is :meth:`image` of it).

        y: (1, ...) measurement. ``method``: ``"auto"`` (closed form, else dense when small, else CG),
        ``"closed"``, ``"dense"`` or ``"cg"``. CG stops at ``||P v - b|| <= tol ||b||``.
        """
        return self.posterior_mean_info(y, method=method, tol=tol, max_iter=max_iter)[0]

    def posterior_mean_info(self, y: Tensor, *, method: str = "auto", tol: float = CG_TOL,
                            max_iter: int = CG_MAX_ITER) -> tuple[Tensor, SolveInfo | None]:
        """:meth:`posterior_mean` and the CG record (``None`` for the exact methods)."""
        method = self._method(method)
        m = self.prior.mean[None]
        residual = y.to(torch.float64) - self.observe(m)
        if method == "closed":
            return self._closed_mean(residual), None
        rhs = self.observe_adjoint(residual) / self.sigma_y**2               # P (mu - m) = D^T A^T (y - A D m) / s2
        if method == "dense":
            precision, _ = self._dense_precision()
            delta = torch.cholesky_solve(rhs.reshape(1, -1).T, torch.linalg.cholesky(precision)).T
            return m + delta.reshape(1, *self.code_shape), None
        delta, info = self.solve(rhs, tol=tol, max_iter=max_iter)
        _check_converged(info, "posterior mean", tol)
        return m + delta, info

    def posterior_std(self, *, method: str = "auto", n_draws: int = DEFAULT_DRAWS,
                      generator: torch.Generator | None = None, tol: float = DRAW_TOL,
                      max_iter: int = CG_MAX_ITER) -> PosteriorStd:
        """Per-pixel posterior std of the image (it does not depend on ``y``).

        ``method``: ``"auto"``, ``"closed"``, ``"dense"`` (exact) or ``"cg"``: ``n_draws`` perturb-and-MAP draws
        (:meth:`posterior_deviations`) from ``generator``, relative standard error ``1 / sqrt(2 n_draws)`` per
        pixel.
        """
        method = self._method(method)
        if method == "closed":
            return PosteriorStd(self._closed_variance().sqrt(), "closed", 0, 0.0, None, None)
        if method == "dense":
            return PosteriorStd(self._dense_image_variance().sqrt(), "dense", 0, 0.0, None, None)
        devs, info = self.posterior_deviations(n_draws, generator, tol=tol, max_iter=max_iter)
        images = self.image(devs)
        std = images.square().mean(0).sqrt()
        return PosteriorStd(std, "cg", n_draws, 1.0 / math.sqrt(2 * n_draws), images, info)

    def posterior_deviations(self, n: int, generator: torch.Generator | None = None, *, tol: float = DRAW_TOL,
                             max_iter: int = CG_MAX_ITER) -> tuple[Tensor, SolveInfo]:
        """(n, C, h, w) exact draws of ``z0 - mu`` from the posterior, by perturb-and-MAP.

        ``z_k - mu = P^{-1} (C^{-1/2} xi_k + D^T A^T eps_k / sigma_y)``, ``xi_k``, ``eps_k`` standard normal (drawn
        in that order from ``generator``): the right-hand side has covariance ``C^{-1} + G / sigma_y^2 = P``, so
        ``Cov(z_k - mu) = P^{-1} P P^{-1} = Sigma`` exactly (up to the CG tolerance ``tol``). Add
        :meth:`posterior_mean` for posterior samples.
        """
        xi = torch.randn((n, *self.code_shape), generator=generator, dtype=torch.float64)
        eps = torch.randn((n, *self.measurement_shape[1:]), generator=generator, dtype=torch.float64)
        rhs = self.prior.apply(xi, self.prior.spectrum.rsqrt()) + self.observe_adjoint(eps) / self.sigma_y
        deviations, info = self.solve(rhs, tol=tol, max_iter=max_iter)
        _check_converged(info, "perturb-and-MAP draws", tol)
        return deviations, info

    def posterior_samples(self, y: Tensor, n: int, generator: torch.Generator | None = None, *,
                          tol: float = CG_TOL, max_iter: int = CG_MAX_ITER) -> Tensor:
        """(n, C, h, w) exact posterior draws of the code (perturb-and-MAP around the exact mean)."""
        return self.posterior_mean(y, tol=tol, max_iter=max_iter) + self.posterior_deviations(
            n, generator, tol=tol, max_iter=max_iter)[0]

    def operator_norm2(self, n_iter: int = 100) -> float:
        """``||A D||_2^2``, the largest eigenvalue of ``G``, by power iteration from a fixed start (private
        generator seeded 0; slightly below the truth when the top eigenvalues are close)."""
        g = torch.Generator().manual_seed(0)
        v = torch.randn((1, *self.code_shape), generator=g, dtype=torch.float64)
        value = 0.0
        for _ in range(n_iter):
            v = v / torch.linalg.vector_norm(v)
            gv = self.normal(v)
            value = float((v * gv).sum())
            v = gv
        return value

    def expected_residual(self) -> float:
        """``sigma_y sqrt(m)``: the RMS of ``||A x - y||`` over :attr:`measurement_support` for the truth and for
        any exact posterior sample (``E||A x - y||^2 = sigma_y^2 m`` for both; docs/exact_gaussian_problems.md)."""
        return self.sigma_y * math.sqrt(self.measurement_size)

    # ---- closed forms ---------------------------------------------------------------------------------
    def _closed_mean(self, residual: Tensor) -> Tensor:
        prior, s2, kind = self.prior, self.sigma_y**2, self.closed_form
        m = prior.mean[None]
        if kind == "fourier":
            lam = prior.half(prior.spectrum)
            t = self._transfer_half()
            return m + prior.from_eigen(prior.to_eigen(residual) * lam * t.conj() / (lam * t.abs().square() + s2))
        kappa, q = prior.colour_eigenvalues, prior.colour
        op = self.operator
        if kind == "pixel" and isinstance(op, Inpainting):
            gain = q @ torch.diag(kappa / (kappa + s2)) @ q.T                       # (C, C) at known pixels
            return m + torch.einsum("dc,bchw->bdhw", gain, residual) * op.mask.to(torch.float64)
        if not isinstance(op, AvgPoolSR):                                         # block
            raise TypeError(f"no closed form for {type(op).__name__}")
        f = op.factor
        gain = q @ torch.diag(kappa / (kappa + f * f * s2)) @ q.T
        w = torch.einsum("dc,bchw->bdhw", gain, residual)
        return m + w.repeat_interleave(f, -2).repeat_interleave(f, -1)

    def _closed_variance(self) -> Tensor:
        """(C, H, W) exact per-pixel posterior variance (closed forms)."""
        prior, s2, kind = self.prior, self.sigma_y**2, self.closed_form
        shape = self.code_shape
        q2 = prior.colour**2
        if kind == "fourier":
            lam = prior.half(prior.spectrum)
            post = lam * s2 / (s2 + lam * self._transfer_half().abs().square())          # (C, H, W//2+1)
            weights = _half_weights(shape[1], shape[2])
            per_eigen = (post * weights).sum((-2, -1)) / (shape[1] * shape[2])
            return (q2 @ per_eigen).view(-1, 1, 1).expand(shape).clone()
        kappa = prior.colour_eigenvalues
        op = self.operator
        if kind == "pixel" and isinstance(op, Inpainting):
            known = q2 @ (kappa * s2 / (kappa + s2))
            hole = q2 @ kappa
            mask = op.mask.to(torch.float64)[0]                                        # (1, H, W)
            variance: Tensor = mask * known.view(-1, 1, 1) + (1 - mask) * hole.view(-1, 1, 1)
            return variance
        if not isinstance(op, AvgPoolSR):                                         # block
            raise TypeError(f"no closed form for {type(op).__name__}")
        f2 = op.factor ** 2
        per_eigen = kappa * (1 - 1 / f2) + kappa * s2 / (f2 * s2 + kappa)
        return (q2 @ per_eigen).view(-1, 1, 1).expand(shape).clone()

    def _transfer_half(self) -> Tensor:
        """(H, W//2+1) complex transfer function of a circular blur (1 for the identity)."""
        _, h, w = self.code_shape
        op = self.operator
        if isinstance(op, Identity):
            return torch.ones(h, w // 2 + 1, dtype=torch.complex128)
        if not isinstance(op, Blur):
            raise TypeError(f"no transfer function for {type(op).__name__}")
        transfer: Tensor = op.transfer_function(h, w, dtype=torch.float64)
        return transfer

    # ---- dense ----------------------------------------------------------------------------------------
    def _dense_precision(self, chunk: int = 256) -> tuple[Tensor, int]:
        """(d, d) ``C^{-1} + G / sigma_y^2`` (columns by applying it to unit codes, ``chunk`` at a time)."""
        d = self.prior.dim
        cols = []
        for start in range(0, d, chunk):
            n = min(chunk, d - start)
            e = torch.zeros(n, d, dtype=torch.float64)
            e[torch.arange(n), torch.arange(start, start + n)] = 1.0
            e = e.view(n, *self.code_shape)
            cols.append((self.prior.precision(e) + self.normal(e) / self.sigma_y**2).reshape(n, d))
        p = torch.cat(cols).T
        return 0.5 * (p + p.T), d

    def _dense_image_variance(self, chunk: int = 256) -> Tensor:
        """(C, H, W) ``diag(D Sigma D^T)`` from the Cholesky factor of the precision: ``Sigma = L^{-T} L^{-1}``."""
        precision, d = self._dense_precision(chunk)
        chol = torch.linalg.cholesky(precision)
        root = torch.linalg.solve_triangular(chol, torch.eye(d, dtype=torch.float64), upper=False).T  # L^{-T}
        total = torch.zeros(self.image_shape, dtype=torch.float64)
        for start in range(0, d, chunk):
            cols = root[:, start:start + chunk].T.reshape(-1, *self.code_shape)
            total += self.image(cols).square().sum(0)
        return total

