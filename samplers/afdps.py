"""AFDPS for rectified flow: a twisted-SMC ensemble sampler of the posterior (pure PyTorch).

AFDPS (Chen, Ren, Min, Ying, Izzo, arXiv 2506.03979) moves ``P`` weighted particles with a guided reverse SDE
and corrects the guidance with importance weights, so that the weighted ensemble targets the exact posterior
of the (discretised) prior. This is the rectified-flow form derived in afdps.md (§2.2-2.7, App. B) with its
recommended configuration: Euler-Maruyama on the given sigma grid, noise level ``V^2 = 2 eta_v s``, the
discrete twisted-SMC ("W2") weights, the ``tweedie`` potential family with the stop-gradient decoder-VJP
proposal gradient, and systematic resampling when ``ESS < 0.5 P`` (never after the last step).

Per step ``s = s_i -> s' = s_{i+1}``, ``dt = s - s' > 0``, ``V^2 = 2 eta_v s`` (afdps.md §2.5)::

    z0_hat = denoise(z, s);   eps_hat = (z - (1 - s) z0_hat) / s                    (eps_hat = z at s = 1)
    m_ref = z + dt (z0_hat - (1 + eta_v) eps_hat)        # Euler-Maruyama mean of the prior reverse SDE
    m_g   = m_ref - dt kappa V^2 g                        # guided proposal mean, g ~ grad mu_s(z)
    z'    = m_g + V sqrt(dt) xi,  xi ~ N(0, I)
    log w += mu_s(z) - mu_s'(z') + kappa V sqrt(dt) g.xi - kappa^2 V^2 dt |g|^2 / 2       (W2)

Potential families ``mu_s`` (all with ``mu_0 = ||y - A D(z)||^2 / (2 sigma_y^2)``, the negative log-likelihood):

* ``"tweedie"`` (latent models; the default): ``mu_s(z) = ||y - A D(z0_hat(z, s))||^2 / (2 tau_s^2)``,
  ``tau_s^2 = sigma_y^2 + gamma^2 s^2 / ((1 - s)^2 + s^2)``, and ``mu := 0`` at the first level (so the
  initial noise needs no weights). Proposal gradient: the stop-gradient surrogate
  ``g = c_s J_D^T A^T (A D(z0_hat) - y) / tau_s^2``, ``c_s = (1 - s) / ((1 - s)^2 + s^2)``: one decoder
  forward + VJP at ``z0_hat`` per particle and step, no back-propagation through the denoiser.
* ``"noised"`` (pixel space, ``decode=None``): ``mu_s(x) = ||(1 - s) y - A x||^2 / (2 tau_s^2)``,
  ``tau_s^2 = (1 - s)^2 sigma_y^2 + gamma^2 s^2``, exact gradient ``g = A^T (A x - (1 - s) y) / tau_s^2``. Its
  first-level potential is not 0: the initial noise is importance-weighted by ``exp(-mu_{s_0})`` (afdps.md
  samples that Gaussian Stage-I law exactly instead; the weights are exact too, but degenerate when ``A`` has
  many rows, so prefer ``"tweedie"`` for images).
* ``"noised"`` on latents (``decode`` given; afdps.md §2.6, the paper-faithful VE form):
  ``mu_s(z) = ||y - A D(z / (1 - s))||^2 / (2 (sigma_y^2 + gamma^2 (s / (1 - s))^2))`` for ``s < 1`` and
  ``mu := 0`` at ``s = 1`` (so plain noise needs no weights). For ``D = I`` it equals the pixel form at every
  ``s < 1``. Exact gradient ``(1 / (1 - s)) J_D^T A^T r / tau^2``: one decoder forward + VJP at ``z / (1 - s)``,
  no back-propagation through the denoiser. Decoding noisy latents is off the VAE's manifold, so expect more
  weight variance than ``"tweedie"``; it exists for the ODE variant, whose corrector needs an exact gradient.
* ``"none"``: ``mu = 0``, no guidance: the plain Euler-Maruyama prior sampler (a test of the prior).

W2 is the exact SMC weight of the Euler-Maruyama prior chain tilted by ``exp(-mu_0)`` at the end, for any
proposal gradient and any intermediate potentials (afdps.md App. B): as ``P -> infinity`` the weighted particles
target the posterior of the discretised prior, which converges to the true posterior as the grid is refined.
``gamma^2`` defaults to ``||A||_F^2 / m`` (mean eigenvalue of ``A A^T``), estimated with Rademacher probes.

Stiffness (afdps.md §2.5 remedy ii): with ``kappa_clip = c`` the guidance factor of step ``i`` is
``kappa_i = min(kappa, c / (dt V^2 L_i))``, ``L_i`` an estimate of the Lipschitz constant of the proposal
gradient (``||A J_D||^2 c_s^2 / tau_s^2`` for ``tweedie``, ``||A J_D||^2 / ((1 - s)^2 tau^2)`` for ``noised``).
W2 uses the actual proposal, so any ``kappa_i`` keeps the weights exact; the clip only removes the overshoot of
the explicit guidance step when ``sigma_y`` is small.

Variants and weights by space:

* latents (``decode`` given): SDE with ``"tweedie"`` (default) or ``"noised"``, W2; ODE + corrector with
  ``"noised"``, W2. W1 needs the Laplacian of ``mu``, which a nonlinear decoder does not give: pixel space only.

Pixel-space options (``decode=None``, ``"noised"`` potential, linear ``A``; afdps.md §2.4-2.5):

* ``weights="W1"``: the paper's weights, ``log w += dt r(z)`` with the reaction rate
  ``r = (kappa - 1/2) V^2 |g|^2 - c_H.g + (1 - kappa) V^2 grad log p_s.g + d mu_s / ds`` (:func:`reaction_rate`);
  its Laplacian term ``-(kappa - 1/2) V^2 ||A||_F^2 / tau_s^2`` is the same for every particle and is dropped
  (exact for the weights, not for the evidence, which is then nan).
* ``variant="ode"``: AFDPS-ODE, the Euler probability-flow predictor ``z' = z - dt v`` (no guidance, W2 weight
  ``mu_s(z) - mu_s'(z')`` or W1 ``dt (v.g + d mu / ds)``), then ``corrector_steps`` unadjusted Langevin steps at
  ``s'`` on ``p_s' exp(-mu_s')`` with the Tweedie score ``-eps_hat / s'`` and the exact ``grad mu_s'`` (no weight
  change); order per step: predictor, weights, corrector, resampling. One extra denoiser call per corrector
  step; no back-propagation through the denoiser anywhere.

Cost per step (SDE): one batched ``denoise`` call on all P particles (under ``torch.no_grad``) and P decoder
forward + VJPs, ``chunk_size`` particles at a time (the VJP is the memory hog at SD3 resolutions).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

import torch
from torch import Tensor

from .flow import noise_from_x0
from .loop import NonFiniteError, batch_view, check_sigmas, compute_dtype, fresh_noise
from .rng import generator_or_default
from .smc import (
    RESAMPLING_SCHEMES,
    effective_sample_size,
    quarantine,
    resample,
    reweight,
    uniform_log_weights,
    weights_from_log,
)
from .types import Denoiser

logger = logging.getLogger(__name__)

__all__ = [
    "POTENTIALS",
    "VARIANTS",
    "WEIGHTINGS",
    "AFDPSConfig",
    "AFDPSResult",
    "AFDPSStepInfo",
    "AdaptiveChunk",
    "adjoint_apply",
    "clipped_kappa",
    "estimate_gamma2",
    "estimate_jacobian_norm2",
    "estimate_operator_norm2",
    "girsanov_log_ratio",
    "langevin_move",
    "langevin_step_size",
    "latent_noised_variance",
    "noise_variance",
    "noised_potential_rate",
    "reaction_rate",
    "reference_mean",
    "residual_value_and_grad",
    "sample_afdps",
    "tempered_variance",
    "tweedie_gain",
]

POTENTIALS = ("tweedie", "noised", "none")
WEIGHTINGS = ("W2", "W1", "none")
VARIANTS = ("sde", "ode")

TensorMap = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AFDPSConfig:
    """AFDPS-SDE settings; the defaults are afdps.md's recommended configuration (all derived there, §2, §5;
    the paper's own EDM experiments use ``V = G``, multinomial resampling that is switched off, and a
    likelihood at the noisy particle, which afdps.md §4.4 shows has very high weight variance in RF form)."""

    variant: str = "sde"
    """``"sde"``: guided Euler-Maruyama moves (AFDPS-SDE, recommended). ``"ode"``: Euler probability-flow
    predictor without guidance, then ``corrector_steps`` Langevin (ULA) steps at the next level targeting
    ``p_s' exp(-mu_s')`` (AFDPS-ODE, afdps.md §2.5); it needs the exact gradient of ``mu``, so it takes the
    ``"noised"`` or ``"none"`` potential (pixel space or latents), and costs 1 + corrector_steps denoiser
    calls and 1 + corrector_steps decoder gradients per particle a step."""
    potential: str = "tweedie"
    """Potential family ``mu_s``: ``"tweedie"`` (recommended), ``"noised"`` (the pixel form, or the VE form
    ``mu_s(z) = ||y - A D(z / (1 - s))||^2 / (2 tau^2)`` on latents; exact gradient, for the ODE variant) or
    ``"none"`` (no likelihood: samples the prior)."""
    weights: str = "W2"
    """``"W2"``: discrete twisted-SMC / Girsanov weights (exact for the discretised prior, no Laplacian).
    ``"W1"``: the paper's Euler discretisation of the reaction rate (afdps.md §2.4-2.5; pixel space and the
    ``"noised"`` potential only, where the Laplacian is particle-independent and drops out exactly; no
    evidence estimate). ``"none"``: no weights and no resampling, i.e. the bare guided dynamics (biased; for
    comparison only)."""
    eta_v: float = 1.0
    """``eta_v`` in the noise level ``V^2 = 2 eta_v s`` (>= 0; 1 recommended, bounded at ``s = 1`` where the
    paper's ``V = G`` is singular). Any value keeps the target; 0 is a deterministic (ODE) move."""
    kappa: float = 1.0
    """Guidance factor ``kappa`` of the proposal drift ``-kappa V^2 g`` (>= 0; the paper's value is 1). With W2
    any value stays exact; 0 is the unguided prior proposal (plain importance sampling)."""
    kappa_clip: float | None = None
    """``c`` of the stiffness clip ``kappa_i = min(kappa, c / (dt V^2 L_i))`` (afdps.md §2.5 remedy ii; SDE
    with W2 only, where it stays exact). ``None``: no clip (the paper). 0.5 keeps the explicit guidance step
    well inside its stability limit of about 1. Needs ``||A J_D||^2`` (``operator_norm2`` or an estimate)."""
    gamma2: float | None = None
    """``gamma^2`` of the tempered variances, on the scale of ``A(x)``. ``None``: ``||A||_F^2 / m`` (the
    recommendation), estimated with ``gamma_probes`` Rademacher probes. Any value > 0 is exact; it only
    changes the weight variance."""
    gamma_probes: int = 16
    """Rademacher probes for the ``gamma^2`` estimate (a private generator seeded 0: deterministic)."""
    resample_threshold: float = 0.5
    """Resample when ``ESS < resample_threshold * P`` (``c`` of afdps.md §2.7; 0 never resamples, 1 always).
    Never after the last step, so that ``best`` is the highest-weight particle of the final weights."""
    resampling: str = "systematic"
    """``"systematic"`` (recommended, lower variance) or ``"multinomial"`` (the paper's Algorithm 1)."""
    chunk_size: int | None = 4
    """Particles per decoder forward + VJP (and per ``A`` call in pixel space); ``None``: all at once.
    afdps.md recommends 1-4 for SD3 at 768^2."""
    corrector_steps: int = 1
    """ULA steps per level of the ODE variant (afdps.md §4: 1)."""
    corrector_delta: float = 0.05
    """ULA step ``h = min(delta s'^2, 0.25 / (Lip + 1 / s'^2))`` (afdps.md §2.5: delta = 0.05), with
    ``Lip = ||A||_2^2 / tau_s'^2`` the Lipschitz constant of ``grad mu_s'``."""
    operator_norm2: float | None = None
    """``||A||_2^2`` (pixel space) or ``||A J_D||_2^2`` (latents, the decoder linearised) for the ULA step and
    the kappa clip; ``None``: power iterations of ``J^T J`` (30 for a linear ``A``, 8 at the first
    ``z0_hat`` through the decoder; private seed 0)."""

    def __post_init__(self) -> None:
        if self.potential not in POTENTIALS:
            raise ValueError(f"potential must be one of {POTENTIALS}, got {self.potential!r}")
        if self.weights not in WEIGHTINGS:
            raise ValueError(f"weights must be one of {WEIGHTINGS}, got {self.weights!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        exact_gradient = ("noised", "none")
        if self.variant == "ode" and self.potential not in exact_gradient:
            raise ValueError(f"the ODE variant's Langevin corrector needs the exact gradient of mu: potential "
                             f"must be one of {exact_gradient}, got {self.potential!r}")
        if self.weights == "W1" and self.potential not in exact_gradient:
            raise ValueError(f"W1 weights need the exact gradient and Laplacian of mu: potential must be one of "
                             f"{exact_gradient}, got {self.potential!r}")
        if not (math.isfinite(self.corrector_delta) and self.corrector_delta > 0):
            raise ValueError(f"corrector_delta must be > 0, got {self.corrector_delta!r}")
        if self.kappa_clip is not None and not (math.isfinite(self.kappa_clip) and self.kappa_clip > 0):
            raise ValueError(f"kappa_clip must be None or > 0, got {self.kappa_clip!r}")
        if self.kappa_clip is not None and (self.variant != "sde" or self.weights != "W2"):
            raise ValueError(f"kappa_clip needs the SDE variant with W2 weights (any kappa_i is exact only "
                             f"there), got variant {self.variant!r}, weights {self.weights!r}")
        if self.operator_norm2 is not None and not (math.isfinite(self.operator_norm2) and self.operator_norm2 > 0):
            raise ValueError(f"operator_norm2 must be None or > 0, got {self.operator_norm2!r}")
        if (isinstance(self.corrector_steps, bool) or not isinstance(self.corrector_steps, int)
                or self.corrector_steps < 0):
            raise ValueError(f"corrector_steps must be an integer >= 0, got {self.corrector_steps!r}")
        if self.resampling not in RESAMPLING_SCHEMES:
            raise ValueError(f"resampling must be one of {RESAMPLING_SCHEMES}, got {self.resampling!r}")
        for name in ("eta_v", "kappa"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if self.gamma2 is not None and not (math.isfinite(self.gamma2) and self.gamma2 > 0):
            raise ValueError(f"gamma2 must be None or > 0, got {self.gamma2!r}")
        if not 0.0 <= self.resample_threshold <= 1.0:
            raise ValueError(f"resample_threshold must lie in [0, 1], got {self.resample_threshold!r}")
        for name, value in (("gamma_probes", self.gamma_probes), ("chunk_size", self.chunk_size)):
            if value is None and name == "chunk_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class AFDPSStepInfo(TypedDict):
    """Callback payload: the k-diffusion keys (ComfyUI previews read ``x``, ``i``, ``denoised``) plus SMC state.

    ``x``: (P, ...) particles at ``sigma`` (before the step); ``denoised``: (P, ...) their ``z0_hat``;
    ``ess``: effective sample size (a count in [1, P]) after this step's weight update, before resampling;
    ``resampled``: whether the particles were resampled after this step; ``log_weights``: (P,) float64
    normalised log-weights after the step (uniform after resampling).
    """

    x: Tensor
    i: int
    sigma: Tensor
    sigma_hat: Tensor
    denoised: Tensor
    ess: float
    resampled: bool
    log_weights: Tensor


@dataclass(frozen=True, eq=False)
class AFDPSResult:
    """The weighted ensemble at ``s = 0`` and its summaries.

    Particles are latents ``(P, ...)`` (pixel images in pixel space); ``images`` are the decoded particles
    ``(P, C, H, W)`` (the particles themselves when ``decode`` is ``None``). Weighted summaries use the
    final normalised weights; quarantined particles have weight 0 and zeroed states.
    """

    particles: Tensor
    """(P, ...) final particles at ``s = 0``, the input noise's dtype."""
    log_weights: Tensor
    """(P,) float64 final normalised log-weights (``logsumexp = 0``; ``-inf`` for quarantined particles)."""
    images: Tensor
    """(P, ...) decoded particles ``D(z)`` (= ``particles`` in pixel space)."""
    ess: Tensor
    """(K + 1,) float64 ESS trace: ``ess[0]`` of the initial weights, ``ess[i + 1]`` after step ``i``'s weight
    update (before any resampling)."""
    n_resampled: int
    """Number of resampling events (including one after the initial weights, if any)."""
    log_evidence: float
    """SMC estimate of ``log p(y)`` under the discretised prior (Gaussian constant included); nan when the
    weights are off. Unbiased for ``p(y)`` itself, so ``log`` is biased low by ~Var/2."""
    sample_index: int
    """Index of one multinomial draw from the final weights (drawn with the sampler's generator)."""
    kappa: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    """(K,) float64 guidance factor used at each SDE step (``kappa``, or less where ``kappa_clip`` cut it);
    empty for the ODE variant."""

    @property
    def weights(self) -> Tensor:
        """(P,) float64 normalised weights."""
        return weights_from_log(self.log_weights)

    @property
    def best_index(self) -> int:
        """Index of the highest-weight particle."""
        return int(torch.argmax(self.log_weights))

    @property
    def best(self) -> Tensor:
        """(1, ...) the highest-weight particle (the paper's output, App. D.2)."""
        return self.particles[self.best_index][None]

    @property
    def sample(self) -> Tensor:
        """(1, ...) one posterior draw (multinomial from the weights)."""
        return self.particles[self.sample_index][None]

    @property
    def mean(self) -> Tensor:
        """(1, ...) weighted mean of the particles (for a latent: decode it only if the decoder is ~linear;
        :attr:`image_mean` averages decoded images)."""
        return self._weighted_mean(self.particles)

    @property
    def image_mean(self) -> Tensor:
        """(1, ...) weighted mean of the decoded particles (the MMSE estimate)."""
        return self._weighted_mean(self.images)

    @property
    def image_std(self) -> Tensor:
        """(1, ...) per-pixel weighted standard deviation of the decoded particles (posterior uncertainty)."""
        x = self.images.to(compute_dtype(self.images.dtype))
        mean = self._weighted_mean(x)
        var = (batch_view(self.weights.to(x.dtype), x) * (x - mean).square()).sum(0, keepdim=True)
        return var.sqrt().to(self.images.dtype)

    def _weighted_mean(self, x: Tensor) -> Tensor:
        work = x.to(compute_dtype(x.dtype))
        return (batch_view(self.weights.to(work.dtype), work) * work).sum(0, keepdim=True).to(x.dtype)


# --- small pure pieces -----------------------------------------------------------------------------------

def noise_variance(sigma: float, eta_v: float) -> float:
    """``V^2 = 2 eta_v s``: the reverse-SDE noise variance per unit ``s`` (afdps.md §2.2)."""
    return 2.0 * eta_v * sigma


def tweedie_gain(sigma: float) -> float:
    """``c_s = (1 - s) / ((1 - s)^2 + s^2)``: the ``z0_hat``-Jacobian of a unit-Gaussian prior (1 at s = 0,
    0 at s = 1), the scale of the stop-gradient proposal gradient."""
    return (1.0 - sigma) / ((1.0 - sigma) ** 2 + sigma**2)


def tempered_variance(potential: str, sigma: float, sigma_y: float, gamma2: float) -> float:
    """``tau_s^2`` of a potential family (both are ``sigma_y^2`` at ``s = 0``):

    ``"tweedie"``: ``sigma_y^2 + gamma^2 s^2 / ((1 - s)^2 + s^2)``;
    ``"noised"``: ``(1 - s)^2 sigma_y^2 + gamma^2 s^2``.
    """
    if potential == "tweedie":
        return sigma_y**2 + gamma2 * sigma**2 / ((1.0 - sigma) ** 2 + sigma**2)
    if potential == "noised":
        return (1.0 - sigma) ** 2 * sigma_y**2 + gamma2 * sigma**2
    raise ValueError(f"no tempered variance for potential {potential!r}")


def latent_noised_variance(sigma: float, sigma_y: float, gamma2: float) -> float:
    """``tau^2 = sigma_y^2 + gamma^2 (s / (1 - s))^2`` of the latent ``noised`` potential at ``s < 1``
    (``= tempered_variance("noised", ...) / (1 - s)^2``)."""
    return sigma_y**2 + gamma2 * (sigma / (1.0 - sigma)) ** 2


def clipped_kappa(kappa: float, clip: float | None, step: float, v2: float, lipschitz: float) -> float:
    """``min(kappa, clip / (dt V^2 L))`` (afdps.md §2.5 stiffness remedy ii); ``kappa`` without a clip."""
    if clip is None or step * v2 * lipschitz <= 0:
        return kappa
    return min(kappa, clip / (step * v2 * lipschitz))


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
                (jtjv,) = torch.autograd.grad((fn(u) * jv).sum(), u, allow_unused=True)
            value = float(jv.to(torch.float64).square().sum())
            if jtjv is None:
                return 0.0
            v = jtjv.detach()
    return value


def reference_mean(z: Tensor, z0_hat: Tensor, sigma: float, step: float, eta_v: float) -> Tensor:
    """Euler-Maruyama mean of the prior reverse SDE with ``V^2 = 2 eta_v s`` over ``dt = step > 0``:
    ``z + dt (z0_hat - (1 + eta_v) eps_hat)`` with ``eps_hat = (z - (1 - s) z0_hat) / s`` (needs ``s > 0``).

    (``= z + dt c_H``, ``c_H = -v - (V^2 / 2s) eps_hat``, afdps.md §2.2.) z, z0_hat: (P, ...)."""
    eps_hat = noise_from_x0(z, z0_hat, sigma)
    return z + step * (z0_hat - (1.0 + eta_v) * eps_hat)


def girsanov_log_ratio(g: Tensor, xi: Tensor, noise_std: float, kappa: float) -> Tensor:
    """``log K_ref(z' | z) / K_g(z' | z) = kappa V sqrt(dt) g.xi - kappa^2 V^2 dt |g|^2 / 2`` per particle.

    g, xi: (P, ...) the proposal gradient and the move's standard normal noise; ``noise_std = V sqrt(dt)``.
    Returns (P,) float64 (afdps.md App. B: the proposal mean is the reference mean minus ``kappa V^2 dt g``).
    """
    g64 = g.reshape(g.shape[0], -1).to(torch.float64)
    xi64 = xi.reshape(xi.shape[0], -1).to(torch.float64)
    a = kappa * noise_std
    return a * (g64 * xi64).sum(1) - 0.5 * a * a * g64.square().sum(1)


def reaction_rate(g: Tensor, z: Tensor, z0_hat: Tensor, sigma: float, v2: float, kappa: float,
                  dmu_ds: Tensor) -> Tensor:
    """W1 log-weight rate per unit reverse time (afdps.md §2.4), without the Laplacian term:

    ``(kappa - 1/2) V^2 |g|^2 + (v + (V^2 / 2s) eps_hat).g - (1 - kappa) V^2 (eps_hat / s).g + d mu_s / ds``

    with ``v = (z - z0_hat) / s``, ``eps_hat = (z - (1 - s) z0_hat) / s`` (needs ``s > 0``). The omitted
    ``-(kappa - 1/2) V^2 Laplacian(mu)`` is particle-independent for a linear ``A`` in pixel space, so it
    cancels in the normalised weights. ``V^2 = 0`` gives the ODE rate ``v.g + d mu / ds``.
    g, z, z0_hat: (P, ...); dmu_ds: (P,). Returns (P,) float64.
    """
    def flat(t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], -1).to(torch.float64)

    g64, v = flat(g), flat((z - z0_hat) / sigma)
    eps = flat(noise_from_x0(z, z0_hat, sigma))
    drift = v + (v2 / (2 * sigma)) * eps - (1 - kappa) * (v2 / sigma) * eps
    return (kappa - 0.5) * v2 * g64.square().sum(1) + (drift * g64).sum(1) + dmu_ds.to(torch.float64)


def noised_potential_rate(sq: Tensor, residual_dot_y: Tensor, sigma: float, sigma_y: float,
                          gamma2: float) -> Tensor:
    """``d mu_s / ds`` of the ``noised`` family ``mu_s = ||A x - (1 - s) y||^2 / (2 tau_s^2)`` at fixed x:
    ``r.y / tau^2 - ||r||^2 (d tau^2 / ds) / (2 tau^4)``, ``r = A x - (1 - s) y``,
    ``d tau^2 / ds = -2 (1 - s) sigma_y^2 + 2 gamma^2 s``. sq = ||r||^2, residual_dot_y = r.y: (P,)."""
    tau2 = tempered_variance("noised", sigma, sigma_y, gamma2)
    dtau2 = -2 * (1 - sigma) * sigma_y**2 + 2 * gamma2 * sigma
    return residual_dot_y / tau2 - sq * dtau2 / (2 * tau2**2)


def langevin_step_size(sigma: float, lipschitz: float, delta: float) -> float:
    """ULA step ``h = min(delta s^2, 0.25 / (Lip + 1 / s^2))`` at level ``s > 0`` (afdps.md §2.5)."""
    return min(delta * sigma**2, 0.25 / (lipschitz + 1.0 / sigma**2))


def langevin_move(z: Tensor, z0_hat: Tensor, grad_mu: Tensor, sigma: float, h: float, xi: Tensor) -> Tensor:
    """One ULA step on ``p_s exp(-mu_s)``: ``z + h (score - grad mu) + sqrt(2 h) xi`` with the score
    ``-(z - (1 - s) z0_hat) / s^2`` (Tweedie). z, z0_hat, grad_mu, xi: (P, ...)."""
    score = -noise_from_x0(z, z0_hat, sigma) / sigma
    return z + h * (score - grad_mu) + math.sqrt(2 * h) * xi


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


def adjoint_apply(forward: TensorMap, y: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``A^T y`` for a linear ``A`` via autograd; y: (1, ...) -> (1, *shape)."""
    with torch.inference_mode(False), torch.enable_grad():
        u = torch.zeros((1, *shape), dtype=dtype, device=y.device, requires_grad=True)
        (aty,) = torch.autograd.grad((forward(u) * y.to(dtype)).sum(), u, allow_unused=True)
    return torch.zeros_like(u).detach() if aty is None else aty.detach()


@dataclass
class AdaptiveChunk:
    """A chunk size (particles per decoder pass; ``None``: all) that halves when a chunk runs out of memory,
    down to 1, and keeps the smaller size for the rest of the run (a warning is logged each time)."""

    size: int | None

    def map(self, u: Tensor, fn: Callable[[Tensor], object]) -> list:
        """``[fn(chunk) for chunk in u.split(size)]``; a chunk that raises ``torch.OutOfMemoryError`` is retried
        with half the size. One particle out of memory re-raises, naming the size."""
        outs, start, n = [], 0, u.shape[0]
        while start < n:
            part = u[start:start + (n if self.size is None else self.size)]
            try:
                outs.append(fn(part))
            except torch.OutOfMemoryError as err:
                if part.shape[0] == 1:
                    raise torch.OutOfMemoryError(
                        f"out of memory in the decoder pass of a single particle (shape {tuple(part.shape[1:])}): "
                        f"reduce the image size or free memory; chunking cannot go below 1") from err
                self.size = part.shape[0] // 2
                logger.warning("AFDPS: out of memory with %d particles per decoder pass; retrying with %d",
                               part.shape[0], self.size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start += part.shape[0]
        return outs


def residual_value_and_grad(u: Tensor, residual: TensorMap, chunk_size: int | AdaptiveChunk | None,
                            need_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """``||r(u)||^2`` per sample and ``J_r^T r`` (the gradient of ``||r||^2 / 2``) for ``r = residual(u)``.

    u: (P, ...); residual: (B, ...) -> (B, ...), e.g. ``A(D(u)) - y``. Evaluated ``chunk_size`` samples at a
    time in float32 (float64 stays float64) on a detached clone inside ``inference_mode(False)`` +
    ``enable_grad()`` (safe under ComfyUI's inference mode). Returns ``(sq: (P,) float64, grad: (P, ...)`` in
    ``u``'s working dtype, or ``None`` when ``need_grad`` is false, which runs under ``no_grad``). An
    :class:`AdaptiveChunk` halves its size when a chunk runs out of memory.
    """
    work = compute_dtype(u.dtype)
    chunks = chunk_size if isinstance(chunk_size, AdaptiveChunk) else AdaptiveChunk(chunk_size)

    def one(part: Tensor) -> tuple[Tensor, Tensor | None]:
        with torch.inference_mode(False):
            part = part.detach().clone().to(work)
            if not need_grad:
                with torch.no_grad():
                    return residual(part).reshape(part.shape[0], -1).square().sum(1).to(torch.float64), None
            with torch.enable_grad():
                part.requires_grad_(True)
                sq = residual(part).reshape(part.shape[0], -1).square().sum(1)
                (g,) = torch.autograd.grad(0.5 * sq.sum(), part, allow_unused=True)
            return sq.detach().to(torch.float64), (torch.zeros_like(part) if g is None else g.detach())

    values, grads = zip(*chunks.map(u, one), strict=True)
    return torch.cat(values), (torch.cat(grads) if need_grad else None)


def estimate_gamma2(forward: TensorMap, shape: tuple[int, ...], *, n_probes: int, dtype: torch.dtype,
                    device: torch.device | str | None = None, seed: int = 0) -> float:
    """``||A||_F^2 / m`` (mean eigenvalue of ``A A^T``) by Hutchinson: ``mean ||A u||^2 / m``, u Rademacher.

    forward: the linear ``A`` on a batch (n, *shape) -> (n, m...); shape: one input's shape (e.g. (3, H, W)).
    Deterministic: the probes come from a private generator seeded ``seed``.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.randint(0, 2, (n_probes, *shape), generator=g, device=device).to(dtype) * 2 - 1
    with torch.inference_mode(False), torch.no_grad():
        au = forward(u).reshape(n_probes, -1)
    return float(au.to(torch.float64).square().sum(1).mean() / au.shape[1])


# --- the sampler -----------------------------------------------------------------------------------------

def sample_afdps(denoise: Denoiser, z: Tensor, sigmas: Tensor, *, forward: TensorMap | None = None,
                 y: Tensor | None = None, sigma_y: float | None = None, decode: TensorMap | None = None,
                 config: AFDPSConfig | None = None,
                 generator: torch.Generator | None = None,
                 callback: Callable[[AFDPSStepInfo], None] | None = None) -> AFDPSResult:
    """AFDPS-SDE (module docstring): ``P`` weighted particles targeting ``p(z0 | y)``.

    Args:
        denoise: ``denoise(z, sigma) -> z0_hat``; z: (P, ...) all particles at once, sigma: (P,) of z's dtype;
            called under ``torch.no_grad()`` once per step (K calls), never back-propagated.
        z: (P, ...) initial noise at ``sigmas[0]`` (``N(0, I)`` for ``sigmas[0] = 1``), one row per particle.
        sigmas: 1-D levels from ``sigmas[0] <= 1`` down to exactly 0 (``K = len(sigmas) - 1`` steps).
        forward: the linear degradation ``A``: (B, ...) images -> (B, ...) measurements, differentiable.
        y: one measurement ``(1, ...)`` matching ``A``'s output for one image; copied once.
        sigma_y: measurement noise std on ``y``'s scale (> 0): ``y = A(D(z0)) + N(0, sigma_y^2 I)``.
            ``forward``, ``y`` and ``sigma_y`` go together: all three, or none of them to sample the prior
            (the run then uses the ``"none"`` potential whatever ``config.potential`` says).
        decode: differentiable latent -> image map (any tensors it saves must be ordinary, non-inference
            tensors, see style.md §3.3.6), or ``None`` for pixel space.
        config: :class:`AFDPSConfig` (default: the recommended configuration).
        generator: source of all randomness (move noise, resampling, the final draw) on ``z``'s device;
            ``None`` takes one seed from torch's global RNG (:mod:`~.rng`), as ``torch.randn`` would.
        callback: called once per step after the weight update and resampling, with an
            :class:`AFDPSStepInfo`; ComfyUI's callback may raise to interrupt.

    Returns:
        :class:`AFDPSResult` with the final particles, weights, summaries (best, mean, sample, image mean and
        per-pixel std), ESS trace, number of resampling events and the evidence estimate.
    """
    config = AFDPSConfig() if config is None else config
    levels = check_sigmas(sigmas)
    if levels[-1] != 0.0:
        raise ValueError(f"AFDPS needs sigmas ending at 0 (the posterior is the target at s = 0), "
                         f"got last sigma {levels[-1]:.6g}")
    given = {"forward": forward is not None, "y": y is not None, "sigma_y": sigma_y is not None}
    if not any(given.values()):                     # no measurement: the prior
        config = dataclasses.replace(config, potential="none")
    elif not all(given.values()):
        missing = ", ".join(name for name, ok in given.items() if not ok)
        raise ValueError(f"forward, y and sigma_y go together (a measurement), or none of them (prior "
                         f"sampling); missing: {missing}")
    elif not (math.isfinite(sigma_y) and sigma_y > 0):
        raise ValueError(f"sigma_y must be > 0, got {sigma_y!r}")
    if config.weights == "W1" and decode is not None:
        raise ValueError("W1 weights need the Laplacian of mu, which a decoder does not give: they are for "
                         "pixel space (decode=None); use W2 for latents")
    generator = generator_or_default(generator, z.device)
    n_steps, n_particles = len(levels) - 1, z.shape[0]
    work = compute_dtype(z.dtype)
    if y is not None:
        if y.ndim < 1 or y.shape[0] != 1:
            raise ValueError(f"y must be one measurement with a batch dimension of 1, got shape {tuple(y.shape)}")
        with torch.inference_mode(False), torch.no_grad():
            y = y.detach().clone()

    def decoded(u: Tensor) -> Tensor:
        return u if decode is None else decode(u)

    def residual_to(target: Tensor) -> TensorMap:
        def residual(u: Tensor) -> Tensor:
            ax = forward(decoded(u))
            return ax - target.to(device=ax.device, dtype=ax.dtype)
        return residual

    chunk = AdaptiveChunk(config.chunk_size)    # halves on out-of-memory, for the rest of the run
    gamma2 = config.gamma2
    if gamma2 is None and config.potential != "none":
        with torch.no_grad():
            image_shape = tuple(chunk.map(z[:1].to(work), decoded)[0].shape[1:])
        gamma2 = estimate_gamma2(forward, image_shape, n_probes=config.gamma_probes, dtype=work,
                                 device=z.device)

    def potential(x: Tensor, x0_hat: Tensor, sigma: float, *, first: bool) -> tuple[Tensor, Tensor]:
        """(mu_s: (P,) float64, proposal gradient g: (P, ...) work dtype) at level sigma > 0."""
        if config.potential == "none":
            return torch.zeros(n_particles, dtype=torch.float64, device=x.device), torch.zeros_like(x)
        tau2 = tempered_variance(config.potential, sigma, sigma_y, gamma2)
        if config.potential == "noised" and decode is not None:     # VE form on latents (afdps.md §2.6)
            if sigma >= 1.0:
                return torch.zeros(n_particles, dtype=torch.float64, device=x.device), torch.zeros_like(x)
            scale, tau2 = 1.0 / (1.0 - sigma), latent_noised_variance(sigma, sigma_y, gamma2)
            sq, grad = residual_value_and_grad(x * scale, residual_to(y), chunk)
            return sq / (2 * tau2), (scale / tau2) * grad
        if config.potential == "noised":
            sq, grad = residual_value_and_grad(x, residual_to((1.0 - sigma) * y), chunk)
            return sq / (2 * tau2), grad / tau2
        gain = tweedie_gain(sigma)
        if first and gain == 0.0:
            return torch.zeros(n_particles, dtype=torch.float64, device=x.device), torch.zeros_like(x)
        sq, grad = residual_value_and_grad(x0_hat, residual_to(y), chunk)
        mu = torch.zeros_like(sq) if first else sq / (2 * tau2)
        return mu, (gain / tau2) * grad

    def final_potential(x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu_0 = ||A D(x) - y||^2 / (2 sigma_y^2): (P,) float64, decoded images (P, ...))."""
        with torch.inference_mode(False), torch.no_grad():
            images = torch.cat(chunk.map(x, lambda part: decoded(part.to(work)))) if decode is not None else x
            if config.potential == "none":
                return torch.zeros(n_particles, dtype=torch.float64, device=x.device), images
            sq, _ = residual_value_and_grad(images, lambda u: forward(u) - y.to(u.dtype), chunk,
                                            need_grad=False)
        return sq / (2 * sigma_y**2), images

    def call_denoiser(x: Tensor, sigma: float) -> Tensor:
        with torch.no_grad():
            x0 = denoise(x.to(z.dtype), z.new_full((n_particles,), sigma))
        if x0.shape != x.shape:
            raise ValueError(f"denoise returned {tuple(x0.shape)} for particles of shape {tuple(x.shape)}")
        return x0.detach().to(work)

    weighted = config.weights != "none"
    ode = config.variant == "ode"
    # ESS < c P, with a relative slack of 1e-9 so that rounding never resamples uniform weights (c = 1)
    threshold = config.resample_threshold * n_particles * (1.0 - 1e-9)

    def maybe_resample(logw: Tensor, ess: float, tensors: list[Tensor]) -> tuple[Tensor, list[Tensor], bool]:
        if not weighted or ess >= threshold:
            return logw, tensors, False
        idx = resample(logw, generator, config.resampling)
        return uniform_log_weights(n_particles, like=logw), [t[idx] for t in tensors], True

    pixel_shape = tuple(z.shape[1:])
    if config.weights == "W1" and config.potential == "noised":
        aty = adjoint_apply(forward, y, pixel_shape, work)                   # A^T y, for d mu / ds
        y_sq = float(y.to(torch.float64).square().sum())

    def w1_increment(x: Tensor, x0: Tensor, mu: Tensor, g: Tensor, sigma: float, step: float, v2: float) -> Tensor:
        if config.potential == "none":
            return torch.zeros_like(mu)
        tau2 = tempered_variance("noised", sigma, sigma_y, gamma2)
        r_dot_y = (x.reshape(n_particles, -1).to(torch.float64) @ aty.reshape(-1).to(torch.float64)
                   - (1 - sigma) * y_sq)
        dmu = noised_potential_rate(2 * tau2 * mu, r_dot_y, sigma, sigma_y, gamma2)
        return step * reaction_rate(g, x, x0, sigma, v2, 0.0 if ode else config.kappa, dmu)

    norm2_cache: list[float] = []

    def jacobian_norm2(x0: Tensor) -> float:
        """``||A||^2`` (pixel space) or ``||A J_D||^2`` at the first ``z0_hat`` (latents), computed once."""
        if not norm2_cache:
            if config.operator_norm2 is not None:
                norm2_cache.append(config.operator_norm2)
            elif decode is None:
                norm2_cache.append(estimate_operator_norm2(forward, pixel_shape, dtype=work, device=z.device))
            else:
                norm2_cache.append(estimate_jacobian_norm2(lambda u: forward(decode(u)), x0[:1]))
        return norm2_cache[0]

    def guidance_lipschitz(x0: Tensor, sigma: float) -> float:
        """Estimate of the Lipschitz constant of the proposal gradient at level ``sigma`` (for the kappa clip)."""
        if config.potential == "none":
            return 0.0
        if config.potential == "tweedie":
            return jacobian_norm2(x0) * tweedie_gain(sigma) ** 2 / tempered_variance("tweedie", sigma, sigma_y, gamma2)
        return jacobian_norm2(x0) / tempered_variance("noised", sigma, sigma_y, gamma2)

    def correct(x: Tensor, x0: Tensor, mu: Tensor, g: Tensor, sigma: float):
        """ULA corrector at level sigma > 0; no weight change (afdps.md §2.5). ``Lip(grad mu_s') =
        ||A J_D||^2 / ((1 - s')^2 tau^2)`` for both forms of ``noised`` (``tau_s'^2`` of the pixel form)."""
        lip = 0.0 if config.potential == "none" else guidance_lipschitz(x0, sigma)
        h = langevin_step_size(sigma, lip, config.corrector_delta)
        for _ in range(config.corrector_steps):
            x = langevin_move(x, x0, g, sigma, h, fresh_noise(x, generator))
            x0 = call_denoiser(x, sigma)
            mu, g = potential(x, x0, sigma, first=False)
        return x, x0, mu, g

    # Stage I: the initial noise is a draw of p_{s_0}; weight it by exp(-mu_{s_0}) (0 for tweedie).
    x = z.detach().to(work)
    x0_hat = call_denoiser(x, levels[0])
    mu, g = potential(x, x0_hat, levels[0], first=True)
    logw, log_z = reweight(uniform_log_weights(n_particles, like=mu), -mu) if weighted else (
        uniform_log_weights(n_particles, like=mu), 0.0)
    logw, x = quarantine(logw, x)
    ess_trace = [effective_sample_size(logw)]
    n_resampled = 0
    kappa_trace: list[float] = []
    logw, (x, x0_hat, mu, g), did = maybe_resample(logw, ess_trace[0], [x, x0_hat, mu, g])
    n_resampled += did
    images = x

    for i in range(n_steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        step = sigma - sigma_next
        v2 = 0.0 if ode else noise_variance(sigma, config.eta_v)
        noise_std = math.sqrt(v2 * step)
        if ode:                                       # Euler probability-flow predictor, no guidance
            x_new = reference_mean(x, x0_hat, sigma, step, 0.0)
        else:
            kappa = config.kappa if config.kappa_clip is None else clipped_kappa(
                config.kappa, config.kappa_clip, step, v2, guidance_lipschitz(x0_hat, sigma))
            kappa_trace.append(kappa)
            xi = fresh_noise(x, generator)
            x_new = reference_mean(x, x0_hat, sigma, step, config.eta_v) - kappa * v2 * step * g + (
                noise_std * xi)
        if config.weights == "W1":                    # Euler of the reaction rate at the old state
            incr = w1_increment(x, x0_hat, mu, g, sigma, step, v2)
        if sigma_next > 0:
            x0_new = call_denoiser(x_new, sigma_next)
            mu_new, g_new = potential(x_new, x0_new, sigma_next, first=False)
        else:
            mu_new, images = final_potential(x_new)
            x0_new, g_new = x_new, g
        if config.weights == "W2":
            incr = mu - mu_new
            if not ode:
                incr = incr + girsanov_log_ratio(g, xi, noise_std, kappa)
        if weighted:
            try:
                logw, d_log_z = reweight(logw, incr)
            except ValueError as err:                 # every particle quarantined: nothing left to continue
                raise NonFiniteError(
                    f"AFDPS step {i + 1} of {n_steps} (sigma {sigma:.4g}): every particle has NaN or Inf values "
                    f"(all {n_particles} quarantined); the run is stopped. Usual causes: a model or VAE in a "
                    f"precision that overflows, or a kappa too large for a small sigma_y.") from err
            log_z += d_log_z
        logw, x_new = quarantine(logw, x_new)
        if ode and sigma_next > 0 and config.corrector_steps > 0:
            x_new, x0_new, mu_new, g_new = correct(x_new, x0_new, mu_new, g_new, sigma_next)
            logw, x_new = quarantine(logw, x_new)
        ess = effective_sample_size(logw)
        ess_trace.append(ess)
        resampled = False
        if i < n_steps - 1:
            logw, (x_new, x0_new, mu_new, g_new), resampled = maybe_resample(
                logw, ess, [x_new, x0_new, mu_new, g_new])
            n_resampled += resampled
        if callback is not None:
            callback({"x": x.to(z.dtype), "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": x0_hat.to(z.dtype), "ess": ess, "resampled": resampled,
                      "log_weights": logw})
        x, x0_hat, mu, g = x_new, x0_new, mu_new, g_new

    if config.weights == "W1":
        log_evidence = math.nan                        # the dropped Laplacian term invalidates log Z
    elif weighted and config.potential != "none":
        m = y[0].numel()
        log_evidence = log_z - 0.5 * m * math.log(2 * math.pi * sigma_y**2)
    elif weighted:
        log_evidence = log_z
    else:
        log_evidence = math.nan
    sample_index = int(torch.multinomial(weights_from_log(logw).to(x.device), 1, generator=generator))
    if decode is None:
        images = x
    else:                                   # quarantined particles: zero images too (weight 0, finite sums)
        images = torch.where(batch_view(torch.isfinite(logw), images), images, torch.zeros_like(images))
    return AFDPSResult(particles=x.to(z.dtype), log_weights=logw, images=images.to(z.dtype),
                       ess=torch.tensor(ess_trace, dtype=torch.float64), n_resampled=int(n_resampled),
                       log_evidence=float(log_evidence), sample_index=sample_index,
                       kappa=torch.tensor(kappa_trace, dtype=torch.float64))
