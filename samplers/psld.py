"""PSLD as the FlowDPS repository runs it: a data-consistency rule of the shared loop (FlowDPS paper, Section 2).

PSLD (Rout et al., "Solving linear inverse problems provably via posterior sampling with latent diffusion
models", NeurIPS 2023) in the rectified-flow form of the FlowDPS repository's baseline. Per step ``s -> s'``:

    z0 = denoise(z, s)                               (with autograd: the transformer is differentiated)
    x = D(z0)                                        (decoder)
    loss = w_m ||A x - y|| + w_g ||z0 - E(P(y) + x - P(A x))||          (w_m = 1, w_g = 0.1)
    g = grad_z loss                                  (through E, D *and* the denoiser)
    z' = z0 + s' (z1 - z0) - step_size * g,         z1 = (z - (1 - s) z0) / s   (deterministic)

``E`` is the VAE encoder, ``P`` the pseudo-inverse ``A^+`` (super-resolution) or the adjoint ``A^T``. The
second ("gluing") term asks the latent to be a fixed point of encode(decode) after the measured part of the
image is replaced by the measurement. Unlike FlowDPS and FlowChef, the gradient is taken with respect to
``z`` itself, so every step back-propagates through the denoiser: the loop
(:func:`~.flowdps.sample_flow_posterior`) calls the denoiser with autograd on when
:meth:`PSLDConfig.needs_denoiser_graph` says so, and the denoiser must then be differentiable (inside
ComfyUI a private copy of the diffusion model, ``nodes/model_copy.py``). Most expensive and weakest of the
three methods in the published comparison; offered as the baseline researchers compare against.

Numerics: ``z`` enters the denoiser as a float32 leaf (float64 stays float64); the loss is summed over the
batch, so each sample gets the gradient of its own loss when the denoiser treats samples independently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .checks import check_non_negative
from .data_term import image_loss
from .flow import noise_from_x0
from .loop import gradient
from .schedules import Schedule, check_range, resolve
from .types import DataLoss, TensorMap

__all__ = ["PSLDConfig", "PSLDTerms", "psld_data_term", "psld_objective"]


class PSLDTerms(NamedTuple):
    """The two per-sample terms of PSLD's objective, each of shape (B,)."""

    measurement: Tensor
    """``||A D(z0) - y||`` (or the residual space / norm the data term was built with)."""
    gluing: Tensor
    """``||z0 - E(P(y) + D(z0) - P(A D(z0)))||``."""


PSLDDataTerm = Callable[[Tensor], PSLDTerms]
"""``term(z0: (B, ...)) -> PSLDTerms``: what :func:`psld_data_term` returns."""


def psld_data_term(decode: TensorMap | None, encode: TensorMap | None, forward: TensorMap, y: Tensor, *,
                   project: TensorMap, measurement_project: TensorMap | None = None, norm: str = "paper",
                   sigma_y: float | None = None) -> PSLDDataTerm:
    """PSLD's two data terms of a clean-latent estimate, decoding it once.

    Args:
        decode: latent ``z0: (B, C, h, w)`` -> image ``(B, 3, H, W)`` in about [-1, 1], differentiable;
            ``None`` for the identity (pixel-space problems).
        encode: image -> latent in the same space as ``z0`` (inside ComfyUI: the VAE encoder followed by
            ``process_latent_in``), differentiable; ``None`` for the identity.
        forward: the degradation ``A`` on images.
        y: measurement ``(1 or B, ...)`` in ``A``'s output space.
        project: ``P`` of the gluing term: ``op.pinv`` for super-resolution, ``op.adjoint`` otherwise.
        measurement_project: residual space of the measurement term; ``None`` (PSLD's ``||A x - y||``),
            or a projection as in :func:`~.data_term.measurement_loss`.
        norm, sigma_y: norm of the measurement term (``"paper"``: un-squared, PSLD's; ``"squared"`` needs
            ``sigma_y``). The gluing term is always the un-squared Euclidean norm (official code).

    Returns:
        ``term(z0) -> PSLDTerms`` of two (B,) tensors. Tensors ``forward``/``project`` hold must be ordinary
        (non-inference) tensors; ``y`` is copied here.
    """
    measurement = image_loss(forward, y, project=measurement_project, norm=norm, sigma_y=sigma_y)
    with torch.inference_mode(False), torch.no_grad():
        projected_y = project(y.detach().clone()).detach().clone()

    def term(z0: Tensor) -> PSLDTerms:
        batch = z0.shape[0]
        x = decode(z0) if decode is not None else z0
        glued = projected_y.to(device=x.device, dtype=x.dtype) + x - project(forward(x))
        latent = encode(glued) if encode is not None else glued
        if latent.shape != z0.shape:
            raise ValueError(f"the encoder maps the image {tuple(glued.shape)} to {tuple(latent.shape)}, not to "
                             f"the latent shape {tuple(z0.shape)}")
        gluing = torch.linalg.vector_norm((z0 - latent.to(z0.dtype)).reshape(batch, -1), dim=1)
        return PSLDTerms(measurement(x), gluing)

    return term


def psld_objective(value: Tensor | PSLDTerms, measurement_weight: float, gluing_weight: float) -> Tensor:
    """``w_m * measurement + w_g * gluing``, (B,). A plain (B,) tensor is the measurement term alone, which
    is only allowed with ``gluing_weight = 0`` (a data loss without an encoder cannot give the second term)."""
    if isinstance(value, PSLDTerms):
        return measurement_weight * value.measurement + gluing_weight * value.gluing
    if gluing_weight != 0:
        raise ValueError(f"PSLD with gluing_weight={gluing_weight} needs a data term that returns PSLDTerms "
                         f"(build it with psld_data_term, which takes the encoder); got a plain loss. Set "
                         f"gluing_weight=0 to use a plain measurement loss")
    return measurement_weight * value


@dataclass(frozen=True)
class PSLDConfig:
    """PSLD as the FlowDPS repository's baseline (module docstring), with its constants named."""

    step_size: float | Schedule = 15.0
    """Gradient step on ``z``, constant or a :class:`Schedule` over the steps. The repository's ``solve.py``
    passes one ``--step_size`` (default 15) to whichever method it runs."""
    measurement_weight: float = 1.0
    """``w_m``, weight of ``||A D(z0) - y||`` (official: 1.0)."""
    gluing_weight: float = 0.1
    """``w_g``, weight of the gluing term ``||z0 - E(P(y) + D(z0) - P(A D(z0)))||`` (official: 0.1)."""

    def __post_init__(self) -> None:
        check_range("step_size", self.step_size, 0.0)
        check_non_negative("measurement_weight", self.measurement_weight)
        check_non_negative("gluing_weight", self.gluing_weight)

    def step_at(self, i: int, n_steps: int) -> float:
        return resolve(self.step_size, i, n_steps)

    def needs_denoiser_graph(self, i: int, n_steps: int) -> bool:
        """Whether step ``i`` differentiates the denoiser (not when its step size is 0: plain Euler)."""
        return self.step_at(i, n_steps) != 0

    def update(self, z: Tensor, z0: Tensor, sigma: float, sigma_next: float, *, i: int, n_steps: int,
               data_loss: DataLoss | PSLDDataTerm, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``z' = z0 + s' (z1 - z0) - step_size * grad_z loss``; ``generator`` is unused (deterministic).

        z: (B, ...) the leaf the denoiser was called on (``requires_grad`` when
        :meth:`needs_denoiser_graph`); z0: (B, ...) the denoiser's output, carrying the graph from ``z``.
        Returns ``(z_next, z0)`` detached, in ``z0``'s dtype.
        """
        step_size = self.step_at(i, n_steps)
        z_plain, z0_plain = z.detach(), z0.detach()
        z_next = z0_plain if sigma_next == 0 else z0_plain + sigma_next * (
            noise_from_x0(z_plain, z0_plain, sigma) - z0_plain)
        if step_size == 0:
            return z_next, z0_plain
        if not (z.requires_grad and z0.requires_grad):
            raise ValueError("PSLD differentiates the denoiser: z must require grad and z0 = denoise(z) carry "
                             "its graph (sample_flow_posterior does this when needs_denoiser_graph is true; "
                             "the denoiser must be differentiable)")
        with torch.inference_mode(False), torch.enable_grad():
            loss = psld_objective(data_loss(z0), self.measurement_weight, self.gluing_weight)
            if tuple(loss.shape) != (z.shape[0],):
                raise ValueError(f"the PSLD data term must give one value per sample, shape ({z.shape[0]},); "
                                 f"got {tuple(loss.shape)}")
            if not loss.requires_grad:                                  # a loss that ignores z0
                return z_next, z0_plain
            g = gradient(loss.sum(), z)
        if g is None:
            return z_next, z0_plain
        return z_next - (step_size * g.detach()).to(z_next.dtype), z0_plain
