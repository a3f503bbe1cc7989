"""Oracles for checking operators: dense matrices, the adjointness gap, a smooth test image."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .base import LinearOperator, check_image_shape

MAX_DENSE_COLUMNS = 4096
"""Largest input size :func:`dense_matrix` accepts (it applies the map once per column)."""


def dense_matrix(op: LinearOperator | Callable[[Tensor], Tensor], input_shape: Sequence[int]) -> Tensor:
    """The matrix ``(m, n)`` (float64) of a linear map on tensors of ``input_shape``, n = prod(input_shape).

    Column k is ``op(e_k).flatten()`` for the k-th unit tensor, in row-major (C) order of the whole batch, so
    ``dense_matrix(op, s) @ x.flatten() == op(x).flatten()``. ``op`` is an operator (its forward is used) or
    any linear callable, e.g. ``op.adjoint`` with the output shape, or ``op.pinv``. When the batch size is
    1 the unit tensors are stacked along the batch dimension (valid for batch-independent operators).
    """
    shape = check_image_shape(input_shape, "input_shape")
    fn = op.forward if isinstance(op, LinearOperator) else op
    n = math.prod(shape)
    if n > MAX_DENSE_COLUMNS:
        raise ValueError(f"input size {n} exceeds {MAX_DENSE_COLUMNS} columns; use a smaller shape")
    eye = torch.eye(n, dtype=torch.float64)
    if shape[0] == 1:
        return fn(eye.view(n, *shape[1:])).reshape(n, -1).T.contiguous()
    return torch.stack([fn(eye[k].view(shape)).reshape(-1) for k in range(n)], dim=1)


def adjoint_gap(op: LinearOperator, x: Tensor, y: Tensor) -> float:
    """Relative adjointness gap ``|<A x, y> - <x, A^T y>| / max(|A x| |y|, |x| |A^T y|)`` (0 when exact).

    Inner products are accumulated in float64; the denominator is the Cauchy-Schwarz bound of both sides,
    so the gap is scale-free and about the dtype's rounding error for a correct adjoint.
    """
    ax, aty = op.forward(x).double(), op.adjoint(y).double()
    x, y = x.double(), y.double()
    lhs, rhs = (ax * y).sum(), (x * aty).sum()
    norm = torch.linalg.vector_norm
    scale = max(float(norm(ax) * norm(y)), float(norm(x) * norm(aty)))
    return 0.0 if scale == 0 else float((lhs - rhs).abs()) / scale


def smooth_image(channels: int, height: int, width: int) -> Tensor:
    """A smooth test image ``(1, channels, height, width)`` (float64, in [-0.8, 0.8]) with no fine detail.

    Channel c is ``0.8 cos(pi (c + 1) u / 3) cos(pi (c + 1) v / 2)`` for ``u, v`` spanning [-1, 1] down the
    rows and across the columns: a few low frequencies, different in every channel.
    """
    rows = torch.linspace(-1, 1, height, dtype=torch.float64)
    cols = torch.linspace(-1, 1, width, dtype=torch.float64)
    planes = [torch.outer(torch.cos(math.pi * (c + 1) * rows / 3), torch.cos(math.pi * (c + 1) * cols / 2))
              for c in range(channels)]
    return 0.8 * torch.stack(planes)[None]
