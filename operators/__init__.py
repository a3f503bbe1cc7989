"""Degradation operators: exact linear maps with true adjoints and pseudo-inverses (pure PyTorch).

Images are ``(B, C, H, W)`` float tensors in [-1, 1]; see :class:`LinearOperator`. Measurement noise is a
separate object (:class:`GaussianNoise`): ``y = noise.apply(op.forward(x), generator)``. Oracles for tests
live in :mod:`.testing`.

This package never imports ComfyUI (enforced by ruff's banned-api rule).
"""

from .base import (
    CG_MAX_ITER,
    CG_TOL,
    RESIDUAL_SPACES,
    UNKNOWN_ATOL,
    Composed,
    LinearOperator,
    ParameterError,
    conjugate_gradient,
)
from .basic import BT601_WEIGHTS, MEAN_WEIGHTS, Grayscale, Identity
from .blur import (
    BOUNDARIES,
    FFT_PINV_RTOL,
    GAUSSIAN_KERNEL_SIZE,
    GAUSSIAN_SIGMA,
    Blur,
    gaussian_blur,
    gaussian_kernel,
    motion_blur,
    validate_kernel,
)
from .inpainting import (
    KEEP_THRESHOLD,
    Inpainting,
    LazyMask,
    box_mask,
    fit_mask,
    lazy_box_mask,
    lazy_random_mask,
    random_mask,
)
from .motion import MOTION_INTENSITY, MOTION_KERNEL_SIZE, motion_kernel
from .noise import GaussianNoise
from .paper import (
    PAPER_GAUSSIAN_KERNEL_SIZE,
    PAPER_GAUSSIAN_SIGMA,
    PAPER_SVD_THRESHOLD,
    PaperGaussianBlur,
    paper_channel_scales,
    paper_gaussian_matrix,
    paper_gaussian_svd,
    paper_gaussian_taps,
)
from .sr import BICUBIC_A, PAPER_SR_FACTOR, AvgPoolSR, BicubicSR, bicubic_matrices

__all__ = [
    "BICUBIC_A",
    "BOUNDARIES",
    "BT601_WEIGHTS",
    "CG_MAX_ITER",
    "CG_TOL",
    "FFT_PINV_RTOL",
    "GAUSSIAN_KERNEL_SIZE",
    "GAUSSIAN_SIGMA",
    "KEEP_THRESHOLD",
    "MEAN_WEIGHTS",
    "MOTION_INTENSITY",
    "MOTION_KERNEL_SIZE",
    "PAPER_GAUSSIAN_KERNEL_SIZE",
    "PAPER_GAUSSIAN_SIGMA",
    "PAPER_SR_FACTOR",
    "PAPER_SVD_THRESHOLD",
    "RESIDUAL_SPACES",
    "UNKNOWN_ATOL",
    "AvgPoolSR",
    "BicubicSR",
    "Blur",
    "Composed",
    "GaussianNoise",
    "Grayscale",
    "Identity",
    "Inpainting",
    "LazyMask",
    "LinearOperator",
    "PaperGaussianBlur",
    "ParameterError",
    "bicubic_matrices",
    "box_mask",
    "conjugate_gradient",
    "fit_mask",
    "gaussian_blur",
    "gaussian_kernel",
    "lazy_box_mask",
    "lazy_random_mask",
    "motion_blur",
    "motion_kernel",
    "paper_channel_scales",
    "paper_gaussian_matrix",
    "paper_gaussian_svd",
    "paper_gaussian_taps",
    "random_mask",
    "validate_kernel",
]
