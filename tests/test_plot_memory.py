"""benchmarks/plot_memory.py: the SVG of peak memory and time per megapixel against image size."""

from __future__ import annotations

import importlib.util
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plot_memory.py"
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def plot():
    spec = importlib.util.spec_from_file_location("plot_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def record(size, mode, peak, seconds):
    return {"size": size, "mode": mode, "peak_mib": peak, "time_s": seconds, "device": "cpu"}


DECODER = [record(256, "full", 1647, 25.8), record(256, "checkpoint", 729, 23.7), record(256, "tiled", 1081, 60.0),
           record(512, "checkpoint", 2448, 163.1), record(512, "tiled", 1600, 313.0),
           record(1024, "tiled", 4356, 1171.2), {"size": 1024, "mode": "checkpoint", "error": "skipped (time budget)"}]
STEP = [record(256, "checkpoint", 900, 70.0), {**record(256, "tiled", 1200, 180.0), "cuda_peak_mib": 300.0},
        record(512, "tiled", 1900, 900.0)]
EXPECTED = {"decoder gradient, full": 1, "decoder gradient, checkpoint": 2, "decoder gradient, tiled": 3,
            "FlowDPS step, checkpoint": 1, "FlowDPS step, tiled": 2}


def write_results(tmp_path):
    (tmp_path / "decoder.json").write_text(json.dumps({"env": {}, "results": DECODER}))
    (tmp_path / "step.json").write_text(json.dumps({"env": {}, "results": STEP}))
    return tmp_path / "decoder.json", tmp_path / "step.json"


def test_the_svg_is_valid_xml_with_one_polyline_per_series_and_panel(plot, tmp_path):
    decoder, step = write_results(tmp_path)
    out = tmp_path / "plot.svg"
    plot.main(["--decoder", str(decoder), "--step", str(step), "--out", str(out)])
    root = ET.fromstring(out.read_text())
    assert root.tag == f"{SVG}svg"
    panels = {g.get("data-panel"): g for g in root.iter(f"{SVG}g")}
    assert set(panels) == {"peak_mib", "seconds_per_mpx"}
    for g in panels.values():
        lines = {p.get("data-series"): p.get("points").split() for p in g.iter(f"{SVG}polyline")}
        assert len(list(g.iter(f"{SVG}polyline"))) == len(EXPECTED)
        assert {name: len(points) for name, points in lines.items()} == EXPECTED
        assert len(list(g.iter(f"{SVG}circle"))) == sum(EXPECTED.values())
    assert len([e for e in panels["peak_mib"].iter(f"{SVG}line") if e.get("class") == "target"]) == 2
    assert not [e for e in panels["seconds_per_mpx"].iter(f"{SVG}line") if e.get("class") == "target"]


def test_axes_are_logarithmic_and_values_as_reported(plot):
    series = {s.label: s for s in plot.series_from_results("step", STEP)}
    tiled = series["FlowDPS step, tiled"]
    assert tiled.sizes == (256, 512)
    assert tiled.peak_mib == (300.0, 1900.0)          # the CUDA peak where a run has one, as the tables
    assert tiled.seconds_per_mpx == pytest.approx((180.0 / 0.065536, 900.0 / 0.262144))
    x = plot.log_axis(256, 2048, 0.0, 300.0)
    assert [x(s) for s in (256, 512, 1024, 2048)] == pytest.approx([0, 100, 200, 300])
    y = plot.log_axis(10, 1000, 50.0, 200.0, flip=True)
    assert (y(10), y(100), y(1000)) == pytest.approx((250, 150, 50))


def test_the_committed_results_plot(plot):
    series = plot.load_series(plot.RESULTS / "decoder_memory.json", plot.RESULTS / "flowdps_step_memory.json")
    ET.fromstring(plot.memory_svg(series))


def test_no_results_is_an_error(plot, tmp_path):
    with pytest.raises(ValueError, match="no results"):
        plot.memory_svg(plot.load_series(tmp_path / "missing.json", None))
