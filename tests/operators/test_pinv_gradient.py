"""The CG pseudo-inverse is differentiated implicitly: its gradient is the transpose of A^+ itself.

``pinv_cg`` solves the normal equations without recording a graph; its backward pass applies
``(A^+)^T = (A A^T)^+ A`` by one more CG solve. Checked against the dense pseudo-inverse of small operators
without a closed form (a blur-then-downsample composition, a zero-boundary blur, a composition that is
singular because of a mask), against finite differences (gradcheck, also second order), and inside a data term
computed the way the samplers do it under ComfyUI's ``torch.inference_mode()``.
"""

from __future__ import annotations

import pytest
import torch
from flowdps.operators import AvgPoolSR, Inpainting, box_mask, gaussian_blur
from flowdps.operators.testing import dense_matrix
from flowdps.samplers import data_gradient, measurement_loss

TIGHT = {"tol": 1e-13, "max_iter": 500}
"""Float64 solves converged far below the comparison tolerances."""

OPERATORS = {
    "blur_then_avgpool": (lambda: AvgPoolSR(2) @ gaussian_blur(3, 0.7, "reflect"), (1, 1, 6, 8)),
    "zero_boundary_blur": (lambda: gaussian_blur(5, 1.0, "zero"), (1, 1, 6, 7)),     # cond(A) ~ 770
    "mask_pool_blur": (lambda: Inpainting(box_mask(4, 3, 1, 1, 2, 1)) @ AvgPoolSR(2)
                       @ gaussian_blur(3, 1.0, "reflect"), (1, 1, 8, 6)),            # singular A A^T
}
WELL_CONDITIONED = ("blur_then_avgpool", "mask_pool_blur")
"""Where CG at its default tolerance (1e-6) is the pseudo-inverse to about 1e-6; on the zero-boundary blur it
stops early (semi-convergence), a regularised A^+."""
pytestmark = pytest.mark.parametrize("name", list(OPERATORS))


def _problem(name: str, seed: int = 0):
    factory, shape = OPERATORS[name]
    op = factory()
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(op.output_shape(shape), generator=generator, dtype=torch.float64)
    cotangent = torch.randn(shape, generator=generator, dtype=torch.float64)
    return op, shape, y, cotangent


def test_gradient_is_the_transpose_of_the_dense_pseudo_inverse(name):
    op, shape, y, cotangent = _problem(name)
    assert not op.closed_form_pinv
    pinv = torch.linalg.pinv(dense_matrix(op, shape))
    y = y.requires_grad_(True)
    x = op.pinv_cg(y, **TIGHT)
    (grad,) = torch.autograd.grad((x * cotangent).sum(), y)
    expected = (pinv.T @ cotangent.flatten()).view(y.shape)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-9 * float(expected.abs().max()))


def test_gradcheck_against_finite_differences(name):
    op, _, y, _ = _problem(name, seed=1)

    def pinv(t):
        return op.pinv_cg(t, **TIGHT)

    # the map is linear, so a large step has no truncation error and keeps the solver's rounding small;
    # fast mode compares random projections u^T J v (one solve per finite difference, not one per column)
    y = y.requires_grad_(True)
    assert torch.autograd.gradcheck(pinv, (y,), eps=1e-3, atol=1e-6, rtol=1e-6, fast_mode=True)
    assert torch.autograd.gradgradcheck(pinv, (y,), eps=1e-3, atol=1e-6, rtol=1e-6, fast_mode=True)


def test_backward_records_no_solver_iterations(name):
    """The output hangs on one autograd node (the implicit solve), not on a chain of CG iterations."""
    op, _, y, _ = _problem(name)
    x = op.pinv_cg(y.requires_grad_(True))
    assert type(x.grad_fn).__name__ == "_PseudoInverseBackward"
    assert [type(f).__name__ for f, _ in x.grad_fn.next_functions] == ["AccumulateGrad"]


def test_data_term_gradient_under_inference_mode(name):
    """As inside a ComfyUI node: operator and measurement made in inference mode, the operator materialised,
    the gradient taken by data_gradient (which leaves inference mode): the same gradient as outside inference
    mode and, where CG converges at its default tolerance, the dense formula
    ``-(A^+ A)^T (A^+ y - A^+ A x) / ||A^+ y - A^+ A x||`` of the paper norm."""
    factory, shape = OPERATORS[name]
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=generator)
    y0 = torch.randn(factory().output_shape(shape), generator=generator)
    with torch.inference_mode():
        op = factory()
        y = op.forward(y0.new_zeros(shape)) + y0
        operator = op.materialize()
        loss = measurement_loss(None, operator.forward, y, project=operator.pinv)
        grad = data_gradient(x, loss)
    assert grad.dtype == torch.float32
    plain = factory()
    torch.testing.assert_close(grad, data_gradient(x, measurement_loss(None, plain.forward, y0, project=plain.pinv)))
    if name not in WELL_CONDITIONED:
        return
    a = dense_matrix(plain, shape)
    projected = torch.linalg.pinv(a) @ a
    r = torch.linalg.pinv(a) @ y0.double().flatten() - projected @ x.double().flatten()
    expected = -(projected.T @ r / torch.linalg.vector_norm(r)).view(shape)
    torch.testing.assert_close(grad.double(), expected, rtol=0, atol=2e-4 * float(expected.abs().max()))
