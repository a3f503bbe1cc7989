"""Differentiable private copies of a ComfyUI VAE's decoder and encoder, usable inside ComfyUI's inference mode.

ComfyUI executes every node under ``torch.inference_mode()``, so the weights its loaders produce are
inference tensors and autograd refuses to save them for backward ("Inference tensors cannot be saved for
backward"). ``VAE.decode`` also clamps its output and may fall back to tiled decoding, neither of which is
differentiable. :class:`GradDecoder` therefore deep-copies ``vae.first_stage_model`` once, *outside*
inference mode, into ordinary tensors on the chosen device and dtype, and calls the copy's own ``decode``
(unclamped) after converting model-space latents with the model's latent format (``process_out``);
:class:`GradEncoder` does the same for the encoder (PSLD). :func:`frozen_copy` is the copy itself, also used
for the diffusion model (``model_copy.py``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .decoder_memory import HALF_DTYPE, decode_function, split_mode

ENCODER_PARTS = ("encoder", "taesd_encoder", "quant_conv")
DECODER_PARTS = ("decoder", "taesd_decoder", "post_quant_conv")


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Leave ComfyUI's inference mode and enable autograd (for a gradient through a private copy)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def clone_for_grad(t: torch.Tensor) -> torch.Tensor:
    """An ordinary (non-inference) copy of a tensor made in a node, safe to combine with grad tensors."""
    with torch.inference_mode(False):
        return t.detach().clone()


def frozen_copy(module: torch.nn.Module, exclude: tuple[str, ...] = (), **to: Any) -> torch.nn.Module:
    """Deep copy of ``module`` in ordinary tensors, moved by ``module.to(**to)`` if given; frozen (no parameter
    requires grad: gradients flow to the inputs only).

    Made outside inference mode, so autograd can save its weights (ComfyUI's loaders make inference tensors).
    The submodules named in ``exclude`` are replaced by ``Identity`` placeholders in the copy (deepcopy's
    memo), so they are never copied.
    """
    memo = {id(getattr(module, name)): torch.nn.Identity()
            for name in exclude if isinstance(getattr(module, name, None), torch.nn.Module)}
    with torch.inference_mode(False):
        copied = copy.deepcopy(module, memo)
        if to:
            copied = copied.to(**to)
    copied.requires_grad_(False)
    return copied


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class PrivateVAEPart:
    """Autograd-capable private copy of part of ``vae.first_stage_model`` (the decoder or the encoder), for one
    sampling run.

    Calling it runs the part outside ComfyUI's inference mode (so it can join a graph inside
    :func:`grad_enabled`, and give ordinary tensors anywhere) on the copy's device and dtype, float32 or
    float64 out. :meth:`release` drops the weights (they are also freed when the object is garbage-collected).
    """

    excluded: tuple[str, ...] = ()

    def __init__(self, vae, latent_map: Callable[[torch.Tensor], torch.Tensor] | None, *,
                 device: torch.device | str | None, dtype: torch.dtype) -> None:
        self.device = torch.device(device) if device is not None else torch.device(vae.device)
        self.dtype = dtype
        self.latent_map = latent_map
        module = frozen_copy(vae.first_stage_model, self.excluded, device=self.device, dtype=dtype).eval()
        for m in module.modules():  # comfy.ops layers cast weights per call; the copy has its device and dtype
            if hasattr(m, "comfy_cast_weights"):
                m.comfy_cast_weights = False
        self.module: torch.nn.Module | None = module

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.module is None:
            raise RuntimeError(f"this {type(self).__name__} was released")
        with torch.inference_mode(False):
            out = self._run(self.module, t.to(device=self.device, dtype=self.input_dtype))
        return out if out.dtype == torch.float64 else out.float()

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the input is cast to before :meth:`_run` (the copy's)."""
        return self.dtype

    def _run(self, module: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def release(self) -> None:
        """Drop the private weights now."""
        self.module = None


def _no_interrupt() -> None:
    return None


def copy_dtype(memory: str, dtype: torch.dtype | None) -> torch.dtype:
    """The decoder copy's dtype for ``memory`` (a mode other than "auto") and an explicit ``dtype`` (``None``: the
    mode's: float32, or bfloat16 for a 16-bit mode). Raises ValueError for a 16-bit mode with another dtype."""
    mode_dtype = split_mode(memory)[1]
    if dtype is None:
        return mode_dtype
    if mode_dtype == HALF_DTYPE and dtype != HALF_DTYPE:
        raise ValueError(f"memory {memory!r} needs a bfloat16 decoder copy, got dtype {dtype}")
    return dtype


def _released(z: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("this GradDecoder was released")


class GradDecoder(PrivateVAEPart):
    """Autograd-capable private copy of ``vae.first_stage_model`` (decoder only).

    Args:
        vae: a ``comfy.sd.VAE`` (what ComfyUI's VAE loaders return).
        process_out: model space -> VAE space (``model.get_model_object("process_latent_out")``, for SD3
            ``z / 1.5305 + 0.0609``); ``None`` when latents are already in VAE space.
        device: where the copy lives (default: the VAE's device).
        dtype: the copy's dtype; by default the memory mode's (float32 whatever the VAE's dtype, bfloat16 for a
            16-bit mode), so gradients are float32. A 16-bit mode needs bfloat16 (ValueError otherwise).
        memory: how the gradient is computed (``decoder_memory``): "full" (plain autograd), "checkpoint" or
            "tiled" (the same gradient with less memory; ComfyUI's KL decoder only), or one of these with
            " 16-bit" (a bfloat16 copy: less memory, a slightly less exact gradient). No "auto" here: the
            bridge resolves it from the image size and the free memory.
        interrupt: called between blocks / bands in the bounded modes (ComfyUI's interrupt check).
        keep_budget: the tiled mode's bytes of kept tensors (``decoder_memory.tiled_budget``; ``None``: all).

    Calling it maps ``z: (B, C, h, w)`` in model space to an image ``(B, 3, 8h, 8w)`` in about [-1, 1],
    unclamped, float32 (float64 for a float64 copy; a bfloat16 copy gets ``z`` mapped to VAE space in float32,
    then cast, and returns its image as float32, so the gradient with respect to ``z`` is float32 too). Inside
    :func:`grad_enabled` gradients flow to ``z`` only (the copy's parameters do not require grad). The encoder
    is not copied.
    """

    excluded = ENCODER_PARTS

    def __init__(self, vae, process_out: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 memory: str = "full", interrupt: Callable[[], None] | None = None,
                 keep_budget: int | None = None) -> None:
        dtype = copy_dtype(memory, dtype)
        super().__init__(vae, process_out, device=device, dtype=dtype)
        assert self.module is not None
        self.memory = memory
        self._decode = decode_function(self.module, memory, interrupt or _no_interrupt, keep_budget)

    @property
    def input_dtype(self) -> torch.dtype:
        """float32 for a 16-bit copy (the latent map runs in float32, :meth:`_run` casts), else the copy's."""
        return torch.float32 if self.dtype.itemsize < 4 else self.dtype

    def _run(self, module: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        z = self.latent_map(z) if self.latent_map is not None else z
        return self._decode(z.to(self.dtype))

    def release(self) -> None:
        super().release()
        self._decode = _released


class GradEncoder(PrivateVAEPart):
    """Autograd-capable private copy of ``vae.first_stage_model`` (encoder only), for PSLD's gluing term.

    Args:
        vae: a ``comfy.sd.VAE``.
        process_in: VAE space -> model space (``model.get_model_object("process_latent_in")``, for SD3
            ``(z - 0.0609) * 1.5305``); ``None`` to return VAE-space latents.
        device, dtype: as :class:`GradDecoder` (float32 by default).

    Calling it maps an image ``x: (B, 3, H, W)`` in [-1, 1] (unclamped) to the latent ``(B, C, H/8, W/8)``
    the VAE's own ``encode`` gives (its mean for a KL autoencoder, as ComfyUI's VAEEncode), in model space.
    The decoder is not copied.

    The official PSLD code instead draws a sample of the encoder's posterior (mean plus its std times fresh
    noise) at every step. We keep the mean on purpose: the gluing term is then a deterministic function of
    the latent (PSLD stays a deterministic sampler, so a seed reproduces it and its gradient is not noisy). The
    two gluing targets differ by the encoder's posterior noise, which the random test VAEs cannot measure for
    real SD3 weights.
    """

    excluded = DECODER_PARTS

    def __init__(self, vae, process_in: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(vae, process_in, device=device, dtype=dtype)

    def _run(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        z = module.encode(x)
        z = z if z.dtype == torch.float64 else z.float()
        return self.latent_map(z) if self.latent_map is not None else z
