"""Every shipped workflow in the real ComfyUI web frontend (headless chromium), as a new user meets it.

ComfyUI's server runs on loopback with the pack and the tiny models (fixture ``comfy_server``); Debian's
chromium, driven by playwright-core (``flowdps_dev/browser/run_workflows.mjs``, installed by the set-up), opens
the app once with the editor's default settings (level of detail, minimap, tabs; only the first-start tutorial
is marked done). For each workflow of ``example_workflows/``, clicked through the template browser dialog
itself (sidebar button, the pack, the card; ``more/`` variants, which the browser does not list, are fetched
from the same route and loaded as a dropped file):

* the pack's cards are titled by their file names, in number order when sorted, each with its picture (no
  404: any console error fails the test);
* the pack's widgets show their plain-words labels (``locales/en/nodeDefs.json``);
* the editor opens at the workflow's stored view (``extra.ds``), at 80 % zoom or more, with text drawn (level of
  detail at its default); no two node boxes overlap (the editor's own bounds, title bar and node-source badge
  included); the note, the photo and every node with a setting before Run are on screen and not covered by the
  sidebar, menus or minimap at 1920x1080 and at 1366x768; the note's text is at least 11 px on screen;
* no missing-node dialog, no unknown node type, no console error; the frontend's own ``app.graphToPrompt()``
  equals our converter's (the headless tests use that one); with the user's files swapped for the tiny models
  and a test image it runs, every output node shows its images and ``/history`` lists images of the expected
  sizes.

Screenshots go to ``out/browser/``: ``<name> @1920x1080.png`` and ``<name> @1366x768.png`` as opened, and
``<name> run.png`` after the run; ``results.json`` holds times and findings. The node search box must find the
pack's nodes for the words artists use, and a photo whose result is not a multiple of 16 px shows the padding
message on the restore node.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from flowdps_dev import frontend as fe_mod
from flowdps_dev import make_workflows
from flowdps_dev.comfy_env import PACK_FOLDER
from flowdps_dev.graphs import TINY_CHECKPOINT, TINY_FLUX_VAE
from flowdps_dev.workflow_convert import ui_to_api
from flowdps_dev.workflow_fixtures import expected_images, family_of, of_type

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "example_workflows"
LISTED = sorted(FOLDER.glob("*.json"))
MORE = sorted((FOLDER / make_workflows.MORE).glob("*.json"))
WORKFLOWS = [*LISTED, *MORE]
FIRST = FOLDER / f"{make_workflows.FIRST_WORKFLOW}.json"
ARTEFACTS = ROOT / "out" / "browser"
SCREENS = {"1920x1080": (1920, 1080), "1366x768": (1366, 768)}
VIEWPORT = SCREENS["1920x1080"]
MIN_ZOOM = 0.8
LABELS = json.loads((ROOT / "locales" / "en" / "nodeDefs.json").read_text(encoding="utf-8"))
MIN_NOTE_PX = 11.0
DEFAULT_LOD_FONT = 8  # the editor's default "Zoom Node Level of Detail - font size threshold"
SEARCHES = {
    "upscale": {"FlowDPSRestore", "FlowDPSOperatorSRBicubic", "FlowDPSOperatorSRAvgPool"},
    "super resolution": {"FlowDPSOperatorSRBicubic"},
    "deblur": {"FlowDPSRestore", "FlowDPSOperatorGaussianBlur", "FlowDPSOperatorMotionBlur"},
    "inpaint": {"FlowDPSRestore", "FlowDPSOperatorBoxInpaintRelative", "FlowDPSOperatorMaskInpaint"},
    "restore": {"FlowDPSRestore", "AFDPSRestore"},
}

pytestmark = [pytest.mark.comfy, pytest.mark.browser]


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def label(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}" if path.parent != FOLDER else path.stem


def shipped_model_files(workflow: dict) -> set[str]:
    """The model files the workflow's loaders name in their ``properties.models`` (the missing-models dialog)."""
    return {m["name"] for n in workflow["nodes"] for m in (n.get("properties") or {}).get("models", [])}


def required_nodes(workflow: dict) -> list[str]:
    """Ids of the nodes a user reads or sets before Run (everything but results and nodes with nothing to set)."""
    return [str(n["id"]) for n in workflow["nodes"] if n["type"] not in make_workflows.OFF_SCREEN_OK]


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


def overlaps(nodes: list[dict]) -> list[str]:
    found = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                found.append(f"{a['title']} ({a['id']}) overlaps {b['title']} ({b['id']})")
    return found


def view_problems(view: dict, workflow: dict, screen: str) -> list[str]:
    """Why a user could not read the opened workflow on this screen (empty: fine)."""
    problems = []
    stored = workflow["extra"]["ds"]
    if abs(view["scale"] - stored["scale"]) > 1e-6 or any(abs(a - b) > 0.5 for a, b in
                                                           zip(view["offset"], stored["offset"], strict=True)):
        problems.append(f"the view is not the stored one: {view['scale']}, {view['offset']} vs {stored}")
    if view["scale"] < MIN_ZOOM:
        problems.append(f"zoom {view['scale']:.2f} is below {MIN_ZOOM}")
    if view["low_quality"]:
        problems.append("the editor draws no text at this zoom (level of detail)")
    if view["min_font_size_for_lod"] != DEFAULT_LOD_FONT:
        problems.append(f"the level-of-detail setting is {view['min_font_size_for_lod']}, not the default")
    problems += overlaps(view["nodes"])
    for node in view["nodes"]:  # the editor shows the pack's plain-words labels (input names stay saved as they were)
        for name, label in node["widgets"].items():
            wanted = LABELS.get(node["type"], {}).get("inputs", {}).get(name, {}).get("name")
            if wanted and label != wanted:
                problems.append(f"{node['title']} ({node['id']}): widget {name} is labelled {label!r}, not {wanted!r}")
    titles = {n["id"]: n["title"] for n in view["nodes"]}
    problems += [f"{titles[k]} ({k}) cannot be seen at {screen}: {v}" for k, v in view["covered"].items()]
    if not view["note"]:
        problems.append("no note")
    small = [f"{line['tag']} {line['px']} px: {line['text']!r}" for line in view["note"] if line["px"] < MIN_NOTE_PX]
    problems += [f"note text smaller than {MIN_NOTE_PX} px on screen: {s}" for s in small]
    if view["note_overflows"]:
        problems.append("the note's text does not fit in the note (it scrolls)")
    return problems


def test_app_starts_with_every_pack_node_and_no_console_error(frontend, comfy_server):
    startup = frontend.startup
    assert startup["frontend_version"], startup
    assert not startup["errors"], "console errors while the app started:\n" + "\n".join(startup["errors"])
    pack_nodes = {k for k, v in comfy_server.get("/object_info").items()
                  if v["python_module"].startswith("custom_nodes.")}
    assert {"FlowDPSRestore", "AFDPSRestore", "FlowDPSPseudoInverse", "FlowDPSLatentForMeasurement"} <= pack_nodes
    assert pack_nodes <= set(startup["registered_types"])


def test_the_template_browser_lists_the_workflows_and_not_the_variants(frontend):
    templates = frontend.templates()
    assert sorted(templates.get(PACK_FOLDER, [])) == sorted(p.stem for p in LISTED), templates
    assert len(LISTED) <= 9
    assert sorted(p.stem for p in LISTED)[0] == make_workflows.FIRST_WORKFLOW  # first in A-Z order


@pytest.mark.parametrize("query", list(SEARCHES))
def test_the_node_search_finds_the_pack_for_the_words_artists_use(frontend, node_info, query):
    results = frontend.search(query)
    shown = {node_id for node_id in SEARCHES[query]
             if any(row.startswith(node_info(node_id)["display_name"]) for row in results)}
    assert shown == SEARCHES[query], (query, results)


def test_a_missing_node_type_is_caught(frontend):
    """The load check itself: a workflow with an unknown node type is reported (dialog and type)."""
    workflow = load(FIRST)
    broken = next(n for n in workflow["nodes"] if n["type"] == "FlowDPSPseudoInverse")
    broken["type"] = "FlowDPSNoSuchNode"
    loaded = frontend.load(workflow, "broken.json")
    assert loaded["missing_types"] == ["FlowDPSNoSuchNode"]
    assert any("FlowDPSNoSuchNode" in d for d in loaded["dialogs"]), loaded["dialogs"]


def test_a_prompt_with_node_errors_is_reported(frontend):
    """The queue check itself: the frontend's prompt with files that do not exist is refused by /prompt (or, when
    some output still validates, queued without the invalid ones); either way the node errors come back."""
    run = fe_mod.BrowserRun("node_errors", frontend.load(load(FIRST), FIRST.name))
    prompt = run.prompt
    for node_id in of_type(prompt, "CheckpointLoaderSimple"):
        prompt[node_id]["inputs"]["ckpt_name"] = "no_such_checkpoint.safetensors"
    for node_id in of_type(prompt, "LoadImage"):
        prompt[node_id]["inputs"]["image"] = "no_such_photo.png"
    run.queued = frontend.queue(prompt, timeout=120)
    node_errors = run.queued["node_errors"] if run.queued["queued"] else run.queued["error"]["node_errors"]
    assert set(node_errors) == set(of_type(prompt, "CheckpointLoaderSimple", "LoadImage")), node_errors
    assert any("/prompt" in p for p in run.problems()), run.problems()


def test_padding_is_shown_on_the_restore_node(frontend, comfy_server):
    """A 50x50 photo upscaled 4x: the restore node tells the user, in the editor, that it padded and cropped."""
    from PIL import Image

    Image.new("RGB", (50, 50), (120, 90, 60)).save(comfy_server.work_dir / "input" / "odd_photo.png")

    def odd_photo(prompt: dict) -> None:
        for node_id in of_type(prompt, "LoadImage"):
            prompt[node_id]["inputs"]["image"] = "odd_photo.png"

    run = fe_mod.run_workflow(frontend, comfy_server, FIRST, template_module=PACK_FOLDER, prepare=odd_photo)
    assert not run.problems(), run.problems()
    restore = of_type(run.run_prompt, "FlowDPSRestore")[0]
    assert {k: v[0] for k, v in run.image_sizes.items()}[of_type(run.run_prompt, "SaveImage")[0]] == (200, 200)
    texts = run.queued["node_texts"]
    assert "the photo is 50x50 px, so the result is 200x200 px" in texts.get(restore, ""), texts


def test_a_flux_cfg_warning_is_shown_on_the_restore_node(frontend, comfy_server):
    """Flux with CFG 2 (instead of the default 0 = 1): the restore node warns, in the editor, about the cost."""
    flux = next(p for p in LISTED if "(Flux)" in p.stem)

    def cfg_two(prompt: dict) -> None:
        for node_id in of_type(prompt, "FlowDPSRestore"):
            prompt[node_id]["inputs"]["cfg"] = 2.0

    run = fe_mod.run_workflow(frontend, comfy_server, flux, template_module=PACK_FOLDER, prepare=cfg_two)
    assert not run.problems(), run.problems()
    restore = of_type(run.run_prompt, "FlowDPSRestore")[0]
    text = run.queued["node_texts"].get(restore, "")
    assert "guidance-distilled: CFG 2 runs a second" in text, run.queued["node_texts"]
    assert "\u26a0 Flux.1" in text, text  # shown as a warning


def test_a_vae_of_another_family_is_a_warning_on_the_restore_node(frontend, comfy_server):
    """The first workflow with Flux's VAE instead of SD3's: it still runs, and the restore node warns, in the
    editor, that the colours will be wrong."""

    def flux_vae(prompt: dict) -> None:
        prompt["flowdps_test_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": TINY_FLUX_VAE}}
        for node_id in of_type(prompt, "FlowDPSRestore"):
            prompt[node_id]["inputs"]["vae"] = ["flowdps_test_vae", 0]

    run = fe_mod.run_workflow(frontend, comfy_server, FIRST, template_module=PACK_FOLDER, prepare=flux_vae)
    assert not run.problems(), run.problems()
    restore = of_type(run.run_prompt, "FlowDPSRestore")[0]
    text = run.queued["node_texts"].get(restore, "")
    assert "another model family's VAE, which gives wrong colours" in text, run.queued["node_texts"]
    assert "\u26a0" in text, text


@pytest.mark.parametrize("path", WORKFLOWS, ids=[label(p) for p in WORKFLOWS])
def test_workflow_opens_readable_and_runs_in_the_frontend(frontend, comfy_server, node_info, path):
    workflow = load(path)
    listed = path.parent == FOLDER
    findings: dict[str, list[str]] = {}

    def check_view(screen: str) -> None:
        view = frontend.view(required_nodes(workflow))
        findings[screen] = view_problems(view, workflow, screen)
        frontend.screenshot(ARTEFACTS / f"{path.stem} @{screen}.png", fit=False)  # as the user sees it

    # opened in a small window (a tab of its own: the editor keeps the view's centre when a window is resized),
    # from the same route; then in the test's window, where it runs
    relative = path.relative_to(FOLDER).as_posix()
    frontend.screen(*SCREENS["1366x768"])
    try:
        small = frontend.load(None, relative, template_module=PACK_FOLDER)
        check_view("1366x768")
    finally:
        frontend.screen(*VIEWPORT)
    assert not small["errors"], small["errors"]

    screenshot = ARTEFACTS / f"{path.stem} run.png"
    run = fe_mod.run_workflow(frontend, comfy_server, path, screenshot=screenshot, template_module=PACK_FOLDER,
                              from_dialog=listed, before_run=lambda run: check_view("1920x1080"))
    frontend.results[label(path)] = {"seconds": run.seconds, "problems": run.problems(), "view": findings,
                                     "images": {k: v for k, v in run.image_sizes.items()},
                                     "cards": run.loaded.get("cards"),
                                     "ignored_console": run.loaded.get("ignored", []) + run.queued.get("ignored", [])}
    assert not run.problems(), f"{path.name} in the ComfyUI frontend:\n" + "\n".join(run.problems())
    for screen, problems in findings.items():
        assert not problems, f"{path.name} as opened at {screen}:\n" + "\n".join(problems)

    if listed:  # clicked through the dialog: the pack's cards, each titled by its file and with its picture
        assert run.loaded["opened_by"] == "sidebar button"
        assert run.loaded["dialog_closed"]
        cards = {c["name"]: c for c in run.loaded["cards"]}
        assert set(cards) == {p.stem for p in LISTED}
        for card in cards.values():
            assert card["text"][0] == card["name"], card
            assert card["picture"], card
            assert card["picture"]["loaded"], card
            assert card["picture"]["width"] == 400, card  # our picture (the placeholder is another size)
    # what opened is the shipped file
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
