"""Separable operators given by two 1-D matrices: ``y = A_h x A_w^T`` on every (B, C) image plane.

If ``A = A_h (x) A_w`` (Kronecker product) then ``A^T = A_h^T (x) A_w^T`` and ``A^+ = A_h^+ (x) A_w^+``, so the
adjoint and the pseudo-inverse are exact and cost two small matrix products. The 1-D matrices are built in
float64 on the CPU, cached, and cast to the input's device/dtype at call time.
"""

from __future__ import annotations

from torch import Tensor

from .base import work_dtype


def apply_separable(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``rows @ x @ cols^T`` over the last two dims. x: (B, C, H, W); rows: (H', H); cols: (W', W).

    Computed in float32 at least (half precisions are upcast) and returned in x's dtype.
    """
    dtype = work_dtype(x.dtype)
    rows = rows.to(device=x.device, dtype=dtype)
    cols = cols.to(device=x.device, dtype=dtype)
    return (rows @ x.to(dtype) @ cols.transpose(0, 1)).to(x.dtype)
