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

NAME = "FlowDPS Restore"  # the display name, which messages and log lines start with
METHODS = ("flowdps", "flowchef", "psld")


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
                *restore_inputs(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise and of FlowDPS's renoising."),
                io.Int.Input("steps", default=28, min=1, max=1000, tooltip="Sampling steps (paper: 28)."),
                *cfg_shift_inputs(),
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
                memory_input(),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The restored photo."),
                io.Latent.Output(display_name="latent", tooltip="The restored latent (VAE space)."),
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
        return io.NodeOutput(vae.decode(run.samples), {"samples": run.samples})
