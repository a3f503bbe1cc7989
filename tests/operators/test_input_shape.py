"""``input_shape`` inverts ``output_shape``: it sizes the restored image from a measurement."""

from __future__ import annotations

import pytest
from flowdps.operators import AvgPoolSR, BicubicSR, Grayscale, Inpainting, box_mask, gaussian_blur


def test_input_shape_inverts_output_shape(case_shape):
    case, shape = case_shape
    op = case.factory()
    assert op.input_shape(op.output_shape(shape)) == shape


@pytest.mark.parametrize(
    ("op", "measurement", "image"),
    [
        (AvgPoolSR(12), (1, 3, 64, 64), (1, 3, 768, 768)),
        (BicubicSR(4), (2, 3, 5, 7), (2, 3, 20, 28)),
        (AvgPoolSR(2) @ gaussian_blur(3, 1.0), (1, 3, 4, 6), (1, 3, 8, 12)),
        (BicubicSR(2) @ Grayscale(), (1, 1, 4, 3), (1, 3, 8, 6)),
    ],
)
def test_input_shape_values(op, measurement, image):
    assert op.input_shape(measurement) == image


@pytest.mark.parametrize(
    ("op", "measurement", "message"),
    [
        (Grayscale(), (1, 3, 4, 4), "1 channel, got 3"),
        (Inpainting(box_mask(8, 8, 1, 1, 2, 2)), (1, 3, 8, 9), "mask 8x8 does not match the image 8x9"),
        (gaussian_blur(5, 1.0), (1, 3, 3, 8), "kernel 5x5 is larger than the image 3x8"),
        (AvgPoolSR(2), (1, 3, 0, 4), "empty dimension"),
    ],
)
def test_input_shape_errors_name_the_sizes(op, measurement, message):
    with pytest.raises(ValueError, match=message):
        op.input_shape(measurement)


def test_closed_form_flag_matches_catalogue(case):
    """The flag the preview node uses to decide whether to cap CG iterations agrees with the catalogue."""
    assert case.factory().closed_form_pinv == case.closed_form_pinv
