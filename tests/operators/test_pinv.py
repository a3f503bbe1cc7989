"""Pseudo-inverses: closed forms equal torch.linalg.pinv of the dense matrix; CG ones within tolerance."""

from __future__ import annotations

import torch
from flowdps.operators import FFT_PINV_RTOL, Blur, conjugate_gradient
from flowdps.operators.testing import dense_matrix


def _is_circular_blur(op):
    return isinstance(op, Blur) and op.boundary == "circular"


def _reference_pinv(op, matrix):
    # the circular blur's closed form truncates the spectrum at FFT_PINV_RTOL (documented); others are exact
    rtol = FFT_PINV_RTOL if _is_circular_blur(op) else None
    return torch.linalg.pinv(matrix, rtol=rtol)


def test_pinv_matches_dense_pinv(pinv_case):
    """Ill-conditioned CG pinvs are left out: they are covered by A A^+ A x = A x."""
    case = pinv_case
    op = case.factory()
    shape = case.dense_shape
    matrix = dense_matrix(op, shape)
    pinv_matrix = dense_matrix(op.pinv, op.output_shape(shape))
    reference = _reference_pinv(op, matrix)
    # CG stops at a relative residual of CG_TOL = 1e-6 on well-conditioned systems (cond <= ~3 here)
    tol = 1e-10 if case.closed_form_pinv else 1e-5
    assert (pinv_matrix - reference).abs().max() <= tol * reference.abs().max()


def test_a_pinv_a_is_a(case_shape):
    case, shape = case_shape
    op = case.factory()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ax = op.forward(x)
    residual = torch.linalg.vector_norm(op.forward(op.pinv(ax)) - ax) / torch.linalg.vector_norm(ax)
    # exact for closed forms; for ill-conditioned blurs CG at CG_TOL resolves A x to about 1e-3; the
    # truncated circular inverse filter drops frequencies where |A| < FFT_PINV_RTOL, a residual below that
    tol = 1e-10 if case.closed_form_pinv else 1e-5 if case.well_conditioned else 2e-3
    if _is_circular_blur(op):
        tol = FFT_PINV_RTOL
    assert residual < tol


def test_pinv_is_moore_penrose_on_the_range(closed_case):
    """A^+ A is the orthogonal projector onto the row space: A^+ A A^+ = A^+ and symmetric (closed forms)."""
    case = closed_case
    op = case.factory()
    shape = case.dense_shape
    matrix = dense_matrix(op, shape)
    pinv_matrix = dense_matrix(op.pinv, op.output_shape(shape))
    projector = pinv_matrix @ matrix
    torch.testing.assert_close(projector, projector.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(projector @ pinv_matrix, pinv_matrix, rtol=0, atol=1e-10)


def test_pinv_cg_tightens_with_tolerance():
    """On an ill-conditioned blur the CG pinv approaches the true one as the tolerance shrinks."""
    from flowdps.operators import gaussian_blur

    op = gaussian_blur(5, 1.0, "reflect")
    shape = (1, 1, 6, 7)
    reference = torch.linalg.pinv(dense_matrix(op, shape))
    y = torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    exact = (reference @ y.flatten()).view(shape)
    loose = op.pinv_cg(y, tol=1e-3, max_iter=500)
    tight = op.pinv_cg(y, tol=1e-13, max_iter=500)
    assert (tight - exact).abs().max() < 1e-6 * exact.abs().max()
    assert (loose - exact).abs().max() > (tight - exact).abs().max()


def test_conjugate_gradient_is_batched_per_sample():
    """Samples with very different scales converge independently; a zero right-hand side stays zero."""
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    spd = q @ q.T + 5 * torch.eye(5, dtype=torch.float64)
    rhs = torch.randn(3, 5, generator=generator, dtype=torch.float64) * torch.tensor([[1.0], [1e6], [0.0]])
    solution = conjugate_gradient(lambda v: v @ spd, rhs, tol=1e-12, max_iter=50)
    torch.testing.assert_close(solution, torch.linalg.solve(spd, rhs.T).T)
    assert torch.all(solution[2] == 0)


def test_pinv_cg_stops_when_interrupted():
    """The interrupt callback runs before every CG iteration; whatever it raises ends the solve at once."""
    from flowdps.operators import motion_blur

    class StopError(Exception):
        pass

    calls = []

    def interrupt() -> None:
        calls.append(1)
        if len(calls) == 5:
            raise StopError

    op = motion_blur(9, 0.5, torch.Generator().manual_seed(0))
    y = torch.rand(1, 3, 24, 24)
    try:
        op.pinv_cg(y, tol=0.0, max_iter=1000, interrupt=interrupt)
    except StopError:
        pass
    else:
        raise AssertionError("the interrupt did not stop the solve")
    assert len(calls) == 5
    calls.clear()
    x = conjugate_gradient(lambda v: 2 * v, torch.ones(1, 4), max_iter=50, interrupt=lambda: calls.append(1))
    torch.testing.assert_close(x, torch.full((1, 4), 0.5))
    assert 1 <= len(calls) <= 2
