"""What an operator says about its measurements: their channels and which of their pixels carry no information."""

from __future__ import annotations

import pytest
import torch
from flowdps.operators import AvgPoolSR, Grayscale, Identity, Inpainting, box_mask, gaussian_blur, random_mask


@pytest.mark.parametrize(
    ("op", "channels", "measured"),
    [
        (Identity(), 3, 3),
        (AvgPoolSR(2), 1, 1),
        (Grayscale(), 3, 1),
        (AvgPoolSR(2) @ Grayscale(), 3, 1),
        (Grayscale() @ gaussian_blur(3, 1.0), 3, 1),
    ],
)
def test_output_channels(op, channels, measured):
    assert op.output_channels(channels) == measured
    assert op.output_shape((1, channels, 8, 8))[1] == measured


def test_colour_to_grey_names_the_channels_it_needs():
    with pytest.raises(ValueError, match="colour-to-grey needs 3 channels, got 1"):
        Grayscale().output_channels(1)
    with pytest.raises(ValueError, match="colour-to-grey needs 3 channels, got 4"):
        (AvgPoolSR(2) @ Grayscale()).output_channels(4)


def test_unknown_pixels_are_the_holes_of_a_mask_in_the_measurement_size():
    keep = box_mask(8, 8, 2, 4, 3, 2)
    unknown = Inpainting(keep).unknown_measurement_mask((2, 3, 8, 8))
    assert unknown.shape == (2, 1, 8, 8)
    assert unknown.dtype == torch.bool
    assert torch.equal(unknown[0, 0], keep[0, 0] == 0)
    # a composition: the mask's holes after a 2x average pool, in the 4x4 measurement
    sr_then_holes = Inpainting(box_mask(4, 4, 1, 1, 2, 2)) @ AvgPoolSR(2)
    assert int(sr_then_holes.unknown_measurement_mask((1, 3, 8, 8)).sum()) == 4


@pytest.mark.parametrize("op", [AvgPoolSR(2), gaussian_blur(3, 1.0), Grayscale(), Identity()])
def test_no_unknown_pixels_without_a_mask(op):
    assert not op.unknown_measurement_mask((1, 3, 8, 8)).any()


def test_every_pixel_unknown_when_the_mask_hides_all():
    hidden = Inpainting(random_mask(4, 6, 1.0, torch.Generator().manual_seed(0)))
    assert hidden.unknown_measurement_mask((1, 3, 4, 6)).all()
