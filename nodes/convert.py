"""Conversions between ComfyUI's conventions and the pack's (the only place that knows both).

ComfyUI IMAGE: ``(B, H, W, C)`` float in [0, 1], C = 3 (or 4 with alpha, 1 for grey), on CPU.
ComfyUI MASK: ``(B, H, W)`` or ``(H, W)`` float in [0, 1], 1 = the area to change (inpaint).
Pack images: ``(B, C, H, W)`` float in [-1, 1] (the VAE decoder's range); the operators' masks are keep-masks
(1 = known pixel), and measurement noise is a standard deviation on that [-1, 1] scale.
UI noise levels (``sigma_y`` widgets): on ComfyUI's [0, 1] image scale, i.e. half the pack's.
"""

from __future__ import annotations

import logging

import torch

from ..operators import GaussianNoise, Inpainting, LinearOperator
from .inputs import inputs_named

logger = logging.getLogger(__name__)

PAPER_SIGMA_Y = 0.015
"""FlowDPS's measurement noise on the [0, 1] scale of the widgets (0.03 on the [-1, 1] scale of solve.py)."""

PIXEL_SCALE = 2.0
"""[0, 1] image scale -> the pack's [-1, 1] scale: lengths (noise levels) double."""


def image_to_pixels(image: torch.Tensor, *, name: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE ``(B, H, W, C)`` in [0, 1] -> ``(B, 3, H, W)`` in [-1, 1] (float32).

    Grey images (C = 1) are repeated to RGB; an alpha channel (C = 4) is dropped with a log line, as
    ComfyUI's own VAEEncode does. Non-finite values raise ``ValueError``.
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise ValueError(f"{name}: expected an IMAGE of shape (B, H, W, C), got {tuple(image.shape)}")
    if min(image.shape) == 0:
        raise ValueError(f"{name}: the IMAGE is empty (shape {tuple(image.shape)}, B, H, W, C)")
    channels = image.shape[-1]
    if channels == 1:
        image = image.expand(-1, -1, -1, 3)
    elif channels == 4:
        logger.info("%s: dropping the alpha channel (RGBA -> RGB)", name)
        image = image[..., :3]
    elif channels != 3:
        raise ValueError(f"{name}: expected 1, 3 or 4 channels, got {channels} (shape {tuple(image.shape)})")
    if not torch.isfinite(image).all():
        bad = int((~torch.isfinite(image)).sum())
        raise ValueError(f"{name}: contains {bad} NaN or infinite values")
    return image.movedim(-1, 1).float() * 2.0 - 1.0


def pixels_to_image(x: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
    """``(B, C, H, W)`` in [-1, 1] -> ComfyUI IMAGE ``(B, H, W, 3)`` in [0, 1] on CPU (grey -> RGB).

    Clamped to [0, 1] unless ``clamp=False``: then values outside stay (ComfyUI's image nodes clip only when
    they save or preview), which keeps e.g. the Gaussian noise of a simulated measurement exact.
    """
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) pixels, got {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    image = (x.float() + 1.0) / 2.0
    return (image.clamp(0.0, 1.0) if clamp else image).movedim(1, -1).cpu().contiguous()


def mask_to_batch(mask: torch.Tensor, *, name: str = "mask") -> torch.Tensor:
    """ComfyUI MASK ``(H, W)`` / ``(B, H, W)`` / ``(B, 1, H, W)`` -> ``(B, H, W)`` float32."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    elif mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise ValueError(f"{name}: expected a MASK of shape (B, H, W), got {tuple(mask.shape)}")
    if not torch.isfinite(mask).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return mask.float()


def pixel_sigma(sigma_y: float) -> float:
    """A ``sigma_y`` widget (noise std on the [0, 1] image scale) on the pack's [-1, 1] scale (x2)."""
    return PIXEL_SCALE * float(sigma_y)


def measurement_noise(sigma_y: float) -> GaussianNoise:
    """The noise model of a ``sigma_y`` widget ([0, 1] scale); errors name ``sigma_y``."""
    with inputs_named({"sigma": "sigma_y"}):
        return GaussianNoise(pixel_sigma(sigma_y))


def keep_mask_from_comfy_mask(mask: torch.Tensor) -> torch.Tensor:
    """A ComfyUI MASK (1 = area to inpaint, values in [0, 1]) as the operators' keep-mask: ``1 - mask`` (so, once
    binarised at 0.5, ComfyUI values above 0.5 are missing and exactly 0.5 is known, as ComfyUI's own
    inpainting nodes, VAE Encode for Inpainting and InpaintModelConditioning, round it: 0.5 rounds to 0)."""
    return 1.0 - mask


def comfy_mask_from_keep_mask(keep: torch.Tensor) -> torch.Tensor:
    """An operator's keep-mask ``(B, 1, H, W)`` (1 = known) as a ComfyUI MASK ``(B, H, W)`` (1 = to fill)."""
    return 1.0 - keep[:, 0]


def measurement_pixels(operator: LinearOperator, image: torch.Tensor, *, name: str = "measurement") -> torch.Tensor:
    """ComfyUI IMAGE ``(B, h, w, C)`` -> the measurement ``(B, C', h, w)`` in [-1, 1] the operator produces.

    IMAGEs are RGB; an operator that measures one channel (colour-to-grey, ``operator.output_channels(3)``)
    gets the channel mean. Raises ValueError, before any expensive work, when no image maps to a measurement
    of this size (the operator's message names the sizes: a mask of another size, a kernel larger than the
    image, ...).
    """
    pixels = image_to_pixels(image, name=name)
    size = f"{pixels.shape[3]}x{pixels.shape[2]}"
    try:
        if operator.output_channels(pixels.shape[1]) == 1:
            pixels = pixels.mean(dim=1, keepdim=True)
        operator.input_shape(pixels.shape)
    except ValueError as e:
        raise ValueError(f"{name} ({size} pixels, W x H) does not fit the operator: {e}"
                         f"{fix_hint(operator, pixels.shape)}") from None
    return pixels


def fix_hint(operator: LinearOperator, shape: tuple[int, ...] | torch.Size) -> str:
    """What to change on the operator's node when a photo of ``shape`` (B, C, h, w) does not fit it: the widgets
    by their names (a sentence starting with '. ', or '' when there is nothing specific to say)."""
    h, w = int(shape[2]), int(shape[3])
    if isinstance(operator, Inpainting):
        return (f". The inpainting mask must have the photo's size: in 'Inpainting operator (box)' or '(random "
                f"pixels)' set 'width' and 'height' to {w} and {h}, or use 'Inpainting operator (box, relative)', "
                "which follows the photo; a painted MASK must be painted on this photo")
    kernel = getattr(operator, "kernel", None)
    if isinstance(kernel, torch.Tensor) and kernel.ndim == 2 and (kernel.shape[0] > h or kernel.shape[1] > w):
        return (f". Lower 'kernel_size' on the blur operator to at most {min(h, w) - (1 - min(h, w) % 2)} "
                "(odd), or use a larger photo")
    return ""


def unknown_mask(operator: LinearOperator, image_shape: tuple[int, ...]) -> torch.Tensor:
    """ComfyUI MASK ``(B, h, w)`` in the measurement's size: 1 where the measurement carries no information
    (``operator.unknown_measurement_mask``: the holes of an inpainting mask; all zeros for SR and blur)."""
    return operator.unknown_measurement_mask(image_shape)[:, 0].float()
