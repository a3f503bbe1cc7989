"""FlowDPS and FlowChef: one sampling loop, with the data-consistency rule as a parameter (its config).

FlowDPS (Kim, Kim & Ye, ICCV 2025, arXiv 2503.08136; official ``sd3_sampler.py``), per step ``s -> s'``
(the paper's Section 2):

    z0 = denoise(z, s);   z1 = z + (1 - s) v = (z - (1 - s) z0) / s              (noise estimate)
    u = z0;  repeat K = 3 times:  u = u - step_size * grad_u loss(u)             (data consistency)
    z0_y = (1 - s) z0 + s u                                                       (blend)
    n = sqrt(s') z1 + sqrt(1 - s') xi,   xi ~ N(0, I) fresh each step             (stochastic renoise)
    z = (1 - s') z0_y + s' n

FlowChef (the baseline in the same repository): one gradient ``g`` of the same loss at ``z0``, no blend,
no fresh noise: ``z = z0 + s' (z1 - z0) - step_size * g``. PSLD, the third method there, is the same
update with the gradient taken with respect to ``z`` through the denoiser (``samplers/psld.py``).

The classifier-free guidance of step 1 of the paper happens inside ``denoise`` (ComfyUI's GUIDER), so CFG
and CFG schedules are not sampler parameters here.

Numerics: gradients are taken inside ``torch.inference_mode(False)`` + ``torch.enable_grad()`` on a detached
clone of ``z0`` in float32 (float64 stays float64), so the loop runs under ComfyUI's inference mode; the
denoiser is called under ``torch.no_grad()`` and never back-propagated (except by PSLD, whose config asks
the loop for the denoiser's graph). The loss is summed over the batch,
so each sample gets the gradient of its own loss. Every step's result is cast back to ``z``'s dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .checks import check_integer
from .flow import noise_from_x0
from .loop import check_finite, check_sigmas, compute_dtype, fresh_noise, gradient
from .rng import generator_or_default
from .schedules import Schedule, check_range, resolve
from .types import ConfigError, DataLoss, Denoiser, StepInfo

__all__ = [
    "FlowChefConfig",
    "FlowDPSConfig",
    "PosteriorUpdate",
    "data_consistency",
    "data_gradient",
    "sample_flow_posterior",
]


def data_gradient(z0: Tensor, data_loss: DataLoss) -> Tensor:
    """``grad_z0 sum_b data_loss(z0)_b``, in float32 (float64 for float64 input).

    z0: (B, ...); ``data_loss`` must return shape (B,). Works when the caller is under
    ``torch.inference_mode()``: the gradient is taken on an ordinary clone of ``z0``. A loss that does not
    depend on ``z0`` (e.g. ``torch.zeros(B)``) has gradient zero.
    """
    with torch.inference_mode(False), torch.enable_grad():
        u = z0.detach().clone().to(compute_dtype(z0.dtype)).requires_grad_(True)
        loss = data_loss(u)
        if tuple(loss.shape) != (u.shape[0],):
            raise ValueError(f"data_loss must return one value per sample, shape ({u.shape[0]},); "
                             f"got {tuple(loss.shape)}")
        if not loss.requires_grad:
            return torch.zeros_like(u)
        g = gradient(loss.sum(), u)
        return torch.zeros_like(u) if g is None else g.detach()


def data_consistency(z0: Tensor, data_loss: DataLoss, *, step_size: float, dc_steps: int) -> Tensor:
    """``dc_steps`` (K) gradient-descent steps ``u <- u - step_size * grad loss(u)`` from ``u = z0``.

    z0: (B, ...). The steps run in float32 (float64 stays float64) and the result has ``z0``'s dtype.
    A zero step size returns ``z0`` without evaluating the loss (no decoder cost).
    """
    if step_size == 0 or dc_steps == 0:
        return z0
    u = z0.to(compute_dtype(z0.dtype))
    for _ in range(dc_steps):
        u = u - step_size * data_gradient(u, data_loss)
    return u.to(z0.dtype)


class PosteriorUpdate(Protocol):
    """A data-consistency rule: what a config must provide to drive :func:`sample_flow_posterior`."""

    def update(self, z: Tensor, z0: Tensor, sigma: float, sigma_next: float, *, i: int, n_steps: int,
               data_loss: DataLoss, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One step ``sigma -> sigma_next`` from ``z`` and the denoiser's ``z0``; returns
        ``(z_next, denoised)`` where ``denoised`` is the data-consistent x0 estimate (for previews).

        A rule that differentiates the denoiser (PSLD) also defines ``needs_denoiser_graph(i, n_steps) ->
        bool``; at the steps where it is true the loop passes ``z`` as a float32 leaf that requires grad and
        ``z0 = denoise(z)`` with its autograd graph (the same single denoiser call per step)."""
        ...


BLEND_RULES = ("paper", "full")
NOISE_RULES = ("paper",)


@dataclass(frozen=True)
class FlowDPSConfig:
    """FlowDPS with the official defaults (SD3-medium, NFE 28, ``solve.py``).

    The residual space and the norm are not here: they belong to the data term
    (:func:`~.data_term.measurement_loss`).
    """

    dc_steps: int = 3
    """K, gradient steps on ``z0`` per sampling step (official: 3)."""
    step_size: float | Schedule = 15.0
    """Gradient step size, constant or a :class:`Schedule` over the steps (official: 15 as ``solve.py``
    passes it; the sampler function's own default is 30). With the paper's un-squared norm it is a
    distance in latent space per gradient step."""
    blend: str | float | Schedule = "paper"
    """Weight ``w`` of the data-consistent ``u`` in ``z0_y = (1 - w) z0 + w u``: ``"paper"`` is ``w = s``
    (trust ``u`` more when the noise is high), ``"full"`` is ``w = 1`` (use ``u``), or a number / Schedule
    in [0, 1]."""
    noise_mixing: str | float | Schedule = "paper"
    """Weight ``c`` of fresh noise in the renoising ``n = sqrt(1 - c^2) z1 + c xi`` (unit variance kept):
    ``"paper"`` is ``c = sqrt(1 - s')``; a number / Schedule in [0, 1] instead (``0`` is deterministic,
    DDIM-like; TriPS found a decreasing weight better). Any fixed ``c > 0`` refreshes a fixed fraction of
    the noise however small the step, so without a data term the output is not the prior even in the
    many-step limit: the paper's rule under-disperses (see tests/samplers/test_flowdps_exact.py)."""

    def __post_init__(self) -> None:
        check_integer("dc_steps", self.dc_steps, minimum=1)
        check_range("step_size", self.step_size, 0.0)
        for name, rules in (("blend", BLEND_RULES), ("noise_mixing", NOISE_RULES)):
            value = getattr(self, name)
            if isinstance(value, str):
                if value not in rules:
                    raise ConfigError(name, f"must be one of {rules}, a number or a Schedule", value)
            else:
                check_range(name, value, 0.0, 1.0)

    def blend_weight(self, sigma: float, i: int, n_steps: int) -> float:
        """``w`` at step ``i`` (noise level ``sigma``)."""
        if isinstance(self.blend, str):
            return sigma if self.blend == "paper" else 1.0          # "full" (the only other rule)
        return resolve(self.blend, i, n_steps)

    def noise_weights(self, sigma_next: float, i: int, n_steps: int) -> tuple[float, float]:
        """``(sqrt(1 - c^2), c)`` at step ``i`` (next noise level ``sigma_next``): weights of ``z1`` and ``xi``."""
        if isinstance(self.noise_mixing, str):                      # "paper", the only rule
            return math.sqrt(sigma_next), math.sqrt(max(0.0, 1.0 - sigma_next))
        c = resolve(self.noise_mixing, i, n_steps)
        return math.sqrt(max(0.0, 1.0 - c * c)), c

    def update(self, z: Tensor, z0: Tensor, sigma: float, sigma_next: float, *, i: int, n_steps: int,
               data_loss: DataLoss, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One FlowDPS step (module docstring); ``s' = 0`` returns ``z0_y`` and draws no noise."""
        u = data_consistency(z0, data_loss, step_size=resolve(self.step_size, i, n_steps),
                             dc_steps=self.dc_steps)
        w = self.blend_weight(sigma, i, n_steps)
        z0_y = (1 - w) * z0 + w * u
        if sigma_next == 0:
            return z0_y, z0_y
        z1 = noise_from_x0(z, z0, sigma)
        keep, c = self.noise_weights(sigma_next, i, n_steps)
        n = keep * z1 + c * fresh_noise(z0, generator)
        return (1 - sigma_next) * z0_y + sigma_next * n, z0_y


@dataclass(frozen=True)
class FlowChefConfig:
    """FlowChef as in the FlowDPS repository: one gradient at ``z0``, no blend, deterministic."""

    step_size: float | Schedule = 15.0
    """Gradient step size, constant or a :class:`Schedule` (``solve.py`` passes 15; the sampler
    function's own default is 50)."""

    def __post_init__(self) -> None:
        check_range("step_size", self.step_size, 0.0)

    def update(self, z: Tensor, z0: Tensor, sigma: float, sigma_next: float, *, i: int, n_steps: int,
               data_loss: DataLoss, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``z' = z0 + s' (z1 - z0) - step_size * g``, ``g = grad loss(z0)``; ``generator`` is unused."""
        step_size = resolve(self.step_size, i, n_steps)
        z_next = z0 if sigma_next == 0 else z0 + sigma_next * (noise_from_x0(z, z0, sigma) - z0)
        if step_size == 0:
            return z_next, z0
        correction = (step_size * data_gradient(z0, data_loss)).to(z0.dtype)
        return z_next - correction, z0 - correction


def _checked(z0: Tensor, z: Tensor) -> Tensor:
    if z0.shape != z.shape:
        raise ValueError(f"denoise returned {tuple(z0.shape)} for z of shape {tuple(z.shape)}")
    return z0


def sample_flow_posterior(denoise: Denoiser, z: Tensor, sigmas: Tensor, data_loss: DataLoss,
                          config: FlowDPSConfig | FlowChefConfig | PosteriorUpdate, *,
                          generator: torch.Generator | None = None,
                          callback: Callable[[StepInfo], None] | None = None) -> Tensor:
    """Sample ``z0 ~ p(z0 | y)`` approximately with FlowDPS, FlowChef or PSLD (chosen by ``config``'s type).

    Args:
        denoise: ``denoise(z, sigma) -> z0_hat``, z: (B, ...) e.g. (B, C, h, w) with any C, h, w;
            sigma: (B,) tensor of ``z``'s dtype. Called once per step under ``torch.no_grad()``, except at
            the steps where ``config.needs_denoiser_graph(i, n_steps)`` (PSLD): then with autograd on, on
            a float32 (float64 stays) leaf ``z``, and it must be differentiable.
        z: (B, ...) start at ``sigmas[0]``, e.g. pure noise for ``sigmas[0] = 1`` (ComfyUI's
            ``noise_scaling`` for less).
        sigmas: 1-D noise levels from ``sigmas[0] <= 1`` down, non-increasing; the last may be 0 (the
            result is then the data-consistent x0 estimate of the last step). ``len(sigmas) - 1`` steps.
        data_loss: ``z0 -> (B,)`` per-sample loss including the decoder (:func:`measurement_loss`); for
            PSLD the two-term :func:`~.psld.psld_data_term`.
        config: :class:`FlowDPSConfig`, :class:`FlowChefConfig`, :class:`~.psld.PSLDConfig` (any object
            with the :class:`PosteriorUpdate` method).
        generator: source of FlowDPS's fresh noise, a ``torch.Generator`` on ``z``'s device (ComfyUI:
            the bridge derives one from the node's seed). ``None`` takes one seed from torch's global RNG
            (:mod:`~.rng`): ``torch.manual_seed`` reproduces the run and two calls give two different
            draws, as with ``torch.randn``. FlowChef and PSLD draw nothing.
        callback: called once per step, after the update, with the k-diffusion payload
            ``{"x": z before the step (at sigma), "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
            "denoised": data-consistent x0 estimate}``. ComfyUI's callback may raise to interrupt.

    Returns:
        (B, ...) sample at ``sigmas[-1]``, ``z``'s dtype and device.
    """
    levels = check_sigmas(sigmas)
    n_steps = len(levels) - 1
    generator = generator_or_default(generator, z.device)
    batch = z.shape[0]
    needs_graph = getattr(config, "needs_denoiser_graph", None)
    for i in range(n_steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        if needs_graph is not None and needs_graph(i, n_steps):
            with torch.inference_mode(False), torch.enable_grad():
                z_leaf = z.detach().clone().to(compute_dtype(z.dtype)).requires_grad_(True)
                z0 = _checked(denoise(z_leaf, z_leaf.new_full((batch,), sigma)), z)
                check_finite(z0, "the model's prediction", i, n_steps, sigma)
                z_next, denoised = config.update(z_leaf, z0, sigma, sigma_next, i=i, n_steps=n_steps,
                                                 data_loss=data_loss, generator=generator)
        else:
            with torch.no_grad():
                z0 = _checked(denoise(z, z.new_full((batch,), sigma)), z)
            check_finite(z0, "the model's prediction", i, n_steps, sigma)
            z_next, denoised = config.update(z, z0.detach(), sigma, sigma_next, i=i, n_steps=n_steps,
                                             data_loss=data_loss, generator=generator)
        check_finite(z_next, "the data-consistency update", i, n_steps, sigma)
        if callback is not None:
            callback({"x": z, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        z = z_next.to(z.dtype)
    return z
