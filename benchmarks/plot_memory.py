"""Peak memory and time per megapixel against image size, as an SVG (no plotting library needed).

Run::

    .venv/bin/python benchmarks/plot_memory.py [--decoder benchmarks/results/decoder_memory.json] \\
        [--step benchmarks/results/flowdps_step_memory.json] [--out benchmarks/results/memory_vs_size.svg]

Reads the results of ``decoder_memory.py`` (one decoder gradient) and ``flowdps_step_memory.py`` (one whole
FlowDPS step) and draws two log-log panels side by side: peak MiB against the image side in pixels, with the
issue's targets as horizontal lines (8 GB for a FlowDPS step at 1024 px, 12 GB for one decoder gradient at
2048 px; decimal GB, drawn in MiB), and seconds per megapixel against the side. One line per (benchmark,
memory mode): colour = mode; solid line and filled markers = FlowDPS step, dashed and hollow = decoder
gradient. Runs that failed or were skipped are left out; a series with one size is a single marker.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("full", "checkpoint", "tiled")
COLORS = {"full": "#d62728", "checkpoint": "#1f77b4", "tiled": "#2ca02c"}
BENCHMARKS = {"decoder": ("decoder gradient", "6 4", False), "step": ("FlowDPS step", "", True)}
"""Per benchmark: label, dash pattern, filled markers (hollow ones tell single-size series apart)."""
MIB_PER_GB = 1e9 / 2**20
TARGETS = ((8 * MIB_PER_GB, "8 GB: FlowDPS step at 1024 px"), (12 * MIB_PER_GB, "12 GB: decoder gradient at 2048 px"))
SIZES = (256, 512, 1024, 2048)
PANEL_W, PANEL_H, MARGIN_L, MARGIN_T, MARGIN_B, GAP = 360, 300, 70, 40, 50, 80


@dataclass(frozen=True)
class Series:
    """One line: a benchmark ("decoder" or "step") in one memory mode, points sorted by size."""

    benchmark: str
    mode: str
    sizes: tuple[int, ...]
    peak_mib: tuple[float, ...]
    seconds_per_mpx: tuple[float, ...]

    @property
    def label(self) -> str:
        return f"{BENCHMARKS[self.benchmark][0]}, {self.mode}"


def series_from_results(benchmark: str, results: Sequence[dict]) -> list[Series]:
    """The series of one results list (``{"size", "mode", "time_s", "peak_mib"[, "cuda_peak_mib"]}`` records;
    records with ``"error"`` are skipped), one per mode present, in :data:`MODES` order."""
    out = []
    for mode in MODES:
        rows = sorted((r for r in results if r.get("mode") == mode and "error" not in r), key=lambda r: r["size"])
        if rows:
            out.append(Series(benchmark, mode, tuple(int(r["size"]) for r in rows),
                              tuple(float(r.get("cuda_peak_mib", r["peak_mib"])) for r in rows),
                              tuple(float(r["time_s"]) / (r["size"] ** 2 / 1e6) for r in rows)))
    return out


def dash_attr(dash: str) -> str:
    """The ``stroke-dasharray`` attribute of a dash pattern (empty for a solid line)."""
    return f' stroke-dasharray="{dash}"' if dash else ""


def log_axis(lo: float, hi: float, start: float, length: float, *, flip: bool = False) -> Callable[[float], float]:
    """Map ``[lo, hi]`` (positive) logarithmically to ``[start, start + length]`` (reversed with ``flip``)."""
    span = math.log(hi) - math.log(lo)

    def to_px(v: float) -> float:
        f = (math.log(v) - math.log(lo)) / span
        return start + length * ((1 - f) if flip else f)

    return to_px


def nice_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks of every decade within ``[lo, hi]``."""
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        ticks += [m * 10.0**e for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]
    return ticks


def value_range(values: Sequence[float]) -> tuple[float, float]:
    """A log-axis range around ``values`` with a 30 % margin each side."""
    return min(values) / 1.3, max(values) * 1.3


def panel(series: Sequence[Series], which: str, left: float, title: str, y_label: str,
          hlines: Sequence[tuple[float, str]] = ()) -> list[str]:
    """SVG elements of one log-log panel at x offset ``left``: ``which`` is ``"peak_mib"`` or
    ``"seconds_per_mpx"``; one ``<polyline>`` per series (``data-series`` = its label) plus its markers."""
    values = [v for s in series for v in getattr(s, which)] + [v for v, _ in hlines]
    ylo, yhi = value_range(values)
    x = log_axis(SIZES[0] / 1.2, SIZES[-1] * 1.2, left, PANEL_W)
    y = log_axis(ylo, yhi, MARGIN_T, PANEL_H, flip=True)
    bottom = MARGIN_T + PANEL_H
    el = [f'<g data-panel="{which}">',
          f'<rect x="{left}" y="{MARGIN_T}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#444"/>',
          f'<text x="{left + PANEL_W / 2}" y="{MARGIN_T - 12}" text-anchor="middle" font-weight="bold">'
          f'{escape(title)}</text>',
          f'<text x="{left + PANEL_W / 2}" y="{bottom + 38}" text-anchor="middle">image side (px), log scale</text>',
          f'<text transform="translate({left - 52},{MARGIN_T + PANEL_H / 2}) rotate(-90)" text-anchor="middle">'
          f'{escape(y_label)}</text>']
    for s in SIZES:
        el.append(f'<line x1="{x(s):.1f}" y1="{MARGIN_T}" x2="{x(s):.1f}" y2="{bottom}" stroke="#ddd"/>')
        el.append(f'<text x="{x(s):.1f}" y="{bottom + 16}" text-anchor="middle">{s}</text>')
    for t in nice_ticks(ylo, yhi):
        el.append(f'<line x1="{left}" y1="{y(t):.1f}" x2="{left + PANEL_W}" y2="{y(t):.1f}" stroke="#eee"/>')
        el.append(f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for v, text in hlines:
        el.append(f'<line class="target" x1="{left}" y1="{y(v):.1f}" x2="{left + PANEL_W}" y2="{y(v):.1f}" '
                  'stroke="#000" stroke-dasharray="2 3"/>')
        el.append(f'<text x="{left + 4}" y="{y(v) - 4:.1f}" font-size="10">{escape(text)}</text>')
    for s in series:
        color, dash = COLORS[s.mode], BENCHMARKS[s.benchmark][1]
        xy = [(x(a), y(b)) for a, b in zip(s.sizes, getattr(s, which), strict=True)]
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in xy)
        el.append(f'<polyline data-series="{escape(s.label)}" points="{pts}" fill="none" stroke="{color}" '
                  f'stroke-width="2"{dash_attr(dash)}/>')
        fill = color if BENCHMARKS[s.benchmark][2] else "white"
        el += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{fill}" stroke="{color}" stroke-width="1.5"/>'
               for a, b in xy]
    el.append("</g>")
    return el


def legend(series: Sequence[Series], left: float, top: float) -> list[str]:
    """One legend row per series: a line sample in its colour and dash, and its label."""
    el = []
    for i, s in enumerate(series):
        yy = top + 16 * i
        dash = BENCHMARKS[s.benchmark][1]
        el.append(f'<line x1="{left}" y1="{yy}" x2="{left + 28}" y2="{yy}" stroke="{COLORS[s.mode]}" '
                  f'stroke-width="2"{dash_attr(dash)}/>')
        el.append(f'<text x="{left + 34}" y="{yy + 4}">{escape(s.label)}</text>')
    return el


def memory_svg(series: Sequence[Series], title: str = "Memory and time against image size") -> str:
    """The whole SVG document: peak MiB (with :data:`TARGETS`) and s / MPx panels, legend below them."""
    if not series:
        raise ValueError("no results to plot")
    right = MARGIN_L + PANEL_W + GAP
    top_legend = MARGIN_T + PANEL_H + MARGIN_B + 20
    width = right + PANEL_W + 20
    height = top_legend + 16 * len(series) + 10
    body = [
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{escape(title)}</text>',
        *panel(series, "peak_mib", MARGIN_L, "Peak extra memory", "peak MiB, log scale", TARGETS),
        *panel(series, "seconds_per_mpx", right, "Time per megapixel", "seconds per megapixel, log scale"),
        *legend(series, MARGIN_L, top_legend),
    ]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">\n'
            f'<rect width="{width}" height="{height}" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")


def load_series(decoder: Path | None, step: Path | None) -> list[Series]:
    """Series of the decoder-gradient and FlowDPS-step JSON results that exist (``{"results": [...]}``)."""
    out: list[Series] = []
    for benchmark, path in (("decoder", decoder), ("step", step)):
        if path is not None and path.exists():
            out += series_from_results(benchmark, json.loads(path.read_text())["results"])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decoder", type=Path, default=RESULTS / "decoder_memory.json")
    p.add_argument("--step", type=Path, default=RESULTS / "flowdps_step_memory.json")
    p.add_argument("--out", type=Path, default=RESULTS / "memory_vs_size.svg")
    args = p.parse_args(argv)
    args.out.write_text(memory_svg(load_series(args.decoder, args.step)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
