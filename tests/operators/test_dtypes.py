"""Any float dtype: half precisions give the float32 result to their precision, in their own dtype."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_float32(case, dtype):
    op = case.factory()
    shape = case.shapes[0]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference = op.forward(x)
    out = op.forward(x.to(dtype))
    assert out.dtype == dtype
    assert out.shape == reference.shape
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=0)
    assert op.adjoint(out).dtype == dtype
    if case.closed_form_pinv:
        assert op.pinv(out).dtype == dtype
