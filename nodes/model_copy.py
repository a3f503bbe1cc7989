"""A differentiable private copy of a ComfyUI diffusion model, for samplers that back-propagate through it (PSLD).

ComfyUI runs every node under ``torch.inference_mode()``: the weights its loaders produce are inference
tensors, and autograd refuses to save them for backward, so ``d z0 / d z`` cannot be taken through the
loaded transformer (the same problem as the VAE's, ``nodes/decoder.py``). Nothing in ComfyUI's model
patcher makes weights gradient-capable: object and weight patches replace or modify tensors, they do not
leave inference mode. :class:`GradDiffusionModel` therefore

* deep-copies ``base.diffusion_model`` (the transformer, with whatever weight patches such as LoRAs the
  patcher has applied at load time) once, outside inference mode, on the same devices and dtypes, and
* builds a *proxy* of the ``BaseModel``: a shallow copy that shares everything with the original (model
  sampling with its shift, latent format, the model patcher, conds handling) except its submodule table,
  where ``diffusion_model`` is the copy.

:meth:`GradDiffusionModel.swapped_into` puts the proxy into the GUIDER for one model call, so the whole
ComfyUI prediction path runs on it: any guider (CFG, dual CFG, ...), ``calc_cond_batch``, the model
options' hooks and wrappers, ``apply_model`` and the CFG combination, all of which are plain tensor
arithmetic and differentiable. Cost: one more copy of the diffusion model's weights for the run (SD3.5
medium in bf16: about 5 GB, SD3.5 large: about 16 GB) plus the activations one backward pass keeps.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch

from .decoder import frozen_copy, module_bytes

logger = logging.getLogger(__name__)


class GradDiffusionModel:
    """Private, gradient-capable copy of ``base.diffusion_model`` and a proxy ``BaseModel`` that uses it.

    Args:
        base: a ``comfy.model_base.BaseModel`` while it is loaded for sampling (``guider.inner_model``).

    Attributes:
        proxy: the ``BaseModel`` to call instead of ``base`` (``None`` after :meth:`release`).
        nbytes: bytes of the copied weights and buffers.
    """

    def __init__(self, base: Any) -> None:
        original = getattr(base, "diffusion_model", None)
        if not isinstance(original, torch.nn.Module):
            raise ValueError(f"cannot copy the diffusion model of {type(base).__name__}: it has no "
                             f"'diffusion_model' module")
        module = frozen_copy(original)                                  # gradients flow to the latent only
        proxy = copy.copy(base)                                         # shares every attribute with base ...
        proxy.__dict__["_modules"] = {**base._modules, "diffusion_model": module}  # ... but its submodules
        self.module: torch.nn.Module | None = module
        self.proxy: Any = proxy
        self.nbytes = module_bytes(module)

    @contextlib.contextmanager
    def swapped_into(self, guider: Any) -> Iterator[None]:
        """Within the block the guider predicts with the copy (``guider.inner_model`` is the proxy)."""
        if self.proxy is None:
            raise RuntimeError("this GradDiffusionModel was released")
        original = guider.inner_model
        guider.inner_model = self.proxy
        try:
            yield
        finally:
            guider.inner_model = original

    def release(self) -> None:
        """Drop the copy now (it is also freed when the object is garbage-collected)."""
        self.module = None
        self.proxy = None
