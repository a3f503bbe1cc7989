"""A differentiable copy of a ComfyUI VAE decoder, usable inside ComfyUI's ``torch.inference_mode()``.

ComfyUI executes every node under ``torch.inference_mode()``, so the weights its loaders produce are
inference tensors and autograd refuses to save them for backward ("Inference tensors cannot be saved for
backward"). ``VAE.decode`` also clamps its output and may fall back to tiled decoding, neither of which is
differentiable. :class:`GradDecoder` therefore deep-copies ``vae.first_stage_model`` once, *outside*
inference mode, into ordinary tensors on the chosen device and dtype, and calls the copy's own ``decode``
(unclamped) after converting model-space latents with the model's latent format (``process_out``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch


def _disable_comfy_casting(module: torch.nn.Module) -> None:
    """comfy.ops layers cast weights per call; the private copy already has the right device and dtype."""
    for m in module.modules():
        if hasattr(m, "comfy_cast_weights"):
            m.comfy_cast_weights = False


ENCODER_PARTS = ("encoder", "taesd_encoder", "quant_conv")


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Leave ComfyUI's inference mode and enable autograd (for the data-consistency gradient only)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def clone_for_grad(t: torch.Tensor) -> torch.Tensor:
    """An ordinary (non-inference) copy of a tensor made in a node, safe to combine with grad tensors."""
    with torch.inference_mode(False):
        return t.detach().clone()


DECODER_PARTS = ("decoder", "taesd_decoder", "post_quant_conv")


def private_copy(first_stage: torch.nn.Module, exclude: tuple[str, ...], device: torch.device,
                 dtype: torch.dtype) -> torch.nn.Module:
    """Deep copy of a VAE's ``first_stage_model`` in ordinary tensors, without the parts named in ``exclude``.

    Made outside inference mode, so autograd can save its weights; the excluded parts are replaced by
    ``Identity`` placeholders in the copy (deepcopy's memo), so they are never copied. Frozen, eval mode.
    """
    memo = {id(getattr(first_stage, name)): torch.nn.Identity()
            for name in exclude if isinstance(getattr(first_stage, name, None), torch.nn.Module)}
    with torch.inference_mode(False):
        module = copy.deepcopy(first_stage, memo).to(device=device, dtype=dtype)
    module.requires_grad_(False)
    module.eval()
    _disable_comfy_casting(module)
    return module


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class GradDecoder:
    """Autograd-capable private copy of ``vae.first_stage_model`` (decoder only).

    Args:
        vae: a ``comfy.sd.VAE`` (what ComfyUI's VAE loaders return).
        process_out: model space -> VAE space (``model.get_model_object("process_latent_out")``, for SD3
            ``z / 1.5305 + 0.0609``); ``None`` when latents are already in VAE space.
        device: where the copy lives (default: the VAE's device).
        dtype: the copy's dtype; float32 by default whatever the VAE's dtype, so gradients are float32.

    Calling it maps ``z: (B, C, h, w)`` in model space to an image ``(B, 3, 8h, 8w)`` in about [-1, 1],
    unclamped, float32 (float64 for a float64 copy). Call it inside :func:`grad_enabled`; gradients flow to ``z`` only (the copy's
    parameters do not require grad). The encoder is not copied.
    """

    def __init__(self, vae, process_out: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device) if device is not None else torch.device(vae.device)
        self.dtype = dtype
        self.process_out = process_out
        self.module: torch.nn.Module | None = private_copy(vae.first_stage_model, ENCODER_PARTS, self.device,
                                                           dtype)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.module is None:
            raise RuntimeError("this GradDecoder was released")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("call GradDecoder inside grad_enabled(): ComfyUI's inference mode is on")
        z = z.to(device=self.device, dtype=self.dtype)
        if self.process_out is not None:
            z = self.process_out(z)
        image = self.module.decode(z)
        return image if image.dtype == torch.float64 else image.float()

    def release(self) -> None:
        """Drop the private weights now (they are also freed when the object is garbage-collected)."""
        self.module = None


class GradEncoder:
    """Autograd-capable private copy of ``vae.first_stage_model`` (encoder only), for PSLD's gluing term.

    Args:
        vae: a ``comfy.sd.VAE``.
        process_in: VAE space -> model space (``model.get_model_object("process_latent_in")``, for SD3
            ``(z - 0.0609) * 1.5305``); ``None`` to return VAE-space latents.
        device, dtype: as :class:`GradDecoder` (float32 by default).

    Calling it maps an image ``x: (B, 3, H, W)`` in [-1, 1] (unclamped) to the latent ``(B, C, H/8, W/8)``
    the VAE's own ``encode`` gives (its mean for a KL autoencoder, as ComfyUI's VAEEncode), in model space.
    Call it inside :func:`grad_enabled`. The decoder is not copied.

    The official PSLD code instead draws a sample of the encoder's posterior (mean plus its std times fresh
    noise) at every step. We keep the mean on purpose: the gluing term is then a deterministic function of
    the latent (PSLD stays a deterministic sampler, so a seed reproduces it and its gradient is not noisy). The
    two gluing targets differ by the encoder's posterior noise, which the random test VAEs cannot measure for
    real SD3 weights.
    """

    def __init__(self, vae, process_in: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device) if device is not None else torch.device(vae.device)
        self.dtype = dtype
        self.process_in = process_in
        self.module: torch.nn.Module | None = private_copy(vae.first_stage_model, DECODER_PARTS, self.device,
                                                           dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.module is None:
            raise RuntimeError("this GradEncoder was released")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("call GradEncoder inside grad_enabled(): ComfyUI's inference mode is on")
        z = self.module.encode(x.to(device=self.device, dtype=self.dtype))
        z = z if z.dtype == torch.float64 else z.float()
        return self.process_in(z) if self.process_in is not None else z

    def release(self) -> None:
        """Drop the private weights now (they are also freed when the object is garbage-collected)."""
        self.module = None
