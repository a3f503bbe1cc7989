"""The paper-compatible Gaussian blur reproduces the official operator, channel-dependent spectra included.

The reference here is built independently of ``operators/paper.py``: dense Kronecker products of the 1-D
singular vectors, Python's (stable) ``sorted`` for the descending order, explicit permutation matrices for the
channel-interleaved layout, and the sorted spectrum tiled by list repetition, step by step as the module
docstring of ``operators/paper.py`` lists them (coefficients -> sorted and interleaved -> times the tiled
spectrum -> back -> U).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from flowdps.operators import (
    PAPER_SVD_THRESHOLD,
    PaperGaussianBlur,
    paper_channel_scales,
    paper_gaussian_matrix,
    paper_gaussian_svd,
)
from flowdps.operators.testing import dense_matrix, smooth_image


def _truncated_svd(n: int, kernel_size: int, sigma: float) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    u, s, vh = torch.linalg.svd(paper_gaussian_matrix(n, kernel_size, sigma))
    return u, [value if value >= PAPER_SVD_THRESHOLD else 0.0 for value in s.tolist()], vh.T


def _official_dense(channels: int, height: int, width: int, kernel_size: int, sigma: float):
    """Dense ``(C H W, C H W)`` forward and pinv of the official steps, and the products, in float64."""
    u_h, s_h, v_h = _truncated_svd(height, kernel_size, sigma)
    u_w, s_w, v_w = _truncated_svd(width, kernel_size, sigma)
    count = height * width
    products = [s_h[i] * s_w[j] for i in range(height) for j in range(width)]  # flat index i * W + j
    perm = sorted(range(count), key=lambda q: -products[q])  # Python's sort is stable: ties keep q's order
    spectrum = [products[q] for q in perm]
    # layout[p * C + c, c * N + q] = 1: per-channel flat coefficients -> sorted, channel-interleaved
    layout = torch.zeros(channels * count, channels * count, dtype=torch.float64)
    for position, q in enumerate(perm):
        for c in range(channels):
            layout[position * channels + c, c * count + q] = 1.0
    tiled = torch.tensor(spectrum * channels, dtype=torch.float64)  # S, S, ..., S end to end
    inverse = torch.where(tiled > 0, 1 / tiled.clamp_min(1e-300), torch.zeros_like(tiled))
    to_coefficients = torch.block_diag(*[torch.kron(v_h, v_w).T] * channels)
    from_coefficients = torch.block_diag(*[torch.kron(u_h, u_w)] * channels)
    forward = from_coefficients @ layout.T @ torch.diag(tiled) @ layout @ to_coefficients
    pinv = to_coefficients.T @ layout.T @ torch.diag(inverse) @ layout @ from_coefficients.T
    return forward, pinv, products


DENSE_CASES = {
    "rgb-8x8-k7": (3, 8, 8, 7, 1.0),
    "rgb-7x9-k7": (3, 7, 9, 7, 1.0),  # non-square: row and column SVDs
    "rgb-10x10-k61": (3, 10, 10, 61, 3.0),  # 100 positions: not a multiple of 3
    "two-6x9-k61": (2, 6, 9, 61, 3.0),
    "grey-9x8-k7": (1, 9, 8, 7, 1.0),
}


@pytest.mark.parametrize("sizes", DENSE_CASES.values(), ids=DENSE_CASES.keys())
def test_matches_dense_official_construction(sizes):
    channels, height, width, kernel_size, sigma = sizes
    forward, pinv, products = _official_dense(*sizes)
    distinct = sorted(set(products))
    # distinct products are far apart relative to round-off, so no SVD rounding can reorder them
    assert min(b - a for a, b in itertools.pairwise(distinct)) > 1e-8
    op = PaperGaussianBlur(kernel_size, sigma)
    shape = (1, channels, height, width)
    scale = forward.abs().max()
    torch.testing.assert_close(dense_matrix(op, shape), forward, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(dense_matrix(op.adjoint, shape), forward.T, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(dense_matrix(op.pinv, shape), pinv, rtol=0, atol=1e-12 * pinv.abs().max())


def test_dense_official_construction_has_no_cross_channel_terms():
    """The official steps give a block-diagonal matrix: one operator per channel, each a different one."""
    channels, height, width = 3, 8, 8
    forward, _, _ = _official_dense(channels, height, width, 7, 1.0)
    count = height * width
    blocks = forward.view(channels, count, channels, count)
    for c in range(channels):
        for d in range(channels):
            if c != d:
                assert torch.count_nonzero(blocks[c, :, d]) == 0
    for c in range(1, channels):
        assert (blocks[c, :, c] - blocks[0, :, 0]).abs().max() > 1e-3


def _separable_truncated(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The truncated 1-D blur ``U diag(s_t) V^T`` and its pseudo-inverse (float64)."""
    u, s, v = paper_gaussian_svd(n)
    inverse = torch.where(s > 0, 1 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    return (u * s) @ v.T, (v * inverse) @ u.T


def test_grey_images_get_the_truncated_separable_blur():
    """With one channel the tiling is the identity: ``A_t (x) A_t`` with the truncated 1-D factors."""
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, 12, 9, generator=generator, dtype=torch.float64)
    y = torch.rand(2, 1, 12, 9, generator=generator, dtype=torch.float64)
    (rows, rows_pinv), (cols, cols_pinv) = _separable_truncated(12), _separable_truncated(9)
    op = PaperGaussianBlur()
    torch.testing.assert_close(op.forward(x), rows @ x @ cols.T, rtol=0, atol=1e-14)
    torch.testing.assert_close(op.adjoint(y), rows.T @ y @ cols, rtol=0, atol=1e-14)
    torch.testing.assert_close(op.pinv(y), rows_pinv @ y @ cols_pinv.T, rtol=0, atol=1e-12)


def test_colour_channels_get_different_operators_and_do_not_mix():
    generator = torch.Generator().manual_seed(4)
    grey = torch.rand(1, 1, 16, 16, generator=generator, dtype=torch.float64)
    x = grey.expand(1, 3, 16, 16).contiguous()
    op = PaperGaussianBlur()
    for apply in (op.forward, op.adjoint, op.pinv):
        out = apply(x)
        for a, b in ((0, 1), (0, 2), (1, 2)):
            assert (out[:, a] - out[:, b]).abs().max() > 1e-4 * out.abs().max()
        assert (out[:, 0] - apply(grey)[:, 0]).abs().max() > 1e-4 * out.abs().max()  # not the grey operator
        bumped = x.clone()
        bumped[:, 0] += torch.rand(1, 16, 16, generator=generator, dtype=torch.float64)
        changed = apply(bumped)
        assert torch.equal(changed[:, 1:], out[:, 1:])
        assert not torch.equal(changed[:, 0], out[:, 0])


def test_exact_ties_keep_flat_order():
    """s_0 s_1 == s_1 s_0 exactly: (0, 1) takes sorted position 1 and (1, 0) position 2 (stable sort), so in
    channel c they are weighted by S[(3 + c) mod N] and S[(6 + c) mod N]; a reversed tie would swap them."""
    n = 10
    s = paper_gaussian_svd(n)[1]
    spectrum = torch.sort((s[:, None] * s[None, :]).flatten(), descending=True).values
    scales = paper_channel_scales(n, n, 3)
    for c in range(3):
        assert float(scales[c, 0, 0]) == float(spectrum[c])
        assert float(scales[c, 0, 1]) == float(spectrum[3 + c])
        assert float(scales[c, 1, 0]) == float(spectrum[6 + c])
    assert float(spectrum[3]) != float(spectrum[6])


def test_pinned_at_768():
    """At the paper's 768 px the truncation keeps 216 x 216 = 46656 non-zero products; the zeros follow in
    flat order (rows 0..215 give 552 each, then whole rows), so sorted position N / 3 = 196608 holds
    v_256 (x) v_0, a coefficient whose true singular value is 0, and channel 0 weights it by S[0] = s_0^2.

    Relative L2 difference of the forward against the truncated separable blur, measured (float64):
    0.0316987 on the smooth image (a correct per-pixel repetition of the spectrum would give 0; PyTorch's
    unstable sort order gives 0.0316810, the float32 order 0.0317000) and 0.9907 on Gaussian noise (seed 0;
    about 1 for any noise: two thirds of the true spectrum are zeroed and as much weight lands on high
    frequencies). Round-off moves the smooth value by about 1e-12 (another LAPACK SVD driver included).
    """
    n = 768
    s = paper_gaussian_svd(n)[1]
    assert int((s == 0).sum()) == 552
    scales = paper_channel_scales(n, n, 3)
    assert float(scales[0, 256, 0]) == float(s[0] ** 2)
    assert float(s[256]) == 0.0
    rows, _ = _separable_truncated(n)
    op = PaperGaussianBlur()
    x = smooth_image(3, n, n)
    noise = torch.randn(1, 3, n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def difference(image: torch.Tensor) -> float:
        separable = rows @ image @ rows.T
        norm = torch.linalg.vector_norm
        return float(norm(op.forward(image) - separable) / norm(separable))

    assert abs(difference(x) - 0.0316987) < 2e-7
    assert 0.97 < difference(noise) < 1.01


def test_matrix_caches_stay_within_their_byte_bound():
    from flowdps.operators.cache import TensorCache, clear_tensor_caches, tensor_bytes
    from flowdps.operators.sr import bicubic_matrices

    calls = []

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(n)
        return torch.zeros(n, n), torch.zeros(n)

    cache = TensorCache(make, max_bytes=3 * tensor_bytes(make(16)))
    calls.clear()
    for n in (16, 8, 16, 4, 16, 32, 16):     # 32 alone exceeds the bound: computed, never kept
        cache(n)
        assert cache.bytes <= cache.max_bytes
        assert cache.bytes == sum(size for _, size in cache.entries.values())
    assert calls == [16, 8, 4, 32]
    assert 32 not in [key[0][0] for key in cache.entries]
    bicubic_matrices(64, 2)
    assert clear_tensor_caches() >= tensor_bytes(bicubic_matrices.cache.function(64, 2))  # type: ignore[attr-defined]
    assert bicubic_matrices.cache.bytes == 0  # type: ignore[attr-defined]
