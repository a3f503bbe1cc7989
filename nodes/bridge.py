"""The one bridge between ComfyUI's sampling machinery and the pure samplers (``samplers/``).

In the spirit of k-diffusion's ``external.py``: what ComfyUI hands over (a MODEL, the wrapped model a sampler
gets, a VAE, ``extra_args`` with the seed) becomes what the pure samplers take (a denoiser, a generator, a data
term with a differentiable decoder). Every sampler function of the pack is built from these pieces:

* :func:`flow_model`: the model checked (rectified flow, a VAE of its latent width) and its latent format
  bound, once: at node time where a node has a MODEL input (the Restore nodes; ComfyUI's AddNoise binds
  ``process_latent_out`` the same way), at sample time for the SAMPLER nodes, which have none;
* :func:`comfy_parts` (the GUIDER and the loaded model behind what ComfyUI passes a sampler) and
  :func:`denoiser` (the model call, after ComfyUI's interrupt check);
* :func:`sampler_seed`, :func:`sampler_generator`: the samplers' own random streams;
* :class:`RestorationProblem`: measurement, operator and data-term choices, checked once; their fit to the
  latent and the residual projections (:func:`projection`);
* private copies (ComfyUI's weights are inference tensors): memory room on a GPU (:func:`make_room`) and the
  lifecycle of a copy (:func:`released`, :func:`decoder_copy`);
* the Restore nodes' run through ComfyUI's own sampling path (:func:`restore`);
* the KSAMPLER functions of FlowDPS / FlowChef (:func:`sample_posterior`) and PSLD (:func:`sample_psld`), which
  keep only their differences (AFDPS's ``Sampler``, ``afdps_nodes.py``, is built from the same pieces).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..operators import CG_MAX_ITER, LinearOperator
from ..samplers import (
    FlowChefConfig,
    FlowDPSConfig,
    PSLDConfig,
    measurement_loss,
    psld_data_term,
    sample_flow_posterior,
)
from ..samplers.data_term import check_norm
from ..samplers.schedules import flowdps_times
from ..samplers.types import Denoiser
from . import messages, padding
from .common import FLOWDPS_SCHEDULER, RESIDUALS, SCHEDULERS
from .convert import measurement_pixels, pixel_sigma
from .decoder import DECODER_PARTS, GradDecoder, GradEncoder, clone_for_grad, module_bytes
from .decoder_memory import (
    DEFAULT_MEMORY,
    FULL_FALLBACK_FACTOR,
    HALF_DTYPE,
    MemoryPlan,
    check_16bit_allowed,
    check_memory_mode,
    copy_bytes,
    plan_memory,
    split_mode,
)
from .model_copy import GradDiffusionModel
from .model_family import check_model_and_vae, restore_settings, with_shift

logger = logging.getLogger(__name__)

SEED_MODULUS = 2**64
SEED_STRIDE = 0x9E3779B97F4A7C15  # odd 64-bit constant: distinct, well-spread seeds per stream
SD3_MULTIPLE = padding.MULTIPLE  # SD3 latents are 1/8 of the image and patchified by 2: sides are multiples of 16
INFERENCE_ERROR = "Inference tensors cannot be saved for backward"

Copy = TypeVar("Copy")

# --- the model ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowModel:
    """A rectified-flow model checked against its VAE, with the latent format the data terms decode with.

    process_latent_out: model space -> VAE space (the decoder's input; SD3 ``z / 1.5305 + 0.0609``);
    process_latent_in: VAE space -> model space (PSLD's encoder output).
    """

    process_latent_out: Callable[[torch.Tensor], torch.Tensor]
    process_latent_in: Callable[[torch.Tensor], torch.Tensor]


def flow_model(model: Any, vae: Any, node: str) -> FlowModel:
    """Check, before any expensive work, that ``model`` is a rectified-flow model (ComfyUI's CONST sampling) and
    ``vae`` has its latent channels (ValueError starting with ``node``), and bind its latent format.

    model: a MODEL (``ModelPatcher``, at node time: its object patches count, as ComfyUI's AddNoise reads them)
    or the loaded ``BaseModel`` (at sample time, :func:`comfy_parts`).
    """
    check_model_and_vae(model, vae, node)
    if hasattr(model, "get_model_object"):
        return FlowModel(model.get_model_object("process_latent_out"), model.get_model_object("process_latent_in"))
    return FlowModel(model.process_latent_out, model.process_latent_in)


def max_latent_side(base_model: Any) -> int | None:
    """The largest latent side the diffusion model accepts (``None``: no limit known). SD3 / SD3.5 crop a learned
    position embedding of ``pos_embed_max_size`` patches per side; a larger latent fails deep inside the model
    (ComfyUI's bare ``AssertionError: (h, max)``) after the text encoders and the model have loaded."""
    diffusion = getattr(base_model, "diffusion_model", None)
    max_patches = getattr(diffusion, "pos_embed_max_size", None)
    embedder = getattr(diffusion, "x_embedder", None)
    if not isinstance(max_patches, int) or getattr(diffusion, "pos_embed", None) is None or embedder is None:
        return None
    patch = getattr(embedder, "patch_size", (1,))
    return int(max_patches) * int(patch[0] if isinstance(patch, tuple | list) else patch)


def check_model_size(base_model: Any, latent_shape: tuple[int, ...], ratio: int, node: str) -> None:
    """Refuse a latent larger than the model's position embedding (ValueError naming the size, the limit and
    the fix) before any model call. base_model: a loaded ``BaseModel`` (or a MODEL: its ``.model``)."""
    base_model = getattr(base_model, "model", base_model) if hasattr(base_model, "get_model_object") else base_model
    limit = max_latent_side(base_model)
    h, w = latent_shape[-2:]
    if limit is None or (h <= limit and w <= limit):
        return
    raise ValueError(f"{node}: the image is {w * ratio}x{h * ratio} pixels (W x H), but this model's position "
                     f"embedding covers at most {limit * ratio}x{limit * ratio} ({limit} latent rows and columns): "
                     f"restore a smaller output (a lower SR factor, or a crop of the photo), or use a model "
                     f"without this limit (Flux)")


def comfy_parts(model: Any) -> tuple[Any, Any]:
    """``(guider, base)`` behind what ComfyUI hands a sampler: a KSAMPLER function gets ``KSamplerX0Inpaint``,
    whose ``inner_model`` is the GUIDER; a ``Sampler.sample`` gets the GUIDER itself. While it samples, the
    GUIDER's ``inner_model`` is the loaded ``BaseModel`` (``None`` for a guider that does not expose it)."""
    guider = model.inner_model if isinstance(model, comfy.samplers.KSamplerX0Inpaint) else model
    return guider, getattr(guider, "inner_model", None)


def denoiser(model: Any, extra_args: dict) -> Denoiser:
    """ComfyUI's wrapped model as the samplers' ``denoise(z, sigma)``: the CFG-combined x0 estimate in model
    space, ``extra_args`` (model options, seed, patches) forwarded. Each call first checks for ComfyUI's
    interrupt (the Cancel button), so a run stops within one model call."""

    def denoise(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        mm.throw_exception_if_processing_interrupted()
        return model(z, sigma, **extra_args)

    return denoise


# --- randomness -----------------------------------------------------------------------------------------------


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


def run_seed(extra_args: dict) -> int:
    """The seed ComfyUI passes a sampler (the NOISE node's or the Restore node's; 0 when there is none)."""
    return int(extra_args.get("seed") or 0)


# --- the problem ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestorationProblem:
    """What the data term needs: ``y = A(x) + noise`` with ``x`` the decoded image in [-1, 1]; checked once.

    measurement: (1 or B, C, h, w) in [-1, 1], the operator's output space.
    residual: "auto" (the operator's own choice, ``operator.auto_residual``) | "pinv" | "adjoint" | "measurement".
    norm: "paper" (un-squared) | "squared" (needs ``sigma_y`` > 0, on the [-1, 1] scale).
    memory: the decoder gradient's memory mode (``decoder_memory.MEMORY_MODES``; "auto" picks from the free
    memory at sample time; a 16-bit mode needs a VAE that ComfyUI runs in bfloat16).
    """

    vae: Any
    operator: LinearOperator
    measurement: torch.Tensor
    residual: str = "auto"
    norm: str = "paper"
    sigma_y: float | None = None
    memory: str = DEFAULT_MEMORY

    def __post_init__(self) -> None:
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")
        check_norm(self.norm, self.sigma_y)
        check_memory_mode(self.memory)
        check_16bit_allowed(self.memory, getattr(self.vae, "working_dtypes", None))

    @classmethod
    def from_inputs(cls, vae: Any, operator: LinearOperator, measurement: torch.Tensor, residual: str, norm: str,
                    sigma_y: float, memory: str = DEFAULT_MEMORY) -> RestorationProblem:
        """From node inputs: the IMAGE read in the operator's output space, ``sigma_y`` (a [0, 1]-scale widget)
        on the [-1, 1] scale for the squared norm (the paper norm has no noise level)."""
        check_memory_mode(memory)
        pixels = measurement_pixels(operator, measurement)
        return cls(vae=vae, operator=operator, measurement=pixels, residual=residual, norm=norm,
                   sigma_y=pixel_sigma(sigma_y) if norm == "squared" else None, memory=memory)

    def image_shape(self, latent_shape: torch.Size) -> tuple[int, int, int, int]:
        """Image shape ``(B, 3, H, W)`` the VAE decodes a latent of ``latent_shape`` to."""
        ratio = getattr(self.vae, "upscale_ratio", 8)
        if not isinstance(ratio, int):
            raise ValueError(f"unsupported VAE (upscale ratio {ratio!r}): an image VAE is needed")
        b, _, h, w = latent_shape
        return (b, 3, h * ratio, w * ratio)

    def check_fits(self, latent_shape: torch.Size) -> None:
        """The operator applied to the image the latent decodes to must give the measurement's shape (what only
        the sampler sees: the latent comes from another node)."""
        image_shape = self.image_shape(latent_shape)
        y = self.measurement
        decodes = f"the latent {tuple(latent_shape)} decodes to {image_shape[3]}x{image_shape[2]} pixels (W x H)"
        advice = ("set the latent size to match: the 'Latent for measurement' node makes it from the photo and the "
                  "operator")
        try:
            expected = tuple(self.operator.output_shape(image_shape))
        except ValueError as e:
            raise ValueError(f"{decodes}, which the operator does not accept ({e}): {advice}") from e
        if y.shape[0] not in (1, image_shape[0]):
            raise ValueError(f"measurement batch {y.shape[0]} must be 1 or the latent batch {image_shape[0]}")
        if tuple(y.shape[1:]) != expected[1:]:
            raise ValueError(f"{decodes}; the operator maps that to {expected[3]}x{expected[2]}, but the "
                             f"measurement is {y.shape[3]}x{y.shape[2]}: {advice}")

    def padded(self, plan: padding.Padding) -> RestorationProblem:
        """This problem for the padded image of ``plan`` (:mod:`.padding`): the measurement mirrored, a mask padded
        with unknown pixels."""
        if not plan.needed:
            return self
        return dataclasses.replace(self, operator=padding.pad_operator(self.operator, plan),
                                   measurement=padding.pad_measurement(self.measurement, plan))

    def fit_to(self, latent_shape: torch.Size) -> RestorationProblem:
        """This problem for a latent of ``latent_shape``: itself when the latent decodes to the measurement's image,
        padded when it decodes to the padded size (:func:`padding.plan`, what 'Latent for measurement' makes);
        otherwise ValueError (:meth:`check_fits`)."""
        try:
            plan = padding.plan(self.operator, tuple(self.measurement.shape))
        except ValueError:
            plan = None
        if plan is not None and plan.needed and tuple(self.image_shape(latent_shape)[2:]) == plan.padded_image:
            return self.padded(plan)
        self.check_fits(latent_shape)
        return self

    def on(self, device: torch.device) -> tuple[LinearOperator, torch.Tensor]:
        """Private float32 copies on ``device`` of the operator (plain tensors, safe in a gradient) and of the
        measurement."""
        return (self.operator.materialize(device=device, dtype=torch.float32),
                self.measurement.to(device=device, dtype=torch.float32))


def projection(operator: LinearOperator, residual: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``P`` of a residual space: ``operator.pinv`` / ``operator.adjoint``, or ``None`` for the measurement itself;
    "auto" is the operator's own choice. A pseudo-inverse without a closed form (a composition, a non-circular
    blur) runs conjugate gradients inside every gradient step: that is logged, it costs hundreds of adjoints."""
    space = operator.auto_residual if residual == "auto" else residual
    if space == "pinv" and not operator.closed_form_pinv:
        messages.warn("residual 'pinv'", f"{operator.describe()} has no closed-form pseudo-inverse, so every gradient "
                      f"step runs and differentiates conjugate gradients (up to {CG_MAX_ITER} iterations; measured "
                      "400x the adjoint's cost for a blur then SR x2 at 128 px): 'auto' or 'adjoint' is much faster")
    return {"pinv": operator.pinv, "adjoint": operator.adjoint, "measurement": None}[space]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# --- private copies -------------------------------------------------------------------------------------------


def make_room(nbytes: int, device: torch.device, keep: Any = None) -> None:
    """Ask ComfyUI to free ``nbytes`` on a GPU before a private copy is made there (no-op on CPU); ``keep``: a
    model patcher to keep loaded (the model being sampled, when the copy is of that model)."""
    if device.type == "cpu":
        return
    loaded = [m for m in mm.current_loaded_models if keep is not None and getattr(m, "model", None) is keep]
    mm.free_memory(nbytes, device, keep_loaded=loaded)


@contextlib.contextmanager
def released(copy: Copy) -> Iterator[Copy]:
    """``copy`` (a private copy with ``release()``) for the block; its weights are dropped when the block ends,
    by an error or ComfyUI's interrupt too."""
    try:
        yield copy
    finally:
        copy.release()  # type: ignore[attr-defined]


def decoder_weight_bytes(vae: Any) -> int:
    """Bytes of the private float32 decoder copy's weights (the decoder parts of ``vae.first_stage_model``; a
    16-bit mode's copy: ``decoder_memory.copy_bytes``, half)."""
    parts = [getattr(vae.first_stage_model, n, None) for n in DECODER_PARTS]
    return sum(4 * sum(p.numel() for p in m.parameters()) for m in parts if isinstance(m, torch.nn.Module))


def free_memory(device: torch.device, *, offloadable: bool = False) -> int:
    """What ComfyUI reports free on ``device`` (bytes; on a CPU the available RAM); with ``offloadable`` on a
    GPU, plus what ComfyUI could free by offloading the models it has loaded there (what :func:`make_room`
    asks it to do; the check before sampling, when the model is not loaded yet)."""
    free = int(mm.get_free_memory(device))
    if offloadable and device.type != "cpu":
        free += sum(int(m.model_loaded_memory()) for m in mm.current_loaded_models
                    if getattr(m, "device", None) == device)
    return free


def _fallback_bytes(vae: Any, latent_shape: tuple[int, ...]) -> int:
    """The full mode's estimate for a decoder without a structural one (TAESD): from ComfyUI's decode estimate."""
    if not hasattr(vae, "memory_used_decode"):
        return 0
    return int(FULL_FALLBACK_FACTOR * vae.memory_used_decode(tuple(latent_shape), torch.float32))


def native_bf16(vae: Any, device: torch.device) -> bool:
    """Whether "auto" may use the 16-bit modes: ComfyUI computes bfloat16 natively on ``device``
    (``should_use_bf16``: not on a CPU) and runs this VAE in it (``working_dtypes``)."""
    working = getattr(vae, "working_dtypes", None)
    return (working is None or HALF_DTYPE in working) and bool(mm.should_use_bf16(device))


def memory_fixes(plan: MemoryPlan, allow_16bit: bool, batch: int) -> list[str]:
    """What to change when ``plan`` does not fit, most effective first (the refusal message's end)."""
    layout, dtype = split_mode(plan.mode)
    fixes = []
    if layout != "tiled" and "tiled" in plan.estimates:
        fixes.append("memory 'tiled' (or 'auto')" if dtype == torch.float32 else "memory 'tiled 16-bit'")
    if allow_16bit and dtype == torch.float32 and "tiled" in plan.estimates:
        fixes.append("a 16-bit mode ('checkpoint 16-bit' or 'tiled 16-bit': about half the memory, in the "
                     "bfloat16 this device computes natively)")
    fixes.append("a smaller output (a lower SR factor, or a crop of the photo)")
    if batch > 1:
        fixes.append("fewer images or particles per decoder call (AFDPS: a smaller chunk_size)")
    return fixes


def plan_decoder_memory(problem: RestorationProblem, latent_shape: tuple[int, ...], device: torch.device,
                        node: str, free: int | None = None) -> MemoryPlan:
    """The decoder gradient's memory mode for ``problem.memory`` and one decoder call on ``latent_shape``
    (B, C, h, w; AFDPS: one chunk of particles), checked against the free memory before any work ("auto" tries
    the 16-bit modes when no float32 one fits and :func:`native_bf16`).

    Raises MemoryError naming the size, the estimate, what is free and what to do when the weights of the
    decoder copy plus the mode's activations do not fit.
    """
    vae = problem.vae
    weights = decoder_weight_bytes(vae)
    free = free_memory(device) if free is None else free
    allow_16bit = native_bf16(vae, device)
    plan = plan_memory(problem.memory, vae.first_stage_model, tuple(latent_shape), free,
                       fallback_bytes=_fallback_bytes(vae, latent_shape), weight_bytes=weights,
                       allow_16bit=allow_16bit)
    copy = copy_bytes(weights, plan.mode)
    need = plan.estimate + copy
    if need > free:
        b, _, h, w = latent_shape
        ratio = getattr(vae, "upscale_ratio", 8)
        others = ", ".join(f"{m} {v / 2**30:.1f} GiB" for m, v in plan.estimates.items() if m != plan.mode)
        raise MemoryError(
            f"{node}: a decoder gradient for {b} image(s) of {w * ratio}x{h * ratio} pixels (W x H) in memory mode "
            f"'{plan.mode}' needs about {need / 2**30:.1f} GiB (decoder copy {copy / 2**30:.1f} GiB, activations "
            f"{plan.estimate / 2**30:.1f} GiB), but {device.type} has {free / 2**30:.1f} GiB free"
            f"{f' (other modes: {others})' if others else ''}: use "
            + ", or ".join(memory_fixes(plan, allow_16bit, b)))
    if plan.mode != "full" or problem.memory != "full":
        logger.info("%s: decoder gradient in memory mode '%s' (%s), about %.2f GiB of activations per call",
                    node, plan.mode, problem.memory, plan.estimate / 2**30)
    return plan


@contextlib.contextmanager
def decoder_copy(problem: RestorationProblem, flow: FlowModel, device: torch.device, latent_shape: tuple[int, ...],
                 node: str = "FlowDPS", keep: Any = None) -> Iterator[GradDecoder]:
    """The run's private decoder copy (float32, or bfloat16 for a 16-bit mode; model-space latents in) in the memory mode
    :func:`plan_decoder_memory` picks for one decoder call on ``latent_shape``, with room made for it on a GPU:
    its weights and one gradient's activations (``keep``: the model patcher being sampled, never offloaded for
    it). Checks ComfyUI's interrupt between the bounded modes' blocks."""
    vae = problem.vae
    if device.type != "cpu":   # ask for what the requested mode ("auto": full) needs, then decide on what is free
        wanted = plan_memory(problem.memory, vae.first_stage_model, tuple(latent_shape), None,
                             fallback_bytes=_fallback_bytes(vae, latent_shape))
        make_room(copy_bytes(decoder_weight_bytes(vae), wanted.mode) + wanted.estimate, device, keep=keep)
    plan = plan_decoder_memory(problem, latent_shape, device, node)
    with released(GradDecoder(vae, flow.process_latent_out, device=device, memory=plan.mode,
                              keep_budget=plan.keep_budget,
                              interrupt=mm.throw_exception_if_processing_interrupted)) as decoder:
        yield decoder


# --- the Restore nodes' run -----------------------------------------------------------------------------------


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


def fit_measurement(problem: RestorationProblem, node: str) -> tuple[RestorationProblem, padding.Padding]:
    """The problem padded so that the restored image has sides that are multiples of 16 (:mod:`.padding`), and
    the padding (whose ``image`` is the exact size to crop the result to); a padding is shown on the node.
    Raises ValueError when the operator cannot be padded (a mask inside a composition)."""
    plan = padding.plan(problem.operator, tuple(problem.measurement.shape))
    if plan.needed:
        messages.note(node, plan.describe())
    return problem.padded(plan), plan


@dataclass(frozen=True)
class RestoreRun:
    """The Restore nodes' sampling widgets: ``cfg`` and ``shift`` 0 mean the model family's default."""

    seed: int
    steps: int
    cfg: float
    shift: float
    scheduler: str = FLOWDPS_SCHEDULER


class Restoration(NamedTuple):
    samples: torch.Tensor
    """(B, C, h, w) the restored latent, VAE space, on ComfyUI's intermediate device."""
    problem: RestorationProblem
    """The problem as sampled (padded to fit, see :func:`fit_measurement`)."""
    sampler: Any
    """The SAMPLER the run used (AFDPS keeps its ensembles there)."""
    size: tuple[int, int] | None = None
    """(height, width) of the restored image the measurement implies: crop the decoded samples to it."""


def restore(node: str, model: Any, positive: Any, negative: Any, problem: RestorationProblem, run: RestoreRun,
            make_sampler: Callable[[RestorationProblem, FlowModel], Any], decoder_batch: int | None = None
            ) -> Restoration:
    """A Restore node's whole run through ComfyUI's own sampling path (``comfy.sample.sample_custom``: the seeded
    initial noise, CFGGuider, previews and progress through ``latent_preview``, interruption).

    ``model`` and the VAE are checked once (:func:`flow_model`, messages start with ``node``); the measurement
    is padded to fit a multiple of 16 pixels (crop the decoded result to ``size``); the family's shift and CFG fill in a 0; the latent is empty, of
    the size the operator implies. ``make_sampler(problem, flow)`` gives the SAMPLER for the fitted problem.
    Before any model is loaded the size is checked against the model's limit and the decoder gradient's memory
    against what is free (``decoder_batch``: latents per decoder call, default the batch).
    """
    flow = flow_model(model, problem.vae, node)
    problem, plan = fit_measurement(problem, node)
    y = problem.measurement
    image_shape = (y.shape[0], 3, *plan.padded_image)
    settings = restore_settings(model, run.shift, run.cfg, image_shape[2], image_shape[3], node)
    logger.info("%s: %s", node, settings.describe())
    shifted = with_shift(model, settings.shift)
    channels = shifted.get_model_object("latent_format").latent_channels
    ratio = problem.vae.upscale_ratio
    latent = torch.zeros(y.shape[0], channels, image_shape[2] // ratio, image_shape[3] // ratio)
    check_model_size(model, tuple(latent.shape), ratio, node)
    device = mm.get_torch_device()
    plan_decoder_memory(problem, (decoder_batch or latent.shape[0], *latent.shape[1:]), device, node,
                        free=free_memory(device, offloadable=True))
    sigmas = restore_sigmas(shifted.get_model_object("model_sampling"), run.scheduler, run.steps)
    sampler = make_sampler(problem, flow)
    noise = comfy.sample.prepare_noise(latent, run.seed)
    callback = latent_preview.prepare_callback(shifted, run.steps)
    samples = comfy.sample.sample_custom(shifted, noise, settings.cfg, sampler, sigmas, positive, negative, latent,
                                         callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
                                         seed=run.seed)
    return Restoration(samples, problem, sampler, plan.image)


# --- the KSAMPLER functions -----------------------------------------------------------------------------------


def sample_posterior(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                     problem: RestorationProblem, config: FlowDPSConfig | FlowChefConfig,
                     flow: FlowModel | None = None):
    """k-diffusion-style sampler function for ``comfy.samplers.KSAMPLER`` (FlowDPS / FlowChef).

    model: ComfyUI's wrapped model; ``model(x, sigma, **extra_args)`` is the CFG-combined x0 in model space.
    x: (B, C, h, w) noisy start in model space (``noise_scaling`` already applied by KSAMPLER).
    flow: the model's facts bound at node time (Restore nodes); ``None``: checked and bound here.
    Returns the (B, C, h, w) sample in model space.
    """
    extra_args = {} if extra_args is None else extra_args
    if flow is None:
        name = "FlowChef" if isinstance(config, FlowChefConfig) else "FlowDPS"
        flow = flow_model(comfy_parts(model)[1], problem.vae, name)
    problem = problem.fit_to(x.shape)
    check_model_size(comfy_parts(model)[1], tuple(x.shape), problem.image_shape(x.shape)[2] // x.shape[2], "FlowDPS")
    with decoder_copy(problem, flow, x.device, tuple(x.shape), "FlowDPS",
                      keep=getattr(comfy_parts(model)[0], "model_patcher", None)) as decoder:
        op, y = problem.on(x.device)
        data_loss = measurement_loss(decoder, op.forward, y, project=projection(op, problem.residual),
                                     norm=problem.norm, sigma_y=problem.sigma_y)
        return sample_flow_posterior(denoiser(model, extra_args), x, sigmas, data_loss, config,
                                     generator=sampler_generator(run_seed(extra_args), x.device),
                                     callback=callback)


class PSLDGradientError(RuntimeError):
    """Autograd met an inference tensor on PSLD's gradient path (explained for the user)."""


@contextlib.contextmanager
def explained_inference_errors() -> Iterator[None]:
    """Re-raise autograd's inference-tensor error with what it means for PSLD."""
    try:
        yield
    except PSLDGradientError:
        raise
    except RuntimeError as e:
        if INFERENCE_ERROR not in str(e):
            raise
        raise PSLDGradientError(
            "PSLD back-propagates through the diffusion model, but a tensor on its path was made under ComfyUI's "
            "inference mode and cannot be differentiated. The pack copies the diffusion model and the VAE; "
            "weights added by other nodes during sampling (ControlNet, hooks, patches that hold their own "
            f"tensors) are not copied: remove them for PSLD. ({e})") from e


def psld_denoiser(model: Any, extra_args: dict, copies: contextlib.ExitStack) -> Denoiser:
    """PSLD's denoiser: the loaded model for a step without a gradient; for a step with one, the GUIDER with a
    private gradient-capable copy of the diffusion model swapped in (``model_copy.py``; made at the first such
    step, so none for step size 0, and released with ``copies``)."""
    guider, base = comfy_parts(model)
    grad_args = dict(extra_args)
    if grad_args.get("denoise_mask") is not None:                 # multiplies the latent: must be ordinary
        grad_args["denoise_mask"] = clone_for_grad(grad_args["denoise_mask"])
    loaded, differentiable = denoiser(model, extra_args), denoiser(model, grad_args)
    made: list[GradDiffusionModel] = []

    def denoise(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not z.requires_grad:
            return loaded(z, sigma)
        if not made:
            made.append(copies.enter_context(released(GradDiffusionModel(base))))
            logger.info("PSLD: private copy of the diffusion model, %.1f MB", made[0].nbytes / 2**20)
        with made[0].swapped_into(guider), explained_inference_errors():
            return differentiable(z, sigma)

    return denoise


def sample_psld(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                problem: RestorationProblem, config: PSLDConfig, flow: FlowModel | None = None):
    """k-diffusion-style sampler function for ``comfy.samplers.KSAMPLER`` (PSLD).

    What PSLD adds to :func:`sample_posterior`: its gradient is taken with respect to the latent through the
    transformer (:func:`psld_denoiser`: the model through the GUIDER, CFG included, on a private copy), and its
    gluing term needs a private copy of the VAE encoder. All copies live for this call only.

    Residual spaces: the measurement term's "auto" is PSLD's own ``||y - A x||`` ("measurement"); the gluing
    term's ``P`` is the operator's own choice (the pseudo-inverse for super-resolution, the identity for motion
    and kernel blurs, the adjoint otherwise) unless "pinv" or "adjoint" is named.
    """
    if not isinstance(config, PSLDConfig):
        raise ValueError(f"sample_psld needs a PSLDConfig, got {type(config).__name__}")
    extra_args = {} if extra_args is None else extra_args
    guider, base = comfy_parts(model)
    if base is None or not hasattr(base, "diffusion_model"):
        raise ValueError(f"PSLD calls the model through the GUIDER with a private copy of the diffusion model, but "
                         f"this guider ({type(guider).__name__}) does not expose the loaded model as "
                         f"'inner_model': use CFGGuider, BasicGuider or another core guider")
    if flow is None:
        flow = flow_model(base, problem.vae, "PSLD")
    problem = problem.fit_to(x.shape)
    check_model_size(base, tuple(x.shape), problem.image_shape(x.shape)[2] // x.shape[2], "PSLD")
    vae = problem.vae
    make_room(module_bytes(base.diffusion_model) + 4 * module_bytes(vae.first_stage_model), x.device,
              keep=getattr(guider, "model_patcher", None))
    plan = plan_decoder_memory(problem, tuple(x.shape), x.device, "PSLD")
    with (contextlib.ExitStack() as copies,
          released(GradDecoder(vae, flow.process_latent_out, device=x.device, memory=plan.mode,
                               keep_budget=plan.keep_budget,
                               interrupt=mm.throw_exception_if_processing_interrupted)) as decoder,
          released(GradEncoder(vae, flow.process_latent_in, device=x.device)) as encoder):
        op, y = problem.on(x.device)
        measurement_space = "measurement" if problem.residual == "auto" else problem.residual
        gluing_space = problem.residual if problem.residual in ("pinv", "adjoint") else "auto"
        term = psld_data_term(decoder, encoder, op.forward, y, project=projection(op, gluing_space) or _identity,
                              measurement_project=projection(op, measurement_space), norm=problem.norm,
                              sigma_y=problem.sigma_y)
        generator = sampler_generator(run_seed(extra_args), x.device)  # unused: PSLD draws nothing
        with explained_inference_errors():
            return sample_flow_posterior(psld_denoiser(model, extra_args, copies), x, sigmas, term, config,
                                         generator=generator, callback=callback)
