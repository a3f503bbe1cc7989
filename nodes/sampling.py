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
import comfy.samplers
import torch
from comfy_api.latest import io

from ..samplers import FlowChefConfig, FlowDPSConfig, measurement_loss, sample_flow_posterior
from ..samplers.schedules import flowdps_times
from .decoder import GradDecoder
from .model_family import check_rectified_flow, check_vae_matches

logger = logging.getLogger(__name__)

RESIDUALS = ("auto", "pinv", "adjoint", "measurement")
FLOWDPS_SCHEDULER = "flowdps"
SCHEDULERS = (FLOWDPS_SCHEDULER, *comfy.samplers.SCHEDULER_NAMES)
SCHEDULER_TOOLTIP = ("Noise levels of the steps. 'flowdps' (default): the official FlowDPS grid (the SD3 scheduler's "
                     "time grid from 1 down to about 0.003, then the model's shift: at 28 steps and shift 4 the last "
                     "level before 0 is 0.0119). The others are ComfyUI's schedulers, as in BasicScheduler ('simple' "
                     "stops at 0.13 at 28 steps: a coarser last step).")
SEED_MODULUS = 2**64
SEED_STRIDE = 0x9E3779B97F4A7C15  # odd 64-bit constant: distinct, well-spread seeds per stream


def scheduler_input() -> io.Combo.Input:
    """The Restore nodes' trailing, optional ``scheduler`` input (saved workflows without it get 'flowdps')."""
    return io.Combo.Input("scheduler", options=list(SCHEDULERS), default=FLOWDPS_SCHEDULER, optional=True,
                          tooltip=SCHEDULER_TOOLTIP)


def flowdps_grid(model_sampling: Any, steps: int) -> torch.Tensor:
    """The official FlowDPS noise levels in the model's own time shift: ``(steps + 1,)`` float32 ending at 0.

    The un-shifted times ``t`` run linearly from 1 to about 0.003 (``samplers.schedules.flowdps_times``) and
    the model's sampling object maps them to noise levels (``percent_to_sigma(1 - t)``: ModelSamplingSD3's
    ``shift t / (1 + (shift - 1) t)``, ModelSamplingFlux's exponential shift). For SD3 with shift 4 this is
    exactly ``samplers.flowdps_sigmas(steps)``.
    """
    levels = [float(model_sampling.percent_to_sigma(1.0 - float(t))) for t in flowdps_times(steps)]
    return torch.tensor([*levels, 0.0], dtype=torch.float32)


def restore_sigmas(model_sampling: Any, scheduler: str, steps: int) -> torch.Tensor:
    """Noise levels for a Restore node: the official grid (``"flowdps"``) or a ComfyUI scheduler by name."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if scheduler == FLOWDPS_SCHEDULER:
        return flowdps_grid(model_sampling, steps)
    return comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps)


def sampler_seed(seed: int, stream: int = 0) -> int:
    """Seed of a sampler's own random stream number ``stream`` (>= 0) for the node seed ``seed``.

    ``(seed + (stream + 1) * SEED_STRIDE) mod 2^64``: the stride is odd, so the result is never ``seed`` itself,
    whose stream is the initial noise that ComfyUI draws on the CPU (``comfy.sample.prepare_noise``), and
    different streams get different seeds. FlowDPS's renoising uses stream 0; AFDPS uses one stream per batch
    item. (Seeding the sampler with ``seed`` itself would make its first draw the initial noise again.)
    """
    return (int(seed) + (int(stream) + 1) * SEED_STRIDE) % SEED_MODULUS


def sampler_generator(seed: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`sampler_seed` (``seed``, ``stream``)."""
    return torch.Generator(device=device).manual_seed(sampler_seed(seed, stream))
NORMS = ("paper", "squared")


@dataclass(frozen=True)
class RestorationProblem:
    """What the data term needs: ``y = A(x) + noise`` with ``x`` the decoded image in [-1, 1].

    measurement: (1 or B, C, h, w) in [-1, 1], the operator's output space.
    residual: "pinv" | "adjoint" | "measurement" | "auto" (the official code's choice for the operator,
        ``operator.auto_residual``: pinv for super-resolution, the measurement itself for motion and kernel
        blurs, the adjoint otherwise).
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
        return self.operator.auto_residual if self.residual == "auto" else self.residual


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
    generator = sampler_generator(int(extra_args.get("seed") or 0), x.device)

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
