"""SAMPLER nodes for SamplerCustomAdvanced: FlowDPS, FlowChef and PSLD.

They combine with any NOISE, GUIDER (CFG, CFG schedules via guider nodes) and SIGMAS node. The latent
given to SamplerCustomAdvanced must decode to the image size the operator expects (for SR x4 of a
64 x 64 photo: 256 x 256, i.e. an EmptySD3LatentImage of 256 x 256).
"""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..samplers import FlowChefConfig, FlowDPSConfig, PSLDConfig, Schedule
from .common import CATEGORY_SAMPLERS, Operator
from .convert import measurement_pixels
from .inputs import check_links, inputs_named
from .psld_sampling import sample_psld
from .sampling import NORMS, RESIDUALS, RestorationProblem, flowdps_grid, sample_posterior

RESIDUAL_TOOLTIP = ("Space of the data-consistency residual. 'auto': the official FlowDPS code's choice for the "
                    "operator: the pseudo-inverse for super-resolution, the measurement itself for motion and "
                    "custom-kernel blurs (the official code's 'adjoint' there is the identity), the adjoint for "
                    "Gaussian blurs, inpainting and colourisation; for a composition the adjoint (or the "
                    "measurement when a part asks for it). 'pinv' ||A+y - A+Ax||, 'adjoint' ||ATy - ATAx|| (the "
                    "exact adjoint, for any operator), 'measurement' ||y - Ax||.")
NORM_TOOLTIP = ("'paper': the un-squared Euclidean norm of the residual (official FlowDPS); 'squared': "
                "||r||^2 / (2 sigma_y^2), the Gaussian log-likelihood (use a much smaller step size).")
STEP_SIZE_NOTE = ("With the paper norm the step is a distance in latent space tuned for 768 px SD3 latents: other "
                  "sizes, tasks or the squared norm need another value.")
PSLD_MEMORY_NOTE = ("Memory: PSLD back-propagates through the diffusion model, so for the run it holds a private "
                    "copy of the diffusion model's weights (as large as the loaded model: about 4 GB for SD3 medium "
                    "and 5 GB for SD3.5 medium in 16-bit, 16 GB for SD3.5 large) and of the VAE encoder, plus the "
                    "transformer's activations for one backward pass. Time: per step one backward pass through the "
                    "transformer, the decoder and the encoder (FlowDPS: three through the decoder only).")
SIGMA_Y_TOOLTIP = ("Measurement noise std on the [0, 1] image scale (only used by the 'squared' norm). The paper "
                   "simulates 0.03 on the [-1, 1] scale, i.e. 0.015 here.")


def common_inputs() -> list:
    return [
        io.Vae.Input("vae", tooltip="The VAE of the model; a private copy of its decoder is differentiated."),
        Operator.Input("operator", tooltip="The degradation that produced the measurement (operator nodes)."),
        io.Image.Input("measurement", tooltip="The degraded photo (the operator's output size)."),
    ]


def data_inputs() -> list:
    return [
        io.Combo.Input("residual", options=list(RESIDUALS), default="auto", tooltip=RESIDUAL_TOOLTIP),
        io.Combo.Input("norm", options=list(NORMS), default="paper", tooltip=NORM_TOOLTIP),
        io.Float.Input("sigma_y", default=0.015, min=0.0, max=1.0, step=0.001, tooltip=SIGMA_Y_TOOLTIP),
    ]


STEP_INPUTS = {"start": "step_size", "end": "step_size_end"}  # Schedule field -> node input


def step_schedule(start: float, end: float) -> float | Schedule:
    """The step_size / step_size_end inputs as a constant or a ramp (errors name those inputs)."""
    with inputs_named(STEP_INPUTS):
        return start if end < 0 or end == start else Schedule(start=start, end=end)


def make_problem(vae, operator, measurement, residual: str, norm: str, sigma_y: float) -> RestorationProblem:
    """Validate node inputs (before any sampling) and build the problem; raises ValueError with the value."""
    if residual not in RESIDUALS:
        raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    pixels = measurement_pixels(operator, measurement)
    return RestorationProblem(vae=vae, operator=operator, measurement=pixels, residual=residual, norm=norm,
                              sigma_y=2.0 * sigma_y if norm == "squared" else None)


class FlowDPSSampler(io.ComfyNode):
    """FlowDPS (Kim, Kim & Ye, ICCV 2025) as a SAMPLER."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSSampler",
            display_name="FlowDPS Sampler",
            category=CATEGORY_SAMPLERS,
            description=(
                "FlowDPS posterior sampler (arXiv 2503.08136) for SamplerCustomAdvanced: at every step the "
                "clean-latent estimate gets K gradient steps towards the measurement through the VAE decoder, "
                "is blended with the prior estimate and renoised. Defaults are the paper's (K=3, step 15). "
                "Use with a rectified-flow model: SD3 with ModelSamplingSD3 shift 4, 28 steps, CFG 2 (the paper); "
                "SD3.5 likewise (its own shift is 3); Flux with CFG 1 (BasicGuider) and FluxGuidance on the prompt."
            ),
            inputs=[
                *common_inputs(),
                io.Int.Input("dc_steps", default=3, min=1, max=50,
                             tooltip="K: gradient steps on the clean-latent estimate per sampling step (paper: 3)."),
                io.Float.Input("step_size", default=15.0, min=0.0, max=1000.0, step=0.1,
                               tooltip=("Data-consistency step size at the first step (paper: 15). " + STEP_SIZE_NOTE)),
                io.Float.Input("step_size_end", default=-1.0, min=-1.0, max=1000.0, step=0.1,
                               tooltip="Step size at the last step (linear ramp); -1 keeps it constant "
                                       "(paper). Later work found a decreasing step better."),
                *data_inputs(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, vae, operator, measurement, dc_steps, step_size, step_size_end, residual, norm,
                sigma_y) -> io.NodeOutput:
        check_links(cls, vae=vae, operator=operator, measurement=measurement)
        problem = make_problem(vae, operator, measurement, residual, norm, sigma_y)
        config = FlowDPSConfig(dc_steps=dc_steps, step_size=step_schedule(step_size, step_size_end))
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_posterior,
                                                     extra_options={"problem": problem, "config": config}))


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
                *common_inputs(),
                io.Float.Input("step_size", default=15.0, min=0.0, max=1000.0, step=0.1,
                               tooltip=("Gradient step size (the repository's solve.py passes 15). " + STEP_SIZE_NOTE)),
                *data_inputs(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, vae, operator, measurement, step_size, residual, norm, sigma_y) -> io.NodeOutput:
        check_links(cls, vae=vae, operator=operator, measurement=measurement)
        problem = make_problem(vae, operator, measurement, residual, norm, sigma_y)
        config = FlowChefConfig(step_size=step_size)
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_posterior,
                                                     extra_options={"problem": problem, "config": config}))


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
                *common_inputs(),
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
                io.Combo.Input("residual", options=list(RESIDUALS), default="auto",
                               tooltip=("Space of the measurement term: 'auto' is PSLD's ||y - Ax|| "
                                        "('measurement'); 'pinv'/'adjoint' also choose P of the gluing term, "
                                        "which is otherwise the pseudo-inverse for super-resolution and the "
                                        "adjoint for the rest.")),
                io.Combo.Input("norm", options=list(NORMS), default="paper", tooltip=NORM_TOOLTIP),
                io.Float.Input("sigma_y", default=0.015, min=0.0, max=1.0, step=0.001, tooltip=SIGMA_Y_TOOLTIP),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, vae, operator, measurement, step_size, step_size_end, measurement_weight, gluing_weight,
                residual, norm, sigma_y) -> io.NodeOutput:
        check_links(cls, vae=vae, operator=operator, measurement=measurement)
        problem = make_problem(vae, operator, measurement, residual, norm, sigma_y)
        config = PSLDConfig(step_size=step_schedule(step_size, step_size_end), measurement_weight=measurement_weight,
                            gluing_weight=gluing_weight)
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_psld, extra_options={"problem": problem, "config": config}))


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
