"""What the nodes share: categories, the node-id prefixes, the operator socket type, and the inputs (with their
tooltips) that several nodes declare alike. Inputs are API: their names, order and defaults never change."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..operators import RESIDUAL_SPACES
from ..samplers.data_term import NORMS
from .decoder_memory import DEFAULT_MEMORY, MEMORY_MODES

CATEGORY_ROOT = "FlowDPS"
CATEGORY_OPERATORS = "FlowDPS/operators"
CATEGORY_MEASUREMENT = "FlowDPS/measurement"
CATEGORY_SAMPLERS = "sampling/custom_sampling/samplers"
NODE_ID_PREFIXES = ("FlowDPS", "FlowChef", "AFDPS")

OPERATOR_TYPE = "FLOWDPS_OPERATOR"
"""The custom socket type that carries a degradation operator (operators.LinearOperator) between nodes."""

Operator = io.Custom(OPERATOR_TYPE)
"""The socket class of :data:`OPERATOR_TYPE` (``Operator.Input(...)`` / ``Operator.Output(...)``)."""

RESIDUALS = ("auto", *RESIDUAL_SPACES)
"""The ``residual`` widget: ``auto`` (the operator's own choice, ``operator.auto_residual``) or a space."""

FLOWDPS_SCHEDULER = "flowdps"
SCHEDULERS = (FLOWDPS_SCHEDULER, *comfy.samplers.SCHEDULER_NAMES)
"""The Restore nodes' ``scheduler`` widget: the official FlowDPS grid, then ComfyUI's schedulers."""

# --- tooltips ---------------------------------------------------------------------------------------------

MODEL_TOOLTIP = ("A rectified-flow model from ComfyUI's loaders: SD3 medium, SD3.5 medium/large "
                 "(CheckpointLoaderSimple or UNETLoader) or Flux.1 dev/schnell (UNETLoader). SD1.5/SDXL models are "
                 "refused with an error.")
POSITIVE_TOOLTIP = ("What the photo shows (the paper: 'a photo of ...'). Flux dev takes its guidance from here: "
                    "put a FluxGuidance node (default 3.5) after the text encoder.")
NEGATIVE_TOOLTIP = ("Negative prompt. The paper's setting (SD3, CFG 2) is the empty prompt encoded by the text "
                    "encoders (a CLIP Text Encode with no text), not ConditioningZeroOut, whose zeros are a "
                    "different negative for SD3's guidance. Unused at CFG 1, Flux's default: connect the positive "
                    "prompt or a ConditioningZeroOut.")
CFG_TOOLTIP = ("Classifier-free guidance scale. 0 = the model family's default: SD3 2.0 (paper), SD3.5 2.0, Flux 1 "
               "(guidance-distilled: no negative pass; set its guidance with FluxGuidance instead).")
SHIFT_TOOLTIP = ("Time shift s of the flow schedule for this run only (ModelSamplingSD3's shift: sigma = s t / "
                 "(1 + (s - 1) t)). 0 = the model family's default: SD3 4.0 (paper; ComfyUI's default is 3.0), SD3.5 "
                 "3.0, Flux dev from the image size (ModelSamplingFlux: 1.65 at 256 px, 3.16 at 1024 px; its shift "
                 "is ln s), Flux schnell 1.0.")
RESTORE_VAE_TOOLTIP = "The model's VAE; a private copy of its decoder is differentiated."
SCHEDULER_TOOLTIP = ("Noise levels of the steps. 'flowdps' (default): the official FlowDPS grid (the SD3 scheduler's "
                     "time grid from 1 down to about 0.003, then the model's shift: at 28 steps and shift 4 the last "
                     "level before 0 is 0.0119). The others are ComfyUI's schedulers, as in BasicScheduler ('simple' "
                     "stops at 0.13 at 28 steps: a coarser last step).")
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

# --- inputs several nodes declare alike ------------------------------------------------------------------


def problem_inputs() -> list:
    """The SAMPLER nodes' first inputs: the VAE, the operator and the measurement."""
    return [
        io.Vae.Input("vae", tooltip="The VAE of the model; a private copy of its decoder is differentiated."),
        Operator.Input("operator", tooltip="The degradation that produced the measurement (operator nodes)."),
        io.Image.Input("measurement", tooltip="The degraded photo (the operator's output size)."),
    ]


def restore_inputs() -> list:
    """The Restore nodes' first inputs: model, prompts, VAE, the degraded photo and its operator."""
    return [
        io.Model.Input("model", tooltip=MODEL_TOOLTIP),
        io.Conditioning.Input("positive", tooltip=POSITIVE_TOOLTIP),
        io.Conditioning.Input("negative", tooltip=NEGATIVE_TOOLTIP),
        io.Vae.Input("vae", tooltip=RESTORE_VAE_TOOLTIP),
        io.Image.Input("measurement", tooltip="The degraded photo."),
        Operator.Input("operator", tooltip="The degradation that produced the photo (operator nodes)."),
    ]


def cfg_shift_inputs(*, cfg_note: str = "") -> list:
    """The Restore nodes' ``cfg`` and ``shift`` (0: the model family's default); ``cfg_note`` ends its tooltip."""
    return [
        io.Float.Input("cfg", default=0.0, min=0.0, max=30.0, step=0.1, tooltip=CFG_TOOLTIP + cfg_note),
        io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.01, tooltip=SHIFT_TOOLTIP),
    ]


def data_inputs(*, residual_tooltip: str = RESIDUAL_TOOLTIP) -> list:
    """``residual``, ``norm`` and ``sigma_y`` of the FlowDPS-family data term."""
    return [
        io.Combo.Input("residual", options=list(RESIDUALS), default="auto", tooltip=residual_tooltip),
        io.Combo.Input("norm", options=list(NORMS), default="paper", tooltip=NORM_TOOLTIP),
        io.Float.Input("sigma_y", default=0.015, min=0.0, max=1.0, step=0.001, tooltip=SIGMA_Y_TOOLTIP),
    ]


MEMORY_TOOLTIP = ("How the decoder's gradient is computed (the same gradient in every mode). 'auto': the fastest mode "
                  "that fits the free memory. 'full': plain autograd, fastest, about 30 KB per output pixel (1024 px: "
                  "about 30 GB). 'checkpoint': recomputes each decoder block in the backward pass, about half the "
                  "memory, slightly slower. 'tiled': works in bands of rows, a few GB at 1024 px, slowest. "
                  "'checkpoint' and 'tiled' need a KL VAE (SD3, SD3.5, Flux), not TAESD.")


def memory_input() -> io.Combo.Input:
    """The trailing, optional ``memory`` input of every node that differentiates the decoder (saved workflows
    without it get 'auto')."""
    return io.Combo.Input("memory", options=list(MEMORY_MODES), default=DEFAULT_MEMORY, optional=True,
                          tooltip=MEMORY_TOOLTIP)


def scheduler_input() -> io.Combo.Input:
    """The Restore nodes' trailing, optional ``scheduler`` input (saved workflows without it get 'flowdps')."""
    return io.Combo.Input("scheduler", options=list(SCHEDULERS), default=FLOWDPS_SCHEDULER, optional=True,
                          tooltip=SCHEDULER_TOOLTIP)
