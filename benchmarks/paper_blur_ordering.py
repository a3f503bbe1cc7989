"""How well the paper-compatible Gaussian blur (``operators/paper.py``) pins the official operator down.

Run: ``.venv/bin/python benchmarks/paper_blur_ordering.py [--size 768]`` (about 15 s at 768 px on one core);
writes ``benchmarks/results/paper_blur_ordering.md``. Numbers, not assertions.

The operator weights each 2-D SVD coefficient by the sorted spectrum read at a position that depends on where
the coefficient lands in the descending sort of the products ``s_i s_j``, so it depends on the sort order and
on the singular vectors themselves. The pack builds everything in float64 with a stable sort; the official run
used float32 on a GPU. This script rebuilds the operator with one ingredient changed at a time and reports the
truncation count, how many sorted positions move and the relative L2 change of the forward on a smooth RGB
image, on 1/f noise (the spectrum of natural photos) and on white noise.
"""

from __future__ import annotations

import argparse
import platform
from datetime import UTC, datetime

import torch
from operator_accuracy import import_pack, rel, write_result  # the benchmark next to this one

CHANNELS = 3


def pink_noise(n: int, seed: int) -> torch.Tensor:
    """(1, 3, n, n) float64 noise with amplitude ~ 1/f (the spectrum of natural photos), unit RMS."""
    g = torch.Generator().manual_seed(seed)
    f = torch.fft.fftfreq(n, dtype=torch.float64)
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2).clamp_min(1 / n)
    white = torch.randn(1, CHANNELS, n, n, generator=g, dtype=torch.float64)
    x = torch.fft.ifft2(torch.fft.fft2(white) / radius).real
    return x / x.std()


def scipy_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD by scipy's LAPACK ``gesvd`` driver (PyTorch's CPU SVD uses ``gesdd``)."""
    import scipy.linalg

    u, s, vh = scipy.linalg.svd(a.numpy(), lapack_driver="gesvd")
    return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)


def construction(ops, n: int, dtype: torch.dtype, stable: bool, svd=torch.linalg.svd):
    """``((U, V), perm, products, truncated)``: float64 factors, sort order, flat products (float64) and the
    number of truncated 1-D values, with the SVD, the products and the sort computed in ``dtype``."""
    u, s, vh = svd(ops.paper_gaussian_matrix(n).to(dtype))
    s_t = torch.where(s < ops.PAPER_SVD_THRESHOLD, torch.zeros_like(s), s)
    products = (s_t[:, None] * s_t[None, :]).flatten()
    perm = torch.argsort(products, descending=True, stable=stable)
    return (u.double(), vh.T.double()), perm, products.double(), int((s_t == 0).sum())


def forward(factors, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``U (weights * (V^T x V)) U^T`` per channel, in float64."""
    u, v = factors
    return u @ (weights * (v.T @ x @ v)) @ u.T


# label -> (dtype, stable sort, float32 order only, svd)
VARIANTS = {
    "float32 sort order only (float64 factors and values)": (torch.float32, True, True, torch.linalg.svd),
    "all in float32, stable sort (as the official GPU run)": (torch.float32, True, False, torch.linalg.svd),
    "float64, SVD by scipy's gesvd instead of PyTorch's gesdd": (torch.float64, True, False, scipy_svd),
    "float64, PyTorch's default CPU sort (unstable)": (torch.float64, False, False, torch.linalg.svd),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=768)
    n = parser.parse_args().size
    torch.set_num_threads(1)
    ops = import_pack()
    from flowdps.operators.paper import tiled_channel_scales
    from flowdps.operators.testing import smooth_image

    white = torch.randn(1, CHANNELS, n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    inputs = {"smooth RGB": smooth_image(CHANNELS, n, n), "1/f noise": pink_noise(n, 0), "white noise": white}
    factors64, perm64, products64, zeros64 = construction(ops, n, torch.float64, stable=True)
    reference = tiled_channel_scales(products64[perm64], perm64, CHANNELS, n, n)
    outputs = {name: forward(factors64, reference, x) for name, x in inputs.items()}
    rows = []
    for label, (dtype, stable, order_only, svd) in VARIANTS.items():
        factors, perm, products, zeros = construction(ops, n, dtype, stable, svd)
        if order_only:
            factors, products = factors64, products64
        weights = tiled_channel_scales(products[perm], perm, CHANNELS, n, n)
        changes = " | ".join(f"{rel(forward(factors, weights, x), outputs[name]):.1e}"
                             for name, x in inputs.items())
        rows.append(f"| {label} | {zeros} | {int((perm != perm64).sum())} | {changes} |")
    separable = products64.view(1, n, n)
    old = ", ".join(f"{k} {rel(outputs[k], forward(factors64, separable, x)):.4f}" for k, x in inputs.items())
    lines = [
        "# Paper-compatible Gaussian blur: how well the official operator is pinned down",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, torch {torch.__version__}; "
        f"{n} x {n} px, {CHANNELS} channels, {n * n} sorted positions. Reference: the pack's construction "
        f"(float64, stable descending sort; {zeros64} of {n} 1-D singular values truncated). Output change: "
        "relative L2 difference of the forward against the reference; inputs: smooth RGB = "
        "`operators.testing.smooth_image`, 1/f and white noise with seed 0.",
        "",
        "| construction | truncated 1-D values | sorted positions that differ | "
        + " | ".join(f"output change, {k}" for k in inputs) + " |",
        "|---|---|---|" + "---|" * len(inputs),
        *rows,
        "",
        f"Relative L2 difference of the reference against the truncated separable blur: {old}.",
    ]
    write_result("paper_blur_ordering", lines)


if __name__ == "__main__":
    main()
