"""What residual ``"auto"`` means per operator: the official FlowDPS code's choice, owned by the operator."""

import pytest
import torch
import torch.nn.functional as F
from flowdps.operators import (
    RESIDUAL_SPACES,
    AvgPoolSR,
    BicubicSR,
    Blur,
    Grayscale,
    Identity,
    Inpainting,
    PaperGaussianBlur,
    box_mask,
    gaussian_blur,
    motion_blur,
    motion_kernel,
)

CASES = [
    ("avg-pool SR", lambda: AvgPoolSR(4), "pinv"),
    ("bicubic SR", lambda: BicubicSR(3), "pinv"),
    ("exact Gaussian blur", lambda: gaussian_blur(5, 1.0), "adjoint"),
    ("paper Gaussian blur", lambda: PaperGaussianBlur(5, 1.0), "adjoint"),
    ("motion blur", lambda: motion_blur(7, 0.5, torch.Generator().manual_seed(0)), "measurement"),
    ("custom kernel", lambda: Blur(torch.ones(3, 3)), "measurement"),
    ("inpainting", lambda: Inpainting(box_mask(8, 8, 2, 2, 4, 4)), "adjoint"),
    ("identity", lambda: Identity(), "adjoint"),
    ("colour to grey", lambda: Grayscale(), "adjoint"),
    # compositions: pinv has no closed form there (CG inside every gradient), so it is never picked
    ("blur then SR", lambda: AvgPoolSR(2) @ gaussian_blur(5, 1.0), "adjoint"),
    ("motion then SR", lambda: AvgPoolSR(2) @ motion_blur(5, 0.5, torch.Generator().manual_seed(0)), "measurement"),
    ("SR then mask", lambda: Inpainting(box_mask(4, 4, 1, 1, 2, 2)) @ AvgPoolSR(2), "adjoint"),
]


@pytest.mark.parametrize(("name", "make", "expected"), CASES, ids=[c[0] for c in CASES])
def test_auto_residual_is_the_official_choice(name, make, expected):
    op = make()
    assert op.auto_residual == expected
    assert op.auto_residual in RESIDUAL_SPACES
    assert op.materialize(dtype=torch.float64).auto_residual == expected    # survives the gradient copy
    if expected == "pinv":
        assert op.closed_form_pinv                 # auto never differentiates through conjugate gradients


def test_blur_rejects_an_unknown_residual():
    with pytest.raises(ValueError, match="auto_residual 'meas' is not one of"):
        Blur(torch.ones(3, 3), auto_residual="meas")


def test_motion_blur_correlates_with_the_generated_kernel_as_the_official_code():
    """The official code applies its motion kernel k by correlation (F.conv2d with k itself); so does ours,
    and the operator's point-spread function is k turned by 180 degrees (the image of one bright pixel)."""
    k = motion_kernel(9, 0.5, torch.Generator().manual_seed(3))
    assert not torch.allclose(k, k.flip(-2, -1))                 # an asymmetric kernel, or the test is void
    op = motion_blur(9, 0.5, torch.Generator().manual_seed(3), boundary="zero")
    x = torch.randn(1, 1, 24, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    official = F.conv2d(F.pad(x, (4, 4, 4, 4)), k[None, None].double())       # correlation, zero padding
    torch.testing.assert_close(op.forward(x), official, rtol=0, atol=1e-12)
    delta = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    delta[..., 4, 4] = 1.0
    torch.testing.assert_close(op.forward(delta)[0, 0], k.flip(-2, -1).double(), rtol=0, atol=1e-12)
    torch.testing.assert_close(op.kernel, k.flip(-2, -1).to(op.kernel.dtype))
