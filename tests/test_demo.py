"""``make demo`` end to end, and the shipped workflow against the real node info of ComfyUI and the pack."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowdps_dev import demo
from flowdps_dev.graphs import TINY_CHECKPOINT
from flowdps_dev.workflow_convert import _widget_specs, ui_to_api

ROOT = Path(__file__).resolve().parents[1]
PAPER_RESTORE = {"seed": 0, "steps": 28, "cfg": 2.0, "shift": 4.0, "method": "flowdps", "dc_steps": 3,
                 "step_size": 15.0, "step_size_end": -1.0, "residual": "auto", "norm": "paper", "sigma_y": 0.015}


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB", path
        return np.asarray(im, dtype=np.uint8).copy()


def to_unit(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float64 in [0, 1]."""
    return torch.from_numpy(image).double().div(255).permute(2, 0, 1)[None]


# ----------------------------------------------------------------------------------- the shipped workflow


@pytest.fixture(scope="module")
def workflow() -> dict:
    return demo.load_workflow()


@pytest.mark.comfy
def test_workflow_widgets_and_links_match_the_real_node_info(comfy, workflow):
    assert workflow["version"] == 0.4
    assert {"nodes", "links", "groups", "config", "extra"} <= set(workflow)
    info = demo.node_info_of(comfy)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert {n["type"] for n in nodes.values()} == {
        "CheckpointLoaderSimple", "CLIPTextEncode", "LoadImage", "FlowDPSOperatorSRBicubic", "FlowDPSRestore",
        "FlowDPSPseudoInverse", "SaveImage", "PreviewImage", "MarkdownNote"}
    for node in nodes.values():
        if node["type"] == "MarkdownNote":
            note = node["widgets_values"][0]
            assert "Run" in note
            assert "upscale factor" in note
            assert "make " not in note
            continue
        specs = _widget_specs(info(node["type"]))
        expected = len(specs) + sum(bool(opts.get("control_after_generate")) for _, opts in specs)
        expected += node["type"] == "LoadImage"  # the editor stores the upload button's value ("image")
        assert len(node["widgets_values"]) == expected, node["type"]
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == kind
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[dst]["inputs"][dst_slot]["type"] == kind


@pytest.mark.comfy
def test_workflow_converts_with_the_papers_defaults(comfy, workflow):
    prompt = ui_to_api(workflow, demo.node_info_of(comfy))
    ids = demo.find_nodes(prompt)
    restore = prompt[ids.restore]["inputs"]
    assert {k: restore[k] for k in PAPER_RESTORE} == PAPER_RESTORE
    assert restore["measurement"] == [ids.measurement, 0]
    assert restore["operator"] == [ids.operator, 0]
    assert prompt[ids.loader]["inputs"] == {"ckpt_name": "sd3_medium_incl_clips.safetensors"}
    assert prompt[ids.positive]["inputs"]["text"] == "a high quality photo"
    assert prompt[ids.negative]["inputs"]["text"] == ""
    assert prompt[ids.operator]["inputs"] == {"factor": 4}
    assert prompt[ids.pseudo_inverse]["inputs"]["measurement"] == [ids.measurement, 0]
    assert prompt[ids.measurement]["inputs"] == {"image": "photo.png"}

    # As shipped, ComfyUI's validation refuses only the two files a user supplies.
    import execution

    ok, _, _, node_errors = asyncio.run(execution.validate_prompt("shipped", prompt, None))[:4]
    assert not ok
    assert set(node_errors) == {ids.loader, ids.measurement}, node_errors
    # With them (the demo's substitutions) it validates.
    Image.fromarray(np.full((16, 16, 3), (200, 120, 60), np.uint8)).save(comfy.input_dir / "demo_test_16.png")
    prompt, _ = demo.prepare_prompt(workflow, demo.node_info_of(comfy), ckpt_name=TINY_CHECKPOINT,
                                    measurement="demo_test_16.png", factor=4, seed=0, steps=28)
    ok, error, _, node_errors = asyncio.run(execution.validate_prompt("substituted", prompt, None))[:4]
    assert ok, (error, node_errors)


@pytest.mark.comfy
def test_workflow_runs_in_comfyui_with_the_tiny_checkpoint(comfy, workflow):
    """The converted workflow validates and runs (1 step, 16x16 measurement -> 64x64 restoration)."""
    Image.fromarray(np.full((16, 16, 3), (200, 120, 60), np.uint8)).save(comfy.input_dir / "demo_test_16.png")
    prompt, ids = demo.prepare_prompt(workflow, demo.node_info_of(comfy), ckpt_name=TINY_CHECKPOINT,
                                      measurement="demo_test_16.png", factor=4, seed=3, steps=1)
    assert prompt[ids.restore]["inputs"]["steps"] == 1
    result = comfy.run(prompt).raise_for_error()
    assert tuple(result.output(ids.restore, 0).shape) == (1, 64, 64, 3)
    assert tuple(result.output(ids.pseudo_inverse, 0).shape) == (1, 64, 64, 3)
    saved = result.image_files(ids.save)
    assert len(saved) == 1
    assert saved[0].name.startswith("superres_x4_")
    with Image.open(saved[0]) as im:
        assert im.size == (64, 64)


def test_cli_rejects_sizes_the_factor_or_sd3_cannot_use(capsys):
    assert demo.parse_args([]).task == "sr4"
    assert demo.parse_args(["--task", "sr12", "--size", "768"]).size == 768
    for argv in (["--task", "sr12"], ["--size", "200"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            demo.parse_args(argv)
    assert "multiple of 48" in capsys.readouterr().err


def test_checkpoint_choice(tmp_path):
    assert demo.choose_checkpoint(None, None, "sd3.safetensors") == demo.Checkpoint(TINY_CHECKPOINT, None, None, True)
    ckpt = tmp_path / "sd3_medium_incl_clips.safetensors"
    ckpt.write_bytes(b"")
    for choice in (demo.choose_checkpoint(str(ckpt), None, "x"), demo.choose_checkpoint(None, str(ckpt), "x")):
        assert choice == demo.Checkpoint(ckpt.name, None, tmp_path, False)
    by_folder = demo.choose_checkpoint(None, str(tmp_path), "sd3_medium_incl_clips.safetensors")
    assert by_folder == demo.Checkpoint("sd3_medium_incl_clips.safetensors", tmp_path, None, False)
    with pytest.raises(demo.DemoError, match="no such file"):
        demo.choose_checkpoint(str(tmp_path / "missing.safetensors"), None, "x")


# ------------------------------------------------------------------------------------------- make demo


def make_env() -> tuple[dict, list[str]]:
    """Environment and make variables that reuse this test run's venv and cache, as `make test` set them."""
    env = dict(os.environ)
    variables = [f"VENV={sys.prefix}"]
    models = env.get("FLOWDPS_MODELS")
    if models:
        cache = Path(models).resolve().parent
        variables.append(f"CACHE={cache}")
        # env.sh exports COMFYUI_PATH; for make it means "an external ComfyUI", so drop it when it is the
        # cache's own tree (set-up would otherwise switch to the external pins).
        if env.get("COMFYUI_PATH") and Path(env["COMFYUI_PATH"]).resolve() == (cache / "ComfyUI").resolve():
            del env["COMFYUI_PATH"]
    return env, variables


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, comfy):  # comfy: fail (FLOWDPS_REQUIRE_COMFY=1) or skip without ComfyUI
    out = tmp_path_factory.mktemp("demo") / "out"
    env, variables = make_env()
    steps = 2
    proc = subprocess.run(["make", "--no-print-directory", "demo", *variables,
                           f"DEMO_ARGS=--steps {steps} --seed 5 --out {out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"make demo failed:\n{proc.stdout}\n{proc.stderr}"
    return out, proc.stdout, steps


@pytest.mark.comfy
@pytest.mark.slow
def test_make_demo_writes_every_file_at_the_right_size(demo_run):
    out, stdout, _ = demo_run
    sizes = {"ground_truth.png": (256, 256), "measurement.png": (64, 64), "pseudo_inverse.png": (256, 256),
             "restored.png": (256, 256), "side_by_side.png": (4 * 256, 256 + demo.LABEL_HEIGHT)}
    for name, size in sizes.items():
        with Image.open(out / name) as im:
            assert im.size == size, name
        assert str(out.resolve() / name) in stdout
    assert (out / "timings.json").is_file()
    assert list((out / "comfyui" / "output" / "FlowDPS").glob("superres_x4_*.png"))


@pytest.mark.comfy
@pytest.mark.slow
def test_make_demo_reports_timings_psnr_and_says_the_models_are_random(demo_run):
    out, stdout, steps = demo_run
    report = json.loads((out / "timings.json").read_text())
    assert set(report) == {"stages_s", "total_s", "psnr_db", "run"}
    assert set(report["stages_s"]) == {"setup", "measurement", "model_load", "pseudo_inverse", "sampling", "saving"}
    assert all(t >= 0 for t in report["stages_s"].values())
    assert sum(report["stages_s"].values()) <= report["total_s"] + 0.01
    run = report["run"]
    assert (run["task"], run["factor"], run["size"], run["steps"], run["seed"]) == ("sr4", 4, 256, steps, 5)
    assert run["tiny_random_weights"] is True
    assert run["checkpoint"] == TINY_CHECKPOINT
    assert run["photo"] == "skimage/data/chelsea.png"
    assert "CC0" in run["photo_licence"]

    gt, pinv, restored = (png(out / f) for f in ("ground_truth.png", "pseudo_inverse.png", "restored.png"))
    assert report["psnr_db"]["pseudo_inverse"] == pytest.approx(demo.psnr(pinv, gt), abs=1e-3)
    assert report["psnr_db"]["restored"] == pytest.approx(demo.psnr(restored, gt), abs=1e-3)
    assert report["psnr_db"]["pseudo_inverse"] > 22  # the naive upscale of a real photo, not noise

    assert "tiny random-weight" in stdout
    assert "only proves the wiring" in stdout
    assert "CC0" in stdout
    for label in ("set-up", "measurement", "model load", "pseudo-inverse", "sampling", "saving", "PSNR"):
        assert label in stdout


@pytest.mark.comfy
@pytest.mark.slow
def test_make_demo_measurement_is_bicubic_sr_of_the_ground_truth_plus_stated_noise(demo_run):
    from flowdps.operators import BicubicSR, GaussianNoise

    out, _, _ = demo_run
    gt, y = png(out / "ground_truth.png"), png(out / "measurement.png")
    clean = (BicubicSR(4).forward(to_unit(gt) * 2 - 1) + 1) / 2  # [0, 1]
    measured = to_unit(y)
    inside = (clean > 0.1) & (clean < 0.9)  # away from the [0, 1] clip
    noise = (measured - clean)[inside]
    assert abs(noise.mean().item()) < 0.002
    assert noise.std().item() == pytest.approx(demo.SIGMA_Y, rel=0.10)
    # and it is exactly that noise: the seeded draw reproduces the PNG up to rounding
    expected = GaussianNoise(2 * demo.SIGMA_Y).apply(clean.float() * 2 - 1, torch.Generator().manual_seed(5))
    expected = ((expected.double() + 1) / 2 * 255).round().clamp(0, 255)
    assert (expected - measured * 255).abs().max().item() <= 1
