"""Conversions between ComfyUI's tensor layouts and the pack's (the only place that knows both).

ComfyUI IMAGE: ``(B, H, W, C)`` float in [0, 1], C = 3 (or 4 with alpha, 1 for grey), on CPU.
ComfyUI MASK: ``(B, H, W)`` or ``(H, W)`` float in [0, 1], 1 = the area to change (inpaint).
Pack images: ``(B, C, H, W)`` float in [-1, 1] (the VAE decoder's range).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


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
