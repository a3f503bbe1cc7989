"""Every shipped workflow (``workflows/*.json``) in the real ComfyUI web frontend, in headless chromium.

ComfyUI's server runs on loopback with the pack and the tiny models (fixture ``comfy_server``); Debian's
chromium, driven by playwright-core (``flowdps_dev/browser/run_workflows.mjs``, installed by the set-up),
opens the app once; its template browser must list every workflow. For each workflow, as a user opening it
from the template browser would (fetched from the server's template route): ``app.loadGraphData`` must show no
missing-node dialog, leave no node type unknown and log no console error; the frontend's own
``app.graphToPrompt()`` gives the prompt, which must equal our converter's (the headless tests use that one);
the user's files are swapped for the tiny checkpoint and a test image (``flowdps_dev.workflow_fixtures``);
the frontend's client queues it; the run must succeed, every output node must show its images in the editor,
and ``/history`` must list images of the expected sizes. A screenshot per workflow goes to ``out/browser/``
with ``results.json`` (times and problems per workflow). New workflow files are picked up automatically.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from flowdps_dev import frontend as fe_mod
from flowdps_dev.comfy_env import PACK_FOLDER
from flowdps_dev.graphs import TINY_CHECKPOINT
from flowdps_dev.workflow_convert import ui_to_api
from flowdps_dev.workflow_fixtures import expected_images, family_of, of_type

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SD3_WORKFLOW = ROOT / "workflows" / "flowdps_sd3_superres_x4.json"
ARTEFACTS = ROOT / "out" / "browser"
VIEWPORT = (1400, 900)

pytestmark = [pytest.mark.comfy, pytest.mark.browser]


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def shipped_model_files(workflow: dict) -> set[str]:
    """The model files the workflow's loaders name in their ``properties.models`` (the missing-models dialog)."""
    return {m["name"] for n in workflow["nodes"] for m in (n.get("properties") or {}).get("models", [])}


@pytest.fixture(scope="module")
def frontend(comfy_server):
    try:
        fe_mod.check_installed()
    except fe_mod.FrontendUnavailableError as e:
        if os.environ.get("FLOWDPS_REQUIRE_COMFY") == "1":
            pytest.fail(f"the browser test is required (make test) but cannot run: {e}", pytrace=False)
        pytest.skip(str(e))
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTEFACTS.glob("*.png"):
        old.unlink()
    fe_mod.seed_user_settings(comfy_server.work_dir / "user")
    fe_mod.write_placeholder_photos(comfy_server.work_dir / "input", WORKFLOWS)
    results: dict[str, dict] = {}
    with fe_mod.Frontend(comfy_server.url, log_path=ARTEFACTS / "browser.log", viewport=VIEWPORT) as fe:
        fe.results = results
        yield fe
    (ARTEFACTS / "results.json").write_text(json.dumps({"startup": fe.startup, "workflows": results}, indent=1))


@pytest.fixture(scope="module")
def node_info(comfy_server):
    info = comfy_server.get("/object_info")
    return info.__getitem__


def api_view(prompt: dict, node_info) -> dict:
    """class_type and the declared inputs per node: the frontend also writes ``_meta`` titles and the values
    of its own display widgets (PreviewAny's ``preview``), which the server ignores."""
    view = {}
    for node_id, node in prompt.items():
        info = node_info(node["class_type"])["input"]
        declared = {*info.get("required", {}), *info.get("optional", {})}
        view[node_id] = {"class_type": node["class_type"],
                         "inputs": {k: v for k, v in node["inputs"].items() if k in declared}}
    return view


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_app_starts_with_every_pack_node_and_no_console_error(frontend, comfy_server):
    startup = frontend.startup
    assert startup["frontend_version"], startup
    assert not startup["errors"], "console errors while the app started:\n" + "\n".join(startup["errors"])
    pack_nodes = {k for k, v in comfy_server.get("/object_info").items()
                  if v["python_module"].startswith("custom_nodes.")}
    assert {"FlowDPSRestore", "AFDPSRestore", "FlowDPSPseudoInverse"} <= pack_nodes
    assert pack_nodes <= set(startup["registered_types"])


def test_the_template_browser_lists_every_workflow(frontend):
    templates = frontend.templates()
    assert sorted(templates.get(PACK_FOLDER, [])) == sorted(p.stem for p in WORKFLOWS), templates


def test_a_missing_node_type_is_caught(frontend):
    """The load check itself: a workflow with an unknown node type is reported (dialog and type)."""
    workflow = load(WORKFLOWS[0])
    broken = next(n for n in workflow["nodes"] if n["type"] == "FlowDPSPseudoInverse")
    broken["type"] = "FlowDPSNoSuchNode"
    loaded = frontend.load(workflow, "broken.json")
    assert loaded["missing_types"] == ["FlowDPSNoSuchNode"]
    assert any("FlowDPSNoSuchNode" in d for d in loaded["dialogs"]), loaded["dialogs"]


def test_a_prompt_with_node_errors_is_reported(frontend):
    """The queue check itself: the frontend's prompt with files that do not exist is refused by /prompt (or, when
    some output still validates, queued without the invalid ones); either way the node errors come back."""
    run = fe_mod.BrowserRun("node_errors", frontend.load(load(SD3_WORKFLOW), SD3_WORKFLOW.name))
    prompt = run.prompt
    for node_id in of_type(prompt, "CheckpointLoaderSimple"):
        prompt[node_id]["inputs"]["ckpt_name"] = "no_such_checkpoint.safetensors"
    for node_id in of_type(prompt, "LoadImage"):
        prompt[node_id]["inputs"]["image"] = "no_such_photo.png"
    run.queued = frontend.queue(prompt, timeout=120)
    node_errors = run.queued["node_errors"] if run.queued["queued"] else run.queued["error"]["node_errors"]
    assert set(node_errors) == set(of_type(prompt, "CheckpointLoaderSimple", "LoadImage")), node_errors
    assert any("/prompt" in p for p in run.problems()), run.problems()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_converts_and_runs_in_the_frontend(frontend, comfy_server, node_info, path):
    workflow = load(path)
    screenshot = ARTEFACTS / f"{path.stem}.png"
    run = fe_mod.run_workflow(frontend, comfy_server, path, screenshot=screenshot, template_module=PACK_FOLDER)
    frontend.results[path.stem] = {"seconds": run.seconds, "problems": run.problems(),
                                   "images": {k: v for k, v in run.image_sizes.items()},
                                   "ignored_console": run.loaded.get("ignored", []) + run.queued.get("ignored", [])}
    assert not run.problems(), f"{path.name} in the ComfyUI frontend:\n" + "\n".join(run.problems())

    # opened from the template browser's route: the served file is the shipped one
    assert run.loaded["template_workflow"] == workflow
    # the frontend's graph-to-prompt is what our converter (used by the headless tests) produces
    ours = ui_to_api(workflow, node_info)
    assert api_view(run.prompt, node_info) == api_view(ours, node_info)
    assert all(set(ours[k]["inputs"]) <= set(v["inputs"]) for k, v in run.prompt.items())
    # the only dialog a user without the model sees: the missing-models list naming the shipped files
    for dialog in run.loaded["dialogs"]:
        assert dialog.startswith("Missing Models"), dialog
        assert all(name in dialog for name in shipped_model_files(workflow)), dialog
    # what ran is the frontend's prompt with only the user's files swapped (the tiny models: for SD3.5 a tiny
    # UNET plus a VAE loader, for Flux the test-only loader) and the run made cheap
    if family_of(run.prompt) == "sd3":
        assert {run.run_prompt[k]["inputs"]["ckpt_name"]
                for k in of_type(run.run_prompt, "CheckpointLoaderSimple")} == {TINY_CHECKPOINT}
    assert not of_type(run.run_prompt, "TripleCLIPLoader", "DualCLIPLoader")
    assert set(run.prompt) <= set(run.run_prompt)

    expected = expected_images(run.run_prompt)
    assert expected
    assert {k: (len(v), v[0]) for k, v in run.image_sizes.items()} == expected
    assert all(len(set(v)) == 1 for v in run.image_sizes.values()), run.image_sizes
    # each output node shows its result in the editor, as after pressing Run
    assert sorted(run.queued["images_shown_on"]) == sorted(expected)
    assert png_size(screenshot) == VIEWPORT
