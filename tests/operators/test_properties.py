"""Property tests over sizes, factors and kernels: either a clear ValueError or an exact adjoint."""

from __future__ import annotations

import re

import pytest
import torch
from flowdps.operators import AvgPoolSR, BicubicSR, Blur, PaperGaussianBlur
from flowdps.operators.testing import adjoint_gap
from hypothesis import given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 20), st.integers(1, 20))


def _check(op, shape, seed):
    try:
        out_shape = op.output_shape(shape)
    except ValueError as error:
        message = str(error)
    else:
        message = None
    if message is not None:
        # a clear error names an offending size and the rule, and forward refuses the same shape
        assert re.search(r"(height|width) \d+ is not divisible|larger than the image", message)
        assert any(str(v) in message for v in shape[2:])
        with pytest.raises(ValueError, match=re.escape(message)):
            op.forward(torch.zeros(shape, dtype=torch.float64))
        return
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    y = torch.randn(out_shape, generator=generator, dtype=torch.float64)
    assert op.forward(x).shape == out_shape
    assert adjoint_gap(op, x, y) < 1e-12


@SETTINGS
@given(shape=shapes, factor=st.integers(1, 6), bicubic=st.booleans(), seed=st.integers(0, 2**16))
def test_sr_adjoint_or_clear_error(shape, factor, bicubic, seed):
    _check((BicubicSR if bicubic else AvgPoolSR)(factor), shape, seed)


@SETTINGS
@given(
    shape=shapes,
    kernel_height=st.integers(0, 5).map(lambda r: 2 * r + 1),
    kernel_width=st.integers(0, 5).map(lambda r: 2 * r + 1),
    boundary=st.sampled_from(["reflect", "circular", "zero"]),
    seed=st.integers(0, 2**16),
)
def test_blur_adjoint_or_clear_error(shape, kernel_height, kernel_width, boundary, seed):
    kernel = torch.rand(
        kernel_height, kernel_width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    _check(Blur(kernel + 1e-3, boundary), shape, seed)


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_paper_gaussian_any_size(shape, seed):
    _check(PaperGaussianBlur(), shape, seed)


@SETTINGS
@given(
    kernel=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=9).filter(
        lambda v: len(v) % 2 == 1
    )
)
def test_kernel_validation_is_total(kernel):
    """Any row kernel either builds a normalised PSF or raises a ValueError."""
    tensor = torch.tensor([kernel], dtype=torch.float64)
    try:
        op = Blur(tensor)
    except ValueError:
        return
    assert bool(torch.isfinite(op.kernel).all())
    assert float(op.kernel.min()) >= 0
    assert abs(float(op.kernel.sum()) - 1) < 1e-9
