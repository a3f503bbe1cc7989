"""Composition: (A @ B) x = A (B x), (A B)^T = B^T A^T, shapes, associativity, validation through the chain."""

from __future__ import annotations

import re

import pytest
import torch
from flowdps.operators import AvgPoolSR, BicubicSR, Composed, Grayscale, Inpainting, box_mask, gaussian_blur
from flowdps.operators.testing import adjoint_gap, dense_matrix


def _ops():
    return AvgPoolSR(2), gaussian_blur(3, 0.8, "reflect"), Grayscale()


def test_forward_and_adjoint_order():
    outer, inner, _ = _ops()
    composed = outer @ inner
    assert isinstance(composed, Composed)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(2, 3, 5, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(composed.forward(x), outer.forward(inner.forward(x)), rtol=0, atol=0)
    torch.testing.assert_close(composed.adjoint(y), inner.adjoint(outer.adjoint(y)), rtol=0, atol=0)
    assert adjoint_gap(composed, x, y) < 1e-13


def test_dense_matrix_of_composition_is_product():
    """(A B)^T = B^T A^T as matrices, and A B as the product of the dense factors."""
    outer, inner, grey = _ops()
    shape = (1, 3, 4, 6)
    for composed in ((outer @ inner) @ grey, outer @ (inner @ grey)):  # associativity
        matrix = dense_matrix(composed, shape)
        adjoint = dense_matrix(composed.adjoint, composed.output_shape(shape))
        grey_m = dense_matrix(grey, shape)
        inner_m = dense_matrix(inner, grey.output_shape(shape))
        outer_m = dense_matrix(outer, inner.output_shape(grey.output_shape(shape)))
        product = outer_m @ inner_m @ grey_m
        torch.testing.assert_close(matrix, product, rtol=0, atol=1e-14)
        torch.testing.assert_close(adjoint, grey_m.T @ inner_m.T @ outer_m.T, rtol=0, atol=1e-14)


def test_shapes_through_the_chain():
    composed = BicubicSR(2) @ AvgPoolSR(3) @ Grayscale()
    assert composed.output_shape((2, 3, 12, 18)) == (2, 1, 2, 3)
    y = composed.forward(torch.zeros(2, 3, 12, 18))
    assert y.shape == (2, 1, 2, 3)
    assert composed.adjoint(y).shape == (2, 3, 12, 18)
    assert composed.pinv(y).shape == (2, 3, 12, 18)


def test_validation_reaches_the_outer_operator():
    """The inner operator accepts 12 x 18 -> 4 x 6, which the outer factor 4 cannot divide."""
    composed = AvgPoolSR(4) @ AvgPoolSR(3)
    with pytest.raises(ValueError, match="width 6 is not divisible by the scale factor 4"):
        composed.output_shape((1, 1, 12, 18))
    with pytest.raises(ValueError, match="width 6"):
        composed.forward(torch.zeros(1, 1, 12, 18))


def test_size_errors_name_the_callers_size_and_the_part_that_failed():
    """SR x2 then a 32x32 mask: a 32x32 image is 16x16 when it reaches the mask; the message says so."""
    composed = Composed(outer=Inpainting(torch.ones(32, 32)), inner=AvgPoolSR(2), title="Compose operators",
                        inner_name="'first'", outer_name="'then'")
    expected = ("Compose operators: the image is 32x32 (H x W); after 'first' (SR x2, average pool) it is 16x16, "
                "which 'then' (inpainting, mask 32x32) does not accept: mask 32x32 does not match the image 16x16")
    with pytest.raises(ValueError, match=re.escape(expected)):
        composed.output_shape((1, 3, 32, 32))
    with pytest.raises(ValueError, match=re.escape(expected)):
        composed.forward(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=re.escape("the image is 31x32 (H x W), which 'first' (SR x2, average "
                                                   "pool) does not accept: height 31 is not divisible")):
        composed.output_shape((1, 3, 31, 32))
    with pytest.raises(ValueError, match=re.escape("the measurement is 16x16 (H x W), which 'then' (inpainting, "
                                                   "mask 32x32) cannot produce: mask 32x32")):
        composed.input_shape((1, 3, 16, 16))


def test_size_errors_name_channels_that_change_and_default_words():
    twice_grey = Grayscale() @ Grayscale()
    with pytest.raises(ValueError, match=re.escape(
            "composed operator: the image is 8x8 (H x W); after the inner operator (colour to grey) it is 8x8 "
            "with 1 channel, which the outer operator (colour to grey) does not accept: colour-to-grey needs 3")):
        twice_grey.output_shape((1, 3, 8, 8))
    with pytest.raises(ValueError, match=re.escape(
            "the measurement is 8x8 (H x W); before the outer operator (colour to grey) it is 8x8 with 3 channels, "
            "which the inner operator (colour to grey) cannot produce")):
        twice_grey.input_shape((1, 1, 8, 8))


def test_descriptions_name_each_part():
    blur_then_pool = AvgPoolSR(4) @ gaussian_blur(5, 1.0, "reflect")
    assert blur_then_pool.describe() == "blur, kernel 5x5, reflect boundary, then SR x4, average pool"
    assert (BicubicSR(2) @ Grayscale()).describe() == "colour to grey, then SR x2, bicubic"


@pytest.mark.parametrize(
    "op",
    [
        AvgPoolSR(2) @ gaussian_blur(3, 0.7, "circular"),
        # rank-deficient and wide: CG on A A^T u = y would diverge for this noisy y (not in the range of A)
        Inpainting(box_mask(3, 4, 1, 1, 1, 2)) @ AvgPoolSR(2) @ gaussian_blur(3, 0.7, "reflect"),
    ],
    ids=["blur_then_pool", "blur_pool_mask"],
)
def test_composed_pinv_is_min_norm_least_squares(op):
    """Wide compositions: CG on the normal equations gives A^+ y, also for y outside the range of A."""
    shape = (1, 1, 6, 8)
    y = torch.randn(op.output_shape(shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = (torch.linalg.pinv(dense_matrix(op, shape)) @ y.flatten()).view(shape)
    torch.testing.assert_close(op.pinv(y), reference, rtol=0, atol=1e-5 * reference.abs().max().item())


def test_matmul_rejects_non_operators():
    with pytest.raises(TypeError):
        AvgPoolSR(2) @ torch.zeros(3)
    with pytest.raises(TypeError):
        Composed(AvgPoolSR(2), "blur")


def test_composition_with_mask_is_a_projection_then_operator():
    op = AvgPoolSR(2) @ Inpainting(box_mask(4, 4, 0, 0, 2, 2))
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(op.forward(x), torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]], dtype=torch.float64))
