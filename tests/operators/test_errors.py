"""Bad inputs raise ValueError whose message names the offending value (and the rule)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from flowdps.operators import (
    AvgPoolSR,
    BicubicSR,
    Blur,
    GaussianNoise,
    Grayscale,
    Inpainting,
    PaperGaussianBlur,
    box_mask,
    gaussian_blur,
    gaussian_kernel,
    motion_kernel,
    random_mask,
)

CASES = {
    "height not divisible": (
        lambda: AvgPoolSR(4).forward(torch.zeros(1, 3, 97, 96)),
        "height 97 is not divisible by the scale factor 4",
    ),
    "width not divisible": (lambda: BicubicSR(3).output_shape((1, 3, 9, 10)), "width 10 is not divisible"),
    "factor larger than the image": (
        lambda: AvgPoolSR(64).output_shape((1, 3, 16, 16)),
        "SR factor 64 is larger than the image (16x16, H x W): the image must be at least 64x64, and its sides "
        "multiples of 64",
    ),
    "factor larger than one side": (lambda: BicubicSR(8).forward(torch.zeros(1, 3, 4, 16)), "at least 8x8"),
    "factor zero": (lambda: AvgPoolSR(0), "scale factor must be >= 1, got 0"),
    "factor float": (lambda: BicubicSR(2.5), "2.5"),
    "kernel larger than image": (
        lambda: gaussian_blur(61, 3.0).forward(torch.zeros(1, 3, 48, 64)),
        "kernel 61x61 is larger than the image 48x64",
    ),
    "kernel larger than image (adjoint)": (
        lambda: gaussian_blur(9, 1.0).adjoint(torch.zeros(1, 3, 8, 64)),
        "kernel 9x9 is larger than the image 8x64",
    ),
    "even kernel size": (lambda: gaussian_kernel(4, 1.0), "kernel size 4 is even"),
    "even user kernel": (lambda: Blur(torch.ones(3, 4)), "kernel width 4 is even"),
    "kernel not 2-D": (lambda: Blur(torch.ones(1, 3, 3)), "(1, 3, 3)"),
    "kernel nan": (lambda: Blur(torch.tensor([[1.0, math.nan, 1.0]])), "nan"),
    "kernel inf": (lambda: Blur(torch.tensor([[1.0, math.inf, 1.0]])), "inf"),
    "kernel negative": (lambda: Blur(torch.tensor([[1.0, -0.5, 1.0]])), "-0.5"),
    "kernel zero sum": (lambda: Blur(torch.zeros(3, 3)), "kernel sums to 0"),
    "sigma zero": (lambda: gaussian_blur(5, 0.0), "sigma 0.0 must be > 0"),
    "sigma negative": (lambda: gaussian_kernel(5, -1.5), "sigma -1.5"),
    "sigma nan": (lambda: gaussian_kernel(5, math.nan), "nan"),
    "paper sigma": (lambda: PaperGaussianBlur(sigma=-2.0), "sigma -2.0"),
    "paper even size": (lambda: PaperGaussianBlur(kernel_size=60), "kernel size 60 is even"),
    "boundary": (lambda: gaussian_blur(3, 1.0, "replicate"), "'replicate'"),
    "mask size": (
        lambda: Inpainting(torch.ones(64, 64)).forward(torch.zeros(1, 3, 48, 48)),
        "mask 64x64 does not match the image 48x48",
    ),
    "mask batch": (
        lambda: Inpainting(torch.ones(2, 8, 8)).forward(torch.zeros(3, 3, 8, 8)),
        "mask batch 2 does not match the image batch 3",
    ),
    "mask range": (lambda: Inpainting(torch.full((4, 4), 2.0)), "2.0"),
    "mask nan": (lambda: Inpainting(torch.full((4, 4), math.nan)), "nan"),
    "mask dims": (lambda: Inpainting(torch.ones(1, 3, 4, 4)), "(1, 3, 4, 4)"),
    "box outside": (lambda: box_mask(8, 8, 6, 0, 4, 4), "6..9"),
    "missing ratio": (lambda: random_mask(8, 8, 1.5), "missing_ratio 1.5"),
    "missing ratio nan": (lambda: random_mask(8, 8, math.nan), "missing_ratio must be finite"),
    "grey channels": (lambda: Grayscale().forward(torch.zeros(1, 4, 8, 8)), "needs 3 channels, got 4"),
    "grey weights": (lambda: Grayscale((0.0, 0.0, 0.0)), "(0.0, 0.0, 0.0)"),
    "not 4-D": (lambda: AvgPoolSR(2).forward(torch.zeros(3, 8, 8)), "(3, 8, 8)"),
    "integer image": (
        lambda: AvgPoolSR(2).forward(torch.zeros(1, 3, 8, 8, dtype=torch.int64)),
        "torch.int64",
    ),
    "motion intensity": (lambda: motion_kernel(15, 1.5), "intensity 1.5"),
    "motion even size": (lambda: motion_kernel(16, 0.5), "motion kernel size 16"),
    "noise sigma negative": (lambda: GaussianNoise(-0.1), "sigma -0.1 must be >= 0"),
    "noise sigma nan": (lambda: GaussianNoise(math.nan), "nan"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_value_error_names_the_value(name):
    action, message = CASES[name]
    with pytest.raises(ValueError, match=re.escape(message)):
        action()
