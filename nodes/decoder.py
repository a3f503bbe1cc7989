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
        first_stage = vae.first_stage_model
        self.device = torch.device(device) if device is not None else torch.device(vae.device)
        self.dtype = dtype
        self.process_out = process_out
        # deepcopy's memo maps the encoder parts to placeholders, so they are never copied.
        memo = {id(getattr(first_stage, name)): torch.nn.Identity()
                for name in ENCODER_PARTS if isinstance(getattr(first_stage, name, None), torch.nn.Module)}
        with torch.inference_mode(False):
            module = copy.deepcopy(first_stage, memo).to(device=self.device, dtype=dtype)
        module.requires_grad_(False)
        module.eval()
        _disable_comfy_casting(module)
        self.module: torch.nn.Module | None = module

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
