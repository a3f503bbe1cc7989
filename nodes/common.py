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

MODEL_TOOLTIP = ("The image model that knows what photos look like: SD3 medium, SD3.5 medium/large (Load "
                 "Checkpoint or Load Diffusion Model) or Flux.1 dev/schnell (Load Diffusion Model). SD1.5/SDXL "
                 "models do not work here (they are refused with an error).")
POSITIVE_TOOLTIP = ("A few words on what the photo shows ('a photo of a cat'); 'a high quality photo' works for "
                    "anything. Flux dev takes its guidance from here: put a FluxGuidance node (3.5) after the text "
                    "encoder.")
NEGATIVE_TOOLTIP = ("Negative prompt: leave its text empty (the paper's setting for SD3 and SD3.5: a CLIP Text "
                    "Encode with no text, not ConditioningZeroOut). Flux does not use it at its default CFG: connect a "
                    "ConditioningZeroOut.")
CFG_TOOLTIP = ("How strongly the prompt steers the result. 0 = the model's own default (SD3 and SD3.5: 2, the "
               "paper's; Flux: 1). Flux takes its guidance from a FluxGuidance node on the prompt instead: any other "
               "CFG doubles the time. (Classifier-free guidance scale.)")
SHIFT_TOOLTIP = ("How much of the run is spent on the coarse shapes (higher) versus fine detail. 0 = the model's "
                 "own default: SD3 4 (the paper's; ComfyUI's default is 3), SD3.5 3, Flux dev from the image size "
                 "(1.65 at 256 px, 3.16 at 1024 px), Flux schnell 1. Applies to this run only. (Time shift s of the "
                 "flow schedule, as ModelSamplingSD3: sigma = s t / (1 + (s - 1) t).)")
RESTORE_VAE_TOOLTIP = ("The model's own VAE (SD3/SD3.5: the SD3 VAE, from the checkpoint; Flux: ae.safetensors). "
                       "Another family's VAE gives wrong colours. (A private copy of its decoder is differentiated.)")
SCHEDULER_TOOLTIP = ("How the noise is removed over the steps. Keep 'flowdps' (the paper's schedule). The others are "
                     "ComfyUI's schedulers, as in BasicScheduler. (The official grid: the SD3 scheduler's times from "
                     "1 to about 0.003 through the shift; at 28 steps and shift 4 its last level before 0 is 0.0119, "
                     "where 'simple' stops at 0.13.)")
RESIDUAL_TOOLTIP = ("How the result is compared with your photo. Keep 'auto' (the paper's choice for each kind of "
                    "degradation). 'auto' = the pseudo-inverse for super-resolution, the photo itself for motion and "
                    "custom-kernel blurs, the adjoint for Gaussian blurs, inpainting and colourisation (for a "
                    "composition the adjoint, or the photo when a part asks for it). 'pinv' ||A+y - A+Ax||, "
                    "'adjoint' ||ATy - ATAx||, 'measurement' ||y - Ax||; 'pinv' on a blur is very slow.")
NORM_TOOLTIP = ("How differences from your photo are weighed. Keep 'paper'. ('paper': the un-squared norm ||r||, "
                "as the official FlowDPS; 'squared': ||r||^2 / (2 sigma_y^2), the Gaussian log-likelihood, which "
                "needs a much smaller fit strength.)")
STEP_SIZE_NOTE = ("15 is tuned for 768 px SD3 results: for other sizes try 5-30; if the result ignores your photo, "
                  "raise it; if it shows artefacts, lower it. (A distance in latent space with the paper norm; the "
                  "squared norm needs a much smaller value.)")
MEASUREMENT_TOOLTIP = ("Your degraded photo (small, blurred or with holes), any size: a size that is not a multiple "
                       "of 16 px is padded and the result cropped back.")
OPERATOR_TOOLTIP = ("What happened to the photo (an operator node: upscale, blur, inpainting...). It must match the "
                    "photo: a wrong operator gives a confident wrong result.")
PSLD_MEMORY_NOTE = ("Memory: PSLD back-propagates through the diffusion model, so for the run it holds a private "
                    "copy of the diffusion model's weights (as large as the loaded model: about 4 GB for SD3 medium "
                    "and 5 GB for SD3.5 medium in 16-bit, 16 GB for SD3.5 large) and of the VAE encoder, plus the "
                    "transformer's activations for one backward pass. Time: per step one backward pass through the "
                    "transformer, the decoder and the encoder (FlowDPS: three through the decoder only).")
SIGMA_Y_TOOLTIP = ("How noisy your photo is, on the 0-1 pixel scale (0.015 = slight noise). Only used with norm "
                   "'squared'. (The paper simulates 0.03 on the [-1, 1] scale, which is 0.015 here.)")

# --- inputs several nodes declare alike ------------------------------------------------------------------


def problem_inputs() -> list:
    """The SAMPLER nodes' first inputs: the VAE, the operator and the measurement."""
    return [
        io.Vae.Input("vae", tooltip=RESTORE_VAE_TOOLTIP),
        Operator.Input("operator", tooltip=OPERATOR_TOOLTIP),
        io.Image.Input("measurement", tooltip=MEASUREMENT_TOOLTIP),
    ]


def restore_inputs() -> list:
    """The Restore nodes' first inputs: model, prompts, VAE, the degraded photo and its operator."""
    return [
        io.Model.Input("model", tooltip=MODEL_TOOLTIP),
        io.Conditioning.Input("positive", tooltip=POSITIVE_TOOLTIP),
        io.Conditioning.Input("negative", tooltip=NEGATIVE_TOOLTIP),
        io.Vae.Input("vae", tooltip=RESTORE_VAE_TOOLTIP),
        io.Image.Input("measurement", tooltip=MEASUREMENT_TOOLTIP),
        Operator.Input("operator", tooltip=OPERATOR_TOOLTIP),
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


MEMORY_TOOLTIP = ("How the decoder's gradient is computed (the first four modes give the same gradient). 'auto': the "
                  "fastest mode that fits the free memory. 'full': plain autograd, fastest, about 25 KB per output "
                  "pixel (1024 px: about 24 GB). 'checkpoint': recomputes each decoder block in the backward pass, "
                  "about 40 % of the memory at 1.25x the time. 'tiled': works in bands of rows, about 6 KB per pixel "
                  "(1024 px: about 5 GB) at about 1.6x the time; with little free memory it keeps fewer tensors and "
                  "recomputes them, several times slower (2048 px in about 11 GB). 'checkpoint' and 'tiled' need a "
                  "KL VAE (SD3, SD3.5, Flux), not TAESD. The '16-bit' modes do the same in bfloat16: less memory "
                  "(about half for full and checkpoint, little for tiled), a slightly less exact gradient (a few "
                  "percent). They are meant for GPUs with native bfloat16, where 'auto' uses them only when nothing "
                  "else fits; on a CPU they run only when chosen, at a speed that depends on the processor.")


def memory_input() -> io.Combo.Input:
    """The trailing, optional ``memory`` input of every node that differentiates the decoder (saved workflows
    without it get 'auto')."""
    return io.Combo.Input("memory", options=list(MEMORY_MODES), default=DEFAULT_MEMORY, optional=True,
                          tooltip=MEMORY_TOOLTIP)


def scheduler_input() -> io.Combo.Input:
    """The Restore nodes' trailing, optional ``scheduler`` input (saved workflows without it get 'flowdps')."""
    return io.Combo.Input("scheduler", options=list(SCHEDULERS), default=FLOWDPS_SCHEDULER, optional=True,
                          tooltip=SCHEDULER_TOOLTIP)
