"""NODES.md is generated from the node schemas and must be current; every node is documented."""

from __future__ import annotations

import pytest

from flowdps_dev import nodes_doc

pytestmark = pytest.mark.comfy


def test_nodes_md_is_current(comfy):
    expected = nodes_doc.generate(comfy)
    assert nodes_doc.NODES_MD.read_text(encoding="utf-8") == expected, (
        "NODES.md is stale: run `source .cache/env.sh && .venv/bin/python -m flowdps_dev.nodes_doc`")


def test_nodes_md_documents_every_node_input_and_output(comfy):
    text = nodes_doc.NODES_MD.read_text(encoding="utf-8")
    for node_id in comfy.pack_node_ids():
        info = comfy.node_classes[node_id].GET_NODE_INFO_V1()
        assert f"`{node_id}` · category" in text
        section = text.split(f"`{node_id}` · category", 1)[1].split("\n## ", 1)[0]
        for group in ("required", "optional"):
            for name, spec in info["input"].get(group, {}).items():
                assert f"| `{name}`" in section, f"{node_id}.{name} missing"
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        for name in info["output_name"]:
            assert f"| `{name}` |" in section, f"{node_id} output {name} missing"


def test_every_label_names_an_input_of_a_pack_node(comfy):
    """locales/en/nodeDefs.json relabels inputs in the editor: each entry must name a real input (a renamed or
    removed input would leave a stale label), and no two inputs of a node may share a label."""
    for node_id, names in nodes_doc.labels().items():
        assert node_id in comfy.pack_node_ids(), node_id
        info = comfy.node_classes[node_id].GET_NODE_INFO_V1()["input"]
        inputs = {*info.get("required", {}), *info.get("optional", {})}
        assert set(names) <= inputs, (node_id, set(names) - inputs)
        assert len(set(names.values())) == len(names), node_id


def test_render_reports_defaults_ranges_and_options():
    info = {"display_name": "Demo", "category": "x", "description": "d",
            "input": {"required": {"n": ["INT", {"default": 3, "min": 1, "max": 9, "tooltip": "t|u"}],
                                   "mode": [["a", "b"], {"default": "a", "tooltip": "m"}]}},
            "input_order": {"required": ["mode", "n"]}, "output": ["IMAGE"], "output_name": ["image"]}
    text = nodes_doc.render(["Demo"], lambda _: info, {"Demo": {"n": "count"}})
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows[0] == "| `mode` |  | COMBO | `'a'`; one of `a`, `b` | m |"  # editor order, not dict order
    assert rows[1] == "| `n` | count | INT | `3`; 1..9 | t\\|u |"
    assert rows[2] == "| `image` | IMAGE |  |"
