"""Accuracy report of every operator at a realistic size: adjoint gap, pseudo-inverse consistency, equivalences.

Run: ``.venv/bin/python benchmarks/operator_accuracy.py [--size 192 256]``; writes
``benchmarks/results/operator_accuracy.md``. Pure PyTorch (plus kornia and scipy for the equivalences, both
installed with ComfyUI's requirements). Numbers, not assertions: the tests assert the bounds.
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def import_pack():
    """The pack's ``operators`` package (the repository imported as the package ``flowdps``)."""
    sys.path.insert(0, str(ROOT))
    from flowdps_dev.pack import import_pack as _import

    _import()
    import flowdps.operators as ops

    return ops


def catalogue(ops, height: int, width: int) -> dict:
    """name -> operator, at an image of height x width (both divisible by 4)."""
    g = torch.Generator().manual_seed(0)
    return {
        "SR avg-pool x4": ops.AvgPoolSR(4),
        "SR bicubic x4": ops.BicubicSR(4),
        "Gaussian 61/3.0 reflect": ops.gaussian_blur(61, 3.0, "reflect"),
        "Gaussian 61/3.0 circular": ops.gaussian_blur(61, 3.0, "circular"),
        "Gaussian 61/3.0 zero": ops.gaussian_blur(61, 3.0, "zero"),
        "Gaussian paper-compatible 61/3.0": ops.PaperGaussianBlur(),
        "Motion 61/0.5 reflect": ops.motion_blur(61, 0.5, g),
        "Inpainting box": ops.Inpainting(ops.box_mask(height, width, height // 4, width // 4, height // 2, width // 2)),
        "Inpainting random 70 %": ops.Inpainting(ops.random_mask(height, width, 0.7, g)),
        "Identity": ops.Identity(),
        "Colour to grey": ops.Grayscale(),
        "Gaussian 9/2.0 then SR avg-pool x4": ops.AvgPoolSR(4) @ ops.gaussian_blur(9, 2.0),
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def write_result(name: str, lines: list[str]) -> None:
    """Print the report ``lines`` and write them to ``benchmarks/results/<name>.md``."""
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def measure(op, shape, dtype) -> dict:
    """Adjoint gap |<Ax, y> - <x, A^T y>| / (|Ax| |y|) and ||A A^+ A x - A x|| / ||A x|| for one operator."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=dtype)
    y = torch.randn(op.output_shape(shape), generator=g, dtype=dtype)
    ax = op.forward(x)
    gap = float((ax * y).sum() - (x * op.adjoint(y)).sum()).__abs__() / float(ax.norm() * y.norm())
    pinv_gap = rel(op.forward(op.pinv(ax)), ax)
    return {"adjoint_gap": gap, "pinv": "closed form" if op.closed_form_pinv else "CG", "AA+A": pinv_gap}


def equivalences(ops, height: int, width: int) -> dict[str, float]:
    """Max abs differences against independent implementations (float64, inputs in [-1, 1])."""
    import kornia
    import scipy.ndimage

    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, height, width, generator=g, dtype=torch.float64) * 2 - 1
    out = {"avg-pool x4 vs F.avg_pool2d": float((ops.AvgPoolSR(4).forward(x) - F.avg_pool2d(x, 4)).abs().max())}
    bic = ops.BicubicSR(4).forward(x)
    ref = F.interpolate(x, scale_factor=0.25, mode="bicubic", antialias=True)
    out["bicubic x4 vs F.interpolate(antialias), interior"] = float((bic - ref)[..., 2:-2, 2:-2].abs().max())
    out["bicubic x4 vs F.interpolate(antialias), border"] = float((bic - ref).abs().max())
    blur = ops.gaussian_blur(61, 3.0, "reflect").forward(x)
    out["Gaussian 61/3 reflect vs kornia"] = float(
        (blur - kornia.filters.gaussian_blur2d(x, (61, 61), (3.0, 3.0), border_type="reflect")).abs().max())
    for boundary, mode in (("reflect", "mirror"), ("circular", "wrap"), ("zero", "constant")):
        ours = ops.gaussian_blur(61, 3.0, boundary).forward(x)
        theirs = torch.from_numpy(scipy.ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 3.0, 3.0), mode=mode,
                                                                truncate=10.0, cval=0.0))
        out[f"Gaussian 61/3 {boundary} vs scipy.ndimage ({mode})"] = float((ours - theirs).abs().max())
    paper = ops.PaperGaussianBlur().forward(x)
    exact = ops.gaussian_blur(61, 3.0, "zero").forward(x)
    out["paper-compatible vs exact centred Gaussian (relative L2)"] = rel(paper, exact)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    args = parser.parse_args()
    height, width = args.size
    ops = import_pack()
    shape = (2, 3, height, width)
    lines = [
        "# Operator accuracy",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, torch {torch.__version__}; input "
        f"{shape} (B, C, H, W), CPU. Adjoint gap = |<Ax, y> - <x, A^T y>| / (|Ax| |y|) for random x, y; "
        "A A+ A = ||A A^+ A x - A x|| / ||A x|| (CG: tolerance 1e-6, at most 200 iterations).",
        "",
        "| operator | pinv | adjoint gap f64 | adjoint gap f32 | A A+ A f64 |",
        "|---|---|---|---|---|",
    ]
    for name, op in catalogue(ops, height, width).items():
        f64, f32 = measure(op, shape, torch.float64), measure(op, shape, torch.float32)
        lines.append(f"| {name} | {f64['pinv']} | {f64['adjoint_gap']:.1e} | {f32['adjoint_gap']:.1e} | "
                     f"{f64['AA+A']:.1e} |")
    lines += ["", "| equivalence (float64, x in [-1, 1], 1 x 3 x H x W) | max abs difference |", "|---|---|"]
    lines += [f"| {name} | {value:.1e} |" for name, value in equivalences(ops, height, width).items()]
    write_result("operator_accuracy", lines)


if __name__ == "__main__":
    main()
