"""Adjointness <A x, y> = <x, A^T y> for every catalogue operator, and A^T against two oracles."""

from __future__ import annotations

import pytest
import torch
from flowdps.operators.testing import adjoint_gap, dense_matrix

# a correct adjoint is exact up to rounding; these bounds sit far above rounding and far below any real error
GAP_TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_adjointness(case_shape, dtype):
    case, shape = case_shape
    op = case.factory()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator, dtype=dtype)
    y = torch.randn(op.output_shape(shape), generator=generator, dtype=dtype)
    assert op.forward(x).shape == op.output_shape(shape)
    assert op.adjoint(y).shape == shape
    assert adjoint_gap(op, x, y) < GAP_TOL[dtype]


def test_adjoint_is_transposed_dense_matrix(case):
    op = case.factory()
    shape = case.dense_shape
    matrix = dense_matrix(op, shape)
    adjoint_matrix = dense_matrix(op.adjoint, op.output_shape(shape))
    torch.testing.assert_close(adjoint_matrix, matrix.T, rtol=0, atol=1e-12)


def test_adjoint_matches_autograd_vjp(case_shape):
    """The hand-written adjoint equals the vector-Jacobian product of the forward (an independent oracle)."""
    case, shape = case_shape
    op = case.factory()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    y = torch.randn(op.output_shape(shape), generator=generator, dtype=torch.float64)
    _, vjp = torch.func.vjp(op.forward, x)
    torch.testing.assert_close(op.adjoint(y), vjp(y)[0], rtol=0, atol=1e-12)


def test_dense_matrix_reproduces_forward(case):
    op = case.factory()
    shape = case.dense_shape
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(dense_matrix(op, shape) @ x.flatten(), op.forward(x).flatten())


def test_adjoint_gap_detects_a_wrong_adjoint():
    """The oracle itself: an operator whose 'adjoint' is the identity (the research code's bug) is caught."""
    from flowdps.operators import gaussian_blur

    class IdentityAdjointBlur(type(gaussian_blur(3, 1.0))):
        def _adjoint(self, y):
            return y

    op = gaussian_blur(3, 1.0)
    bad = IdentityAdjointBlur(op.kernel, op.boundary)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1, 8, 8, generator=generator, dtype=torch.float64)
    y = torch.randn(1, 1, 8, 8, generator=generator, dtype=torch.float64)
    assert adjoint_gap(op, x, y) < 1e-14
    assert adjoint_gap(bad, x, y) > 1e-3
