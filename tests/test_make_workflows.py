"""The workflow generator: shipped files are up to date, and spec mistakes are refused by name."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from flowdps_dev import demo, make_workflows
from flowdps_dev.make_workflows import (
    Link,
    Node,
    Workflow,
    all_workflows,
    build,
    check_layout,
    rendered,
    stale,
)
from flowdps_dev.workflow_convert import ui_to_api

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def node_info(comfy):
    return demo.node_info_of(comfy)


def test_shipped_workflows_and_their_table_are_up_to_date(node_info):
    files = rendered(node_info)
    assert stale(files) == [], "run: python -m flowdps_dev.make_workflows"
    assert len([p for p in files if p.suffix == ".json"]) >= 16


def small(*nodes: Node, links: tuple[Link, ...] = ()) -> Workflow:
    return Workflow("t", 1, nodes, links, (), task="t", sampler="s", inputs="i")


def test_widget_values_follow_the_schema_order_with_the_seed_control_value(node_info):
    restore = Node("r", "FlowDPSRestore", (0, 0), (1, 1), {"steps": 7, "method": "flowchef"})
    values = make_workflows.widget_values(restore, node_info("FlowDPSRestore"))
    prompt = ui_to_api(
        {"nodes": [{"id": 1, "type": "FlowDPSRestore", "mode": 0, "inputs": [], "widgets_values": values}], "links": []},
        node_info,
    )
    inputs = prompt["1"]["inputs"]
    assert (inputs["steps"], inputs["method"], inputs["seed"]) == (7, "flowchef", 0)
    assert values[1] == "fixed"  # the control value the editor stores after a seed


def test_an_unknown_widget_name_is_refused(node_info):
    bad = Node("r", "FlowDPSRestore", (0, 0), (1, 1), {"step": 7})
    with pytest.raises(ValueError, match=r"no widget named \['step'\]"):
        build(small(bad), node_info, "0")


def test_a_link_to_a_missing_input_or_of_the_wrong_type_is_refused(node_info):
    loader = Node("l", "CheckpointLoaderSimple", (0, 0), (1, 1), {"ckpt_name": "x"})
    save = Node("s", "SaveImage", (0, 0), (1, 1))
    with pytest.raises(ValueError, match="has no input 'image'"):
        build(small(loader, save, links=(Link("l", "VAE", "s", "image"),)), node_info, "0")
    with pytest.raises(ValueError, match="joins VAE to IMAGE"):
        build(small(loader, save, links=(Link("l", "VAE", "s", "images"),)), node_info, "0")


def test_an_unlinked_required_input_is_refused(node_info):
    save = Node("s", "SaveImage", (0, 0), (1, 1))
    with pytest.raises(ValueError, match=r"required input s\.images is not linked"):
        build(small(save), node_info, "0")


def test_links_and_execution_order_are_consistent(node_info):
    loader = Node("l", "CheckpointLoaderSimple", (0, 0), (1, 1), {"ckpt_name": "x"})
    decode = Node("d", "VAEDecode", (0, 0), (1, 1))
    empty = Node("e", "EmptySD3LatentImage", (0, 0), (1, 1))
    save = Node("s", "SaveImage", (0, 0), (1, 1))
    links = (Link("d", "IMAGE", "s", "images"), Link("e", "LATENT", "d", "samples"), Link("l", "VAE", "d", "vae"))
    data = json.loads(make_workflows.dumps(build(small(save, decode, empty, loader, links=links), node_info, "0")))
    order = {n["type"]: n["order"] for n in data["nodes"]}
    assert order["SaveImage"] > order["VAEDecode"] > max(order["EmptySD3LatentImage"], order["CheckpointLoaderSimple"])
    assert data["links"][0] == [1, 2, 0, 1, 0, "IMAGE"]  # decode (id 2) IMAGE -> save (id 1) images
    assert ui_to_api(data, node_info)["2"]["inputs"] == {"samples": ["3", 0], "vae": ["4", 2]}


def test_every_shipped_layout_is_readable():
    """No overlaps (title bar and badge included), everything to set before Run on screen at 80 % zoom."""
    assert [p for w in all_workflows() for p in check_layout(w)] == []


def test_the_layout_check_finds_overlaps_hidden_settings_and_a_low_zoom():
    base = all_workflows()[0]
    restore = next(n for n in base.nodes if n.type == "FlowDPSRestore")
    moved = replace(restore, pos=(restore.pos[0], restore.pos[1] - 40))      # its badge now covers the prompt
    nodes = tuple(moved if n is restore else n for n in base.nodes)
    assert any("overlap" in p for p in check_layout(replace(base, nodes=nodes)))
    off = tuple(replace(n, pos=(n.pos[0] + 2000, n.pos[1])) if n is restore else n for n in base.nodes)
    assert any("restore (FlowDPSRestore) is off screen at 1366x768" in p for p in check_layout(replace(base, nodes=off)))
    assert any("below 80 %" in p for p in check_layout(replace(base, view=(0.5, (0, 0)))))
