"""AFDPS potentials: the likelihood terms ``mu_s`` that guide and weight the particles (pure PyTorch).

Every potential family ends at ``mu_0 = ||y - A D(z)||^2 / (2 sigma_y^2)``, the negative log-likelihood of
``y = A(D(z0)) + N(0, sigma_y^2 I)`` (``D`` the decoder, the identity in pixel space). A potential is an object
with the :class:`Potential` methods, built once per run; the sampling loop (``afdps.py``) only calls them:

* :class:`TweediePotential` (``"tweedie"``, the default):
  ``mu_s(z) = ||y - A D(z0_hat(z, s))||^2 / (2 tau_s^2)``, ``tau_s^2 = sigma_y^2 + gamma^2 s^2 / ((1 - s)^2 + s^2)``,
  and ``mu := 0`` at the first level (so the initial noise needs no weights). Proposal gradient: the
  stop-gradient surrogate
  ``g = c_s J_D^T A^T (A D(z0_hat) - y) / tau_s^2``, ``c_s = (1 - s) / ((1 - s)^2 + s^2)``: one decoder
  forward + VJP at ``z0_hat`` per particle and step, no back-propagation through the denoiser.
* :class:`LatentNoisedPotential` (``"noised"`` with a decoder; the paper-faithful VE form):
  ``mu_s(z) = ||y - A D(z / (1 - s))||^2 / (2 (sigma_y^2 + gamma^2 (s / (1 - s))^2))`` for ``s < 1`` and
  ``mu := 0`` at ``s = 1`` (plain noise needs no weights). Exact gradient ``(1 / (1 - s)) J_D^T A^T r / tau^2``:
  one decoder forward + VJP at ``z / (1 - s)``, no back-propagation through the denoiser. Decoding noisy latents
  is off the VAE's manifold, so expect more weight variance than ``"tweedie"``; it exists for the ODE variant,
  whose corrector needs an exact gradient. (The pixel form of ``"noised"`` is a research option,
  ``afdps_research.py``; for ``D = I`` the two agree at every ``s < 1``.)
* :class:`NoPotential` (``"none"``, and prior sampling without a measurement): ``mu = 0``, no guidance.

``gamma^2`` defaults to ``||A||_F^2 / m`` (mean eigenvalue of ``A A^T``), estimated with Rademacher probes.
The stiffness clip and the Langevin step need ``L``, a Lipschitz constant of the proposal gradient
(:meth:`Potential.lipschitz`): ``||A J_D||^2 c_s^2 / tau_s^2`` for ``tweedie``,
``||A J_D||^2 / ((1 - s)^2 tau^2)`` for ``noised``; ``||A J_D||^2`` (``||A||^2`` in pixel space) is estimated
once per run, at the first ``z0_hat`` it is asked for (:class:`OperatorNorm2`).

Decoder passes (forward + VJP) run ``chunk_size`` particles at a time (:class:`AdaptiveChunk`, which halves the
size when a chunk runs out of memory) in float32 (float64 stays float64), on detached clones inside
``inference_mode(False)`` + ``enable_grad()``, so they work under ComfyUI's inference mode.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, TypeVar, overload

import torch
from torch import Tensor

from .loop import compute_dtype, gradient
from .types import TensorMap

logger = logging.getLogger(__name__)

__all__ = [
    "TEMPERED_VARIANCES",
    "AdaptiveChunk",
    "JacobianFrobenius2",
    "LatentNoisedPotential",
    "Likelihood",
    "Measurement",
    "NoPotential",
    "OperatorNorm2",
    "OperatorProbe",
    "ParticleSpace",
    "Potential",
    "TweediePotential",
    "estimate_gamma2",
    "estimate_jacobian_frobenius2",
    "estimate_jacobian_norm2",
    "estimate_operator_norm2",
    "latent_noised_variance",
    "noised_variance",
    "probe_operator",
    "residual_value_and_grad",
    "tempered_variance",
    "tweedie_gain",
    "tweedie_variance",
]

T = TypeVar("T")


# --- the tempered variances ------------------------------------------------------------------------------

def tweedie_gain(sigma: float) -> float:
    """``c_s = (1 - s) / ((1 - s)^2 + s^2)``: the ``z0_hat``-Jacobian of a unit-Gaussian prior (1 at s = 0,
    0 at s = 1), the scale of the stop-gradient proposal gradient."""
    return (1.0 - sigma) / ((1.0 - sigma) ** 2 + sigma**2)


def tweedie_variance(sigma: float, sigma_y: float, gamma2: float) -> float:
    """``tau_s^2 = sigma_y^2 + gamma^2 s^2 / ((1 - s)^2 + s^2)`` of the ``tweedie`` family."""
    return sigma_y**2 + gamma2 * sigma**2 / ((1.0 - sigma) ** 2 + sigma**2)


def noised_variance(sigma: float, sigma_y: float, gamma2: float) -> float:
    """``tau_s^2 = (1 - s)^2 sigma_y^2 + gamma^2 s^2`` of the pixel ``noised`` family."""
    return (1.0 - sigma) ** 2 * sigma_y**2 + gamma2 * sigma**2


def latent_noised_variance(sigma: float, sigma_y: float, gamma2: float) -> float:
    """``tau^2 = sigma_y^2 + gamma^2 (s / (1 - s))^2`` of the latent ``noised`` potential at ``s < 1``
    (``= noised_variance(...) / (1 - s)^2``)."""
    return sigma_y**2 + gamma2 * (sigma / (1.0 - sigma)) ** 2


TEMPERED_VARIANCES: dict[str, Callable[[float, float, float], float]] = {
    "tweedie": tweedie_variance,
    "noised": noised_variance,
}


def tempered_variance(potential: str, sigma: float, sigma_y: float, gamma2: float) -> float:
    """``tau_s^2`` of a potential family by name (both are ``sigma_y^2`` at ``s = 0``):
    :func:`tweedie_variance` or :func:`noised_variance`."""
    if potential not in TEMPERED_VARIANCES:
        raise ValueError(f"no tempered variance for potential {potential!r}")
    return TEMPERED_VARIANCES[potential](sigma, sigma_y, gamma2)


# --- estimates of the operator's scale (deterministic: private generators) -------------------------------

class OperatorProbe(NamedTuple):
    """What Rademacher probes ``u`` (image-shaped) tell about the linear ``A``: ``gamma^2``, ``||A||_F^2`` and which
    measurement entries depend on the image at all."""

    gamma2: float
    """``||A||_F^2 / m`` with ``m`` every entry of ``A(x)`` (the tempering default, :func:`estimate_gamma2`)."""
    frobenius2: float
    """``||A||_F^2 = E ||A u||^2``."""
    support: Tensor
    """(1, ...) bool, ``A(x)``'s shape: the entries some probe reached (``False`` where the row of ``A`` is 0, e.g.
    the missing pixels of inpainting, which hold no information about the image)."""

    @property
    def support_size(self) -> int:
        """``m_s``, the number of measurement entries that depend on the image."""
        return int(self.support.sum())


def probe_operator(forward: TensorMap, shape: tuple[int, ...], *, n_probes: int, dtype: torch.dtype,
                   device: torch.device | str | None = None, seed: int = 0) -> OperatorProbe:
    """``||A||_F^2 / m``, ``||A||_F^2`` and the support of ``A``'s rows from ``n_probes`` Rademacher probes
    (Hutchinson: ``E ||A u||^2 = ||A||_F^2``).

    forward: the linear ``A`` on a batch (n, *shape) -> (n, m...); shape: one input's shape (e.g. (3, H, W)).
    Deterministic: the probes come from a private generator seeded ``seed``. An entry counts as outside the
    support when every probe gives exactly 0 there (for a row with k non-zero coefficients of equal magnitude
    that misses it with probability at most 2^-n_probes)."""
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.randint(0, 2, (n_probes, *shape), generator=g, device=device).to(dtype) * 2 - 1
    with torch.inference_mode(False), torch.no_grad():
        au = forward(u)
        flat = au.reshape(n_probes, -1)
        sq = flat.to(torch.float64).square().sum(1)
        support = (au != 0).any(0, keepdim=True)              # an ordinary tensor, usable under autograd
    return OperatorProbe(float(sq.mean() / flat.shape[1]), float(sq.mean()), support)


def estimate_gamma2(forward: TensorMap, shape: tuple[int, ...], *, n_probes: int, dtype: torch.dtype,
                    device: torch.device | str | None = None, seed: int = 0) -> float:
    """``||A||_F^2 / m`` (mean eigenvalue of ``A A^T``) by Hutchinson: ``mean ||A u||^2 / m``, u Rademacher.

    forward: the linear ``A`` on a batch (n, *shape) -> (n, m...); shape: one input's shape (e.g. (3, H, W)).
    Deterministic: the probes come from a private generator seeded ``seed`` (:func:`probe_operator`).
    """
    return probe_operator(forward, shape, n_probes=n_probes, dtype=dtype, device=device, seed=seed).gamma2


def estimate_operator_norm2(forward: TensorMap, shape: tuple[int, ...], *, dtype: torch.dtype,
                            device: torch.device | str | None = None, n_iter: int = 30, seed: int = 0) -> float:
    """``||A||_2^2`` (largest eigenvalue of ``A^T A``) by power iteration, ``A^T`` from autograd.

    forward: the linear ``A`` on a batch (1, *shape). Deterministic (private generator seeded ``seed``);
    slightly below the true value when the top eigenvalues are close (n_iter iterations)."""
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.randn((1, *shape), generator=g, device=device, dtype=torch.float64).to(dtype)
    value = 0.0
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(n_iter):
            u = (u / torch.linalg.vector_norm(u)).detach().requires_grad_(True)
            au = forward(u)
            (ata_u,) = torch.autograd.grad(0.5 * au.square().sum(), u)
            value = float(au.detach().to(torch.float64).square().sum())
            u = ata_u.detach()
    return value


def estimate_jacobian_norm2(fn: TensorMap, u0: Tensor, *, n_iter: int = 8, seed: int = 0,
                            rel_eps: float = 1e-3) -> float:
    """``||J||_2^2`` of ``fn`` at ``u0: (1, ...)`` by power iteration on ``J^T J``: ``J v`` by a central
    difference, ``J^T`` by autograd (exact for a linear ``fn``). Deterministic (private generator)."""
    work = compute_dtype(u0.dtype)
    g = torch.Generator(device=u0.device).manual_seed(seed)
    with torch.inference_mode(False):
        u0 = u0.detach().clone().to(work)
        v = torch.randn(u0.shape, generator=g, device=u0.device, dtype=torch.float64).to(work)
        eps = rel_eps * max(1.0, float(torch.linalg.vector_norm(u0)))
        value = 0.0
        for _ in range(n_iter):
            v = v / torch.linalg.vector_norm(v)
            with torch.no_grad():
                jv = (fn(u0 + eps * v) - fn(u0 - eps * v)) / (2 * eps)
            with torch.enable_grad():
                u = u0.clone().requires_grad_(True)
                jtjv = gradient((fn(u) * jv).sum(), u)
            value = float(jv.to(torch.float64).square().sum())
            if jtjv is None:
                return 0.0
            v = jtjv.detach()
    return value


def estimate_jacobian_frobenius2(fn: TensorMap, u0: Tensor, *, n_probes: int, seed: int = 0,
                                 rel_eps: float = 1e-3) -> float:
    """``||J||_F^2`` of ``fn`` at ``u0: (1, ...)`` by Hutchinson, ``mean ||J v||^2`` over ``n_probes`` Rademacher ``v``,
    with ``J v`` a central difference (exact for a linear ``fn``); no gradients. Deterministic (private
    generator seeded ``seed``)."""
    work = compute_dtype(u0.dtype)
    g = torch.Generator(device=u0.device).manual_seed(seed)
    with torch.inference_mode(False), torch.no_grad():
        u0 = u0.detach().clone().to(work)
        eps = rel_eps * max(1.0, float(torch.linalg.vector_norm(u0)))
        total = 0.0
        for _ in range(n_probes):
            v = torch.randint(0, 2, u0.shape, generator=g, device=u0.device).to(work) * 2 - 1
            jv = (fn(u0 + eps * v) - fn(u0 - eps * v)) / (2 * eps)
            total += float(jv.to(torch.float64).square().sum())
    return total / n_probes


# --- chunked decoder passes ------------------------------------------------------------------------------

@dataclass
class AdaptiveChunk:
    """A chunk size (particles per decoder pass; ``None``: all) that halves when a chunk runs out of memory,
    down to 1, and keeps the smaller size for the rest of the run (a warning is logged each time)."""

    size: int | None

    def map(self, u: Tensor, fn: Callable[[Tensor], T]) -> list[T]:
        """``[fn(chunk) for chunk in u.split(size)]``; a chunk that raises ``torch.OutOfMemoryError`` is retried
        with half the size. One particle out of memory re-raises, naming the size."""
        return self.map_rows(u.shape[0], lambda rows: fn(u[rows]), tuple(u.shape[1:]))

    def map_rows(self, n: int, fn: Callable[[slice], T], shape: tuple[int, ...] = ()) -> list[T]:
        """``fn(rows)`` for consecutive row ranges ``rows`` of ``n`` rows, ``size`` at a time (halved on out of
        memory, as :meth:`map`); ``shape`` (one particle's) only words the error."""
        outs: list[T] = []
        start = 0
        while start < n:
            rows = slice(start, min(n, start + (n if self.size is None else self.size)))
            count = rows.stop - rows.start
            try:
                outs.append(fn(rows))
            except torch.OutOfMemoryError as err:
                if count == 1:
                    raise torch.OutOfMemoryError(
                        f"out of memory in the decoder pass of a single particle (shape {shape}): "
                        f"reduce the image size or free memory; chunking cannot go below 1") from err
                self.size = count // 2
                logger.warning("AFDPS: out of memory with %d particles per decoder pass; retrying with %d",
                               count, self.size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start = rows.stop
        return outs


def _squared_residual(u: Tensor, residual: TensorMap) -> Tensor:
    """``||r(u)||^2: (n,) float64`` for one chunk ``u: (n, ...)``, without a graph (see below)."""
    with torch.inference_mode(False), torch.no_grad():
        u = u.detach().clone().to(compute_dtype(u.dtype))
        return residual(u).reshape(u.shape[0], -1).square().sum(1).to(torch.float64)


def _squared_residual_and_grad(u: Tensor, residual: TensorMap) -> tuple[Tensor, Tensor]:
    """``(||r(u)||^2: (n,) float64, J_r^T r)`` for one chunk ``u: (n, ...)`` (see below)."""
    with torch.inference_mode(False):
        u = u.detach().clone().to(compute_dtype(u.dtype))
        with torch.enable_grad():
            u.requires_grad_(True)
            sq = residual(u).reshape(u.shape[0], -1).square().sum(1)
            g = gradient(0.5 * sq.sum(), u)
        return sq.detach().to(torch.float64), (torch.zeros_like(u) if g is None else g.detach())


@overload
def residual_value_and_grad(u: Tensor, residual: TensorMap, chunk_size: int | AdaptiveChunk | None,
                            need_grad: Literal[True] = ...) -> tuple[Tensor, Tensor]: ...
@overload
def residual_value_and_grad(u: Tensor, residual: TensorMap, chunk_size: int | AdaptiveChunk | None,
                            need_grad: bool) -> tuple[Tensor, Tensor | None]: ...
def residual_value_and_grad(u: Tensor, residual: TensorMap, chunk_size: int | AdaptiveChunk | None,
                            need_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """``||r(u)||^2`` per sample and ``J_r^T r`` (the gradient of ``||r||^2 / 2``) for ``r = residual(u)``.

    u: (P, ...); residual: (B, ...) -> (B, ...), e.g. ``A(D(u)) - y``. Evaluated ``chunk_size`` samples at a
    time in float32 (float64 stays float64) on a detached clone inside ``inference_mode(False)`` +
    ``enable_grad()`` (safe under ComfyUI's inference mode). Returns ``(sq: (P,) float64, grad: (P, ...)`` in
    ``u``'s working dtype, or ``None`` when ``need_grad`` is false, which runs under ``no_grad``). An
    :class:`AdaptiveChunk` halves its size when a chunk runs out of memory.
    """
    chunks = chunk_size if isinstance(chunk_size, AdaptiveChunk) else AdaptiveChunk(chunk_size)
    if not need_grad:
        return torch.cat(chunks.map(u, functools.partial(_squared_residual, residual=residual))), None
    values, grads = zip(*chunks.map(u, functools.partial(_squared_residual_and_grad, residual=residual)),
                        strict=True)
    return torch.cat(values), torch.cat(grads)


# --- the problem a potential is built from ---------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ParticleSpace:
    """Where the particles live: one particle's shape, the dtype the sampler computes in, the decoder to images
    (``None``: the particles are pixel images) and the chunking of decoder passes (shared by the whole run)."""

    shape: tuple[int, ...]
    work: torch.dtype
    decode: TensorMap | None
    chunk: AdaptiveChunk

    def __call__(self, u: Tensor) -> Tensor:
        """``D(u)``: the images of particles ``u: (n, ...)`` (``u`` itself in pixel space)."""
        return u if self.decode is None else self.decode(u)

    def images(self, z: Tensor) -> Tensor:
        """(P, ...) decoded images of the particles ``z``, without a graph, chunk by chunk."""
        if self.decode is None:
            return z
        with torch.inference_mode(False), torch.no_grad():
            return torch.cat(self.chunk.map(z, self._decode_work))

    def image_shape(self, u: Tensor) -> tuple[int, ...]:
        """Shape of one image, from decoding the particle ``u: (1, ...)`` (without a graph)."""
        with torch.no_grad():
            return tuple(self.chunk.map(u.to(self.work), self)[0].shape[1:])

    def _decode_work(self, u: Tensor) -> Tensor:
        return self(u.to(self.work))


class Measurement(NamedTuple):
    """``y = A(x) + N(0, sigma_y^2 I)``: what the caller measured."""

    forward: TensorMap
    """The linear degradation ``A`` on (B, ...) images, differentiable."""
    y: Tensor
    """(1, ...) the measurement (a private copy)."""
    sigma_y: float
    """Noise std on ``y``'s scale (> 0)."""


@dataclass(eq=False)
class OperatorNorm2:
    """``||A||_2^2`` (pixel space) or ``||A J_D||_2^2`` (latents, the decoder linearised at the first ``z0_hat``
    asked for): estimated once, on first use (power iterations with a private seed), then held in ``value``.
    A ``value`` given up front is used as it is."""

    forward: TensorMap
    space: ParticleSpace
    value: float | None = None

    def at(self, z0_hat: Tensor) -> float:
        """The estimate; ``z0_hat: (P, ...)``, whose first particle is the linearisation point on first use."""
        if self.value is None:
            if self.space.decode is None:
                self.value = estimate_operator_norm2(self.forward, self.space.shape, dtype=self.space.work,
                                                     device=z0_hat.device)
            else:
                self.value = estimate_jacobian_norm2(self._forward_decoded, z0_hat[:1])
        return self.value

    def _forward_decoded(self, u: Tensor) -> Tensor:
        return self.forward(self.space(u))


JACOBIAN_PROBES = 4
"""Rademacher probes (8 decoder forwards) for ``||A J_D||_F^2`` on latents (:class:`JacobianFrobenius2`): it only
sets the scale of the final data-consistency step's gain, which saturates, so a rough value is enough."""


@dataclass(eq=False)
class JacobianFrobenius2:
    """``||A J_D||_F^2`` on the particles' space: ``||A||_F^2`` from the operator probes in pixel space, a
    Hutchinson estimate through the decoder linearised at the first ``z0_hat`` asked for on latents (once)."""

    forward: TensorMap
    space: ParticleSpace
    pixel_value: float
    """``||A||_F^2`` (the operator probes), the value in pixel space."""
    value: float | None = None

    def at(self, z0_hat: Tensor) -> float:
        if self.value is None:
            self.value = self.pixel_value if self.space.decode is None else estimate_jacobian_frobenius2(
                self._forward_decoded, z0_hat[:1], n_probes=JACOBIAN_PROBES)
        return self.value

    def _forward_decoded(self, u: Tensor) -> Tensor:
        return self.forward(self.space(u))


@dataclass(frozen=True, eq=False)
class Likelihood:
    """The measurement with what every measurement potential needs: ``gamma^2``, ``||A J_D||^2`` and the chunked
    residual gradients through the decoder (and what the final data-consistency step needs: the support of
    ``A``'s rows and ``||A J_D||_F^2``)."""

    measurement: Measurement
    space: ParticleSpace
    gamma2: float
    """``gamma^2`` of the tempered variances, on the scale of ``A(x)``."""
    norm2: OperatorNorm2
    probe: OperatorProbe
    """The operator probes (:func:`probe_operator`) on images shaped like ``D(z)``."""
    frobenius2: JacobianFrobenius2

    @classmethod
    def build(cls, measurement: Measurement, space: ParticleSpace, probe: Tensor, *, gamma2: float | None,
              gamma_probes: int, operator_norm2: float | None) -> Likelihood:
        """``gamma2`` or, when ``None``, ``||A||_F^2 / m`` estimated with ``gamma_probes`` Rademacher probes on
        images shaped like ``D(probe)`` (``probe: (1, ...)``, one particle; decoded once for the shape)."""
        probed = probe_operator(measurement.forward, space.image_shape(probe), n_probes=gamma_probes,
                                dtype=space.work, device=probe.device)
        return cls(measurement, space, probed.gamma2 if gamma2 is None else gamma2,
                   OperatorNorm2(measurement.forward, space, operator_norm2), probed,
                   JacobianFrobenius2(measurement.forward, space, probed.frobenius2))

    @property
    def sigma_y(self) -> float:
        return self.measurement.sigma_y

    @property
    def y(self) -> Tensor:
        return self.measurement.y

    @property
    def log_normalizer(self) -> float:
        """``(m / 2) log(2 pi sigma_y^2)``, the Gaussian constant of ``p(y | x)`` (``m`` values in ``y``)."""
        return 0.5 * self.y[0].numel() * math.log(2 * math.pi * self.sigma_y**2)

    def value_and_grad(self, u: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(||A D(u) - target||^2: (P,) float64, J^T (A D(u) - target): (P, ...))``, chunk by chunk."""
        return residual_value_and_grad(u, functools.partial(self._residual, target), self.space.chunk)

    def perturbed_value_and_grad(self, u: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(||A D(u) - y||^2`` over the support: (P,) float64, ``J^T (A D(u) - targets)``: (P, ...))`` for
        one target per particle, ``targets: (P, ...)`` (the measurement perturbed), chunk by chunk."""
        parts = self.space.chunk.map_rows(u.shape[0], functools.partial(self._perturbed_chunk, u, targets),
                                          tuple(u.shape[1:]))
        values, grads = zip(*parts, strict=True)
        return torch.cat(values), torch.cat(grads)

    def negative_log_likelihood(self, images: Tensor) -> Tensor:
        """``mu_0 = ||A x - y||^2 / (2 sigma_y^2)``: (P,) float64 for images ``x: (P, ...)`` (no graph)."""
        with torch.inference_mode(False), torch.no_grad():
            sq, _ = residual_value_and_grad(images, self._image_residual, self.space.chunk, need_grad=False)
        return sq / (2 * self.sigma_y**2)

    def _residual(self, target: Tensor, u: Tensor) -> Tensor:
        ax = self.measurement.forward(self.space(u))
        return ax - target.to(device=ax.device, dtype=ax.dtype)

    def _image_residual(self, x: Tensor) -> Tensor:
        return self.measurement.forward(x) - self.y.to(x.dtype)

    def _perturbed_chunk(self, u: Tensor, targets: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        with torch.inference_mode(False):
            part = u[rows].detach().clone().to(compute_dtype(u.dtype))
            target = targets[rows].detach().clone()          # ordinary tensors, even under inference mode
            with torch.enable_grad():
                part.requires_grad_(True)
                ax = self.measurement.forward(self.space(part))
                support = self.probe.support.to(device=ax.device)
                plain = (ax - self.y.to(device=ax.device, dtype=ax.dtype)) * support
                perturbed = (ax - target.to(device=ax.device, dtype=ax.dtype)) * support
                g = gradient(0.5 * perturbed.square().sum(), part)
            sq = plain.detach().reshape(plain.shape[0], -1).to(torch.float64).square().sum(1)
            return sq, (torch.zeros_like(part) if g is None else g.detach())


# --- the potentials --------------------------------------------------------------------------------------

class Potential(Protocol):
    """A potential family ``mu_s``: what the sampling loop asks of it."""

    @property
    def log_normalizer(self) -> float:
        """The constant that turns the SMC estimate of ``E[exp(-mu_0)]`` into ``log p(y)`` (subtracted)."""
        ...

    def value_and_grad(self, z: Tensor, z0_hat: Tensor, sigma: float, *, first: bool) -> tuple[Tensor, Tensor]:
        """``(mu_s(z): (P,) float64, proposal gradient g: (P, ...))`` at level ``sigma > 0`` for particles ``z``
        and their denoised ``z0_hat``; ``first``: the initial level of the run."""
        ...

    def lipschitz(self, z0_hat: Tensor, sigma: float) -> float:
        """An estimate of the Lipschitz constant of the proposal gradient at level ``sigma``."""
        ...

    def final(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu_0(z): (P,) float64, the decoded images (P, ...))`` at ``s = 0``."""
        ...


def _zero_potential(z: Tensor) -> tuple[Tensor, Tensor]:
    return torch.zeros(z.shape[0], dtype=torch.float64, device=z.device), torch.zeros_like(z)


@dataclass(frozen=True, eq=False)
class NoPotential:
    """``mu = 0``: no likelihood and no guidance (the plain prior sampler; prior sampling without ``y``)."""

    space: ParticleSpace
    log_normalizer: float = 0.0

    def value_and_grad(self, z: Tensor, z0_hat: Tensor, sigma: float, *, first: bool) -> tuple[Tensor, Tensor]:
        return _zero_potential(z)

    def lipschitz(self, z0_hat: Tensor, sigma: float) -> float:
        return 0.0

    def final(self, z: Tensor) -> tuple[Tensor, Tensor]:
        images = self.space.images(z)
        return torch.zeros(z.shape[0], dtype=torch.float64, device=z.device), images


@dataclass(frozen=True, eq=False)
class MeasurementPotential:
    """What the measurement potentials share: ``mu_0`` (the negative log-likelihood) and its constant."""

    likelihood: Likelihood

    @property
    def log_normalizer(self) -> float:
        return self.likelihood.log_normalizer

    def final(self, z: Tensor) -> tuple[Tensor, Tensor]:
        images = self.likelihood.space.images(z)
        return self.likelihood.negative_log_likelihood(images), images


@dataclass(frozen=True, eq=False)
class TweediePotential(MeasurementPotential):
    """``mu_s(z) = ||y - A D(z0_hat)||^2 / (2 tau_s^2)`` with the stop-gradient proposal gradient (module
    docstring); ``mu := 0`` at the first level."""

    def value_and_grad(self, z: Tensor, z0_hat: Tensor, sigma: float, *, first: bool) -> tuple[Tensor, Tensor]:
        lik = self.likelihood
        tau2 = tweedie_variance(sigma, lik.sigma_y, lik.gamma2)
        gain = tweedie_gain(sigma)
        if first and gain == 0.0:
            return _zero_potential(z)
        sq, grad = lik.value_and_grad(z0_hat, lik.y)
        mu = torch.zeros_like(sq) if first else sq / (2 * tau2)
        return mu, (gain / tau2) * grad

    def lipschitz(self, z0_hat: Tensor, sigma: float) -> float:
        lik = self.likelihood
        tau2 = tweedie_variance(sigma, lik.sigma_y, lik.gamma2)
        return lik.norm2.at(z0_hat) * tweedie_gain(sigma) ** 2 / tau2


@dataclass(frozen=True, eq=False)
class LatentNoisedPotential(MeasurementPotential):
    """``mu_s(z) = ||y - A D(z / (1 - s))||^2 / (2 tau^2)`` below ``s = 1``, 0 at ``s = 1``, exact gradient
    (module docstring)."""

    def value_and_grad(self, z: Tensor, z0_hat: Tensor, sigma: float, *, first: bool) -> tuple[Tensor, Tensor]:
        if sigma >= 1.0:
            return _zero_potential(z)
        lik = self.likelihood
        scale, tau2 = 1.0 / (1.0 - sigma), latent_noised_variance(sigma, lik.sigma_y, lik.gamma2)
        sq, grad = lik.value_and_grad(z * scale, lik.y)
        return sq / (2 * tau2), (scale / tau2) * grad

    def lipschitz(self, z0_hat: Tensor, sigma: float) -> float:
        """``||A J_D||^2 / ((1 - s)^2 tau^2)`` (= ``||A J_D||^2 / tau_s^2`` of the pixel form)."""
        lik = self.likelihood
        return lik.norm2.at(z0_hat) / noised_variance(sigma, lik.sigma_y, lik.gamma2)
