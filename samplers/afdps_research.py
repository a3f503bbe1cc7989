"""AFDPS research options: paper-literal pieces the nodes do not use, kept for comparison and exactness tests.

They plug into the same loop (:func:`~.afdps.sample_afdps`) through the same protocols as the product path
(:class:`~.afdps_potentials.Potential`, :class:`~.afdps_moves.Weighting`); ``AFDPSConfig`` selects them by name.
All are for pixel space (``decode=None``) with a linear ``A``:

* :class:`PixelNoisedPotential` (``potential="noised"`` without a decoder):
  ``mu_s(x) = ||(1 - s) y - A x||^2 / (2 tau_s^2)``, ``tau_s^2 = (1 - s)^2 sigma_y^2 + gamma^2 s^2``, exact
  gradient ``g = A^T (A x - (1 - s) y) / tau_s^2``. Its first-level potential is not 0: the initial noise is
  importance-weighted by ``exp(-mu_{s_0})`` (one could sample that Gaussian first-level law exactly instead; the
  weights are exact too, but degenerate when ``A`` has many rows, so prefer ``"tweedie"`` for images).
* :class:`ReactionRateWeights` (``weights="W1"``): the paper's weights, ``log w += dt r(z)`` with the reaction
  rate ``r = (kappa - 1/2) V^2 |g|^2 - c_H.g + (1 - kappa) V^2 grad log p_s.g + d mu_s / ds``
  (:func:`reaction_rate`), at the state before the move; its Laplacian term ``-(kappa - 1/2) V^2 ||A||_F^2 /
  tau_s^2`` is the same for every particle and is dropped (exact for the weights, not for the evidence, which is
  then nan). W1 needs the Laplacian of ``mu``, which a nonlinear decoder does not give: pixel space only, with
  the ``"noised"`` (or ``"none"``) potential.
* :class:`NoWeights` (``weights="none"``): no weights and no resampling, i.e. the bare guided dynamics (biased;
  for comparison only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .afdps_moves import Level, Move, StatelessWeights
from .afdps_potentials import (
    Likelihood,
    MeasurementPotential,
    ParticleSpace,
    Potential,
    noised_variance,
)
from .flow import noise_from_x0
from .loop import gradient
from .types import TensorMap

__all__ = [
    "NoWeights",
    "PixelNoisedPotential",
    "ReactionRateWeights",
    "adjoint_apply",
    "noised_potential_rate",
    "reaction_rate",
]


# --- the pixel-space noised potential --------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PixelNoisedPotential(MeasurementPotential):
    """``mu_s(x) = ||(1 - s) y - A x||^2 / (2 tau_s^2)`` with its exact gradient (module docstring)."""

    def value_and_grad(self, z: Tensor, z0_hat: Tensor, sigma: float, *, first: bool) -> tuple[Tensor, Tensor]:
        lik = self.likelihood
        tau2 = noised_variance(sigma, lik.sigma_y, lik.gamma2)
        sq, grad = lik.value_and_grad(z, (1.0 - sigma) * lik.y)
        return sq / (2 * tau2), grad / tau2

    def lipschitz(self, z0_hat: Tensor, sigma: float) -> float:
        """``||A||^2 / tau_s^2``."""
        lik = self.likelihood
        return lik.norm2.at(z0_hat) / noised_variance(sigma, lik.sigma_y, lik.gamma2)


# --- W1: the paper's reaction-rate weights ---------------------------------------------------------------

def reaction_rate(g: Tensor, z: Tensor, z0_hat: Tensor, sigma: float, v2: float, kappa: float,
                  dmu_ds: Tensor) -> Tensor:
    """W1 log-weight rate per unit reverse time, without the Laplacian term:

    ``(kappa - 1/2) V^2 |g|^2 + (v + (V^2 / 2s) eps_hat).g - (1 - kappa) V^2 (eps_hat / s).g + d mu_s / ds``

    with ``v = (z - z0_hat) / s``, ``eps_hat = (z - (1 - s) z0_hat) / s`` (needs ``s > 0``). The omitted
    ``-(kappa - 1/2) V^2 Laplacian(mu)`` is particle-independent for a linear ``A`` in pixel space, so it
    cancels in the normalised weights. ``V^2 = 0`` gives the ODE rate ``v.g + d mu / ds``.
    g, z, z0_hat: (P, ...); dmu_ds: (P,). Returns (P,) float64.
    """
    g64, v = _flat64(g), _flat64((z - z0_hat) / sigma)
    eps = _flat64(noise_from_x0(z, z0_hat, sigma))
    drift = v + (v2 / (2 * sigma)) * eps - (1 - kappa) * (v2 / sigma) * eps
    return (kappa - 0.5) * v2 * g64.square().sum(1) + (drift * g64).sum(1) + dmu_ds.to(torch.float64)


def _flat64(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).to(torch.float64)


def noised_potential_rate(sq: Tensor, residual_dot_y: Tensor, sigma: float, sigma_y: float,
                          gamma2: float) -> Tensor:
    """``d mu_s / ds`` of the ``noised`` family ``mu_s = ||A x - (1 - s) y||^2 / (2 tau_s^2)`` at fixed x:
    ``r.y / tau^2 - ||r||^2 (d tau^2 / ds) / (2 tau^4)``, ``r = A x - (1 - s) y``,
    ``d tau^2 / ds = -2 (1 - s) sigma_y^2 + 2 gamma^2 s``. sq = ||r||^2, residual_dot_y = r.y: (P,)."""
    tau2 = noised_variance(sigma, sigma_y, gamma2)
    dtau2 = -2 * (1 - sigma) * sigma_y**2 + 2 * gamma2 * sigma
    return residual_dot_y / tau2 - sq * dtau2 / (2 * tau2**2)


def adjoint_apply(forward: TensorMap, y: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``A^T y`` for a linear ``A`` via autograd; y: (1, ...) -> (1, *shape)."""
    with torch.inference_mode(False), torch.enable_grad():
        u = torch.zeros((1, *shape), dtype=dtype, device=y.device, requires_grad=True)
        aty = gradient((forward(u) * y.to(dtype)).sum(), u)
    return torch.zeros_like(u).detach() if aty is None else aty.detach()


@dataclass(frozen=True, eq=False)
class ReactionRateWeights:
    """W1: ``log w += dt r(z)`` at the state before the move (module docstring); no evidence."""

    likelihood: Likelihood | None
    """The pixel ``noised`` potential's likelihood; ``None`` with the ``none`` potential (rate 0)."""
    aty: Tensor | None
    """(1, ...) ``A^T y``, for ``d mu / ds``."""
    y_sq: float
    """``||y||^2``."""
    weighted: ClassVar[bool] = True

    @classmethod
    def build(cls, potential: Potential, space: ParticleSpace) -> ReactionRateWeights:
        if space.decode is not None:
            raise ValueError("W1 weights need the Laplacian of mu, which a decoder does not give: they are for "
                             "pixel space (decode=None); use W2 for latents")
        if not isinstance(potential, PixelNoisedPotential):
            return cls(None, None, 0.0)
        lik = potential.likelihood
        return cls(lik, adjoint_apply(lik.measurement.forward, lik.y, space.shape, space.work),
                   float(lik.y.to(torch.float64).square().sum()))

    def increment(self, before: Level, after: Level, move: Move, sigma: float, dt: float) -> Tensor:
        if self.likelihood is None or self.aty is None:            # both or neither (build)
            return torch.zeros_like(before.mu)
        sigma_y, gamma2 = self.likelihood.sigma_y, self.likelihood.gamma2
        tau2 = noised_variance(sigma, sigma_y, gamma2)
        r_dot_y = _flat64(before.z) @ self.aty.reshape(-1).to(torch.float64) - (1 - sigma) * self.y_sq
        dmu = noised_potential_rate(2 * tau2 * before.mu, r_dot_y, sigma, sigma_y, gamma2)
        kappa = 0.0 if move.kappa is None else move.kappa
        return dt * reaction_rate(before.g, before.z, before.z0, sigma, move.v2, kappa, dmu)

    def log_evidence(self, log_z: float, potential: Potential) -> float:
        return math.nan                      # the dropped Laplacian term invalidates log Z


@dataclass(frozen=True)
class NoWeights(StatelessWeights):
    """No weights: the bare guided dynamics (no reweighting, no resampling, evidence nan). The loop never asks
    for an increment (``weighted`` is false); it would be 0."""

    weighted: ClassVar[bool] = False

    def increment(self, before: Level, after: Level, move: Move, sigma: float, dt: float) -> Tensor:
        return torch.zeros_like(before.mu)

    def log_evidence(self, log_z: float, potential: Potential) -> float:
        return math.nan
