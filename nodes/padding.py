"""Photos of any size: pad to what the model needs, restore, crop back to the exact size.

SD3, SD3.5 and Flux latents are 1/8 of the image and are cut into 2 x 2 patches, so the pack samples images whose
sides are multiples of :data:`MULTIPLE` (16) pixels. A measurement whose restored image is not of that size is
padded *in the measurement's own space* until it is, and the restored image is cropped back (top-left corner)
to exactly the size the measurement implies: SR x4 of a 250 x 250 photo samples 1008 x 1008 from a 252 x 252
measurement and returns 1000 x 1000, 4 x 250. No pixel of the photo is lost.

What the padding is, per operator:

* **super-resolution, blurs, colour-to-grey, identity and their compositions** (operators that accept any
  size): the measurement is mirrored at its bottom and right edges (``reflect``; ``replicate`` when the photo
  is too small to mirror). The data term then also asks the restoration to match the mirrored strip, which
  keeps the image continuous across the border; the strip is cropped away.
* **inpainting** (a box, random pixels or a painted mask: a mask of the photo's own size): the mask is padded
  with *unknown* pixels, so the added strip is filled by the model like a hole and never constrains the
  photo (the mirrored values in the measurement there are ignored). Replicating the mask edge instead would
  make mirrored pixels count as known: the same result inside the photo, only more constraints outside.
* **a composition that contains a mask**: it has one fixed size, so it cannot be padded; the error names the
  size the photo needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..operators import Inpainting, LinearOperator

MULTIPLE = 16
"""Restored images have sides that are multiples of this (SD3 latents: 1/8 of the image, 2 x 2 patches)."""
MAX_PAD = 64
"""Largest padding tried per side, in measurement pixels (SR x1..x64 and any blur need at most 15)."""


def round_up(n: int, multiple: int = MULTIPLE) -> int:
    return -(-int(n) // multiple) * multiple


@dataclass(frozen=True)
class Padding:
    """How one measurement is padded: its size as given and padded, and the restored image's exact and sampled
    sizes, all ``(height, width)``."""

    measurement: tuple[int, int]
    padded_measurement: tuple[int, int]
    image: tuple[int, int]
    padded_image: tuple[int, int]

    @property
    def needed(self) -> bool:
        return self.padded_measurement != self.measurement or self.padded_image != self.image

    def describe(self) -> str:
        """What happened, in one sentence for the user (sizes are width x height)."""
        (h, w), (ph, pw), (ih, iw), (pih, piw) = self.measurement, self.padded_measurement, self.image, self.padded_image
        return (f"the photo is {w}x{h} px, so the result is {iw}x{ih} px; the model works on multiples of "
                f"{MULTIPLE} px, so it restored {piw}x{pih} px (the photo padded to {pw}x{ph}) and cropped the "
                f"result back to {iw}x{ih}: no pixels lost")


def _fixed_size(operator: LinearOperator) -> bool:
    """Whether ``operator`` is a mask of one size (inpainting), the only kind padded by changing the operator."""
    return isinstance(operator, Inpainting)


def plan(operator: LinearOperator, measurement_shape: tuple[int, ...] | torch.Size) -> Padding:
    """The padding of a measurement of ``measurement_shape`` (B, C, h, w) for ``operator`` (ValueError when the
    operator does not accept it, or cannot be padded: the message names the sizes)."""
    b, c, h, w = (int(v) for v in measurement_shape)
    image = tuple(int(v) for v in operator.input_shape((b, c, h, w))[2:])
    if image[0] % MULTIPLE == 0 and image[1] % MULTIPLE == 0:
        return Padding((h, w), (h, w), image, image)  # type: ignore[arg-type]
    if _fixed_size(operator):
        padded = (round_up(image[0]), round_up(image[1]))
        return Padding((h, w), padded, image, padded)  # type: ignore[arg-type]

    def side(axis: int) -> tuple[int, int]:
        for extra in range(MAX_PAD + 1):
            shape = [b, c, h, w]
            shape[2 + axis] += extra
            try:
                size = int(operator.input_shape(tuple(shape))[2 + axis])
            except ValueError:
                continue
            if size % MULTIPLE == 0:
                return shape[2 + axis], size
        wanted = round_up(image[axis])
        raise ValueError(
            f"the restored image would be {image[1]}x{image[0]} px (W x H), not a multiple of {MULTIPLE}, and this "
            f"operator ({operator.describe()}) has a fixed size, so the photo cannot be padded: make the photo's "
            f"{'height' if axis == 0 else 'width'} give a multiple of {MULTIPLE} px (e.g. {wanted} px)")

    (ph, pih), (pw, piw) = side(0), side(1)
    return Padding((h, w), (ph, pw), image, (pih, piw))  # type: ignore[arg-type]


def pad_measurement(y: torch.Tensor, padding: Padding) -> torch.Tensor:
    """``y`` (B, C, h, w) mirrored at its bottom and right edges to the padded measurement size (replicated where
    it is too small to mirror)."""
    (h, w), (ph, pw) = padding.measurement, padding.padded_measurement
    if (ph, pw) == (h, w):
        return y
    mode = "reflect" if ph - h < h and pw - w < w else "replicate"
    return F.pad(y, (0, pw - w, 0, ph - h), mode=mode)


def pad_operator(operator: LinearOperator, padding: Padding) -> LinearOperator:
    """The operator for the padded image: the same one when it accepts any size; for a mask, the mask padded with
    unknown pixels (0 = missing in the operators' keep-mask)."""
    if not padding.needed or not _fixed_size(operator):
        return operator
    assert isinstance(operator, Inpainting)
    (h, w), (ph, pw) = padding.image, padding.padded_image
    return dataclasses.replace(operator, mask=F.pad(operator.mask, (0, pw - w, 0, ph - h), value=0.0))


def crop_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A ComfyUI IMAGE (B, H, W, C) or MASK (B, H, W) cropped to ``size`` (height, width) at the top left."""
    return image[:, : size[0], : size[1]]


__all__ = ["MAX_PAD", "MULTIPLE", "Padding", "crop_image", "pad_measurement", "pad_operator", "plan",
           "round_up"]
