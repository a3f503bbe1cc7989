"""AFDPS for rectified flow: a twisted-SMC ensemble sampler of the posterior (pure PyTorch).

AFDPS (Chen, Ren, Min, Ying, Izzo, arXiv 2506.03979) moves ``P`` weighted particles with a guided reverse SDE
and corrects the guidance with importance weights, so that the weighted ensemble targets the exact posterior
of the (discretised) prior. This is its rectified-flow form, with a
recommended configuration: Euler-Maruyama on the given sigma grid, noise level ``V^2 = 2 eta_v s``, the
discrete twisted-SMC ("W2") weights, the ``tweedie`` potential family with the stop-gradient decoder-VJP
proposal gradient, and systematic resampling when ``ESS < 0.5 P`` (never after the last step).

What the weights can do depends on the dimension (docs/afdps_posterior_outputs.md, measured on the exact
image-scale Gaussian problems): in a few dimensions with many particles they make the ensemble exact; on images
they collapse onto one particle within the first steps at any affordable ``P`` (4-16), and resampling then
only clones it. So images are sampled without resampling (``resample_threshold=0``): the particles stay
independent guided chains, their plain spread is the uncertainty map (calibrated to within 0.95-1.17 of the
exact posterior std there), and :attr:`AFDPSResult.uncertainty` says which map a run gives and whether it is
calibrated. The run ends on the denoised estimate followed by one data-consistency step
(``config.final_step``), so no noise of the last move is left in the output on any grid.

One short loop (:func:`sample_afdps`) drives small objects chosen by :class:`AFDPSConfig` through the tables
below (no string dispatch inside the loop):

* a potential ``mu_s`` (``afdps_potentials.py``; ``config.potential``): it guides the moves and weights them,
  and ends at ``mu_0 = ||y - A D(z)||^2 / (2 sigma_y^2)``, the negative log-likelihood;
* a move (``afdps_moves.py``; ``config.variant``): the guided Euler-Maruyama step (``"sde"``), or the Euler
  probability-flow predictor followed, after the weight update, by Langevin corrector steps (``"ode"``); the
  last step (``config.final_step``) ends on the denoised estimate, then the data-consistency step;
* a weighting (``config.weights``): W2 (``afdps_moves.py``), exact for any proposal gradient and any
  intermediate potentials: as ``P -> infinity`` the weighted particles target the posterior of the discretised
  prior, which converges to the true posterior as the grid is refined.

The research options (the pixel-space ``"noised"`` potential, the paper's W1 weights, no weights) live in
``afdps_research.py`` and plug into the same loop. What the nodes use: SDE + ``tweedie`` + W2 with the kappa
clip, and ODE + the latent ``"noised"`` potential + W2.

Per step ``s -> s'``: move, evaluate the new level (one batched ``denoise`` call under ``torch.no_grad``, the
potential: P decoder forward + VJPs, ``chunk_size`` particles at a time with a decoder), reweight, quarantine
non-finite particles, (ODE: correct), ESS, resample if ``ESS < resample_threshold * P`` (not after the last
step), callback. After the last step: the data-consistency step (one decoder forward + VJP per particle) and
the uncertainty map.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypedDict

import torch
from torch import Tensor

from .afdps_moves import (
    DataConsistencyStep,
    EndOnDenoised,
    GuidedEulerMaruyama,
    LangevinCorrector,
    Level,
    ProbabilityFlowEuler,
    Proposal,
    TwistedWeights,
    Weighting,
    clipped_kappa,
    girsanov_log_ratio,
    langevin_move,
    langevin_step_size,
    noise_variance,
    reference_mean,
)
from .afdps_potentials import (
    AdaptiveChunk,
    LatentNoisedPotential,
    Likelihood,
    Measurement,
    MeasurementPotential,
    NoPotential,
    ParticleSpace,
    Potential,
    TweediePotential,
    estimate_gamma2,
    estimate_jacobian_norm2,
    estimate_operator_norm2,
    latent_noised_variance,
    residual_value_and_grad,
    tempered_variance,
    tweedie_gain,
)
from .afdps_research import NoWeights, PixelNoisedPotential, ReactionRateWeights
from .checks import (
    check_choice,
    check_fraction,
    check_integer,
    check_non_negative,
    check_optional_integer,
    check_optional_positive,
    check_positive,
    check_sigma_y,
)
from .loop import NonFiniteError, batch_view, check_sigmas, compute_dtype
from .rng import generator_or_default
from .smc import (
    RESAMPLING_SCHEMES,
    effective_sample_size,
    normalize_log_weights,
    quarantine,
    resample,
    reweight,
    uniform_log_weights,
    weights_from_log,
)
from .types import Denoiser, TensorMap

__all__ = [
    "FINAL_STEPS",
    "MAP_MIN_ESS",
    "MAP_MIN_FRACTION",
    "POTENTIALS",
    "VARIANTS",
    "WEIGHTINGS",
    "AFDPSConfig",
    "AFDPSResult",
    "AFDPSStepInfo",
    "AdaptiveChunk",
    "EnsembleUncertainty",
    "clipped_kappa",
    "ensemble_uncertainty",
    "estimate_gamma2",
    "estimate_jacobian_norm2",
    "estimate_operator_norm2",
    "girsanov_log_ratio",
    "healthy_ess",
    "langevin_move",
    "langevin_step_size",
    "latent_noised_variance",
    "noise_variance",
    "reference_mean",
    "residual_value_and_grad",
    "sample_afdps",
    "tempered_variance",
    "tweedie_gain",
]

Corrector = Callable[[Level, float, Potential, Callable[[Tensor, float], Level], torch.Generator], Level]


# --- the options: name -> what it builds -----------------------------------------------------------------

def noised_potential(likelihood: Likelihood) -> Potential:
    """The ``noised`` family: the VE form on latents; in pixel space the pixel form (a research option)."""
    if likelihood.space.decode is None:
        return PixelNoisedPotential(likelihood)
    return LatentNoisedPotential(likelihood)


POTENTIAL_FAMILIES: Mapping[str, Callable[[Likelihood], Potential] | None] = {
    "tweedie": TweediePotential,
    "noised": noised_potential,
    "none": None,                                   # no likelihood: NoPotential
}
WEIGHT_SCHEMES: Mapping[str, Callable[[Potential, ParticleSpace], Weighting]] = {
    "W2": TwistedWeights.build,
    "W1": ReactionRateWeights.build,
    "none": NoWeights.build,
}


def sde_moves(config: AFDPSConfig) -> tuple[Proposal, Corrector | None]:
    """AFDPS-SDE: guided Euler-Maruyama moves, no corrector."""
    return GuidedEulerMaruyama(config.eta_v, config.kappa, config.kappa_clip), None


def ode_moves(config: AFDPSConfig) -> tuple[Proposal, Corrector | None]:
    """AFDPS-ODE: the Euler probability-flow predictor, then ``corrector_steps`` Langevin steps."""
    steps = config.corrector_steps
    return ProbabilityFlowEuler(), (LangevinCorrector(steps, config.corrector_delta) if steps > 0 else None)


VARIANT_MOVES: Mapping[str, Callable[[AFDPSConfig], tuple[Proposal, Corrector | None]]] = {
    "sde": sde_moves,
    "ode": ode_moves,
}

FINAL_STEPS = ("move", "denoised", "dc")
"""``AFDPSConfig.final_step``: the variant's own move to ``s = 0``; end on the denoised estimate; end on it, then
one data-consistency step (docs/afdps_posterior_outputs.md)."""

POTENTIALS = tuple(POTENTIAL_FAMILIES)
WEIGHTINGS = tuple(WEIGHT_SCHEMES)
VARIANTS = tuple(VARIANT_MOVES)
EXACT_GRADIENT = ("noised", "none")
"""Potentials with an exact gradient (and, in pixel space, a particle-independent Laplacian)."""


# --- the config and its checks ---------------------------------------------------------------------------

FIELD_CHECKS: tuple[tuple[str, Callable[[str, object], object]], ...] = (
    ("potential", functools.partial(check_choice, choices=POTENTIALS)),
    ("weights", functools.partial(check_choice, choices=WEIGHTINGS)),
    ("variant", functools.partial(check_choice, choices=VARIANTS)),
    ("resampling", functools.partial(check_choice, choices=RESAMPLING_SCHEMES)),
    ("final_step", functools.partial(check_choice, choices=FINAL_STEPS)),
    ("eta_v", check_non_negative),
    ("kappa", check_non_negative),
    ("kappa_clip", check_optional_positive),
    ("gamma2", check_optional_positive),
    ("operator_norm2", check_optional_positive),
    ("corrector_delta", check_positive),
    ("resample_threshold", check_fraction),
    ("gamma_probes", functools.partial(check_integer, minimum=1)),
    ("chunk_size", functools.partial(check_optional_integer, minimum=1)),
    ("corrector_steps", functools.partial(check_integer, minimum=0)),
)
"""One check per field: the field's name and its check (which raises :class:`ConfigError` naming the field)."""

REQUIREMENTS: tuple[tuple[str, str, str, tuple[str, ...], str], ...] = (
    ("variant", "ode", "potential", EXACT_GRADIENT,
     "the ODE variant's Langevin corrector needs the exact gradient of mu"),
    ("weights", "W1", "potential", EXACT_GRADIENT, "W1 weights need the exact gradient and Laplacian of mu"),
)
"""Cross-field rules: (field, value, other field, the values it allows then, why)."""


@dataclass(frozen=True)
class AFDPSConfig:
    """AFDPS settings: the SDE + ``tweedie`` + W2 moves and weights with SMC resampling, ending on the
    denoised estimate followed by one data-consistency step (chosen on the exact image-scale Gaussian problems,
    docs/afdps_posterior_outputs.md; the literal last Euler-Maruyama step is ``final_step="move"``).
    For images pass ``resample_threshold=0`` (and, as the nodes do, ``kappa_clip=0.5``): the configuration
    measured to give a calibrated uncertainty map. The paper's own EDM experiments use ``V = G``, multinomial
    resampling that is switched off, and a likelihood at the noisy particle, which in RF form has very high
    weight variance."""

    variant: str = "sde"
    """``"sde"``: guided Euler-Maruyama moves (AFDPS-SDE, recommended). ``"ode"``: Euler probability-flow
    predictor without guidance, then ``corrector_steps`` Langevin (ULA) steps at the next level targeting
    ``p_s' exp(-mu_s')`` (AFDPS-ODE); it needs the exact gradient of ``mu``, so it takes the
    ``"noised"`` or ``"none"`` potential (pixel space or latents), and costs 1 + corrector_steps denoiser
    calls and 1 + corrector_steps decoder gradients per particle a step."""
    potential: str = "tweedie"
    """Potential family ``mu_s``: ``"tweedie"`` (recommended), ``"noised"`` (the pixel form, or the VE form
    ``mu_s(z) = ||y - A D(z / (1 - s))||^2 / (2 tau^2)`` on latents; exact gradient, for the ODE variant) or
    ``"none"`` (no likelihood: samples the prior)."""
    weights: str = "W2"
    """``"W2"``: discrete twisted-SMC / Girsanov weights (exact for the discretised prior, no Laplacian).
    ``"W1"``: the paper's Euler discretisation of the reaction rate (pixel space and the
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
    """``c`` of the stiffness clip ``kappa_i = min(kappa, c / (dt V^2 L_i))`` (SDE
    with W2 only, where it stays exact). ``None``: no clip (the paper). 0.5 keeps the explicit guidance step
    well inside its stability limit of about 1. Needs ``||A J_D||^2`` (``operator_norm2`` or an estimate)."""
    gamma2: float | None = None
    """``gamma^2`` of the tempered variances, on the scale of ``A(x)``. ``None``: ``||A||_F^2 / m`` (the
    recommendation), estimated with ``gamma_probes`` Rademacher probes. Any value > 0 is exact; it only
    changes the weight variance."""
    gamma_probes: int = 16
    """Rademacher probes for the ``gamma^2`` estimate (a private generator seeded 0: deterministic)."""
    resample_threshold: float = 0.5
    """Resample when ``ESS < resample_threshold * P`` (0 never resamples, 1 always).
    Never after the last step, so that ``best`` is the highest-weight particle of the final weights.
    0.5 is the SMC setting for where the weights stay informative (low dimension, many particles):
    there resampling is what makes the weighted ensemble converge to the posterior. **For images use 0**
    (docs/afdps_posterior_outputs.md): there the weights collapse at any affordable ``P`` (ESS 1 of 8 within the
    first steps on every exact image problem), and resampling then only clones a few particles, which removes
    the ensemble's spread (the uncertainty map: 2-19 % of the exact std) and gains nothing; without it the
    particles stay independent guided chains whose spread is calibrated (:class:`EnsembleUncertainty`). The
    AFDPS nodes default to 0 and say so in their tooltip."""
    resampling: str = "systematic"
    """``"systematic"`` (recommended, lower variance) or ``"multinomial"`` (the paper's Algorithm 1)."""
    chunk_size: int | None = 4
    """Particles per decoder forward + VJP; ``None``: all at once. 1-4 suits SD3 at 768^2.
    Used only with a decoder: in pixel space every particle goes through ``A`` in one pass whatever this says
    (chunking bought nothing there and made runs 2-35x slower)."""
    corrector_steps: int = 1
    """ULA steps per level of the ODE variant (1 is enough)."""
    corrector_delta: float = 0.05
    """ULA step ``h = min(delta s'^2, 0.25 / (Lip + 1 / s'^2))`` (delta = 0.05), with
    ``Lip = ||A||_2^2 / tau_s'^2`` the Lipschitz constant of ``grad mu_s'``."""
    operator_norm2: float | None = None
    """``||A||_2^2`` (pixel space) or ``||A J_D||_2^2`` (latents, the decoder linearised) for the ULA step and
    the kappa clip; ``None``: power iterations of ``J^T J`` (30 for a linear ``A``, 8 at the first
    ``z0_hat`` through the decoder; private seed 0)."""

    final_step: str = "dc"
    """How the run ends (docs/afdps_posterior_outputs.md): ``"move"``: the variant's own move from the last level
    ``s_{K-1}`` to 0 (SDE: an Euler-Maruyama step whose noise ``s_{K-1} sqrt(eta_v^2 + 2 eta_v)`` stays in the
    output: 0.02 on the official 28-step grid, 0.22 on ComfyUI's ``simple`` one); ``"denoised"``: every particle
    ends on its denoised estimate ``z0_hat(z, s_{K-1})`` (deterministic, unguided; the weighted ensemble then
    targets the posterior of the prior chain whose last step is that map, exactly as before); ``"dc"``
    (default): ``"denoised"``, then one data-consistency step towards the measurement
    (:class:`~.afdps_moves.DataConsistencyStep`, one decoder forward + VJP per particle) that is not reweighted:
    it removes the guided chains' remaining misfit on measured pixels, which no grid removes otherwise."""

    def __post_init__(self) -> None:
        for name, check in FIELD_CHECKS:
            check(name, getattr(self, name))
        for name, value, other, allowed, why in REQUIREMENTS:
            if getattr(self, name) == value and getattr(self, other) not in allowed:
                raise ValueError(f"{why}: {other} must be one of {allowed}, got {getattr(self, other)!r}")
        if self.kappa_clip is not None and (self.variant, self.weights) != ("sde", "W2"):
            raise ValueError(f"kappa_clip needs the SDE variant with W2 weights (any kappa_i is exact only "
                             f"there), got variant {self.variant!r}, weights {self.weights!r}")


# --- what the sampler reports ----------------------------------------------------------------------------

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


MAP_MIN_ESS = 4.0
MAP_MIN_FRACTION = 0.1
"""The weights count as healthy (informative) while the ESS stays at or above ``max(min(MAP_MIN_ESS, P / 2),
MAP_MIN_FRACTION * P)`` at every step (:func:`healthy_ess`; 4 of 8 or 16 particles, 2 of 4, 400 of 4000): below
that a weighted spread rests on too few particles, and a resampling there clones them."""


def healthy_ess(n_particles: int) -> float:
    """The smallest ESS at which a run's weights count as healthy (:data:`MAP_MIN_FRACTION`)."""
    return max(min(MAP_MIN_ESS, n_particles / 2), MAP_MIN_FRACTION * n_particles)

UNCERTAINTY_SOURCES = ("weighted", "unweighted", "none")


@dataclass(frozen=True, eq=False)
class EnsembleUncertainty:
    """A per-pixel uncertainty map of the decoded ensemble, on an absolute scale, with what it is and whether
    it is calibrated (:func:`ensemble_uncertainty`; measured in docs/afdps_posterior_outputs.md).

    ``std`` is in the images' own units: for images on the [-1, 1] scale (ComfyUI's pixels ``p`` in [0, 1]
    are ``2 p - 1``) a std of 0.1 is 0.05 on the [0, 1] scale. Never normalised by its maximum.
    """

    mean: Tensor
    """(1, C, H, W) the ensemble mean the ``std`` goes with (weighted or plain, as ``source`` says)."""
    std: Tensor
    """(1, C, H, W) per-pixel standard deviation of the decoded particles around ``mean`` (the unbiased,
    effective-sample-size corrected estimate ``sqrt(sum_i w_i (x_i - mean)^2 / (1 - sum_i w_i^2))``)."""
    source: str
    """``"weighted"``: the final weights (healthy: the ESS never fell below :func:`healthy_ess`);
    ``"unweighted"``: the plain spread of the particles (the weights collapsed, or there are none); ``"none"``:
    fewer than two usable particles, ``std`` is 0."""
    calibrated: bool
    """Whether ``std`` is an uncertainty a user can read: the weighted spread of a healthy ensemble, or the
    plain spread of particles that are independent chains (never resampled). False when the particles share
    ancestors (resampled, then the weights collapsed) or when there is no spread to measure."""
    reason: str
    """One line for the user: what the map is and why it is (or is not) calibrated."""
    effective_particles: float
    """The number of particles the map effectively rests on: the final ESS (weighted) or the usable count."""


def ensemble_uncertainty(images: Tensor, log_weights: Tensor, *, weighted: bool, n_resampled: int,
                         ess_min: float) -> EnsembleUncertainty:
    """The uncertainty map of a finished run. images: (P, C, H, W) decoded particles; log_weights: (P,) final
    (``-inf`` for quarantined particles); ``weighted``: whether the run had weights; ``n_resampled``: how often
    it resampled; ``ess_min``: the smallest ESS of the run (after each weight update, before resampling).

    The weighted spread when the weights stayed healthy (``ess_min >= healthy_ess(P)``), otherwise the
    plain spread of the usable particles, which is calibrated only if they are independent chains (no
    resampling: resampling a collapsed ensemble clones a few particles, whose copies then carry equal weights,
    so the final ESS alone would not tell). On the exact image problems the weights
    always collapse, and the plain spread of ``P = 8`` chains was within 0.95-1.17 of the exact posterior std
    (coverage of a 90 % interval 0.82-0.86; 0.835 for 8 exact samples).
    """
    logw = normalize_log_weights(log_weights)
    usable = torch.isfinite(logw)
    n = int(usable.sum())
    x = images.to(compute_dtype(images.dtype))
    plain = torch.where(usable, torch.full_like(logw, -math.log(max(n, 1))), torch.full_like(logw, -math.inf))
    ess = effective_sample_size(logw) if weighted else float(n)
    if n < 2:
        w = weights_from_log(plain).to(device=x.device, dtype=x.dtype)
        mean = (batch_view(w, x) * x).sum(0, keepdim=True)
        return EnsembleUncertainty(mean.to(images.dtype), torch.zeros_like(mean).to(images.dtype), "none", False,
                                   f"only {n} usable particle: no spread to measure (use at least 2, ideally 8)",
                                   float(n))
    healthy = weighted and ess_min >= healthy_ess(n)
    if healthy:
        source, calibrated = "weighted", True
        reason = (f"weighted spread of the ensemble (final ESS {ess:.1f} of {n}, never below {ess_min:.1f}): the "
                  f"weights stayed informative, so this is the SMC estimate of the posterior std")
        chosen = logw
    else:
        source, chosen, ess = "unweighted", plain, float(n)
        if not weighted:
            calibrated = True
            reason = (f"no weights: plain spread of {n} independent guided chains (calibrated on the exact "
                      f"Gaussian benchmarks; an approximation, not an exact posterior quantity)")
        elif n_resampled == 0:
            calibrated = True
            reason = (f"the weights collapsed (ESS down to {ess_min:.2f} of {n}): plain spread of the {n} "
                      f"independent guided chains (calibrated on the exact Gaussian benchmarks; an "
                      f"approximation, not an exact posterior quantity)")
        else:
            calibrated = False
            reason = (f"the weights collapsed (ESS down to {ess_min:.2f} of {n}) and the run resampled "
                      f"{n_resampled} times, so the particles share ancestors and their spread underestimates "
                      f"the uncertainty; set the ESS threshold to 0 for a calibrated map")
    w = weights_from_log(chosen).to(device=x.device, dtype=x.dtype)
    mean = (batch_view(w, x) * x).sum(0, keepdim=True)
    sum_w2 = float(weights_from_log(chosen).square().sum())
    var = (batch_view(w, x) * (x - mean).square()).sum(0, keepdim=True) / max(1.0 - sum_w2, 1e-12)
    return EnsembleUncertainty(mean.to(images.dtype), var.sqrt().to(images.dtype), source, calibrated, reason,
                               ess)


@dataclass(frozen=True, eq=False)
class AFDPSResult:
    """The weighted ensemble at ``s = 0`` and its summaries.

    Particles are latents ``(P, ...)`` (pixel images in pixel space); ``images`` are the decoded particles
    ``(P, C, H, W)`` (the particles themselves when ``decode`` is ``None``). Weighted summaries use the
    final normalised weights; quarantined particles have weight 0 and zeroed states.

    What the weighted ensemble targets as ``P -> infinity``: ``p_K(z) exp(-mu_0(z))`` normalised, with ``p_K`` the
    law of the discretised prior chain: Euler-Maruyama moves on the grid, then the last step the run took
    (``final_step="move"``: one more Euler-Maruyama step; ``"denoised"`` and ``"dc"``: the map
    ``z -> z0_hat(z, s_{K-1})``, which loses the prior's variance below the last noise level, ``s_{K-1}^2`` per
    unit-variance coordinate). With ``"dc"`` the weights are those of the particles before the data-consistency
    step, which then moves them without reweighting: no longer exact at a finite grid, but the step vanishes as
    ``s_{K-1} -> 0`` for particles that fit the data (on the d = 2 / 8 mixture problems the three endings gave
    the same errors to within Monte-Carlo noise). On images the weights collapse (see :attr:`uncertainty`):
    then ``best``, ``mean`` and ``sample`` are one guided chain each, and the ensemble's plain spread is the map.
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
    uncertainty: EnsembleUncertainty
    """The per-pixel uncertainty map of the decoded ensemble, with its provenance and whether it is calibrated
    (:func:`ensemble_uncertainty`); use it rather than :attr:`image_std`, which is the weighted spread whatever
    state the weights are in (0 once they collapse)."""
    kappa: Tensor = field(default_factory=functools.partial(torch.zeros, 0, dtype=torch.float64))
    """(K,) float64 guidance factor used at each guided SDE step (``kappa``, or less where ``kappa_clip`` cut
    it); K - 1 values when the last step ends on the denoised estimate (unguided); empty for the ODE variant."""
    dc_gain: Tensor = field(default_factory=functools.partial(torch.zeros, 0, dtype=torch.float64))
    """(P,) float64 gain of the final data-consistency step per particle (the fraction of the residual removed
    in the top singular direction, :class:`~.afdps_moves.DataConsistencyStep`); empty without that step."""

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
        """(1, ...) the highest-weight particle (the paper's output, App. D.2; one guided chain, i.e. roughly
        one posterior draw, once the weights collapse)."""
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
        """(1, ...) weighted mean of the decoded particles (the MMSE estimate while the weights are healthy; the
        highest-weight particle once they collapse: :attr:`uncertainty` ``.mean`` is the ensemble mean then)."""
        return self._weighted_mean(self.images)

    @property
    def image_std(self) -> Tensor:
        """(1, ...) per-pixel weighted standard deviation of the decoded particles (biased, ``sum w (x - m)^2``):
        the posterior std only while the weights are healthy; 0 once they collapse onto one particle. The
        uncertainty map to show is :attr:`uncertainty`."""
        x = self.images.to(compute_dtype(self.images.dtype))
        mean = self._weighted_mean(x)
        var = (batch_view(self.weights.to(x.dtype), x) * (x - mean).square()).sum(0, keepdim=True)
        return var.sqrt().to(self.images.dtype)

    def _weighted_mean(self, x: Tensor) -> Tensor:
        work = x.to(compute_dtype(x.dtype))
        return (batch_view(self.weights.to(work.dtype), work) * work).sum(0, keepdim=True).to(x.dtype)


# --- the loop's small steps ------------------------------------------------------------------------------

def resolve_measurement(config: AFDPSConfig, forward: TensorMap | None, y: Tensor | None,
                        sigma_y: float | None) -> tuple[AFDPSConfig, Measurement | None]:
    """The validated measurement with a private copy of ``y``; without any of the three, prior sampling: no
    measurement and the config with the ``"none"`` potential."""
    if forward is None and y is None and sigma_y is None:
        return dataclasses.replace(config, potential="none"), None
    if forward is None or y is None or sigma_y is None:
        given = {"forward": forward, "y": y, "sigma_y": sigma_y}
        missing = ", ".join(name for name, value in given.items() if value is None)
        raise ValueError(f"forward, y and sigma_y go together (a measurement), or none of them (prior "
                         f"sampling); missing: {missing}")
    sigma_y = check_sigma_y(sigma_y, "the AFDPS likelihood")
    if y.ndim < 1 or y.shape[0] != 1:
        raise ValueError(f"y must be one measurement with a batch dimension of 1, got shape {tuple(y.shape)}")
    with torch.inference_mode(False), torch.no_grad():
        return config, Measurement(forward, y.detach().clone(), sigma_y)


def make_potential(config: AFDPSConfig, measurement: Measurement | None, space: ParticleSpace,
                   probe: Tensor) -> Potential:
    """The potential ``config.potential`` names (:data:`POTENTIAL_FAMILIES`); ``probe: (1, ...)`` one particle,
    decoded once for the image shape when ``gamma2`` is estimated."""
    family = POTENTIAL_FAMILIES[config.potential]
    if family is None or measurement is None:       # resolve_measurement: no measurement, potential "none"
        return NoPotential(space)
    return family(Likelihood.build(measurement, space, probe, gamma2=config.gamma2,
                                   gamma_probes=config.gamma_probes, operator_norm2=config.operator_norm2))


def call_denoiser(denoise: Denoiser, z: Tensor, sigma: float, dtype: torch.dtype) -> Tensor:
    """``z0_hat`` of the particles ``z: (P, ...)`` at ``sigma``: one batched call in the model's ``dtype``
    under ``torch.no_grad()``, returned in ``z``'s dtype."""
    with torch.no_grad():
        z0 = denoise(z.to(dtype), torch.full((z.shape[0],), sigma, dtype=dtype, device=z.device))
    if z0.shape != z.shape:
        raise ValueError(f"denoise returned {tuple(z0.shape)} for particles of shape {tuple(z.shape)}")
    return z0.detach().to(z.dtype)


def evaluate(denoise: Denoiser, potential: Potential, dtype: torch.dtype, z: Tensor, sigma: float,
             first: bool = False) -> Level:
    """The particles ``z`` at level ``sigma > 0`` with their ``z0_hat``, potential and proposal gradient."""
    z0 = call_denoiser(denoise, z, sigma, dtype)
    mu, g = potential.value_and_grad(z, z0, sigma, first=first)
    return Level(z, z0, mu, g)


def reweighted(logw: Tensor, increment: Tensor, i: int, n_steps: int, sigma: float) -> tuple[Tensor, float]:
    """:func:`~.smc.reweight`, or :class:`NonFiniteError` naming the step when no particle is left."""
    try:
        return reweight(logw, increment)
    except ValueError as err:                 # every particle quarantined: nothing left to continue
        raise NonFiniteError(
            f"AFDPS step {i + 1} of {n_steps} (sigma {sigma:.4g}): every particle has NaN or Inf values "
            f"(all {logw.shape[0]} quarantined); the run is stopped. Usual causes: a model or VAE in a "
            f"precision that overflows, or a kappa too large for a small sigma_y.") from err


def quarantined(logw: Tensor, level: Level) -> tuple[Tensor, Level]:
    """:func:`~.smc.quarantine` of the level's particles (weight 0 and zeroed state where not finite)."""
    logw, z = quarantine(logw, level.z)
    return logw, level._replace(z=z)


def resampled(logw: Tensor, level: Level, generator: torch.Generator, scheme: str) -> tuple[Tensor, Level]:
    """The level resampled from the weights (``scheme``), with uniform weights."""
    idx = resample(logw, generator, scheme)
    return uniform_log_weights(logw.shape[0], like=logw), Level(*(t[idx] for t in level))


def final_moves(config: AFDPSConfig, potential: Potential) -> tuple[Proposal | None, DataConsistencyStep | None]:
    """What ends the run (``config.final_step``): the move of the last step (``None``: the variant's own) and
    the data-consistency step after it (``None``: none; also without a measurement, i.e. prior sampling)."""
    if config.final_step == "move":
        return None, None
    dc = None
    if config.final_step == "dc" and isinstance(potential, MeasurementPotential):
        dc = DataConsistencyStep(potential.likelihood)
    return EndOnDenoised(), dc


# --- the sampler -----------------------------------------------------------------------------------------

def sample_afdps(denoise: Denoiser, z: Tensor, sigmas: Tensor, *, forward: TensorMap | None = None,
                 y: Tensor | None = None, sigma_y: float | None = None, decode: TensorMap | None = None,
                 config: AFDPSConfig | None = None,
                 generator: torch.Generator | None = None,
                 callback: Callable[[AFDPSStepInfo], None] | None = None) -> AFDPSResult:
    """AFDPS (module docstring): ``P`` weighted particles targeting ``p(z0 | y)``.

    Args:
        denoise: ``denoise(z, sigma) -> z0_hat``; z: (P, ...) all particles at once, sigma: (P,) of z's dtype;
            called under ``torch.no_grad()`` once per step (K calls; ODE: + one per corrector step), never
            back-propagated.
        z: (P, ...) initial noise at ``sigmas[0]`` (``N(0, I)`` for ``sigmas[0] = 1``), one row per particle.
        sigmas: 1-D levels from ``sigmas[0] <= 1`` down to exactly 0 (``K = len(sigmas) - 1`` steps).
        forward: the linear degradation ``A``: (B, ...) images -> (B, ...) measurements, differentiable.
        y: one measurement ``(1, ...)`` matching ``A``'s output for one image; copied once.
        sigma_y: measurement noise std on ``y``'s scale (> 0): ``y = A(D(z0)) + N(0, sigma_y^2 I)``.
            ``forward``, ``y`` and ``sigma_y`` go together: all three, or none of them to sample the prior
            (the run then uses the ``"none"`` potential whatever ``config.potential`` says).
        decode: differentiable latent -> image map (any tensors it saves must be ordinary, non-inference
            tensors: ComfyUI runs nodes under inference mode), or ``None`` for pixel space.
        config: :class:`AFDPSConfig` (default: its defaults, the configuration chosen by measurement).
        generator: source of all randomness (move noise, resampling, the final draw) on ``z``'s device;
            ``None`` takes one seed from torch's global RNG (:mod:`~.rng`), as ``torch.randn`` would.
        callback: called once per step after the weight update and resampling, with an
            :class:`AFDPSStepInfo`; ComfyUI's callback may raise to interrupt.

    Returns:
        :class:`AFDPSResult` with the final particles, weights, summaries (best, mean, sample, image mean and
        per-pixel std), the uncertainty map with its provenance, ESS trace, number of resampling events and the
        evidence estimate (``log p(y)`` of the discretised prior whose last step is the one the run took).
    """
    config = AFDPSConfig() if config is None else config
    levels = check_sigmas(sigmas)
    if levels[-1] != 0.0:
        raise ValueError(f"AFDPS needs sigmas ending at 0 (the posterior is the target at s = 0), "
                         f"got last sigma {levels[-1]:.6g}")
    config, measurement = resolve_measurement(config, forward, y, sigma_y)
    chunk = AdaptiveChunk(config.chunk_size if decode is not None else None)   # pixel space: one pass
    space = ParticleSpace(tuple(z.shape[1:]), compute_dtype(z.dtype), decode, chunk)
    potential = make_potential(config, measurement, space, z[:1])
    weights = WEIGHT_SCHEMES[config.weights](potential, space)
    propose, correct = VARIANT_MOVES[config.variant](config)
    propose_last, data_consistency = final_moves(config, potential)
    generator = generator_or_default(generator, z.device)
    at_level = functools.partial(evaluate, denoise, potential, z.dtype)
    n_steps, n_particles = len(levels) - 1, z.shape[0]
    # ESS < c P, with a relative slack of 1e-9 so that rounding never resamples uniform weights (c = 1)
    threshold = config.resample_threshold * n_particles * (1.0 - 1e-9)

    # Stage I: the initial noise is a draw of p_{s_0}; weight it by exp(-mu_{s_0}) (0 for tweedie).
    level = at_level(z.detach().to(space.work), levels[0], first=True)
    logw, log_z = uniform_log_weights(n_particles, like=level.mu), 0.0
    if weights.weighted:
        logw, log_z = reweight(logw, -level.mu)
    logw, level = quarantined(logw, level)
    ess_trace, kappas = [effective_sample_size(logw)], []
    n_resampled = int(weights.weighted and ess_trace[0] < threshold)
    if n_resampled:
        logw, level = resampled(logw, level, generator, config.resampling)

    for i in range(n_steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        mover = propose_last if propose_last is not None and sigma_next == 0 else propose
        move = mover(level, sigma, sigma_next, potential, generator)
        if move.kappa is not None:
            kappas.append(move.kappa)
        if sigma_next > 0:
            new = at_level(move.z, sigma_next)
        else:                                       # s = 0: the negative log-likelihood and the images
            mu_0, images = potential.final(move.z)
            new = Level(move.z, move.z, mu_0, level.g)
        if weights.weighted:
            increment = weights.increment(level, new, move, sigma, sigma - sigma_next)
            logw, d_log_z = reweighted(logw, increment, i, n_steps, sigma)
            log_z += d_log_z
        logw, new = quarantined(logw, new)
        if correct is not None and sigma_next > 0:  # ODE: Langevin at s', no weight change
            logw, new = quarantined(logw, correct(new, sigma_next, potential, at_level, generator))
        ess = effective_sample_size(logw)
        ess_trace.append(ess)
        resample_now = weights.weighted and i < n_steps - 1 and ess < threshold
        if resample_now:
            logw, new = resampled(logw, new, generator, config.resampling)
            n_resampled += 1
        if callback is not None:
            callback({"x": level.z.to(z.dtype), "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": level.z0.to(z.dtype), "ess": ess, "resampled": resample_now,
                      "log_weights": logw})
        level = new

    dc_gain = torch.zeros(0, dtype=torch.float64)
    if data_consistency is not None:                # after the last weight update; not reweighted
        moved, dc_gain = data_consistency(level.z, levels[-2], generator)
        logw, moved = quarantine(logw, moved)
        level = level._replace(z=moved, z0=moved)
        images = space.images(moved)
    sample_index = int(torch.multinomial(weights_from_log(logw).to(level.z.device), 1, generator=generator))
    if space.decode is None:
        images = level.z
    else:                                   # quarantined particles: zero images too (weight 0, finite sums)
        images = torch.where(batch_view(torch.isfinite(logw), images), images, torch.zeros_like(images))
    images = images.to(z.dtype)
    return AFDPSResult(particles=level.z.to(z.dtype), log_weights=logw, images=images,
                       ess=torch.tensor(ess_trace, dtype=torch.float64), n_resampled=n_resampled,
                       log_evidence=float(weights.log_evidence(log_z, potential)), sample_index=sample_index,
                       uncertainty=ensemble_uncertainty(images, logw, weighted=weights.weighted,
                                                        n_resampled=n_resampled, ess_min=min(ess_trace)),
                       kappa=torch.tensor(kappas, dtype=torch.float64), dc_gain=dc_gain.cpu())
