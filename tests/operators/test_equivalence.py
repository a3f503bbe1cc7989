"""Equivalences with independent implementations and with the official definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flowdps.operators import (
    PAPER_SVD_THRESHOLD,
    AvgPoolSR,
    BicubicSR,
    PaperGaussianBlur,
    gaussian_blur,
    paper_gaussian_matrix,
    paper_gaussian_svd,
    paper_gaussian_taps,
)

# measured max |ours - F.interpolate| over the interior (2-pixel border excluded), float64: ~7e-16
BICUBIC_INTERIOR_TOL = {torch.float64: 1e-13, torch.float32: 2e-6}


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 5, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_avgpool_equals_avg_pool2d_exactly(factor, dtype):
    x = (
        torch.rand(2, 3, 2 * factor, 3 * factor, generator=torch.Generator().manual_seed(factor)).to(dtype)
        * 2
        - 1
    )
    assert torch.equal(AvgPoolSR(factor).forward(x), F.avg_pool2d(x, factor))


@pytest.mark.parametrize(("factor", "height", "width"), [(2, 24, 18), (3, 27, 21), (4, 48, 32), (5, 40, 45)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bicubic_interior_equals_interpolate_antialias(factor, height, width, dtype):
    x = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(factor), dtype=dtype) * 2 - 1
    ours = BicubicSR(factor).forward(x)
    for reference in (
        F.interpolate(x, size=(height // factor, width // factor), mode="bicubic", antialias=True),
        F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True),
    ):
        assert ours.shape == reference.shape
        interior = (ours - reference)[..., 2:-2, 2:-2]
        assert interior.abs().max() < BICUBIC_INTERIOR_TOL[dtype]
    # the border differs on purpose: symmetric reflection (official) vs PyTorch's truncated taps
    assert (ours - reference).abs().max() > 1e-3


def test_bicubic_matches_official_taps_for_even_factor():
    """Official SRConv, even f: 4f taps at (i - 2f + 0.5)/f, normalised, rows centred on each block."""
    factor, n = 4, 32
    positions = (torch.arange(4 * factor, dtype=torch.float64) - 2 * factor + 0.5) / factor
    t = positions.abs()
    a = -0.5
    taps = torch.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1, a * (((t - 5) * t + 8) * t - 4))
    taps = taps / taps.sum()
    x = torch.zeros(1, 1, n, n, dtype=torch.float64)
    x[..., 13, 17] = 1.0  # an interior pixel: read the weights of output rows/cols off the response
    y = BicubicSR(factor).forward(x)[0, 0]
    m_row, m_col = 3, 4  # output pixels whose support contains pixel (13, 17)
    expected = (
        taps[13 - (m_row * factor + factor // 2 - 2 * factor)]
        * taps[17 - (m_col * factor + factor // 2 - 2 * factor)]
    )
    torch.testing.assert_close(y[m_row, m_col], expected, rtol=0, atol=1e-15)


def test_bicubic_border_is_half_sample_symmetric():
    """Mirroring the image about its edge (half-sample) and cropping gives the same output as reflection."""
    factor = 2
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    big = torch.cat([x.flip(-2), x, x.flip(-2)], dim=-2)
    big = torch.cat([big.flip(-1), big, big.flip(-1)], dim=-1)  # 24 x 24, symmetric extension
    torch.testing.assert_close(BicubicSR(factor).forward(x), BicubicSR(factor).forward(big)[..., 4:8, 4:8])


@pytest.mark.parametrize(("size", "sigma"), [(5, 1.0), (7, 1.5), (9, 3.0)])
def test_gaussian_reflect_equals_kornia(size, sigma):
    kornia = pytest.importorskip("kornia")
    x = torch.rand(2, 3, 13, 17, generator=torch.Generator().manual_seed(size), dtype=torch.float64) * 2 - 1
    ours = gaussian_blur(size, sigma, "reflect").forward(x)
    reference = kornia.filters.gaussian_blur2d(x, (size, size), (sigma, sigma), border_type="reflect")
    assert (ours - reference).abs().max() < 1e-14


@pytest.mark.parametrize(
    ("boundary", "mode"), [("reflect", "mirror"), ("circular", "wrap"), ("zero", "constant")]
)
def test_gaussian_equals_scipy(boundary, mode):
    ndimage = pytest.importorskip("scipy.ndimage")
    size, sigma = 9, 1.7
    x = torch.rand(1, 2, 11, 14, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    ours = gaussian_blur(size, sigma, boundary).forward(x)
    reference = ndimage.gaussian_filter(
        x.numpy(), sigma=(0, 0, sigma, sigma), mode=mode, truncate=(size // 2) / sigma
    )
    assert (ours - torch.from_numpy(reference)).abs().max() < 1e-14


def test_blur_is_a_true_convolution():
    """A single bright pixel spreads into the kernel itself (not its flip): the PSF convention."""
    from flowdps.operators import Blur

    kernel = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    x = torch.zeros(1, 1, 7, 7, dtype=torch.float64)
    x[..., 3, 3] = 1.0
    for boundary in ("reflect", "circular", "zero"):
        y = Blur(kernel, boundary).forward(x)
        torch.testing.assert_close(y[0, 0, 2:5, 2:5], kernel / kernel.sum(), rtol=0, atol=1e-15)


def test_paper_taps_are_off_centre():
    taps = paper_gaussian_taps()
    k = torch.arange(-31, 30, dtype=torch.float64)
    torch.testing.assert_close(taps, torch.exp(-(k**2) / 18) / torch.exp(-(k**2) / 18).sum())
    assert taps.numel() == 61
    assert int(taps.argmax()) == 31


def test_paper_matrix_definition_and_shift():
    """A[i, j] = taps[j - i + 30] for j in [i - 30, i + 29], zero boundary; row i peaks at column i + 1."""
    n = 70
    matrix = paper_gaussian_matrix(n)
    taps = paper_gaussian_taps()
    for i in (0, 5, 35, 69):
        for j in range(n):
            expected = taps[j - i + 30] if -30 <= j - i < 30 else 0.0
            assert float(matrix[i, j]) == float(expected)
    assert torch.equal(matrix[10:60].argmax(dim=1), torch.arange(11, 61))


def test_paper_untruncated_grey_is_centred_gaussian_shifted_by_one():
    """Untruncated and on one channel the operator is a zero-boundary Gaussian blur shifted by one pixel."""
    x = torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = PaperGaussianBlur(threshold=0.0).forward(x)
    d = torch.arange(-30, 31, dtype=torch.float64)
    g = torch.exp(-(d**2) / 18)
    g = g / g.sum()
    centred = F.conv2d(x, (g[:, None] * g[None, :])[None, None], padding=30)
    # y[i, j] = centred[i + 1, j + 1], up to taps below 1e-20 that the official kernel drops
    torch.testing.assert_close(ours[..., :-1, :-1], centred[..., 1:, 1:], rtol=0, atol=1e-13)  # SVD round-off


def test_paper_truncation_count_at_768():
    """1-D singular values < 0.03 are zeroed: 552 of 768 at 768 px."""
    u, singular_values, v = paper_gaussian_svd(768)
    exact = torch.linalg.svdvals(paper_gaussian_matrix(768))
    assert int((exact < PAPER_SVD_THRESHOLD).sum()) == 552
    assert int((singular_values == 0).sum()) == 552
    truncated = (u * singular_values) @ v.T
    assert torch.linalg.matrix_rank(truncated) == 768 - 552
    kept = exact[exact >= PAPER_SVD_THRESHOLD]
    torch.testing.assert_close(torch.linalg.svdvals(truncated)[: kept.numel()], kept)
    torch.testing.assert_close(singular_values[: kept.numel()], kept)


def test_paper_svd_factors_reconstruct_the_matrix():
    """``paper_gaussian_svd`` returns U, the truncated values and V (not V^T) of the official 1-D matrix."""
    u, s, v = paper_gaussian_svd(12, threshold=0.0)
    torch.testing.assert_close((u * s) @ v.T, paper_gaussian_matrix(12), rtol=0, atol=1e-14)
    _, truncated, _ = paper_gaussian_svd(12)
    assert int((truncated == 0).sum()) > 0  # the truncation bites even at 12 px
