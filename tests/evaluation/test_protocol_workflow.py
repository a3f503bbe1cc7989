"""The evaluation's protocol config, ground-truth preparation and prompt rewiring (no server needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from evaluation import cli, protocol, runner, workflow
from evaluation.client import ComfyClient, ComfyClientError, normalise_url


def test_protocol_defaults_are_the_papers():
    p = protocol.Protocol()
    assert (p.size, p.sigma_y, p.seed, p.steps, p.cfg, p.shift) == (768, 0.015, 0, 28, 2.0, 4.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        protocol.Protocol(size=770)
    with pytest.raises(ValueError, match="sigma_y"):
        protocol.Protocol(sigma_y=2.0)
    assert protocol.fingerprint(p, "w") == protocol.fingerprint(protocol.Protocol(), "w")
    assert protocol.fingerprint(p, "w") != protocol.fingerprint(protocol.Protocol(steps=27), "w")


def test_resize_center_crop_keeps_the_centre(tmp_path):
    img = np.zeros((60, 180, 3), np.uint8)       # wide: black | white centre third | black
    img[:, 60:120] = 255
    Image.fromarray(img).save(tmp_path / "wide.png")
    gt = protocol.load_ground_truth(tmp_path / "wide.png", 48)
    assert gt.shape == (48, 48, 3)
    assert gt.dtype == np.uint8
    assert gt[:, 4:-4].min() == 255                # the crop is the white centre (bicubic edges aside)
    tall = Image.fromarray(np.zeros((100, 30, 3), np.uint8))
    assert protocol.resize_center_crop(tall, 32).size == (32, 32)


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        protocol.list_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        protocol.list_images(tmp_path)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "b.PNG")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.jpg")
    assert [p.name for p in protocol.list_images(tmp_path)] == ["a.jpg", "b.PNG"]
    keys = {runner.image_key(p) for p in protocol.list_images(tmp_path)}
    assert len(keys) == 2


def api_superres() -> dict:
    """The API form of "example_workflows/1 - Upscale a photo 4x (SD3).json" (as ui_to_api gives it)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3_medium_incl_clips.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "measurement.png"}},
        "5": {"class_type": "FlowDPSOperatorSRBicubic", "inputs": {"factor": 4}},
        "6": {"class_type": "FlowDPSRestore", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2], "measurement": ["4", 0],
            "operator": ["5", 0], "seed": 7, "steps": 10, "cfg": 0.0, "shift": 0.0, "method": "flowdps",
            "sigma_y": 0.05}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "FlowDPS/x"}},
        "8": {"class_type": "FlowDPSPseudoInverse", "inputs": {"measurement": ["4", 0], "operator": ["5", 0]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def test_evaluation_prompt_simulates_the_measurement_and_sets_the_protocol():
    api = api_superres()
    p = protocol.Protocol(size=64, steps=3)
    prompt, graph = workflow.evaluation_prompt(api, checkpoint="tiny.safetensors", image_name="gt.png",
                                               protocol=p, prefix="eval/k")
    assert api["6"]["inputs"]["measurement"] == ["4", 0]          # the input is not modified
    sim = prompt[workflow.SIMULATE_ID]
    assert sim["class_type"] == "FlowDPSSimulateMeasurement"
    assert sim["inputs"] == {"image": ["4", 0], "operator": ["5", 0], "sigma_y": 0.015, "seed": 0, "clip": False}
    restore = prompt["6"]["inputs"]
    assert restore["measurement"] == [workflow.SIMULATE_ID, 0]
    assert (restore["seed"], restore["steps"], restore["cfg"], restore["shift"], restore["sigma_y"]) == (
        0, 3, 2.0, 4.0, 0.015)
    assert prompt["4"]["inputs"]["image"] == "gt.png"
    assert prompt["1"]["inputs"]["ckpt_name"] == "tiny.safetensors"
    assert prompt["7"]["inputs"]["filename_prefix"] == "eval/k"
    assert "8" not in prompt
    assert "9" not in prompt
    assert (graph.task, graph.method, graph.save, graph.restore) == ("SR x4 bicubic", "FlowDPS", "7", "6")


def test_evaluation_prompt_rejects_other_shapes():
    api = api_superres()
    api["6"]["inputs"]["measurement"] = ["5", 0]
    with pytest.raises(workflow.WorkflowError, match="LoadImage"):
        workflow.evaluation_prompt(api, checkpoint="c", image_name="i", protocol=protocol.Protocol(), prefix="p")
    api = api_superres()
    del api["7"]
    with pytest.raises(workflow.WorkflowError, match="exactly one SaveImage"):
        workflow.evaluation_prompt(api, checkpoint="c", image_name="i", protocol=protocol.Protocol(), prefix="p")
    with pytest.raises(workflow.WorkflowError, match="no node type 'Foo'"):
        workflow.to_api({"nodes": [{"id": 1, "type": "Foo", "mode": 0, "inputs": [], "widgets_values": []}],
                         "links": []}, {})


def test_checkpoint_names_reads_both_combo_formats():
    old = {"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a", "b"], {}]}}}}
    new = {"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": ["COMBO", {"options": ["c"]}]}}}}
    assert workflow.checkpoint_names(old) == ["a", "b"]
    assert workflow.checkpoint_names(new) == ["c"]
    assert workflow.checkpoint_names({}) == []


def test_unreachable_server_and_bad_urls_are_named():
    assert normalise_url("127.0.0.1:8188/") == "http://127.0.0.1:8188"
    with pytest.raises(ValueError, match="not an http"):
        normalise_url("ftp://x:1")
    with pytest.raises(ComfyClientError, match=r"http://127\.0\.0\.1:1 is unreachable"):
        ComfyClient("http://127.0.0.1:1").check()


def test_cli_reports_a_missing_folder_and_an_unreachable_server(tmp_path, caplog):
    assert cli.main(["--data", str(tmp_path / "none"), "--model", "m", "--server", "http://127.0.0.1:1"]) == 2
    assert "does not exist" in caplog.text
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    assert cli.main(["--data", str(tmp_path), "--model", "m", "--server", "http://127.0.0.1:1",
                     "--out", str(tmp_path / "o")]) == 2
    assert "127.0.0.1:1 is unreachable" in caplog.text


def test_resume_reuses_only_records_with_the_same_fingerprint(tmp_path):
    runner.write_json(runner.record_path(tmp_path, "k"), {"fingerprint": "abc", "psnr": 1.0})
    assert runner.load_record(tmp_path, "k", "abc")["psnr"] == 1.0
    assert runner.load_record(tmp_path, "k", "other") is None
    assert runner.load_record(tmp_path, "missing", "abc") is None
    runner.record_path(tmp_path, "bad").write_text("{half")
    assert runner.load_record(tmp_path, "bad", "abc") is None
    assert json.loads(runner.record_path(tmp_path, "k").read_text())["fingerprint"] == "abc"


def test_reports_use_learned_metrics_only_when_available(tmp_path, monkeypatch):
    from evaluation import metrics

    records = []
    for i, key in enumerate(("a", "b")):
        folder = tmp_path / "images" / key
        folder.mkdir(parents=True)
        img = np.full((16, 16, 3), 40 * (i + 1), np.uint8)
        Image.fromarray(img).save(folder / "ground_truth.png")
        Image.fromarray(img + 10).save(folder / "restored.png")
        records.append({"key": key, "image": f"{key}.png", "index": i, "psnr": 20.0 + i, "ssim": 0.5,
                        "seconds": 2.0, "server": "s", "prompt_id": "p"})
    seen = []
    monkeypatch.setattr(metrics, "lpips_availability", lambda: metrics.Availability("LPIPS", True, "lpips here"))
    monkeypatch.setattr(metrics, "lpips_scores", lambda pairs: seen.extend(pairs) or [0.25, 0.35])
    monkeypatch.setattr(metrics, "fid_availability", lambda: metrics.Availability("FID", True, "fid here"))

    def broken_fid(restored, truth):
        raise RuntimeError("no GPU")

    monkeypatch.setattr(metrics, "fid_score", broken_fid)
    config = runner.EvalConfig(data=tmp_path / "toy", workflow=tmp_path / "w.json", checkpoint="c", out=tmp_path)
    graph = workflow.EvalGraph("6", "4", "1", "7", "SR x12 avg-pool", "FlowDPS")
    summary = runner.write_reports(config, records, graph, "fp")
    assert len(seen) == 2
    assert seen[0][0][0, 0, 0] == 50                              # (restored, truth) order
    assert seen[0][1][0, 0, 0] == 40
    assert summary["lpips"] == pytest.approx(0.30)
    assert summary["learned"]["FID"] == "skipped: RuntimeError: no GPU"
    assert summary["psnr"] == pytest.approx(20.5)
    assert "| toy, SR x12 avg-pool | FlowDPS | 20.50 | 0.500 | 0.300 | skipped | 2 | 2.0 |" in (
        tmp_path / "summary.md").read_text()
