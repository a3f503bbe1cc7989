"""SAMPLER nodes for SamplerCustomAdvanced: FlowDPS, FlowChef and PSLD, and the official FlowDPS SIGMAS.

They combine with any NOISE, GUIDER (CFG, CFG schedules via guider nodes) and SIGMAS node. The latent
given to SamplerCustomAdvanced must decode to the image size the operator expects (for SR x4 of a
64 x 64 photo: 256 x 256); the 'Latent for measurement' node makes it. A latent of the padded size it gives for a
photo whose result is not a multiple of 16 px is accepted (the measurement is padded alike, ``RestorationProblem.fit_to``).
"""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..samplers import FlowChefConfig, FlowDPSConfig, PSLDConfig
from .bridge import RestorationProblem, flowdps_grid, sample_posterior, sample_psld
from .common import (
    CATEGORY_SAMPLERS,
    DEFAULT_MEMORY,
    PSLD_MEMORY_NOTE,
    STEP_SIZE_NOTE,
    data_inputs,
    memory_input,
    problem_inputs,
)
from .inputs import check_links, step_schedule

PSLD_RESIDUAL_TOOLTIP = ("Space of the measurement term: 'auto' is PSLD's ||y - Ax|| ('measurement'); "
                         "'pinv'/'adjoint' also choose P of the gluing term, which is otherwise the pseudo-inverse "
                         "for super-resolution and the adjoint for the rest.")


def ksampler(function, problem: RestorationProblem, config) -> comfy.samplers.KSAMPLER:
    """The SAMPLER of a sampler function for a problem and a config (the model is checked at sample time)."""
    return comfy.samplers.KSAMPLER(function, extra_options={"problem": problem, "config": config})


class FlowDPSSampler(io.ComfyNode):
    """FlowDPS (Kim, Kim & Ye, ICCV 2025) as a SAMPLER."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSSampler",
            display_name="FlowDPS Sampler",
            category=CATEGORY_SAMPLERS,
            description=(
                "FlowDPS posterior sampler (arXiv 2503.08136) for SamplerCustomAdvanced (give it a latent from 'Latent "
                "for measurement'): at every step the "
                "clean-latent estimate gets K gradient steps towards the measurement through the VAE decoder, "
                "is blended with the prior estimate and renoised. Defaults are the paper's (K=3, step 15). "
                "Use with a rectified-flow model: SD3 with ModelSamplingSD3 shift 4, 28 steps, CFG 2 (the paper); "
                "SD3.5 likewise (its own shift is 3); Flux with CFG 1 (BasicGuider) and FluxGuidance on the prompt."
            ),
            inputs=[
                *problem_inputs(),
                io.Int.Input("dc_steps", default=3, min=1, max=50,
                             tooltip="How many times per step the result is nudged towards your photo (paper: "
                                     "3). (K gradient steps on the clean-latent estimate.)"),
                io.Float.Input("step_size", default=15.0, min=0.0, max=1000.0, step=0.1,
                               tooltip=("How hard each nudge pulls the result towards your photo, at the first "
                                        "step (paper: 15). " + STEP_SIZE_NOTE)),
                io.Float.Input("step_size_end", default=-1.0, min=-1.0, max=1000.0, step=0.1,
                               tooltip="Fit strength at the last step, ramping from step_size (-1: no ramp, the "
                                       "paper). Later work found a decreasing one better."),
                *data_inputs(),
                memory_input(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, vae, operator, measurement, dc_steps, step_size, step_size_end, residual, norm,
                sigma_y, memory=DEFAULT_MEMORY) -> io.NodeOutput:
        check_links(cls, vae=vae, operator=operator, measurement=measurement)
        problem = RestorationProblem.from_inputs(vae, operator, measurement, residual, norm, sigma_y, memory)
        config = FlowDPSConfig(dc_steps=dc_steps, step_size=step_schedule(step_size, step_size_end))
        return io.NodeOutput(ksampler(sample_posterior, problem, config))


class FlowChefSampler(io.ComfyNode):
    """The FlowChef baseline as in the FlowDPS repository."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowChefSampler",
            display_name="FlowChef Sampler",
            category=CATEGORY_SAMPLERS,
            description=(
                "FlowChef baseline (as in the FlowDPS repository) for SamplerCustomAdvanced: one gradient "
                "of the data term at the clean-latent estimate per step, deterministic. Faster and weaker "
                "than FlowDPS."
            ),
            inputs=[
                *problem_inputs(),
                io.Float.Input("step_size", default=15.0, min=0.0, max=1000.0, step=0.1,
                               tooltip=("How hard each step pulls the result towards your photo (the FlowDPS "
                                        "repository uses 15). " + STEP_SIZE_NOTE)),
                *data_inputs(),
                memory_input(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, vae, operator, measurement, step_size, residual, norm, sigma_y,
                memory=DEFAULT_MEMORY) -> io.NodeOutput:
        check_links(cls, vae=vae, operator=operator, measurement=measurement)
        problem = RestorationProblem.from_inputs(vae, operator, measurement, residual, norm, sigma_y, memory)
        config = FlowChefConfig(step_size=step_size)
        return io.NodeOutput(ksampler(sample_posterior, problem, config))


class PSLDSampler(io.ComfyNode):
    """PSLD, the third method of the FlowDPS repository, as a SAMPLER."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSPSLDSampler",
            display_name="PSLD Sampler",
            category=CATEGORY_SAMPLERS,
            description=(
                "PSLD baseline (Rout et al. 2023, as in the FlowDPS repository) for SamplerCustomAdvanced: at every "
                "step one gradient of ||A D(z0) - y|| + 0.1 ||z0 - E(P y + D(z0) - P A D(z0))|| with respect to the "
                "noisy latent itself, through the transformer, the VAE decoder and encoder; deterministic. The most "
                "expensive and weakest of the three methods in the published comparison. " + PSLD_MEMORY_NOTE
            ),
            inputs=[
                *problem_inputs(),
                io.Float.Input("step_size", default=15.0, min=0.0, max=1000.0, step=0.1,
                               tooltip=("Gradient step on the noisy latent at the first step (the repository's "
                                        "solve.py passes 15). 0 is plain Euler sampling with no copy made. "
                                        + STEP_SIZE_NOTE)),
                io.Float.Input("step_size_end", default=-1.0, min=-1.0, max=1000.0, step=0.1,
                               tooltip="Step size at the last step (linear ramp); -1 keeps it constant."),
                io.Float.Input("measurement_weight", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of ||A D(z0) - y|| (official: 1.0)."),
                io.Float.Input("gluing_weight", default=0.1, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the gluing term ||z0 - E(P y + D(z0) - P A D(z0))|| "
                                       "(official: 0.1); 0 skips the encoder's gradient."),
                *data_inputs(residual_tooltip=PSLD_RESIDUAL_TOOLTIP),
                memory_input(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, vae, operator, measurement, step_size, step_size_end, measurement_weight, gluing_weight,
                residual, norm, sigma_y, memory=DEFAULT_MEMORY) -> io.NodeOutput:
        check_links(cls, vae=vae, operator=operator, measurement=measurement)
        problem = RestorationProblem.from_inputs(vae, operator, measurement, residual, norm, sigma_y, memory)
        config = PSLDConfig(step_size=step_schedule(step_size, step_size_end), measurement_weight=measurement_weight,
                            gluing_weight=gluing_weight)
        return io.NodeOutput(ksampler(sample_psld, problem, config))


class FlowDPSSigmas(io.ComfyNode):
    """The official FlowDPS noise levels as SIGMAS, for SamplerCustomAdvanced."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSSigmas",
            display_name="FlowDPS sigmas (official grid)",
            category=CATEGORY_SAMPLERS,
            description=(
                "The noise levels of the official FlowDPS code for the given model and number of steps: the SD3 "
                "scheduler's time grid from 1 down to about 0.003, through the model's shift (connect the model "
                "after ModelSamplingSD3 shift 4, the paper's), then 0. At 28 steps and shift 4 the last level "
                "before 0 is 0.0119; BasicScheduler's 'simple' stops at 0.13, 'normal' at 0.004."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model with its sampling shift (e.g. after ModelSamplingSD3)."),
                io.Int.Input("steps", default=28, min=1, max=10000, tooltip="Number of steps (paper: 28)."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, steps) -> io.NodeOutput:
        check_links(cls, model=model)
        return io.NodeOutput(flowdps_grid(model.get_model_object("model_sampling"), int(steps)))
