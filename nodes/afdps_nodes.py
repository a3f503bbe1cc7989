"""AFDPS nodes: the ensemble (twisted-SMC) posterior sampler as a SAMPLER and as an all-in-one Restore node.

AFDPS (samplers/afdps.py) moves ``P`` weighted particles per image. ComfyUI's KSAMPLER functions
see one latent per image, so the bridge is a ``comfy.samplers.Sampler`` subclass (a KSAMPLER function cannot
change the batch it is given): for every batch
item it builds ``P`` particles, runs :func:`~..samplers.sample_afdps` with ComfyUI's guider as the denoiser
(all particles in one batched model call per step, CFG included) and returns one latent per batch item, so the
batch size of the output is the input's.

Particle noise: particle 0 of batch item ``b`` starts from the NOISE input's ``noise[b]``; particles 1..P-1 and
all in-loop randomness (SDE noise, resampling, the ``sample`` draw) come from a ``torch.Generator`` on the
sampling device seeded from the seed of the NOISE node / the Restore node and ``b`` (the sampler's stream ``b``,
``bridge.sampler_seed``), so a seed reproduces a run exactly on one device. Batch items are sampled one after the other (independent ensembles).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import comfy.samplers
import torch
from comfy_api.latest import io

from ..samplers import AFDPSConfig, AFDPSResult, sample_afdps
from . import messages
from .bridge import (
    FlowModel,
    RestorationProblem,
    RestoreRun,
    check_model_size,
    comfy_parts,
    decoder_copy,
    denoiser,
    flow_model,
    restore,
    run_seed,
    sampler_generator,
)
from .common import (
    CATEGORY_ROOT,
    CATEGORY_SAMPLERS,
    DEFAULT_MEMORY,
    FLOWDPS_SCHEDULER,
    RESTORE_VAE_TOOLTIP,
    Operator,
    cfg_shift_inputs,
    memory_input,
    restore_inputs,
    scheduler_input,
)
from .convert import pixels_to_image
from .inputs import check_links, inputs_named
from .padding import crop_image

logger = logging.getLogger(__name__)

RESTORE_NAME = "AFDPS Restore"  # the Restore node's messages and log lines start with it
RESTORE_DISPLAY_NAME = "Restore with uncertainty (AFDPS)"  # what the editor shows and its search finds
OUTPUTS = ("best", "mean", "sample")
AFDPS_VARIANTS = ("sde", "ode")
VARIANT_TOOLTIP = ("Keep 'sde' (recommended). 'ode' takes twice the time and its weights vary more. ('sde': guided "
                   "Euler-Maruyama moves with exact weights and the 'tweedie' potential; 'ode': probability-flow "
                   "predictor and one Langevin corrector step per level with the latent 'noised' potential, whose "
                   "gradient comes from the decoder alone.)")
DEFAULTS = AFDPSConfig()
CONFIG_INPUTS = {"eta_v": "eta", "resample_threshold": "ess_threshold"}
"""AFDPSConfig field -> the node input that feeds it, where the names differ (kappa, chunk_size, variant and
kappa_clip keep theirs; chunk_size and kappa_clip 0 become None, checked by the node first)."""
MAX_WEIGHTS_SHOWN = 16  # final weights listed in the report / log line

SIGMA_Y_TOOLTIP = ("How noisy your photo is, on the 0-1 pixel scale (0.015 = slight noise). Smaller trusts the "
                   "photo more; a very large value ignores it (the model alone). (The likelihood's sigma_y, x2 on "
                   "the [-1, 1] scale.)")
PARTICLES_TOOLTIP = ("How many restorations are made side by side and compared (8 or more at 768 px). Time and "
                     "memory grow with it.")
ETA_TOOLTIP = ("How much fresh randomness each step adds (1 recommended; 0 = none). (eta_v of the SDE noise "
               "level V^2 = 2 eta_v s.)")
ESS_TOOLTIP = ("When the weight concentrates on few particles, the weak ones are replaced by copies of the strong "
               "ones: this is the fraction below which that happens (1 = every step, 0 = never). "
               "(Resampling threshold on the effective sample size; never after the last step.)")
KAPPA_TOOLTIP = ("How strongly each move is pulled towards your photo (paper: 1; 0 = not at all, the weights alone "
                 "fit it). The weights stay exact for any value. (Guidance factor kappa of the proposal drift; "
                 "kappa_clip lowers it where the move would overshoot.)")
KAPPA_CLIP = 0.5  # measured on the tiny models (SR x2, kappa 1): residual ratio 0.90 clipped vs 1.02 unclipped
KAPPA_CLIP_TOOLTIP = ("Keeps the pull towards the photo from overshooting when the photo is trusted a lot (small "
                      "sigma_y); 0.5 recommended, 0 = off (the paper's unclipped guidance). Costs about 24 decoder "
                      "passes once per photo. (Stiffness clip c, SDE only: each step uses min(kappa, c / (dt V^2 L)), "
                      "L the estimated Lipschitz constant of the guidance; the weights stay exact.)")
IMAGE_ESS_THRESHOLD = 0.0
"""The nodes' ESS threshold: never resample. On images the weights collapse onto one particle within the first
steps at any affordable P, and resampling then clones it: the spread (the uncertainty map) fell to 2-19 % of the
exact posterior std, against 0.95-1.17 without resampling (benchmarks/results/posterior_quality.md, 256 px, P 8).
``AFDPSConfig.resample_threshold`` keeps the SMC setting 0.5 for low-dimensional problems."""
ESS_DEFAULT_NOTE = (" Default 0 here (the Python AFDPSConfig default is 0.5): on images the weights collapse to one "
                    "particle at any affordable P and resampling only clones it, which makes the uncertainty map "
                    "black; without resampling the particles stay independent and their spread is calibrated.")
KAPPA_CLIP_DEFAULT_NOTE = " Default 0.5 here (the Python AFDPSConfig default is off)."
UNCERTAINTY_FULL_SCALE = 0.25
"""Std on the [0, 1] image scale shown as the brightest colour of the uncertainty heat map (an absolute scale,
the same for every run: 0.25 is about the std of a pixel uniform on [0, 1], i.e. nothing known)."""
CHUNK_TOOLTIP = ("Lower it if you run out of GPU memory (1-4 at 768 px): how many particles go through the VAE "
                 "decoder at once, the most memory-hungry part. 0 = all at once. A chunk that runs out of memory is "
                 "retried smaller by itself.")


def ensemble_inputs() -> list:
    """The AFDPS settings shared by the SAMPLER and the Restore node (eta, kappa, ESS threshold, chunk, sigma_y)."""
    return [
        io.Float.Input("eta", default=DEFAULTS.eta_v, min=0.0, max=10.0, step=0.05, tooltip=ETA_TOOLTIP),
        io.Float.Input("kappa", default=DEFAULTS.kappa, min=0.0, max=10.0, step=0.05, tooltip=KAPPA_TOOLTIP),
        io.Float.Input("ess_threshold", default=IMAGE_ESS_THRESHOLD, min=0.0, max=1.0, step=0.05,
                       tooltip=ESS_TOOLTIP + ESS_DEFAULT_NOTE),
        io.Int.Input("chunk_size", default=DEFAULTS.chunk_size, min=0, max=256, tooltip=CHUNK_TOOLTIP),
        io.Float.Input("sigma_y", default=0.015, min=0.0001, max=1000.0, step=0.001, tooltip=SIGMA_Y_TOOLTIP),
    ]


def late_inputs(*, variant: bool) -> list:
    """Inputs added after the first release, last and optional, so that saved workflows (positional widget
    values) and API prompts without them keep working (with the defaults: SDE, clip 0.5)."""
    extra = [io.Combo.Input("variant", options=list(AFDPS_VARIANTS), default="sde", tooltip=VARIANT_TOOLTIP,
                            optional=True)] if variant else []
    return [*extra, io.Float.Input("kappa_clip", default=KAPPA_CLIP, min=0.0, max=10.0, step=0.05,
                                   tooltip=KAPPA_CLIP_TOOLTIP + KAPPA_CLIP_DEFAULT_NOTE, optional=True)]


def make_config(eta: float, kappa: float, ess_threshold: float, chunk_size: int, *, variant: str = "sde",
                kappa_clip: float = KAPPA_CLIP) -> AFDPSConfig:
    """Validated AFDPS settings from node inputs (raises ValueError naming the value). ``variant`` "ode" uses
    the latent ``noised`` potential (its corrector needs an exact gradient) and ignores the kappa clip."""
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0: all particles at once), got {chunk_size}")
    if variant not in AFDPS_VARIANTS:
        raise ValueError(f"variant must be one of {AFDPS_VARIANTS}, got {variant!r}")
    if not (math.isfinite(kappa_clip) and kappa_clip >= 0):
        raise ValueError(f"kappa_clip must be >= 0 (0: off), got {kappa_clip}")
    ode = variant == "ode"
    with inputs_named(CONFIG_INPUTS):
        return AFDPSConfig(eta_v=float(eta), kappa=float(kappa), resample_threshold=float(ess_threshold),
                           chunk_size=int(chunk_size) or None, variant=variant,
                           potential="noised" if ode else DEFAULTS.potential,
                           kappa_clip=None if ode or kappa_clip == 0 else float(kappa_clip))


def make_afdps_problem(vae, operator, measurement, sigma_y: float, memory: str = DEFAULT_MEMORY) -> RestorationProblem:
    """The measurement in the operator's space with AFDPS's Gaussian likelihood: ``||y - A x||^2 / (2 sigma_y^2)``,
    sigma_y (> 0) on the [-1, 1] scale."""
    return RestorationProblem.from_inputs(vae, operator, measurement, "measurement", "squared", sigma_y, memory)


class AFDPSEnsembleSampler(comfy.samplers.Sampler):
    """``comfy.samplers.Sampler`` running AFDPS with ``n_particles`` particles per batch item.

    Returns, per batch item, the ``output`` summary of its ensemble (best | mean | sample) in model space.
    With ``keep_results`` the :class:`~..samplers.AFDPSResult` of every batch item of the last run is kept in
    ``results`` (the Restore node reads the decoded particles, weights and ESS trace from there).
    """

    def __init__(self, problem: RestorationProblem, config: AFDPSConfig, n_particles: int, output: str = "best",
                 *, keep_results: bool = False, flow: FlowModel | None = None) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if isinstance(n_particles, bool) or not isinstance(n_particles, int) or n_particles < 1:
            raise ValueError(f"particles must be an integer >= 1, got {n_particles!r}")
        self.problem = problem
        self.config = config
        self.n_particles = n_particles
        self.output = output
        self.keep_results = keep_results
        self.flow = flow
        self.results: list[AFDPSResult] = []

    @property
    def decoder_batch(self) -> int:
        """Particles per decoder call (the chunk size)."""
        return min(self.config.chunk_size or self.n_particles, self.n_particles)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        """ComfyUI's sampler interface: ``model_wrap`` is the guider; noise: (B, C, h, w) raw N(0, I);
        latent_image: (B, C, h, w) model space. Returns (B, C, h, w) in model space.

        Particle 0 of batch item ``b`` starts from ``noise[b]``; the others, and all of the item's in-loop
        randomness, come from the sampler's stream ``b`` of the run's seed (``bridge.sampler_generator``),
        never the NOISE input's own stream, so that particle 1 never starts from particle 0's noise."""
        extra_args = {} if extra_args is None else extra_args
        _, base = comfy_parts(model_wrap)
        flow = self.flow if self.flow is not None else flow_model(base, self.problem.vae, "AFDPS")
        if denoise_mask is not None:
            raise ValueError("AFDPS does not use a latent noise_mask: remove it from the latent and describe the "
                             "missing region with an inpainting operator instead")
        problem = self.problem.fit_to(noise.shape)
        check_model_size(base, tuple(noise.shape), problem.image_shape(noise.shape)[2] // noise.shape[2], "AFDPS")
        if latent_image is None:
            latent_image = torch.zeros_like(noise)
        sampling = base.model_sampling
        device = noise.device
        steps = len(sigmas) - 1
        start = sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        denoise = denoiser(model_wrap, extra_args)

        self.results = []
        outputs = []
        with decoder_copy(problem, flow, device, (self.decoder_batch, *noise.shape[1:]), "AFDPS",
                          keep=getattr(comfy_parts(model_wrap)[0], "model_patcher", None)) as decoder:
            op, y_all = problem.on(device)
            for item in range(noise.shape[0]):
                y = y_all[item if y_all.shape[0] > 1 else 0][None]
                generator = sampler_generator(run_seed(extra_args), device, stream=item)
                extra = torch.randn((self.n_particles - 1, *noise.shape[1:]), generator=generator, device=device,
                                    dtype=noise.dtype)
                extra = sampling.noise_scaling(sigmas[0], extra, latent_image[item:item + 1].expand_as(extra))
                z = torch.cat([start[item:item + 1], extra])
                result = sample_afdps(denoise, z, sigmas, forward=op.forward, y=y, sigma_y=problem.sigma_y,
                                      decode=decoder, config=self.config, generator=generator,
                                      callback=_preview_callback(callback, steps))
                logger.info("AFDPS item %d: %s", item, ensemble_summary(result))
                if self.keep_results:
                    self.results.append(result)
                outputs.append(getattr(result, self.output))
        return sampling.inverse_noise_scaling(sigmas[-1], torch.cat(outputs))


def _preview_callback(callback, total_steps: int):
    """AFDPS step info -> ComfyUI's ``callback(i, x0, x, total)`` with the highest-weight particle.

    The info's ``x``/``denoised`` are the particles before step i, whose weights are those reported at step
    i - 1 (after any resampling; uniform at i = 0)."""
    if callback is None:
        return None
    state: dict[str, Any] = {"log_weights": None}

    def on_step(info) -> None:
        previous = state["log_weights"]
        best = 0 if previous is None else int(torch.argmax(previous))
        state["log_weights"] = info["log_weights"]
        callback(info["i"], info["denoised"][best:best + 1], info["x"][best:best + 1], total_steps)

    return on_step


def ensemble_summary(result: AFDPSResult) -> str:
    """One line: ESS trace, resampling count, final weights (for logs and the report)."""
    ess = " ".join(f"{float(e):.2f}" for e in result.ess)
    shown = result.weights[:MAX_WEIGHTS_SHOWN]
    weights = " ".join(f"{float(w):.3f}" for w in shown) + (" ..." if len(result.weights) > len(shown) else "")
    dropped = int(torch.isneginf(result.log_weights).sum())
    quarantine = f"; {dropped} quarantined (NaN/Inf, weight 0)" if dropped else ""
    return (f"ESS trace [{ess}] of {result.particles.shape[0]}; resampled {result.n_resampled} times; "
            f"final weights [{weights}]; best particle {result.best_index}{quarantine}")


HEAT_ANCHORS = ((0.0, 0.0, 0.02), (0.34, 0.06, 0.42), (0.73, 0.21, 0.33), (0.98, 0.55, 0.04), (0.99, 1.0, 0.64))


def heat_map(u: torch.Tensor) -> torch.Tensor:
    """(B, H, W) values in [0, 1] -> ComfyUI IMAGE (B, H, W, 3), an inferno-like colour scale (dark = low)."""
    anchors = torch.tensor(HEAT_ANCHORS, dtype=torch.float32)
    pos = u.float().clamp(0, 1) * (len(HEAT_ANCHORS) - 1)
    lo = pos.floor().long().clamp(max=len(HEAT_ANCHORS) - 2)
    frac = (pos - lo.float())[..., None]
    return (anchors[lo] * (1 - frac) + anchors[lo + 1] * frac).contiguous()


def uncertainty(result: AFDPSResult) -> tuple[torch.Tensor, float]:
    """The run's uncertainty map (:attr:`AFDPSResult.uncertainty`: the weighted spread of a healthy ensemble,
    else the plain spread of the particles) on an absolute scale: the per-pixel std averaged over colour
    channels, on the [0, 1] image scale, (1, H, W), clamped to [0, 1] (never divided by its maximum), and its
    maximum."""
    std = result.uncertainty.std.float().mean(dim=1) / 2.0  # [-1, 1] -> [0, 1] scale
    return std.clamp(0.0, 1.0).cpu(), float(std.max())


def uncertainty_line(result: AFDPSResult) -> str:
    """One line for the node and the report: calibrated or not, why, and the map's scale."""
    u = result.uncertainty
    _, peak = uncertainty(result)
    state = "calibrated" if u.calibrated else "NOT calibrated"
    return (f"uncertainty map {state} ({u.source}; {u.reason}); std on the [0, 1] scale up to {peak:.3f}, heat "
            f"map full scale {UNCERTAINTY_FULL_SCALE:g}")


def ensemble_outputs(results: list[AFDPSResult], y: torch.Tensor,
                     operator) -> tuple[list[torch.Tensor], list[tuple[float, float]]]:
    """The Restore node's image outputs for every photo's ensemble (best, mean, the particles best first, the
    uncertainty heat map and mask), and ``||A x - y||`` of the best and the mean. y: (1 or B, C, h, w). The mean
    is the uncertainty map's centre: the weighted mean while the weights are healthy, the plain mean of the
    particles once they collapse (the weighted mean is then the best particle again)."""
    best, mean, ensemble, masks, residuals = [], [], [], [], []
    for item, result in enumerate(results):
        images = result.images.float().cpu()
        order = torch.argsort(result.weights.cpu(), descending=True, stable=True)
        best.append(images[result.best_index][None])
        mean.append(result.uncertainty.mean.float().cpu())
        ensemble.append(images[order])
        masks.append(uncertainty(result)[0])
        y_item = y[item if y.shape[0] > 1 else 0][None].float().cpu()
        residuals.append(tuple(float(torch.linalg.vector_norm(operator.forward(x) - y_item))
                               for x in (best[-1], mean[-1])))
    mask = torch.cat(masks)
    outputs = [pixels_to_image(torch.cat(best)), pixels_to_image(torch.cat(mean)), pixels_to_image(torch.cat(ensemble)),
               heat_map(mask / UNCERTAINTY_FULL_SCALE), mask]
    return outputs, residuals


def restore_report(results: list[AFDPSResult], residuals: list[tuple[float, float]], *, particles: int,
                   steps: int, sigma_y: float) -> str:
    lines = [f"AFDPS: {particles} particles, {steps} steps, sigma_y {sigma_y:g} ([0, 1] scale)"]
    for item, (result, (r_best, r_mean)) in enumerate(zip(results, residuals, strict=True)):
        lines.append(f"image {item}: {ensemble_summary(result)}")
        lines.append(f"  ||A x - y||: best {r_best:.4g}, mean {r_mean:.4g}; log evidence {result.log_evidence:.4g}")
        lines.append(f"  {uncertainty_line(result)}")
    return "\n".join(lines)


def show_uncertainty_state(results: list[AFDPSResult]) -> str:
    """Show on the Restore node (in the frontend) whether each photo's uncertainty map is calibrated, and why;
    returns the text (also logged)."""
    text = "\n".join(f"image {item}: {uncertainty_line(result)}" for item, result in enumerate(results))
    logger.info("%s: %s", RESTORE_NAME, text)
    messages.show(text)
    return text


class AFDPSSampler(io.ComfyNode):
    """AFDPS as a SAMPLER for SamplerCustomAdvanced."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AFDPSSampler",
            display_name="AFDPS Sampler",
            category=CATEGORY_SAMPLERS,
            description=(
                "AFDPS ensemble posterior sampler (arXiv 2506.03979, in rectified-flow form) for "
                "SamplerCustomAdvanced: every image gets its own P weighted particles, moved by a guided SDE with "
                "exact twisted-SMC weights (resampled when the ESS drops below ess_threshold; default 0: never). "
                "Each output batch item is the best particle, the weighted mean latent or one weighted draw. Use a "
                "rectified-flow model (SD3, SD3.5, Flux), a SIGMAS schedule ending at 0, CFG 1-2 (Flux: CFG 1 with "
                "FluxGuidance). Costs P model calls per step and image."
            ),
            inputs=[
                io.Vae.Input("vae", tooltip=RESTORE_VAE_TOOLTIP),
                Operator.Input("operator", tooltip="The degradation that produced the measurement (operator nodes)."),
                io.Image.Input("measurement", tooltip="The degraded photo (the operator's output size)."),
                io.Int.Input("particles", default=8, min=1, max=256, tooltip=PARTICLES_TOOLTIP),
                io.Combo.Input("variant", options=list(AFDPS_VARIANTS), default="sde", tooltip=VARIANT_TOOLTIP),
                *ensemble_inputs(),
                io.Combo.Input("output", options=list(OUTPUTS), default="best",
                               tooltip="What each batch item becomes: 'best' the highest-weight particle (the "
                                       "paper's choice), 'mean' the weighted mean latent, 'sample' one draw from "
                                       "the weighted ensemble (a posterior sample)."),
                *late_inputs(variant=False),
                memory_input(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, vae, operator, measurement, particles, variant, eta, kappa, ess_threshold, chunk_size, sigma_y,
                output, kappa_clip=KAPPA_CLIP, memory=DEFAULT_MEMORY) -> io.NodeOutput:
        check_links(cls, vae=vae, operator=operator, measurement=measurement)
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        config = make_config(eta, kappa, ess_threshold, chunk_size, variant=variant, kappa_clip=kappa_clip)
        problem = make_afdps_problem(vae, operator, measurement, sigma_y, memory)
        return io.NodeOutput(AFDPSEnsembleSampler(problem, config, int(particles), output))


class AFDPSRestore(io.ComfyNode):
    """Restore a degraded photo with AFDPS in one node, with the ensemble and its uncertainty."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AFDPSRestore",
            display_name=RESTORE_DISPLAY_NAME,
            category=CATEGORY_ROOT,
            description=(
                "Restores a degraded photo (upscaling, deblurring, inpainting) like FlowDPS Restore, but makes "
                "several restorations at once (particles) and weighs them, so you also see where they disagree: "
                "the best one, their weighted mean, all of them (best first), a heat map and MASK of the "
                "uncertain areas (faces, text, large holes) and a text report. SD3, SD3.5 or Flux (cfg and shift "
                "0 pick the model's own). The result's size follows from the photo and the operator. (AFDPS "
                "ensemble posterior sampling, arXiv 2506.03979.)"
            ),
            inputs=[
                *restore_inputs(),
                io.Int.Input("particles", default=8, min=1, max=256, tooltip=PARTICLES_TOOLTIP),
                io.Int.Input("steps", default=28, min=1, max=1000, tooltip="Sampling steps (28 recommended)."),
                *cfg_shift_inputs(cfg_note=" For AFDPS 1-2; 1 keeps the weights exact."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the particles' noise, the SDE noise and the resampling."),
                *ensemble_inputs(),
                *late_inputs(variant=True),
                scheduler_input(),
                memory_input(),
            ],
            outputs=[
                io.Image.Output(display_name="best", tooltip="The highest-weight particle, decoded."),
                io.Image.Output(display_name="mean",
                                tooltip="Mean of the decoded particles (MMSE-like): weighted while the weights are "
                                        "healthy, plain once they collapse (see the report)."),
                io.Image.Output(display_name="particles",
                                tooltip="All decoded particles, P per photo, ordered by weight (best first)."),
                io.Image.Output(display_name="uncertainty",
                                tooltip="Heat map of the per-pixel std of the particles on a fixed scale: black = "
                                        "0, brightest = std 0.25 or more on the [0, 1] image scale (not scaled to "
                                        "its maximum). Whether it is calibrated, and why, is shown on the node "
                                        "and in the report."),
                io.Mask.Output(display_name="uncertainty_mask",
                               tooltip="The per-pixel std itself, on the [0, 1] image scale (absolute)."),
                io.String.Output(display_name="report",
                                 tooltip="ESS trace, resampling count, final weights, residuals and whether the "
                                         "uncertainty map is calibrated."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, vae, measurement, operator, particles, steps, cfg, shift, seed,
                eta, kappa, ess_threshold, chunk_size, sigma_y, variant="sde", kappa_clip=KAPPA_CLIP,
                scheduler=FLOWDPS_SCHEDULER, memory=DEFAULT_MEMORY) -> io.NodeOutput:
        check_links(cls, model=model, positive=positive, negative=negative, vae=vae, measurement=measurement,
                    operator=operator)
        config = make_config(eta, kappa, ess_threshold, chunk_size, variant=variant, kappa_clip=kappa_clip)
        problem = make_afdps_problem(vae, operator, measurement, sigma_y, memory)

        def sampler(problem: RestorationProblem, flow: FlowModel) -> AFDPSEnsembleSampler:
            return AFDPSEnsembleSampler(problem, config, int(particles), "best", keep_results=True, flow=flow)

        run = restore(RESTORE_NAME, model, positive, negative, problem, RestoreRun(seed, steps, cfg, shift, scheduler),
                      sampler, decoder_batch=min(int(chunk_size) or int(particles), int(particles)))
        results, run.sampler.results = run.sampler.results, []
        images, residuals = ensemble_outputs(results, run.problem.measurement, run.problem.operator)
        images = [crop_image(image, run.size) for image in images] if run.size else images
        show_uncertainty_state(results)
        report = restore_report(results, residuals, particles=int(particles), steps=steps, sigma_y=sigma_y)
        return io.NodeOutput(*images, report)
