"""Inpainting: keep the known pixels, zero the missing ones.

**Mask rule: 1 = known / kept pixel, 0 = missing pixel (to be filled).** Masks are binarised at
construction: values >= :data:`KEEP_THRESHOLD` count as known. (ComfyUI's MASK means the opposite; the nodes
convert it, ``nodes/convert.py``.)

A mask is ``(H, W)``, ``(Bm, H, W)`` or ``(Bm, 1, H, W)``; it applies to every channel, and ``Bm`` must be 1
(one mask for the whole batch) or the image batch size B.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LinearOperator, Shape, check_finite_float, check_image_shape, check_positive_int

KEEP_THRESHOLD = 0.5
"""Mask values >= this count as known pixels when a soft mask is binarised."""


def as_mask_batch(mask: Tensor) -> Tensor:
    """``mask`` as ``(Bm, 1, H, W)`` (a view); accepts ``(H, W)``, ``(Bm, H, W)`` and ``(Bm, 1, H, W)``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 2:
        return mask[None, None]
    if mask.dim() == 3:
        return mask[:, None]
    if mask.dim() == 4 and mask.shape[1] == 1:
        return mask
    raise ValueError(f"mask must be (H, W), (B, H, W) or (B, 1, H, W), got shape {tuple(mask.shape)}")


def fit_mask(mask: Tensor, height: int, width: int, *, resize: bool = False) -> Tensor:
    """Return ``mask`` as ``(Bm, 1, height, width)``.

    With ``resize=False`` a size mismatch raises ValueError naming both sizes; with ``resize=True`` the mask
    is resized bilinearly (antialiased when shrinking) and should then be binarised (``Inpainting`` does).
    """
    m = as_mask_batch(mask)
    if m.shape[-2:] == (height, width):
        return m
    if not resize:
        raise ValueError(
            f"mask {m.shape[-2]}x{m.shape[-1]} does not match the image {height}x{width} (H x W); "
            "resize the mask or the image"
        )
    m = m if m.is_floating_point() else m.float()
    return F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def box_mask(height: int, width: int, top: int, left: int, box_height: int, box_width: int) -> Tensor:
    """Keep-mask ``(1, 1, height, width)`` (float32): 0 inside the box (missing), 1 elsewhere.

    The box covers rows ``top .. top + box_height - 1`` and columns ``left .. left + box_width - 1`` and must
    lie inside the image.
    """
    height, width = check_positive_int(height, "height"), check_positive_int(width, "width")
    box_height, box_width = (
        check_positive_int(box_height, "box_height"),
        check_positive_int(box_width, "box_width"),
    )
    if top < 0 or left < 0 or top + box_height > height or left + box_width > width:
        raise ValueError(
            f"box rows {top}..{top + box_height - 1}, columns {left}..{left + box_width - 1} "
            f"does not fit in the image {height}x{width}"
        )
    mask = torch.ones(1, 1, height, width)
    mask[..., top : top + box_height, left : left + box_width] = 0
    return mask


def random_mask(
    height: int, width: int, missing_ratio: float, generator: torch.Generator | None = None, batch: int = 1
) -> Tensor:
    """Keep-mask ``(batch, 1, height, width)`` (float32) with exactly ``round(missing_ratio * H * W)`` missing
    pixels per sample, chosen uniformly at random (shared by all channels). missing_ratio in [0, 1]."""
    height, width = check_positive_int(height, "height"), check_positive_int(width, "width")
    batch = check_positive_int(batch, "batch")
    ratio = check_finite_float(missing_ratio, "missing_ratio")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"missing_ratio {ratio} must be in [0, 1]")
    n = height * width
    n_missing = round(ratio * n)
    device = generator.device if generator is not None else "cpu"
    mask = torch.ones(batch, n)
    for b in range(batch):
        mask[b, torch.randperm(n, generator=generator, device=device)[:n_missing].cpu()] = 0
    return mask.view(batch, 1, height, width)


@dataclasses.dataclass(frozen=True, eq=False)
class Inpainting(LinearOperator):
    """Mask multiply: ``y = m * x`` (missing pixels become 0; output has the input's shape).

    mask: keep-mask (1 = known, 0 = missing, see module doc), binarised at KEEP_THRESHOLD, values must be
    finite and in [0, 1]. A is an orthogonal projection, so ``A^T = A^+ = A``.
    """

    mask: Tensor = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        m = as_mask_batch(self.mask).detach()
        if not m.is_floating_point():
            m = m.to(torch.float32)
        bad = m[~torch.isfinite(m)]
        if bad.numel():
            raise ValueError(f"mask contains non-finite values ({bad[0].item()})")
        if m.numel() and (m.min() < 0 or m.max() > 1):
            raise ValueError(f"mask values must be in [0, 1], got range [{m.min().item()}, {m.max().item()}]")
        object.__setattr__(self, "mask", (m >= KEEP_THRESHOLD).to(m.dtype))

    def validate_input_shape(self, shape: Sequence[int]) -> Shape:
        shape = check_image_shape(shape, "x")
        m_batch, _, m_height, m_width = self.mask.shape
        if (m_height, m_width) != shape[2:]:
            raise ValueError(
                f"mask {m_height}x{m_width} does not match the image {shape[2]}x{shape[3]} (H x W)"
            )
        if m_batch not in (1, shape[0]):
            raise ValueError(
                f"mask batch {m_batch} does not match the image batch {shape[0]} (must be 1 or equal)"
            )
        return shape

    def describe(self) -> str:
        return f"inpainting, mask {self.mask.shape[-2]}x{self.mask.shape[-1]}"

    def _forward(self, x: Tensor) -> Tensor:
        return x * self.mask.to(device=x.device, dtype=x.dtype)

    def _adjoint(self, y: Tensor) -> Tensor:
        self.validate_input_shape(y.shape)
        return self._forward(y)

    def _pinv(self, y: Tensor) -> Tensor:
        return self._adjoint(y)
