"""Operators built under torch.inference_mode() (as in a ComfyUI node) back-propagate after materialize()."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flowdps.operators import Inpainting, LinearOperator, box_mask


def _tensors(op: LinearOperator):
    for field in dataclasses.fields(op):
        value = getattr(op, field.name)
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, LinearOperator):
            yield from _tensors(value)


def _grad(op: LinearOperator, shape) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    loss = op.forward(x).square().sum() + op.adjoint(op.forward(x)).square().sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def test_inference_tensors_break_backward_without_materialize():
    """The failure this guards against: a mask made in inference mode cannot be saved for backward."""
    with torch.inference_mode():
        op = Inpainting(box_mask(6, 6, 1, 1, 2, 2))
    assert op.mask.is_inference()
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        _grad(op, (1, 3, 6, 6))


def test_materialize_gives_plain_tensors_and_gradients(case):
    shape = case.shapes[0]
    with torch.inference_mode():
        op = case.factory()
        materialized = op.materialize()  # callable inside inference mode, as in a node
    assert not any(t.is_inference() for t in _tensors(materialized))
    grad = _grad(materialized, shape)
    # same operator: the gradient equals the analytic one, 2 A^T A x + 2 (A^T A)^2 x
    with torch.no_grad():
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        ata = op.adjoint(op.forward(x))
        expected = 2 * ata + 2 * op.adjoint(op.forward(ata))
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4)


def test_materialize_moves_dtype_and_keeps_the_original():
    op = Inpainting(box_mask(4, 4, 0, 0, 2, 2))
    double = op.materialize(dtype=torch.float64)
    assert double.mask.dtype == torch.float64
    assert op.mask.dtype == torch.float32
    assert double.mask.data_ptr() != op.mask.data_ptr()
    with pytest.raises(ValueError, match=r"torch\.int64"):
        op.materialize(dtype=torch.int64)


def test_operators_are_immutable():
    op = Inpainting(box_mask(4, 4, 0, 0, 2, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        op.mask = torch.ones(1, 1, 4, 4)
