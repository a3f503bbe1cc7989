"""The evaluation runner end to end: two small images through the shipped SR x4 workflow on two real ComfyUI
servers on loopback, with the tiny random-weight SD3 checkpoint (numbers meaningless: this checks the
plumbing, the files, the spreading over both servers' queues and resuming)."""

from __future__ import annotations

import csv
import io
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from evaluation import metrics, runner
from evaluation.client import ComfyClient
from evaluation.protocol import Protocol

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

TINY_CHECKPOINT = "tiny_sd3_ckpt.safetensors"


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    from flowdps_dev import comfy_env
    from flowdps_dev.server import ComfyServer

    try:
        comfy_env.resolve_comfy_path()
    except comfy_env.ComfyNotFoundError as e:
        if os.environ.get("FLOWDPS_REQUIRE_COMFY") == "1":
            pytest.fail(f"ComfyUI is required but unavailable: {e}", pytrace=False)
        pytest.skip(f"ComfyUI unavailable: {e}")
    servers = [ComfyServer(work_dir=tmp_path_factory.mktemp(f"eval_server{i}")) for i in range(2)]
    errors = []

    def start(server):
        try:
            server.start()
        except Exception as e:  # reported below, after both tried
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield servers
    finally:
        for s in servers:
            s.stop()


def make_images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("cat.png", (72, 96, 3)), ("dog.jpg", (64, 64, 3))):
        smooth = np.cumsum(rng.random(shape), axis=1)
        Image.fromarray((255 * smooth / smooth.max()).astype(np.uint8)).save(folder / name)


def test_two_servers_two_images_and_resume(two_servers, tmp_path):
    data = tmp_path / "data"
    make_images(data)
    clients = [ComfyClient(s.url) for s in two_servers]
    config = runner.EvalConfig(data=data, workflow=runner_workflow(), checkpoint=TINY_CHECKPOINT,
                               out=tmp_path / "out", protocol=Protocol(size=64, steps=1), dataset="toy")
    stream = io.StringIO()
    first = runner.run(config, clients, progress_stream=stream)
    assert first.failed == {}
    assert sorted(first.finished) == sorted(runner.image_key(p) for p in data.iterdir())
    assert first.per_server == {c.url: 1 for c in clients}          # both servers' queues got an image
    assert "2/2" in stream.getvalue()

    out = config.out
    records = {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}
    assert len(records) == 2
    assert {r["server"] for r in records.values()} == {c.url for c in clients}
    for key, r in records.items():
        truth = np.asarray(Image.open(out / "images" / key / "ground_truth.png"))
        restored = np.asarray(Image.open(out / "images" / key / "restored.png"))
        assert truth.shape == restored.shape == (64, 64, 3)
        a, b = metrics.to_unit(restored), metrics.to_unit(truth)
        assert r["psnr"] == pytest.approx(metrics.psnr(a, b))
        assert np.isfinite(r["psnr"])
        assert r["ssim"] == pytest.approx(metrics.ssim(a, b))
        assert -1 <= r["ssim"] <= 1
        assert (r["task"], r["method"]) == ("SR x4 bicubic", "FlowDPS")
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["image"] for row in rows] == ["cat.png", "dog.jpg"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 2
    assert summary["psnr"] == pytest.approx(np.mean([r["psnr"] for r in records.values()]))
    assert summary["learned"]["LPIPS"].startswith("skipped")
    table = (out / "summary.md").read_text()
    assert "| toy, SR x4 bicubic | FlowDPS |" in table
    assert "| skipped | skipped | 2 |" in table
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["protocol"]["steps"] == 1
    assert run_info["checkpoint"] == TINY_CHECKPOINT

    history = [c.history_count() for c in clients]
    second = runner.run(config, clients, progress_stream=io.StringIO())
    assert second.finished == []
    assert sorted(second.skipped) == sorted(first.finished)
    assert [c.history_count() for c in clients] == history             # nothing was queued again
    assert json.loads((out / "summary.json").read_text())["psnr"] == summary["psnr"]


def runner_workflow():
    from evaluation.cli import DEFAULT_WORKFLOW

    return DEFAULT_WORKFLOW
