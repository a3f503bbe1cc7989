"""AFDPS moves and their weights: how the particles go from one noise level to the next (pure PyTorch).

Per step ``s = s_i -> s' = s_{i+1}``, ``dt = s - s' > 0``, ``V^2 = 2 eta_v s`` ::

    z0_hat = denoise(z, s);   eps_hat = (z - (1 - s) z0_hat) / s                    (eps_hat = z at s = 1)
    m_ref = z + dt (z0_hat - (1 + eta_v) eps_hat)        # Euler-Maruyama mean of the prior reverse SDE
    m_g   = m_ref - dt kappa V^2 g                        # guided proposal mean, g ~ grad mu_s(z)
    z'    = m_g + V sqrt(dt) xi,  xi ~ N(0, I)
    log w += mu_s(z) - mu_s'(z') + kappa V sqrt(dt) g.xi - kappa^2 V^2 dt |g|^2 / 2       (W2)

* :class:`GuidedEulerMaruyama` (AFDPS-SDE): the guided move above; its :class:`Move` carries the Girsanov term
  ``log K_ref(z' | z) / K_g(z' | z)`` (the last two terms). Stiffness: with
  ``kappa_clip = c`` the guidance factor of the step is ``kappa_i = min(kappa, c / (dt V^2 L_i))``, ``L_i`` the
  potential's Lipschitz estimate. W2 uses the actual proposal, so any ``kappa_i`` keeps the weights exact; the
  clip only removes the overshoot of the explicit guidance step when ``sigma_y`` is small.
* :class:`ProbabilityFlowEuler` + :class:`LangevinCorrector` (AFDPS-ODE): the Euler probability-flow predictor
  ``z' = z - dt v`` (no guidance, no noise; W2 weight ``mu_s(z) - mu_s'(z')``), then after the weight update
  ``steps`` unadjusted Langevin steps at ``s'`` on ``p_s' exp(-mu_s')`` with the Tweedie score
  ``-eps_hat / s'`` and the exact ``grad mu_s'`` (no weight change). One extra denoiser call per corrector step.
* :class:`TwistedWeights` (W2): the exact SMC weight of the Euler-Maruyama prior chain tilted by ``exp(-mu_0)``
  at the end, for any proposal gradient and any intermediate potentials.
* The last step (``AFDPSConfig.final_step``): :class:`EndOnDenoised` ends every particle on its denoised estimate
  ``z0_hat(z, s_{K-1})`` (the probability-flow Euler step to 0, exactly: deterministic and unguided, so the
  move leaves no noise and its W2 weight is ``mu_{s_{K-1}}(z) - mu_0(z0_hat)``); :class:`DataConsistencyStep`
  then moves each particle once towards the measurement (a Gaussian proximal step with a perturbed
  measurement), after the last weight update (docs/afdps_posterior_outputs.md).

A :class:`Level` is the particles at one noise level with their denoised estimate, potential and gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor

from .afdps_potentials import Likelihood, ParticleSpace, Potential
from .flow import noise_from_x0
from .loop import batch_view, fresh_noise

__all__ = [
    "SIGNIFICANCE",
    "DataConsistencyStep",
    "EndOnDenoised",
    "GuidedEulerMaruyama",
    "LangevinCorrector",
    "Level",
    "Move",
    "ProbabilityFlowEuler",
    "Proposal",
    "StatelessWeights",
    "TwistedWeights",
    "Weighting",
    "clipped_kappa",
    "dc_error_variance",
    "denoiser_error_variance",
    "girsanov_log_ratio",
    "langevin_move",
    "langevin_step_size",
    "noise_variance",
    "reference_mean",
]


class Level(NamedTuple):
    """The particles at one noise level ``s`` and what the weights and the next move need."""

    z: Tensor
    """(P, ...) particles at ``s`` (the sampler's work dtype)."""
    z0: Tensor
    """(P, ...) their denoised estimate ``z0_hat`` (the particles themselves at ``s = 0``)."""
    mu: Tensor
    """(P,) float64 potential ``mu_s(z)``."""
    g: Tensor
    """(P, ...) proposal gradient at ``z``."""


class Move(NamedTuple):
    """What a proposal did, as the weights need it."""

    z: Tensor
    """(P, ...) the moved particles at the next level."""
    v2: float
    """The noise variance ``V^2`` of the move (0 for a deterministic one)."""
    kappa: float | None
    """Guidance factor of a guided move; ``None`` for an unguided one."""
    log_ratio: Tensor | None
    """(P,) float64 ``log K_ref(z' | z) / K_g(z' | z)`` of a stochastic guided move (W2's Girsanov term);
    ``None`` when the move is the reference kernel itself."""


# --- small pure pieces -----------------------------------------------------------------------------------

def noise_variance(sigma: float, eta_v: float) -> float:
    """``V^2 = 2 eta_v s``: the reverse-SDE noise variance per unit ``s``."""
    return 2.0 * eta_v * sigma


def reference_mean(z: Tensor, z0_hat: Tensor, sigma: float, dt: float, eta_v: float) -> Tensor:
    """Euler-Maruyama mean of the prior reverse SDE with ``V^2 = 2 eta_v s`` over ``dt > 0``:
    ``z + dt (z0_hat - (1 + eta_v) eps_hat)`` with ``eps_hat = (z - (1 - s) z0_hat) / s`` (needs ``s > 0``).

    (``= z + dt c_H``, ``c_H = -v - (V^2 / 2s) eps_hat``.) z, z0_hat: (P, ...)."""
    eps_hat = noise_from_x0(z, z0_hat, sigma)
    return z + dt * (z0_hat - (1.0 + eta_v) * eps_hat)


def girsanov_log_ratio(g: Tensor, xi: Tensor, noise_std: float, kappa: float) -> Tensor:
    """``log K_ref(z' | z) / K_g(z' | z) = kappa V sqrt(dt) g.xi - kappa^2 V^2 dt |g|^2 / 2`` per particle.

    g, xi: (P, ...) the proposal gradient and the move's standard normal noise; ``noise_std = V sqrt(dt)``.
    Returns (P,) float64 (the proposal mean is the reference mean minus ``kappa V^2 dt g``).
    """
    g64 = g.reshape(g.shape[0], -1).to(torch.float64)
    xi64 = xi.reshape(xi.shape[0], -1).to(torch.float64)
    a = kappa * noise_std
    return a * (g64 * xi64).sum(1) - 0.5 * a * a * g64.square().sum(1)


def clipped_kappa(kappa: float, clip: float | None, dt: float, v2: float, lipschitz: float) -> float:
    """``min(kappa, clip / (dt V^2 L))`` (stiffness clip); ``kappa`` without a clip."""
    if clip is None or dt * v2 * lipschitz <= 0:
        return kappa
    return min(kappa, clip / (dt * v2 * lipschitz))


def langevin_step_size(sigma: float, lipschitz: float, delta: float) -> float:
    """ULA step ``h = min(delta s^2, 0.25 / (Lip + 1 / s^2))`` at level ``s > 0``."""
    return min(delta * sigma**2, 0.25 / (lipschitz + 1.0 / sigma**2))


def langevin_move(z: Tensor, z0_hat: Tensor, grad_mu: Tensor, sigma: float, h: float, xi: Tensor) -> Tensor:
    """One ULA step on ``p_s exp(-mu_s)``: ``z + h (score - grad mu) + sqrt(2 h) xi`` with the score
    ``-(z - (1 - s) z0_hat) / s^2`` (Tweedie). z, z0_hat, grad_mu, xi: (P, ...)."""
    score = -noise_from_x0(z, z0_hat, sigma) / sigma
    return z + h * (score - grad_mu) + math.sqrt(2 * h) * xi


# --- moves -----------------------------------------------------------------------------------------------

class Proposal(Protocol):
    """A move of every particle from ``sigma`` to ``sigma_next < sigma``."""

    def __call__(self, level: Level, sigma: float, sigma_next: float, potential: Potential,
                 generator: torch.Generator) -> Move: ...


@dataclass(frozen=True)
class GuidedEulerMaruyama:
    """AFDPS-SDE: one guided Euler-Maruyama step of the prior reverse SDE (module docstring)."""

    eta_v: float
    kappa: float
    kappa_clip: float | None = None

    def __call__(self, level: Level, sigma: float, sigma_next: float, potential: Potential,
                 generator: torch.Generator) -> Move:
        dt = sigma - sigma_next
        v2 = noise_variance(sigma, self.eta_v)
        noise_std = math.sqrt(v2 * dt)
        kappa = self.kappa if self.kappa_clip is None else clipped_kappa(
            self.kappa, self.kappa_clip, dt, v2, potential.lipschitz(level.z0, sigma))
        xi = fresh_noise(level.z, generator)
        m_ref = reference_mean(level.z, level.z0, sigma, dt, self.eta_v)
        z_next = m_ref - kappa * v2 * dt * level.g + noise_std * xi
        return Move(z_next, v2, kappa, girsanov_log_ratio(level.g, xi, noise_std, kappa))


@dataclass(frozen=True)
class ProbabilityFlowEuler:
    """AFDPS-ODE predictor: ``z' = z - dt v``, deterministic and unguided."""

    def __call__(self, level: Level, sigma: float, sigma_next: float, potential: Potential,
                 generator: torch.Generator) -> Move:
        return Move(reference_mean(level.z, level.z0, sigma, sigma - sigma_next, 0.0), 0.0, None, None)


@dataclass(frozen=True)
class LangevinCorrector:
    """AFDPS-ODE corrector: ``steps`` ULA steps at level ``sigma`` on ``p_s exp(-mu_s)``, step size
    :func:`langevin_step_size` with ``delta`` and the potential's Lipschitz estimate; no weight change."""

    steps: int
    delta: float

    def __call__(self, level: Level, sigma: float, potential: Potential,
                 at_level: Callable[[Tensor, float], Level], generator: torch.Generator) -> Level:
        """``at_level(z, sigma)``: the particles ``z`` with their denoised estimate and potential."""
        h = langevin_step_size(sigma, potential.lipschitz(level.z0, sigma), self.delta)
        for _ in range(self.steps):
            xi = fresh_noise(level.z, generator)
            level = at_level(langevin_move(level.z, level.z0, level.g, sigma, h, xi), sigma)
        return level


@dataclass(frozen=True)
class EndOnDenoised:
    """The last step to ``s = 0``: ``z' = z0_hat(z, s)``, the particles' denoised estimate (module docstring)."""

    def __call__(self, level: Level, sigma: float, sigma_next: float, potential: Potential,
                 generator: torch.Generator) -> Move:
        return Move(level.z0, 0.0, None, None)


# --- the final data-consistency step ---------------------------------------------------------------------

SIGNIFICANCE = 3.0
"""z-score above which a particle's residual counts as larger than the measurement noise explains
(:func:`dc_error_variance`): ``||r||^2 / m > sigma_y^2 (1 + 3 sqrt(2 / m))``, the chi-square tail of ``m`` entries."""


def denoiser_error_variance(sigma: float) -> float:
    """``s^2 / ((1 - s)^2 + s^2)``: the variance of ``z0 - z0_hat(z_s)`` per coordinate for a unit-variance
    Gaussian code (the ``tweedie`` family's tempering at ``gamma^2 = 1``)."""
    return sigma**2 / ((1.0 - sigma) ** 2 + sigma**2)


def dc_error_variance(sq: Tensor, m: int, sigma_y: float, gamma2: float, sigma: float) -> Tensor:
    """``r^2``, the variance per code coordinate that the data-consistency step assigns to the error of each
    particle's ``z0_hat`` (treated as white): the unit-variance Tweedie value :func:`denoiser_error_variance` at
    the last level ``sigma``, or more where the particle's residual says so: ``(||r||^2 / m - sigma_y^2) /
    gamma^2`` when ``||r||^2 / m`` exceeds ``sigma_y^2`` by more than :data:`SIGNIFICANCE` standard deviations
    of ``m`` noise entries. sq: (P,) ``||A D(z0_hat) - y||^2`` over the ``m`` measured entries; gamma2:
    ``||A J_D||_F^2 / m``. Returns (P,) float64."""
    floor = denoiser_error_variance(sigma)
    per_entry = sq.to(torch.float64) / m
    significant = per_entry > sigma_y**2 * (1.0 + SIGNIFICANCE * math.sqrt(2.0 / m))
    excess = (per_entry - sigma_y**2).clamp_min(0.0) / gamma2
    return torch.where(significant, excess.clamp_min(floor), torch.full_like(excess, floor))


@dataclass(frozen=True)
class DataConsistencyStep:
    """One step towards the measurement after the last level (``final_step="dc"``).

    Each particle ``z`` (its ``z0_hat`` at the last level ``s_{K-1}``) is treated as ``N(z0, r^2 I)`` around the
    truth, ``r^2`` from :func:`dc_error_variance`, and moved once along the data gradient to the mean of
    ``N(z; z_hat, r^2 I) N(y'; A D(z), sigma_y^2 I)`` in the top singular direction of ``A J_D``::

        z <- z - h J_D^T A^T (A D(z) - y'),   h = r^2 / (sigma_y^2 + r^2 ||A J_D||_2^2)

    with a perturbed measurement ``y' = y + sigma_y xi`` on the entries that depend on the image (the ensemble
    Kalman trick: each particle sees its own noise draw, so the measured part of the ensemble keeps the noise
    level's spread instead of collapsing onto ``y``). Exact in one step for operators whose non-zero singular
    values are equal (inpainting, average-pool SR, in pixel space or through a linear decoder with ``D^T D``
    a multiple of I); smaller singular directions move less. One decoder forward + VJP per particle.
    """

    likelihood: Likelihood

    def __call__(self, z: Tensor, sigma: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(z moved: (P, ...), gain: (P,) float64)`` for particles ``z`` at ``s = 0`` and the last non-zero
        level ``sigma``; ``gain = r^2 L / (sigma_y^2 + r^2 L)`` (``L = ||A J_D||^2``), the fraction of the residual
        removed in the top singular direction (0: no change, 1: onto ``y'``)."""
        lik = self.likelihood
        m = lik.probe.support_size
        frobenius2 = lik.frobenius2.at(z)
        if m == 0 or frobenius2 <= 0:
            return z, torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
        y = lik.y.to(z.device)
        xi = fresh_noise(y.expand(z.shape[0], *y.shape[1:]), generator)
        targets = y + lik.sigma_y * xi * lik.probe.support.to(y.device)
        sq, grad = lik.perturbed_value_and_grad(z, targets)
        norm2 = lik.norm2.at(z)
        r2 = dc_error_variance(sq, m, lik.sigma_y, frobenius2 / m, sigma)
        step = r2 / (lik.sigma_y**2 + r2 * norm2)
        moved = z - batch_view(step.to(device=z.device, dtype=grad.dtype), grad) * grad
        return moved.to(z.dtype), (r2 * norm2 / (lik.sigma_y**2 + r2 * norm2)).to(z.device)


# --- weights ---------------------------------------------------------------------------------------------

class Weighting(Protocol):
    """A weighting scheme: the log-weight increment of a move and what the accumulated ``log Z`` means."""

    weighted: ClassVar[bool]
    """False: no weights at all (no reweighting, no resampling, no evidence)."""

    def increment(self, before: Level, after: Level, move: Move, sigma: float, dt: float) -> Tensor:
        """(P,) log-weight increment of the move ``before`` (at ``sigma``) -> ``after``, over ``dt``."""
        ...

    def log_evidence(self, log_z: float, potential: Potential) -> float:
        """``log p(y)`` from the accumulated SMC estimate ``log_z`` (nan when the scheme gives none)."""
        ...


StatelessT = TypeVar("StatelessT", bound="StatelessWeights")


class StatelessWeights:
    """A weighting that needs nothing of the problem: ``build`` ignores it."""

    @classmethod
    def build(cls: type[StatelessT], potential: Potential, space: ParticleSpace) -> StatelessT:
        """The weighting for this potential and particle space."""
        return cls()


@dataclass(frozen=True)
class TwistedWeights(StatelessWeights):
    """W2: ``mu_s(z) - mu_s'(z')`` plus the move's Girsanov term (exact for the discretised prior)."""

    weighted: ClassVar[bool] = True

    def increment(self, before: Level, after: Level, move: Move, sigma: float, dt: float) -> Tensor:
        incr = before.mu - after.mu
        return incr if move.log_ratio is None else incr + move.log_ratio

    def log_evidence(self, log_z: float, potential: Potential) -> float:
        return log_z - potential.log_normalizer
