"""Inpainting: keep the known pixels, zero the missing ones.

**Mask rule: 1 = known / kept pixel, 0 = missing pixel (to be filled).** Masks are binarised at
construction: values >= :data:`KEEP_THRESHOLD` count as known. (ComfyUI's MASK means the opposite; the nodes
convert it, ``nodes/convert.py``.)

A mask is ``(H, W)``, ``(Bm, H, W)`` or ``(Bm, 1, H, W)``; it applies to every channel, and ``Bm`` must be 1
(one mask for the whole batch) or the image batch size B.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

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


def _check_box(height: int, width: int, top: int, left: int, box_height: int, box_width: int) -> None:
    if top < 0 or left < 0 or top + box_height > height or left + box_width > width:
        raise ValueError(
            f"box rows {top}..{top + box_height - 1}, columns {left}..{left + box_width - 1} "
            f"does not fit in the image {height}x{width}"
        )


def _check_ratio(missing_ratio: float) -> float:
    ratio = check_finite_float(missing_ratio, "missing_ratio")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"missing_ratio {ratio} must be in [0, 1]")
    return ratio


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
    _check_box(height, width, top, left, box_height, box_width)
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
    ratio = _check_ratio(missing_ratio)
    n = height * width
    n_missing = round(ratio * n)
    device = generator.device if generator is not None else "cpu"
    mask = torch.ones(batch, n)
    for b in range(batch):
        mask[b, torch.randperm(n, generator=generator, device=device)[:n_missing].cpu()] = 0
    return mask.view(batch, 1, height, width)


@dataclasses.dataclass(frozen=True)
class LazyMask:
    """A keep-mask ``(batch, 1, height, width)`` known by its size and parameters, built on first use.

    ``build`` returns the mask (any shape :func:`as_mask_batch` accepts, of this size). Give it to
    :meth:`Inpainting.lazy`: the operator checks image sizes against ``height`` x ``width`` and builds the mask
    only when it is first applied (or its ``mask`` is read), once per operator.
    """

    batch: int
    height: int
    width: int
    build: Callable[[], Tensor] = dataclasses.field(repr=False, compare=False)
    text: str = ""


def lazy_box_mask(height: int, width: int, top: int, left: int, box_height: int, box_width: int) -> LazyMask:
    """:func:`box_mask` as a :class:`LazyMask`: the parameters are checked now, the mask is built on first use."""
    height, width = check_positive_int(height, "height"), check_positive_int(width, "width")
    box_height, box_width = (
        check_positive_int(box_height, "box_height"),
        check_positive_int(box_width, "box_width"),
    )
    _check_box(height, width, top, left, box_height, box_width)
    build = functools.partial(box_mask, height, width, top, left, box_height, box_width)
    return LazyMask(1, height, width, build, f"box {box_width}x{box_height} at ({left}, {top})")


def lazy_random_mask(height: int, width: int, missing_ratio: float, seed: int, batch: int = 1) -> LazyMask:
    """:func:`random_mask` with a CPU generator seeded with ``seed``, as a :class:`LazyMask` (parameters
    checked now, mask built on first use; the same mask as ``random_mask(..., Generator().manual_seed(seed))``)."""
    height, width = check_positive_int(height, "height"), check_positive_int(width, "width")
    batch = check_positive_int(batch, "batch")
    ratio = _check_ratio(missing_ratio)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")

    def build() -> Tensor:
        return random_mask(height, width, ratio, torch.Generator().manual_seed(seed), batch)

    return LazyMask(batch, height, width, build, f"random, {ratio:g} missing, seed {seed}")


def keep_mask(mask: Tensor) -> Tensor:
    """``mask`` as a binary keep-mask ``(Bm, 1, H, W)`` (floating point), after checking its values."""
    m = as_mask_batch(mask).detach()
    if not m.is_floating_point():
        m = m.to(torch.float32)
    bad = m[~torch.isfinite(m)]
    if bad.numel():
        raise ValueError(f"mask contains non-finite values ({bad[0].item()})")
    if m.numel() and (m.min() < 0 or m.max() > 1):
        raise ValueError(f"mask values must be in [0, 1], got range [{m.min().item()}, {m.max().item()}]")
    return (m >= KEEP_THRESHOLD).to(m.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class Inpainting(LinearOperator):
    """Mask multiply: ``y = m * x`` (missing pixels become 0; output has the input's shape).

    mask: keep-mask (1 = known, 0 = missing, see module doc), binarised at KEEP_THRESHOLD, values must be
    finite and in [0, 1]. A is an orthogonal projection, so ``A^T = A^+ = A``. :meth:`lazy` makes an operator
    whose mask is built on first use.
    """

    mask: Tensor = dataclasses.field(repr=False)

    @classmethod
    def lazy(cls, recipe: LazyMask) -> Inpainting:
        """An operator for the mask ``recipe`` describes; nothing of the image's size is allocated until the
        operator is first applied or its ``mask`` read (sizes are checked against the recipe's before that)."""
        if not isinstance(recipe, LazyMask):
            raise TypeError(f"recipe must be a LazyMask, got {type(recipe).__name__}")
        return cls(cast(Tensor, recipe))

    def __post_init__(self) -> None:
        if isinstance(self.mask, LazyMask):
            object.__setattr__(self, "_recipe", self.mask)
            object.__delattr__(self, "mask")  # built by __getattr__ on first use
            return
        object.__setattr__(self, "mask", keep_mask(self.mask))

    def __getattr__(self, name: str) -> Any:
        recipe = self.__dict__.get("_recipe")
        if name != "mask" or recipe is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        m = keep_mask(recipe.build())
        if m.shape != (recipe.batch, 1, recipe.height, recipe.width):
            raise RuntimeError(f"the mask ({recipe.text}) was built with shape {tuple(m.shape)}, expected "
                               f"{(recipe.batch, 1, recipe.height, recipe.width)}")
        object.__setattr__(self, "mask", m)
        return m

    @property
    def mask_size(self) -> tuple[int, int, int]:
        """``(batch, height, width)`` of the mask, without building a lazy one."""
        recipe = self.__dict__.get("_recipe")
        if "mask" not in self.__dict__ and recipe is not None:
            return recipe.batch, recipe.height, recipe.width
        b, _, h, w = self.mask.shape
        return int(b), int(h), int(w)

    @property
    def mask_built(self) -> bool:
        """Whether the mask tensor exists (always, unless made by :meth:`lazy` and not used yet)."""
        return "mask" in self.__dict__

    def validate_input_shape(self, shape: Sequence[int]) -> Shape:
        shape = check_image_shape(shape, "x")
        m_batch, m_height, m_width = self.mask_size
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
        _, height, width = self.mask_size
        return f"inpainting, mask {height}x{width}"

    def _forward(self, x: Tensor) -> Tensor:
        return x * self.mask.to(device=x.device, dtype=x.dtype)

    def _adjoint(self, y: Tensor) -> Tensor:
        self.validate_input_shape(y.shape)
        return self._forward(y)

    def _pinv(self, y: Tensor) -> Tensor:
        return self._adjoint(y)
