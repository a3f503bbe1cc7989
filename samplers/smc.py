"""Sequential Monte Carlo helpers: log-weights, effective sample size, resampling, evidence (pure PyTorch).

Particles live on the batch axis: ``P`` particles ``z: (P, ...)`` carry log-weights ``logw: (P,)``. All
log-weight arithmetic is done in float64 (half precision makes ``sum w^2`` underflow and the ESS meaningless).
Conventions:

* *normalised* log-weights satisfy ``logsumexp(logw) = 0`` (the weights ``exp(logw)`` sum to 1);
* a particle whose log-weight (or state) is not finite is *quarantined*: its log-weight is ``-inf``, so it has
  weight 0 and no resampling scheme ever selects it;
* the evidence (log normalising constant) is accumulated as ``log Z += logsumexp(logw_prev + incr)`` with
  normalised ``logw_prev``, before the weights are renormalised . After resampling the
  weights are uniform (``-log P``), so the estimate is unaffected by when resampling happens.

Typical step::

    logw, log_z = reweight(logw, incr)            # normalised, + evidence increment
    if effective_sample_size(logw) < threshold * P:
        idx = systematic_resample(logw, generator)
        z, logw = z[idx], uniform_log_weights(P, like=logw)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .loop import batch_view

__all__ = [
    "RESAMPLING_SCHEMES",
    "effective_sample_size",
    "multinomial_resample",
    "normalize_log_weights",
    "quarantine",
    "resample",
    "reweight",
    "systematic_resample",
    "uniform_log_weights",
    "weights_from_log",
]

RESAMPLING_SCHEMES = ("systematic", "multinomial")


def _check_log_weights(logw: Tensor) -> Tensor:
    if logw.ndim != 1 or logw.numel() == 0:
        raise ValueError(f"log-weights must be a non-empty 1-D tensor (P,), got shape {tuple(logw.shape)}")
    return logw.to(torch.float64)


def normalize_log_weights(logw: Tensor) -> Tensor:
    """``logw - logsumexp(logw)`` in float64, max-shifted; non-finite entries (nan, +-inf) become ``-inf``.

    logw: (P,) any float dtype. Returns (P,) float64 with ``logsumexp = 0``. Invariant to adding a constant.
    Raises ``ValueError`` when no particle has a finite log-weight (all particles are quarantined).
    """
    logw = _check_log_weights(logw)
    logw = torch.where(torch.isfinite(logw), logw, torch.full_like(logw, -math.inf))
    top = logw.max()
    if not torch.isfinite(top):
        raise ValueError("all particles have non-finite log-weights: nothing left to normalise")
    shifted = logw - top
    return shifted - torch.logsumexp(shifted, dim=0)


def uniform_log_weights(n: int, *, like: Tensor | None = None) -> Tensor:
    """(n,) normalised uniform log-weights ``-log n`` (float64, on ``like``'s device if given)."""
    device = like.device if like is not None else None
    return torch.full((n,), -math.log(n), dtype=torch.float64, device=device)


def weights_from_log(logw: Tensor) -> Tensor:
    """(P,) float64 probabilities ``softmax(logw)`` (0 for quarantined particles)."""
    return normalize_log_weights(logw).exp()


def effective_sample_size(logw: Tensor) -> float:
    """Kish's ESS ``1 / sum w_i^2`` of the normalised weights, a count in ``[1, P]``.

    P for uniform weights, 1 when one particle holds all the weight; quarantined particles count as weight 0.
    """
    logw = normalize_log_weights(logw)
    return float(torch.exp(-torch.logsumexp(2.0 * logw, dim=0)))


def quarantine(logw: Tensor, particles: Tensor) -> tuple[Tensor, Tensor]:
    """Quarantine particles whose log-weight or state is not finite.

    logw: (P,); particles: (P, ...). Returns ``(logw, particles)``: float64 log-weights with ``-inf`` for
    every particle that had a non-finite log-weight or any non-finite entry, and the particles with those
    particles' states replaced by zeros (so nan/inf cannot leak into weighted sums: weight 0 times a finite
    value is 0). The particles keep their dtype; the log-weights are not renormalised.
    """
    logw = _check_log_weights(logw)
    if particles.shape[0] != logw.shape[0]:
        raise ValueError(f"{logw.shape[0]} log-weights for {particles.shape[0]} particles")
    finite_state = torch.isfinite(particles.reshape(particles.shape[0], -1)).all(dim=1)
    bad = ~(finite_state & torch.isfinite(logw))
    if not bool(bad.any()):
        return logw, particles
    logw = torch.where(bad, torch.full_like(logw, -math.inf), logw)
    return logw, torch.where(batch_view(bad, particles), torch.zeros_like(particles), particles)


def reweight(logw: Tensor, increment: Tensor) -> tuple[Tensor, float]:
    """Multiply the weights by ``exp(increment)``; return the new normalised log-weights and the evidence
    increment ``log sum_i w_i exp(increment_i)`` (with ``w`` the normalised weights before the update).

    logw: (P,) normalised (or not: it is normalised first); increment: (P,). Non-finite increments quarantine
    their particle. Summing the returned evidence increments over a run (plus the initial one) gives the SMC
    estimate of ``log Z``; it is exact bookkeeping whatever the resampling pattern.
    """
    prev = normalize_log_weights(logw)
    incr = increment.to(device=prev.device, dtype=torch.float64).reshape(prev.shape)
    new = torch.where(torch.isfinite(incr), prev + incr, torch.full_like(prev, -math.inf))
    new = torch.where(torch.isfinite(new), new, torch.full_like(new, -math.inf))
    if not bool(torch.isfinite(new).any()):
        raise ValueError("all particles have non-finite log-weights after the update")
    log_z = float(torch.logsumexp(new, dim=0))
    return new - log_z, log_z


def systematic_resample(logw: Tensor, generator: torch.Generator, n: int | None = None) -> Tensor:
    """Systematic resampling: ``n`` (default P) ancestor indices, one uniform offset ``u ~ U[0, 1/n)``.

    logw: (P,) log-weights (normalised or not). Returns (n,) int64 indices, sorted, on ``logw``'s device.
    Particle ``i`` is chosen ``floor(n w_i)`` or ``ceil(n w_i)`` times (so ``E[count_i] = n w_i``);
    quarantined (zero-weight) particles are never chosen. ``generator`` must be on ``logw``'s device.
    """
    w = weights_from_log(logw)
    n = w.shape[0] if n is None else n
    cdf = torch.cumsum(w, dim=0)
    cdf = cdf / cdf[-1]
    u0 = torch.rand((), generator=generator, device=w.device, dtype=torch.float64)
    u = (u0 + torch.arange(n, device=w.device, dtype=torch.float64)) / n
    idx = torch.searchsorted(cdf, u, right=True)
    last_positive = int(torch.nonzero(w > 0).max())
    return idx.clamp(max=last_positive)


def multinomial_resample(logw: Tensor, generator: torch.Generator, n: int | None = None) -> Tensor:
    """Multinomial resampling: ``n`` (default P) i.i.d. draws from the weights (the paper's Algorithm 1).

    logw: (P,). Returns (n,) int64 indices; quarantined particles are never chosen.
    """
    w = weights_from_log(logw)
    n = w.shape[0] if n is None else n
    return torch.multinomial(w, n, replacement=True, generator=generator)


def resample(logw: Tensor, generator: torch.Generator, scheme: str = "systematic",
             n: int | None = None) -> Tensor:
    """Ancestor indices (n,) with the named scheme (``"systematic"`` or ``"multinomial"``)."""
    if scheme == "systematic":
        return systematic_resample(logw, generator, n)
    if scheme == "multinomial":
        return multinomial_resample(logw, generator, n)
    raise ValueError(f"resampling scheme must be one of {RESAMPLING_SCHEMES}, got {scheme!r}")
