"""PSNR / SSIM of the evaluation runner against hand-computed values and an independent SSIM (scipy's
Gaussian filter on the whole image, then the border cropped, as scikit-image does)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from evaluation import metrics

C1, C2 = (0.01) ** 2, (0.03) ** 2


def reference_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """skimage's algorithm (gaussian_weights, sigma 1.5, population covariance), written independently."""
    a, b = np.atleast_3d(a).astype(np.float64), np.atleast_3d(b).astype(np.float64)

    def f(x):
        return np.stack([gaussian_filter(x[..., c], 1.5, truncate=3.5) for c in range(x.shape[-1])], -1)

    ma, mb = f(a), f(b)
    va, vb, cv = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ma * mb + c1) * (2 * cv + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return float(s[5:-5, 5:-5].mean())


def test_psnr_hand_computed():
    a = np.zeros((8, 8, 3))
    assert metrics.psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-12)       # mse 0.01
    assert metrics.psnr(a, a + 0.01) == pytest.approx(40.0, abs=1e-12)
    half = a.copy()
    half[:, :4] = 0.2                                                        # mse 0.02
    assert metrics.psnr(a, half) == pytest.approx(10 * math.log10(1 / 0.02), abs=1e-12)
    u8 = np.full((4, 4), 10, np.uint8)
    assert metrics.psnr(metrics.to_unit(u8), metrics.to_unit(u8 * 0)) == pytest.approx(
        20 * math.log10(255 / 10), abs=1e-9)
    assert metrics.psnr(a, a) == math.inf


def test_ssim_of_constant_images_is_the_luminance_term():
    # zero variances and covariance: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1) exactly
    a, b = np.full((16, 16), 0.2), np.full((16, 16), 0.6)
    expected = (2 * 0.2 * 0.6 + C1) / (0.2**2 + 0.6**2 + C1)
    assert metrics.ssim(a, b) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.2401 / 0.4001, abs=1e-15)


def test_ssim_of_a_flipped_sign_pattern_is_hand_computable():
    # b = 1 - a for a in {0.25, 0.75} with equal means 0.5 at every window: luminance term 1, and
    # cov = -var, so SSIM = (C2 - 2 var) / (2 var + C2) with the Gaussian-window variance var = 0.0625 ...
    a = np.full((32, 32), 0.25)
    a[::2, ::2] = a[1::2, 1::2] = 0.75                                   # checkerboard
    b = 1.0 - a
    s = metrics.ssim(a, b)
    # ... up to the window's tiny mean deviation from 0.5; the value is close to (C2 - 0.125) / (0.125 + C2)
    assert s == pytest.approx((C2 - 0.125) / (0.125 + C2), abs=2e-3)
    assert s == pytest.approx(reference_ssim(a, b), abs=1e-12)


@pytest.mark.parametrize("shape", [(40, 50), (33, 21, 3)])
def test_ssim_matches_the_independent_reference(shape):
    rng = np.random.default_rng(0)
    a = rng.random(shape)
    b = np.clip(a + 0.1 * rng.standard_normal(shape), 0, 1)
    assert metrics.ssim(a, b) == pytest.approx(reference_ssim(a, b), abs=1e-12)
    u8a, u8b = (a * 255).astype(np.uint8), (b * 255).astype(np.uint8)
    assert metrics.ssim(u8a.astype(float), u8b.astype(float), data_range=255) == pytest.approx(
        reference_ssim(u8a, u8b, 255), abs=1e-12)


def test_ssim_properties():
    rng = np.random.default_rng(1)
    a = rng.random((24, 24, 3))
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    b = np.clip(a + 0.05 * rng.standard_normal(a.shape), 0, 1)
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a), abs=1e-14)
    noisier = [metrics.ssim(a, np.clip(a + s * rng.standard_normal(a.shape), 0, 1)) for s in (0.02, 0.1, 0.3)]
    assert noisier[0] > noisier[1] > noisier[2]
    taps = metrics.gaussian_kernel()
    assert taps.size == 11
    assert taps.sum() == pytest.approx(1.0)
    assert taps.argmax() == 5


def test_metric_errors_name_the_problem():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(np.zeros((10, 40)), np.zeros((10, 40)))
    with pytest.raises(ValueError, match="neither uint8"):
        metrics.to_unit(np.zeros((2, 2), np.int32))


def test_learned_metrics_are_skipped_without_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for check in (metrics.lpips_availability, metrics.fid_availability):
        a = check()
        assert not a.available
        assert a.reason.startswith("skipped: ")
        assert ("not installed" in a.reason) or (str(tmp_path) in a.reason)
