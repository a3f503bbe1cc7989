"""Every shipped workflow (``example_workflows/*.json`` and ``more/``) against the real node info of ComfyUI and the
pack.

For each file: the editor structure (numbered groups, a note, a stored view), widget counts and link types as the
editor would store them for the real schemas; ``ui_to_api`` + ComfyUI's ``validate_prompt`` once the user-supplied files are
substituted; a headless 1-step run at 64 px with the tiny checkpoint; and the paper's settings on the main
sampler node. New workflow files are picked up automatically.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowdps_dev import demo
from flowdps_dev.workflow_convert import VIRTUAL_NODES, _has_control_value, _widget_specs, ui_to_api
from flowdps_dev.workflow_fixtures import (
    BOX,
    SMALL_KERNEL,
    SR_OPERATORS,
    USER_FILE_LOADERS,
    family_of,
    of_type,
    only,
    run_size,
    sr_factor,
    substituted,
    tiny_run_prompt,
)

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "example_workflows"
WORKFLOWS = [*sorted(FOLDER.glob("*.json")), *sorted((FOLDER / "more").glob("*.json"))]
CHECKPOINT = "sd3_medium_incl_clips.safetensors"
MAIN_SAMPLERS = ("FlowDPSRestore", "AFDPSRestore", "FlowDPSSampler", "AFDPSSampler", "FlowChefSampler")
IMAGE_OUTPUTS = ("FlowDPSRestore", "AFDPSRestore", "FlowDPSPseudoInverse", "VAEDecode")
# The paper's settings (FlowDPS, arXiv 2503.08136): 28 steps, CFG 2, shift 4, K = 3, step size 15.
PAPER_FLOWDPS = {"dc_steps": 3, "step_size": 15.0, "step_size_end": -1.0, "norm": "paper", "sigma_y": 0.015}
PAPER_SAMPLING = {"steps": 28, "cfg": 2.0, "shift": 4.0}
RESIDUALS = {"auto", "measurement"}  # 'measurement' is the paper-compatible choice for motion blur

pytestmark = pytest.mark.comfy


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def node_info(comfy, tiny_families):  # tiny_families registers the test-only loader of the tiny Flux
    return demo.node_info_of(comfy)


def output_types(comfy, node_info, class_type: str) -> list[str]:
    info = node_info(class_type)
    if info.get("output") is not None:
        return list(info["output"])
    return list(comfy.node_classes[class_type].RETURN_TYPES)


def link_input_types(node_info, class_type: str) -> dict[str, str]:
    """Non-widget (linked) inputs of a node: name -> type."""
    info = node_info(class_type)
    widgets = {name for name, _ in _widget_specs(info)}
    types = {}
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            if name not in widgets:
                types[name] = spec[0] if isinstance(spec, list | tuple) else spec
    return types


def expected_widget_count(node_info, class_type: str) -> int:
    """len(widgets_values) as the editor stores it: one per widget, plus the control value after a seed
    (control_after_generate, or an INT named seed / noise_seed: the frontend's legacy rule), plus LoadImage's
    upload button."""
    info = node_info(class_type)
    specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    count = 0
    for name, opts in _widget_specs(info):
        spec = specs[name]
        count += 1 + _has_control_value(name, opts, spec[0] if isinstance(spec, list | tuple) else spec)
    return count + (class_type == "LoadImage")


@pytest.fixture(params=WORKFLOWS, ids=[p.relative_to(FOLDER).with_suffix("").as_posix() for p in WORKFLOWS])
def workflow(request) -> dict:
    return load(request.param)


def test_every_workflow_is_listed_in_the_readme():
    readme = (FOLDER / "README.md").read_text(encoding="utf-8")
    assert len(WORKFLOWS) >= 6
    for path in WORKFLOWS:
        assert f"`{path.relative_to(FOLDER).as_posix()}`" in readme, path.name


def test_the_template_folder_holds_one_workflow_per_task_each_with_its_picture():
    listed = sorted(FOLDER.glob("*.json"))
    assert 6 <= len(listed) <= 9
    assert [p.stem.split(" - ")[0] for p in listed] == [str(i) for i in range(1, len(listed) + 1)]
    for path in listed:
        picture = path.with_suffix(".jpg")
        assert picture.is_file(), picture.name
        assert picture.stat().st_size < 100_000, picture.name
        with Image.open(picture) as im:
            assert im.format == "JPEG"
            assert im.size == (400, 400)
    assert not list(FOLDER.glob("*/*.jpg")), "pictures only for the listed workflows"


def test_structure_widgets_and_links_match_the_real_node_info(comfy, node_info, workflow):
    assert workflow["version"] == 0.4
    assert {"nodes", "links", "groups", "config", "extra"} <= set(workflow)
    titles = [g["title"] for g in workflow["groups"]]
    assert [t[:3] for t in titles[:4]] == ["1  ", "2  ", "3  ", "4  "], titles  # the steps, left to right
    assert workflow["extra"]["ds"]["scale"] >= 0.8
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"])
    assert workflow["last_node_id"] >= max(nodes)
    assert workflow["last_link_id"] >= max(link[0] for link in workflow["links"])
    notes = [n for n in nodes.values() if n["type"] == "MarkdownNote"]
    assert len(notes) == 1
    assert notes[0]["widgets_values"][0].startswith("# ")
    assert all(line.startswith("#") for line in notes[0]["widgets_values"][0].splitlines() if line)
    assert sum(n["type"] == "FlowDPSPseudoInverse" for n in nodes.values()) == 1
    for node in nodes.values():
        if node["type"] in VIRTUAL_NODES:
            continue
        assert node["type"] in comfy.node_classes, node["type"]
        assert len(node["widgets_values"]) == expected_widget_count(node_info, node["type"]), node["type"]
        assert [o["type"] for o in node["outputs"]] == output_types(comfy, node_info, node["type"]), node["type"]
        inputs = link_input_types(node_info, node["type"])
        for slot in node["inputs"]:
            assert slot["type"] == inputs[slot["name"]], (node["type"], slot["name"])
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == kind
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[dst]["inputs"][dst_slot]["type"] in (kind, "*"), (link_id, kind)
    linked = {link[0] for link in workflow["links"]}
    for node in nodes.values():
        assert {i["link"] for i in node["inputs"] if i["link"] is not None} <= linked
        for out in node["outputs"]:
            assert set(out["links"] or []) <= linked


def test_main_sampler_has_the_papers_defaults(node_info, workflow):
    prompt = ui_to_api(workflow, node_info)
    main = only(prompt, *MAIN_SAMPLERS)
    inputs = prompt[main]["inputs"]
    kind = prompt[main]["class_type"]
    if kind in ("FlowDPSRestore", "FlowDPSSampler"):
        assert {k: inputs[k] for k in PAPER_FLOWDPS} == PAPER_FLOWDPS
        assert inputs["residual"] in RESIDUALS
    family = family_of(prompt)
    if kind in ("FlowDPSRestore", "AFDPSRestore"):
        expected = PAPER_SAMPLING if family == "sd3" else {**PAPER_SAMPLING, "cfg": 0.0, "shift": 0.0}
        assert {k: inputs[k] for k in PAPER_SAMPLING} == expected  # other families: 0 = the family's default
        assert inputs["seed"] == 0
        assert inputs["scheduler"] == "flowdps"            # the official grid
    if kind == "FlowDPSRestore":
        assert inputs["method"] == "flowdps"
    if kind == "AFDPSRestore":
        assert (inputs["particles"], inputs["sigma_y"]) == (8, 0.015)
    if kind.endswith("Sampler"):  # the SAMPLER route: schedule, shift and CFG live in core nodes
        assert prompt[only(prompt, "ModelSamplingSD3")]["inputs"]["shift"] == PAPER_SAMPLING["shift"]
        assert prompt[only(prompt, "CFGGuider")]["inputs"]["cfg"] == PAPER_SAMPLING["cfg"]
        sigmas = prompt[only(prompt, "FlowDPSSigmas")]["inputs"]
        assert sigmas["steps"] == 28                        # the official grid, 28 steps
        # the latent is sized from the photo and the operator, and the result cropped back: nothing by hand
        latent = prompt[only(prompt, "FlowDPSLatentForMeasurement")]["inputs"]
        assert latent["measurement"] == prompt[main]["inputs"]["measurement"]
        assert latent["operator"] == prompt[main]["inputs"]["operator"]
        assert not of_type(prompt, "EmptySD3LatentImage", "EmptyLatentImage")
        assert of_type(prompt, "FlowDPSCropToResult")
    texts = {prompt[k]["inputs"]["text"] for k in of_type(prompt, "CLIPTextEncode")}
    if family == "flux":  # guidance-distilled: FluxGuidance on the prompt, the negative is unused (CFG 1)
        assert texts == {"a high quality photo"}
        assert prompt[only(prompt, "FluxGuidance")]["inputs"]["guidance"] == 3.5
        assert prompt[only(prompt, "UNETLoader")]["inputs"]["unet_name"] == "flux1-dev.safetensors"
        assert prompt[only(prompt, "VAELoader")]["inputs"]["vae_name"] == "ae.safetensors"
        assert prompt[only(prompt, "DualCLIPLoader")]["inputs"]["type"] == "flux"
    else:
        assert texts == {"a high quality photo", ""}
        checkpoint = {"sd3": CHECKPOINT, "sd35": "sd3.5_medium.safetensors"}[family]
        assert prompt[only(prompt, "CheckpointLoaderSimple")]["inputs"] == {"ckpt_name": checkpoint}
    if of_type(prompt, "FlowDPSSimulateMeasurement"):  # starts from a clean photo
        assert {prompt[k]["inputs"]["image"] for k in of_type(prompt, "LoadImage")} == {"clean_photo.png"}
        assert prompt[only(prompt, "FlowDPSSimulateMeasurement")]["inputs"]["sigma_y"] == PAPER_FLOWDPS["sigma_y"]
    else:
        assert {prompt[k]["inputs"]["image"] for k in of_type(prompt, "LoadImage")} == {"photo.png"}
    for node_id in of_type(prompt, *SR_OPERATORS):
        assert prompt[node_id]["inputs"]["factor"] in (4, 12)


# ------------------------------------------------------------------------------------------- validation


def test_converts_and_validates_once_the_user_files_are_supplied(comfy, node_info, workflow):
    import execution

    prompt = ui_to_api(workflow, node_info)
    # As shipped, ComfyUI refuses only the files a user supplies (an output that needs neither, such as the
    # motion-blur kernel preview, still validates, so the prompt as a whole may pass).
    node_errors = asyncio.run(execution.validate_prompt("shipped", prompt, None))[3]
    assert node_errors
    assert set(node_errors) <= set(of_type(prompt, *USER_FILE_LOADERS)), node_errors  # (validation may stop early)
    prompt = substituted(comfy.input_dir, prompt)
    ok, error, _, node_errors = asyncio.run(execution.validate_prompt("substituted", prompt, None))[:4]
    assert ok, (error, node_errors)


# ------------------------------------------------------------------------------------------------- runs


def test_runs_one_step_with_the_tiny_checkpoint(comfy, node_info, workflow):
    prompt = tiny_run_prompt(comfy.input_dir, ui_to_api(workflow, node_info))
    size = run_size(prompt)
    result = comfy.run(prompt).raise_for_error()
    for node_id in of_type(prompt, *IMAGE_OUTPUTS):
        assert tuple(result.output(node_id, 0).shape) == (1, size, size, 3), prompt[node_id]["class_type"]
    for node_id in of_type(prompt, "FlowDPSSimulateMeasurement"):
        side = size // sr_factor(prompt)
        assert tuple(result.output(node_id, 0).shape) == (1, side, side, 3)
    saves = of_type(prompt, "SaveImage")
    assert saves
    for node_id in saves:
        files = result.image_files(node_id)
        assert len(files) == 1, node_id
        assert files[0].name.startswith(Path(prompt[node_id]["inputs"]["filename_prefix"]).name + "_")
        with Image.open(files[0]) as im:
            assert im.size == (size, size)
    for node_id in of_type(prompt, "AFDPSRestore"):
        assert tuple(result.output(node_id, 2).shape) == (2, size, size, 3)  # the particles
        assert tuple(result.output(node_id, 3).shape) == (1, size, size, 3)  # the uncertainty heat map
        assert result.output(node_id, 5).startswith("AFDPS: 2 particles, 1 steps")
    for node_id in of_type(prompt, "FlowDPSOperatorMotionBlur"):
        assert tuple(result.output(node_id, 1).shape) == (1, SMALL_KERNEL, SMALL_KERNEL, 3)  # the kernel
    for node_id in of_type(prompt, "FlowDPSOperatorMaskInpaint"):
        source = prompt[node_id]["inputs"]["mask"]
        assert prompt[source[0]]["class_type"] == "LoadImage"
        assert source[1] == 1  # LoadImage's MASK output
        mask = result.output(source[0], 1)
        expected = np.zeros((size, size), np.float32)
        expected[BOX] = 1
        np.testing.assert_array_equal(mask[0].numpy(), expected)
    for node_id in of_type(prompt, "FlowDPSOperatorBoxInpaint"):
        expected = np.zeros((size, size), np.float32)
        expected[BOX] = 1
        np.testing.assert_array_equal(result.output(node_id, 1)[0].numpy(), expected)  # its MASK output
    for node_id in of_type(prompt, "FlowDPSOperatorBoxInpaintRelative"):  # the middle quarter of any photo
        inputs = prompt[node_id]["inputs"]
        assert (inputs["box_left"], inputs["box_top"], inputs["box_width"], inputs["box_height"]) == (0.25,) * 2 + (0.5,) * 2
        expected = np.zeros((size, size), np.float32)
        expected[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
        np.testing.assert_array_equal(result.output(node_id, 1)[0].numpy(), expected)
