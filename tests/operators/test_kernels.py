"""Kernels: Gaussian taps, kernel validation, and the random-trajectory motion kernels."""

from __future__ import annotations

import pytest
import torch
from flowdps.operators import Blur, gaussian_kernel, motion_kernel, validate_kernel


def _minor_axis_std(kernel: torch.Tensor) -> float:
    """Standard deviation of the kernel's mass along its narrowest direction (pixels)."""
    n = kernel.shape[0]
    coords = torch.arange(n, dtype=kernel.dtype)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    mx, my = (kernel * xx).sum(), (kernel * yy).sum()
    cxx, cyy = (kernel * (xx - mx) ** 2).sum(), (kernel * (yy - my) ** 2).sum()
    cxy = (kernel * (xx - mx) * (yy - my)).sum()
    return float(
        torch.linalg.eigvalsh(torch.stack([torch.stack([cxx, cxy]), torch.stack([cxy, cyy])]))[0].sqrt()
    )


def test_gaussian_kernel_properties():
    k = gaussian_kernel(7, 1.3)
    assert k.shape == (7, 7)
    torch.testing.assert_close(k.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(k, k.flip(0))
    assert int(k.argmax()) == 3 * 7 + 3
    d = torch.arange(-3, 4, dtype=torch.float64)
    g = torch.exp(-(d**2) / (2 * 1.3**2))
    torch.testing.assert_close(k, torch.outer(g, g) / g.sum() ** 2)


def test_blur_normalises_and_copies_the_kernel():
    raw = torch.tensor([[0.0, 2.0, 0.0], [2.0, 4.0, 2.0], [0.0, 2.0, 0.0]])
    op = Blur(raw)
    torch.testing.assert_close(op.kernel.sum(), torch.tensor(1.0))
    raw.zero_()  # later changes to the caller's tensor do not reach the (immutable) operator
    assert op.kernel.sum() > 0.99
    assert validate_kernel(torch.ones(1, 1, dtype=torch.int64)).dtype == torch.float32


@pytest.mark.parametrize("intensity", [0.0, 0.5, 1.0])
def test_motion_kernel_is_a_normalised_psf(intensity):
    for seed in range(4):
        k = motion_kernel(31, intensity, torch.Generator().manual_seed(seed))
        assert k.shape == (31, 31)
        assert k.dtype == torch.float64
        assert bool(torch.isfinite(k).all())
        assert float(k.min()) >= 0
        assert abs(float(k.sum()) - 1.0) < 1e-12


def test_motion_kernel_size_and_dtype():
    for size in (3, 15, 61):
        assert motion_kernel(size, 0.5, torch.Generator().manual_seed(0), dtype=torch.float32).shape == (
            size,
            size,
        )


def test_motion_kernel_is_reproducible_and_seed_dependent():
    a = motion_kernel(21, 0.5, torch.Generator().manual_seed(123))
    b = motion_kernel(21, 0.5, torch.Generator().manual_seed(123))
    c = motion_kernel(21, 0.5, torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_motion_kernel_does_not_touch_global_rng():
    state = torch.random.get_rng_state()
    motion_kernel(15, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.random.get_rng_state())


def test_motion_intensity_bends_the_path():
    """Intensity 0: a straight streak (minor-axis spread = the smoothing only, ~0.6 px at size 61).
    Intensity 1: directions wander, so the kernel spreads across its narrow axis too (measured mean ~2 px)."""
    straight = [_minor_axis_std(motion_kernel(61, 0.0, torch.Generator().manual_seed(s))) for s in range(8)]
    curved = [_minor_axis_std(motion_kernel(61, 1.0, torch.Generator().manual_seed(s))) for s in range(8)]
    assert max(straight) < 0.8
    assert sum(curved) / len(curved) > 2 * sum(straight) / len(straight)


def test_motion_kernel_spreads_from_its_centre():
    """The path is centred on the canvas: the kernel's centre of mass lies near the middle pixel."""
    for seed in range(4):
        k = motion_kernel(41, 0.5, torch.Generator().manual_seed(seed)).float()
        coords = torch.arange(41, dtype=torch.float32)
        assert abs(float((k.sum(1) * coords).sum()) - 20) < 6
        assert abs(float((k.sum(0) * coords).sum()) - 20) < 6
