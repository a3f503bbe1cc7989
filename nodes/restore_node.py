"""All-in-one restoration node for artists: model, prompts, VAE, photo and degradation in; photo out."""

from __future__ import annotations

import dataclasses
import logging

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..samplers import FlowChefConfig, FlowDPSConfig, PSLDConfig
from .common import CATEGORY_ROOT
from .inputs import check_links
from .model_family import (
    CFG_TOOLTIP,
    MODEL_TOOLTIP,
    NEGATIVE_TOOLTIP,
    POSITIVE_TOOLTIP,
    SHIFT_TOOLTIP,
    check_model_and_vae,
    restore_settings,
    with_shift,
)
from .psld_sampling import sample_psld
from .sampler_nodes import (
    PSLD_MEMORY_NOTE,
    STEP_SIZE_NOTE,
    Operator,
    data_inputs,
    make_problem,
    step_schedule,
)
from .sampling import FLOWDPS_SCHEDULER, SCHEDULERS, restore_sigmas, sample_posterior, scheduler_input

logger = logging.getLogger(__name__)

NAME = "FlowDPS Restore"  # the display name, which messages and log lines start with
METHODS = ("flowdps", "flowchef", "psld")
MAX_CROP = 64  # largest crop of the measurement (pixels per side) tried by fit_measurement
SD3_MULTIPLE = 16  # SD3 latents are 1/8 of the image and patchified by 2: image sides must be multiples of 16


def shifted_model(model, shift: float):
    """A clone of ``model`` with rectified-flow sampling shifted by ``shift`` (what ModelSamplingSD3 does; for
    Flux dev, ModelSamplingFlux with ``ln(shift)``: see model_family.with_shift)."""
    return with_shift(model, shift)


def fit_measurement(operator, measurement: torch.Tensor, node: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Crop the measurement (bottom/right) until the image it implies has sides that are multiples of 16.

    measurement: (B, C, h, w); node: the display name that the crop warning starts with. Returns the (possibly
    cropped) measurement and the image shape (B, 3, H, W).
    Raises ValueError when no crop works (for example a mask operator of a fixed, unsuitable size).
    """
    b, c, h, w = measurement.shape
    error: ValueError | None = None
    for dh in range(min(h, MAX_CROP + 1)):
        for dw in range(min(w, MAX_CROP + 1)):
            try:
                shape = tuple(operator.input_shape((b, c, h - dh, w - dw)))
            except ValueError as e:
                error = error or e
                continue
            if shape[2] % SD3_MULTIPLE or shape[3] % SD3_MULTIPLE:
                continue
            if dh or dw:
                logger.warning("%s: cropped the measurement from %dx%d to %dx%d (W x H) so that the restored "
                               "image (%dx%d) is a multiple of %d pixels", node, w, h, w - dw, h - dh, shape[3],
                               shape[2], SD3_MULTIPLE)
            return measurement[:, :, : h - dh, : w - dw], shape
    raise ValueError(f"the measurement ({w}x{h}, W x H) cannot be fitted to an image whose sides are multiples of "
                     f"{SD3_MULTIPLE} pixels with this operator ({error or f'no crop of up to {MAX_CROP} pixels works'})")


class FlowDPSRestore(io.ComfyNode):
    """Restore a degraded photo with FlowDPS (or the FlowChef / PSLD baselines) in one node."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSRestore",
            display_name=NAME,
            category=CATEGORY_ROOT,
            description=(
                "Restores a degraded photo (super-resolution, deblurring, inpainting) with a rectified-flow model "
                "(SD3, SD3.5, Flux) by posterior sampling (FlowDPS, arXiv 2503.08136). The output size follows from "
                "the operator and the measurement (SR x12 of 64x64 gives 768x768); it must be a multiple of 16 "
                "pixels, otherwise the measurement is cropped and a warning is logged. Defaults are the paper's; "
                "shift and CFG 0 pick the model family's (Flux: CFG 1, guidance via FluxGuidance). The 'psld' "
                "method differentiates the diffusion model: it needs a second copy of the model's weights in memory."
            ),
            inputs=[
                io.Model.Input("model", tooltip=MODEL_TOOLTIP),
                io.Conditioning.Input("positive", tooltip=POSITIVE_TOOLTIP),
                io.Conditioning.Input("negative", tooltip=NEGATIVE_TOOLTIP),
                io.Vae.Input("vae", tooltip="The model's VAE; a private copy of its decoder is differentiated."),
                io.Image.Input("measurement", tooltip="The degraded photo."),
                Operator.Input("operator", tooltip="The degradation that produced the photo (operator nodes)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise and of FlowDPS's renoising."),
                io.Int.Input("steps", default=28, min=1, max=1000, tooltip="Sampling steps (paper: 28)."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=30.0, step=0.1, tooltip=CFG_TOOLTIP),
                io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.01, tooltip=SHIFT_TOOLTIP),
                io.Combo.Input("method", options=list(METHODS), default="flowdps",
                               tooltip="flowdps: the paper's method; flowchef: the baseline (one gradient per "
                                       "step, deterministic); psld: the PSLD baseline (gradient through the "
                                       "transformer and the VAE encoder, weights 1.0 / 0.1; residual 'auto' is "
                                       "||y - Ax||). " + PSLD_MEMORY_NOTE),
                io.Int.Input("dc_steps", default=3, min=1, max=50,
                             tooltip="FlowDPS: gradient steps per sampling step (paper: 3); unused by flowchef "
                                     "and psld."),
                io.Float.Input("step_size", default=15.0, min=0.0, max=1000.0, step=0.1,
                               tooltip=("Data-consistency step size (paper: 15). " + STEP_SIZE_NOTE)),
                io.Float.Input("step_size_end", default=-1.0, min=-1.0, max=1000.0, step=0.1,
                               tooltip="Step size at the last step (linear ramp); -1 keeps it constant."),
                *data_inputs(),
                scheduler_input(),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The restored photo."),
                io.Latent.Output(display_name="latent", tooltip="The restored latent (VAE space)."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, vae, measurement, operator, seed, steps, cfg, shift, method,
                dc_steps, step_size, step_size_end, residual, norm, sigma_y,
                scheduler=FLOWDPS_SCHEDULER) -> io.NodeOutput:
        check_links(cls, model=model, positive=positive, negative=negative, vae=vae, measurement=measurement,
                    operator=operator)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        check_model_and_vae(model, vae, NAME)
        problem = make_problem(vae, operator, measurement, residual, norm, sigma_y)
        y, image_shape = fit_measurement(operator, problem.measurement, NAME)
        problem = dataclasses.replace(problem, measurement=y)
        settings = restore_settings(model, shift, cfg, image_shape[2], image_shape[3])
        logger.info("%s: %s", NAME, settings.describe())
        step = step_schedule(step_size, step_size_end)
        config = {"flowdps": lambda: FlowDPSConfig(dc_steps=dc_steps, step_size=step),
                  "flowchef": lambda: FlowChefConfig(step_size=step),
                  "psld": lambda: PSLDConfig(step_size=step)}[method]()
        sample_function = sample_psld if method == "psld" else sample_posterior

        patched = shifted_model(model, settings.shift)
        channels = patched.get_model_object("latent_format").latent_channels
        ratio = vae.upscale_ratio
        batch = y.shape[0]
        latent = torch.zeros(batch, channels, image_shape[2] // ratio, image_shape[3] // ratio)
        noise = comfy.sample.prepare_noise(latent, seed)
        sigmas = restore_sigmas(patched.get_model_object("model_sampling"), scheduler, steps)
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(positive, negative)
        guider.set_cfg(settings.cfg)
        sampler = comfy.samplers.KSAMPLER(sample_function, extra_options={"problem": problem, "config": config})
        callback = latent_preview.prepare_callback(patched, steps)
        samples = guider.sample(noise, latent, sampler, sigmas, callback=callback,
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        samples = samples.to(mm.intermediate_device())
        image = vae.decode(samples)
        return io.NodeOutput(image, {"samples": samples})
