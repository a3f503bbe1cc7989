"""All-in-one restoration node for artists: model, prompts, VAE, photo and degradation in; photo out."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..samplers import FlowChefConfig, FlowDPSConfig, PSLDConfig
from .bridge import RestorationProblem, RestoreRun, restore, sample_posterior, sample_psld
from .common import (
    CATEGORY_ROOT,
    DEFAULT_MEMORY,
    FLOWDPS_SCHEDULER,
    PSLD_MEMORY_NOTE,
    STEP_SIZE_NOTE,
    cfg_shift_inputs,
    data_inputs,
    memory_input,
    restore_inputs,
    scheduler_input,
)
from .inputs import check_links, step_schedule
from .padding import crop_image

NAME = "FlowDPS Restore"  # messages and log lines start with it
DISPLAY_NAME = "Restore: upscale, deblur, inpaint (FlowDPS)"  # what the editor shows; its search finds these words
METHODS = ("flowdps", "flowchef", "psld")


class FlowDPSRestore(io.ComfyNode):
    """Restore a degraded photo with FlowDPS (or the FlowChef / PSLD baselines) in one node."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSRestore",
            display_name=DISPLAY_NAME,
            category=CATEGORY_ROOT,
            description=(
                "Restores a degraded photo: upscaling (super-resolution), deblurring or filling holes (inpainting), "
                "with SD3, SD3.5 or Flux and no training. Connect the model, prompts, VAE, your photo and an operator "
                "node that says what happened to the photo; the result's size follows (upscale x4 of 64x64 gives "
                "256x256, exactly, whatever the photo's size). The defaults are the paper's (FlowDPS, Kim, Kim & Ye, "
                "ICCV 2025); cfg and shift 0 pick the model's own. Method 'psld' needs a second copy of the model "
                "in memory."
            ),
            inputs=[
                *restore_inputs(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Another seed gives another plausible restoration; the same seed repeats "
                                     "the result. (Initial noise and FlowDPS's renoising.)"),
                io.Int.Input("steps", default=28, min=1, max=1000,
                             tooltip="Sampling steps: 28 is the paper's; 12-16 is a quick preview."),
                *cfg_shift_inputs(),
                io.Combo.Input("method", options=list(METHODS), default="flowdps",
                               tooltip="Keep 'flowdps' (the paper's method). 'flowchef' is a faster, weaker "
                                       "baseline (one gradient per step, deterministic); 'psld' an older, slower "
                                       "one, for comparisons (gradient through the transformer and the VAE "
                                       "encoder, weights 1.0 / 0.1; residual 'auto' is ||y - Ax||). "
                                       + PSLD_MEMORY_NOTE),
                io.Int.Input("dc_steps", default=3, min=1, max=50,
                             tooltip="How many times per step the result is nudged towards your photo (paper: "
                                     "3; more is slower). Unused by flowchef and psld. (K gradient steps on the "
                                     "clean-latent estimate.)"),
                io.Float.Input("step_size", default=15.0, min=0.0, max=1000.0, step=0.1,
                               tooltip=("How hard each nudge pulls the result towards your photo (paper: 15). "
                                        + STEP_SIZE_NOTE)),
                io.Float.Input("step_size_end", default=-1.0, min=-1.0, max=1000.0, step=0.1,
                               tooltip="Fit strength at the last step, ramping from fit strength (-1: no ramp, "
                                       "the paper)."),
                *data_inputs(),
                scheduler_input(),
                memory_input(),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The restored photo, at the size the photo and the "
                                                             "operator imply."),
                io.Latent.Output(display_name="latent", tooltip="The restored latent (VAE space), as sampled: for a "
                                                               "size that is not a multiple of 16 px it includes "
                                                               "the padding."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, vae, measurement, operator, seed, steps, cfg, shift, method,
                dc_steps, step_size, step_size_end, residual, norm, sigma_y,
                scheduler=FLOWDPS_SCHEDULER, memory=DEFAULT_MEMORY) -> io.NodeOutput:
        check_links(cls, model=model, positive=positive, negative=negative, vae=vae, measurement=measurement,
                    operator=operator)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        problem = RestorationProblem.from_inputs(vae, operator, measurement, residual, norm, sigma_y, memory)
        step = step_schedule(step_size, step_size_end)
        config = {"flowdps": lambda: FlowDPSConfig(dc_steps=dc_steps, step_size=step),
                  "flowchef": lambda: FlowChefConfig(step_size=step),
                  "psld": lambda: PSLDConfig(step_size=step)}[method]()
        function = sample_psld if method == "psld" else sample_posterior

        def sampler(problem: RestorationProblem, flow) -> comfy.samplers.KSAMPLER:
            return comfy.samplers.KSAMPLER(function, extra_options={"problem": problem, "config": config, "flow": flow})

        run = restore(NAME, model, positive, negative, problem, RestoreRun(seed, steps, cfg, shift, scheduler), sampler)
        return io.NodeOutput(crop_image(vae.decode(run.samples), run.size), {"samples": run.samples})
