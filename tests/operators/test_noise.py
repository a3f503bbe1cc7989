"""The measurement-noise model: sigma on the operators' [-1, 1] scale, seeded, separate from A. (The [0, 1]
scale of the nodes and the paper's value: tests/test_convert.py.)"""

from __future__ import annotations

import torch
from flowdps.operators import GaussianNoise


def test_noise_statistics_on_model_scale():
    y = torch.zeros(4, 3, 64, 64, dtype=torch.float64)
    noisy = GaussianNoise(0.2).apply(y, torch.Generator().manual_seed(0))
    assert abs(float(noisy.std()) - 0.2) < 0.005
    assert abs(float(noisy.mean())) < 0.005


def test_seeded_reproducible_and_dtype_preserving():
    y = torch.zeros(1, 3, 8, 8)
    a = GaussianNoise(0.1).apply(y, torch.Generator().manual_seed(3))
    b = GaussianNoise(0.1).apply(y, torch.Generator().manual_seed(3))
    c = GaussianNoise(0.1).apply(y, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    half = GaussianNoise(0.1).apply(y.to(torch.bfloat16), torch.Generator().manual_seed(3))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), a, atol=1e-2, rtol=0)


def test_zero_noise_is_a_copy():
    y = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = GaussianNoise(0.0).apply(y)
    assert torch.equal(out, y)
    assert out.data_ptr() != y.data_ptr()
