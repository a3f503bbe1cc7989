"""The bridge between ComfyUI's sampling machinery and the pure samplers (``samplers/``).

:func:`sample_posterior` has the k-diffusion signature that ``comfy.samplers.KSAMPLER`` calls; the
restoration problem (VAE, operator, measurement, data-term choices) and the method's config travel in
``extra_options``. ComfyUI's model call returns the CFG-combined x0 estimate in model space, which is
exactly the samplers' ``denoise(z, sigma)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import comfy.model_management as mm
import torch

from ..operators import AvgPoolSR, BicubicSR, Composed
from ..samplers import FlowChefConfig, FlowDPSConfig, measurement_loss, sample_flow_posterior
from .decoder import GradDecoder
from .model_family import check_rectified_flow, check_vae_matches

logger = logging.getLogger(__name__)

RESIDUALS = ("auto", "pinv", "adjoint", "measurement")
NORMS = ("paper", "squared")


@dataclass(frozen=True)
class RestorationProblem:
    """What the data term needs: ``y = A(x) + noise`` with ``x`` the decoded image in [-1, 1].

    measurement: (1 or B, C, h, w) in [-1, 1], the operator's output space.
    residual: "pinv" | "adjoint" | "measurement" | "auto" (pinv for super-resolution, as the paper).
    norm: "paper" (un-squared) | "squared" (needs ``sigma_y`` on the [-1, 1] scale, > 0).
    """

    vae: Any
    operator: Any
    measurement: torch.Tensor
    residual: str = "auto"
    norm: str = "paper"
    sigma_y: float | None = None

    def __post_init__(self) -> None:
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.norm == "squared" and not (self.sigma_y and self.sigma_y > 0):
            raise ValueError(f"norm 'squared' needs sigma_y > 0, got {self.sigma_y!r}")

    def residual_space(self) -> str:
        if self.residual != "auto":
            return self.residual
        return "pinv" if is_super_resolution(self.operator) else "adjoint"


def is_super_resolution(operator: Any) -> bool:
    """True for a downsampling operator, alone or as the outer part of a composition (e.g. blur then pool)."""
    if isinstance(operator, AvgPoolSR | BicubicSR) or getattr(operator, "is_super_resolution", False):
        return True
    return isinstance(operator, Composed) and is_super_resolution(operator.outer)


def check_flow_model(base_model: Any, vae: Any = None, node: str = "FlowDPS") -> None:
    """Our samplers need a rectified-flow model (ComfyUI's CONST sampling: SD3, SD3.5, Flux) and, when
    ``vae`` is given, a VAE with the model's latent channels (model_family.py; raises ValueError)."""
    check_rectified_flow(base_model, node)
    if vae is not None:
        check_vae_matches(base_model, vae, node)


def decoded_shape(vae: Any, latent_shape: torch.Size) -> tuple[int, int, int, int]:
    """Image shape ``(B, 3, H, W)`` the VAE decodes a latent of ``latent_shape`` to."""
    ratio = getattr(vae, "upscale_ratio", 8)
    if not isinstance(ratio, int):
        raise ValueError(f"unsupported VAE (upscale ratio {ratio!r}): an image VAE is needed")
    b, _, h, w = latent_shape
    return (b, 3, h * ratio, w * ratio)


def check_problem_fits(problem: RestorationProblem, latent_shape: torch.Size) -> None:
    """The operator applied to the image the latent decodes to must give the measurement's shape."""
    image_shape = decoded_shape(problem.vae, latent_shape)
    y = problem.measurement
    decodes = f"the latent {tuple(latent_shape)} decodes to {image_shape[3]}x{image_shape[2]} pixels (W x H)"
    advice = "set the latent size to match the operator and the measurement"
    try:
        expected = tuple(problem.operator.output_shape(image_shape))
    except ValueError as e:
        raise ValueError(f"{decodes}, which the operator does not accept ({e}): {advice}") from e
    if y.shape[0] not in (1, image_shape[0]):
        raise ValueError(f"measurement batch {y.shape[0]} must be 1 or the latent batch {image_shape[0]}")
    if tuple(y.shape[1:]) != expected[1:]:
        raise ValueError(f"{decodes}; the operator maps that to {expected[3]}x{expected[2]}, but the measurement is "
                         f"{y.shape[3]}x{y.shape[2]}: {advice}")


def build_data_loss(problem: RestorationProblem, decoder: GradDecoder, device: torch.device):
    """The per-sample data term with private (non-inference) copies of the operator and measurement."""
    op = problem.operator.materialize(device=device, dtype=torch.float32)
    projections = {"pinv": op.pinv, "adjoint": op.adjoint, "measurement": None}
    return measurement_loss(decoder, op.forward, problem.measurement.to(device=device, dtype=torch.float32),
                            project=projections[problem.residual_space()], norm=problem.norm,
                            sigma_y=problem.sigma_y)


def make_room_for_decoder(vae: Any, device: torch.device) -> None:
    if device.type == "cpu":
        return
    params = sum(p.numel() for p in vae.first_stage_model.parameters())
    mm.free_memory(params * 4 * 2, device)  # float32 weights plus working room for one backward


def sample_posterior(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                     problem: RestorationProblem, config: FlowDPSConfig | FlowChefConfig):
    """k-diffusion-style sampler function for ``comfy.samplers.KSAMPLER`` (FlowDPS / FlowChef).

    model: ComfyUI's wrapped model; ``model(x, sigma, **extra_args)`` is the CFG-combined x0 in model space.
    x: (B, C, h, w) noisy start in model space (``noise_scaling`` already applied by KSAMPLER).
    Returns the (B, C, h, w) sample in model space.
    """
    extra_args = {} if extra_args is None else extra_args
    base = model.inner_model.inner_model
    check_flow_model(base, problem.vae, "FlowChef" if isinstance(config, FlowChefConfig) else "FlowDPS")
    check_problem_fits(problem, x.shape)
    seed = int(extra_args.get("seed") or 0)
    generator = torch.Generator(device=x.device).manual_seed(seed)

    def denoise(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        mm.throw_exception_if_processing_interrupted()
        return model(z, sigma, **extra_args)

    make_room_for_decoder(problem.vae, x.device)
    decoder = GradDecoder(problem.vae, base.process_latent_out, device=x.device)
    try:
        data_loss = build_data_loss(problem, decoder, x.device)
        return sample_flow_posterior(denoise, x, sigmas, data_loss, config, generator=generator,
                                     callback=callback)
    finally:
        decoder.release()
