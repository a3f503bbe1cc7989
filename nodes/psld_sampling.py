"""The ComfyUI bridge of PSLD: :func:`sample_psld` for ``comfy.samplers.KSAMPLER``.

Same role as :func:`~.sampling.sample_posterior` (FlowDPS / FlowChef) and the same loop
(``samplers.sample_flow_posterior``), with what PSLD needs on top: its gradient is taken with respect to
the latent through the transformer, so each step with a nonzero step size calls the model on a private
gradient-capable copy of the diffusion model (:class:`~.model_copy.GradDiffusionModel`), through the
guider (CFG included), and its gluing term needs a private copy of the VAE encoder
(:class:`~.decoder.GradEncoder`).

Residual spaces: PSLD's measurement term is ``||A D(z0) - y||``, so ``residual="auto"`` means
``"measurement"`` here; the gluing term's ``P`` follows the operator's official choice
(``operator.auto_residual``: the pseudo-inverse for super-resolution, the identity for motion and kernel blurs,
whose official "adjoint" is the identity, the adjoint otherwise), or the residual named explicitly when it is
"pinv" or "adjoint".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import comfy.model_management as mm
import torch

from ..samplers import PSLDConfig, psld_data_term, sample_flow_posterior
from .decoder import GradDecoder, GradEncoder, clone_for_grad, module_bytes
from .model_copy import GradDiffusionModel
from .sampling import RestorationProblem, check_flow_model, check_problem_fits, sampler_generator

logger = logging.getLogger(__name__)

INFERENCE_ERROR = "Inference tensors cannot be saved for backward"


def measurement_residual(problem: RestorationProblem) -> str:
    """Residual space of PSLD's measurement term: "auto" is PSLD's own ``||y - A x||``."""
    return "measurement" if problem.residual == "auto" else problem.residual


def gluing_projection(problem: RestorationProblem) -> str:
    """``P`` of the gluing term: "pinv", "adjoint" or "measurement" (the identity), the official choice for the
    operator unless "pinv" or "adjoint" is named explicitly."""
    if problem.residual in ("pinv", "adjoint"):
        return problem.residual
    return problem.operator.auto_residual


def build_psld_term(problem: RestorationProblem, decoder: GradDecoder, encoder: GradEncoder,
                    device: torch.device):
    """PSLD's two-term data term with private (non-inference) copies of the operator and measurement."""
    op = problem.operator.materialize(device=device, dtype=torch.float32)
    projections = {"pinv": op.pinv, "adjoint": op.adjoint, "measurement": None}
    return psld_data_term(decoder, encoder, op.forward, problem.measurement.to(device=device, dtype=torch.float32),
                          project=projections[gluing_projection(problem)] or _identity,
                          measurement_project=projections[measurement_residual(problem)], norm=problem.norm,
                          sigma_y=problem.sigma_y)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def make_room(nbytes: int, device: torch.device, patcher: Any) -> None:
    """Ask ComfyUI to free ``nbytes`` on a GPU, keeping the model being sampled loaded (no-op on CPU)."""
    if device.type == "cpu":
        return
    keep = [m for m in mm.current_loaded_models if getattr(m, "model", None) is patcher]
    mm.free_memory(nbytes, device, keep_loaded=keep)


class PSLDGradientError(RuntimeError):
    """Autograd met an inference tensor on PSLD's gradient path (explained for the user)."""


@contextmanager
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


def sample_psld(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                problem: RestorationProblem, config: PSLDConfig):
    """k-diffusion-style sampler function for ``comfy.samplers.KSAMPLER`` (PSLD).

    model: ComfyUI's wrapped model (``KSamplerX0Inpaint``; ``model.inner_model`` is the GUIDER);
    ``model(x, sigma, **extra_args)`` is the CFG-combined x0 in model space.
    x: (B, C, h, w) noisy start in model space. Returns the (B, C, h, w) sample in model space.
    The private copies live for this call only and are released before it returns.
    """
    if not isinstance(config, PSLDConfig):
        raise ValueError(f"sample_psld needs a PSLDConfig, got {type(config).__name__}")
    extra_args = {} if extra_args is None else extra_args
    guider = model.inner_model
    base = getattr(guider, "inner_model", None)
    if base is None or not hasattr(base, "diffusion_model"):
        raise ValueError(f"PSLD calls the model through the GUIDER with a private copy of the diffusion model, but "
                         f"this guider ({type(guider).__name__}) does not expose the loaded model as "
                         f"'inner_model': use CFGGuider, BasicGuider or another core guider")
    check_flow_model(base, problem.vae, "PSLD")
    check_problem_fits(problem, x.shape)
    generator = sampler_generator(int(extra_args.get("seed") or 0), x.device)   # unused: PSLD draws nothing
    grad_args = dict(extra_args)
    if grad_args.get("denoise_mask") is not None:                 # multiplies the latent: must be ordinary
        grad_args["denoise_mask"] = clone_for_grad(grad_args["denoise_mask"])

    vae = problem.vae
    make_room(module_bytes(base.diffusion_model) + 4 * module_bytes(vae.first_stage_model), x.device,
              getattr(guider, "model_patcher", None))
    copies: dict[str, Any] = {}

    def denoise(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        mm.throw_exception_if_processing_interrupted()
        if not z.requires_grad:                                  # a step without gradient: the loaded model
            return model(z, sigma, **extra_args)
        if "model" not in copies:                                # made at the first step that needs it
            copies["model"] = GradDiffusionModel(base)
            logger.info("PSLD: private copy of the diffusion model, %.1f MB", copies["model"].nbytes / 2**20)
        with copies["model"].swapped_into(guider), explained_inference_errors():
            return model(z, sigma, **grad_args)

    decoder = GradDecoder(vae, base.process_latent_out, device=x.device)
    encoder = GradEncoder(vae, base.process_latent_in, device=x.device)
    try:
        term = build_psld_term(problem, decoder, encoder, x.device)
        with explained_inference_errors():
            return sample_flow_posterior(denoise, x, sigmas, term, config, generator=generator, callback=callback)
    finally:
        decoder.release()
        encoder.release()
        for copy in copies.values():
            copy.release()
        copies.clear()
