"""Generate NODES.md, the reference of every node of the pack, from the node schemas ComfyUI registers.

Run ``python -m flowdps_dev.nodes_doc`` (after ``source .cache/env.sh``) to rewrite NODES.md; the test
``tests/test_nodes_doc.py`` fails when the committed file is stale. The content is what ``GET /object_info``
reports (display name, category, description, inputs in the editor's order with type, default, range, options
and tooltip, outputs with tooltips), plus each input's label in the editor (``locales/en/nodeDefs.json``, which
ComfyUI serves to the frontend), so it documents exactly what users see in the editor.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NODES_MD = ROOT / "NODES.md"
LABELS = ROOT / "locales" / "en" / "nodeDefs.json"
HEADER = """# Nodes

Every node of comfyui-flowdps with its inputs (in the editor's order), defaults and outputs. Generated from the
node schemas by `python -m flowdps_dev.nodes_doc`; do not edit by hand (`tests/test_nodes_doc.py` checks it).

**Against the official FlowDPS code.** The defaults are the official ones (28 steps on the official noise grid,
CFG 2, shift 4, K = 3, step 15, the un-squared norm, the official residual per operator with `residual = auto`,
the encoded empty prompt as negative). Deliberately different: gradients through a float32 copy of the decoder
(the official code casts to float16, which moves its output by 5e-4 to 2e-3); shift 4 applied to the model
whatever diffusers version is installed (the official assignment only works with the version it pins); the
samplers' noise drawn from a seed derived from the node seed, never the stream of ComfyUI's initial noise (the
official code uses one global stream); exact adjoints everywhere, with `auto` reproducing the official
identity "adjoint" of motion and kernel blurs as the measurement residual; PSLD's encoder takes the posterior
mean, not a sample; `Simulate measurement` clips to [0, 1] unless `clip` is off. README.md explains each.

**Labels.** The editor shows friendlier labels for some inputs (column *label*, from `locales/en/nodeDefs.json`);
saved workflows and API prompts keep the input names (column *input*).
"""


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _input_type(spec: Any) -> tuple[str, Mapping[str, Any]]:
    kind = spec[0] if isinstance(spec, list | tuple) else spec
    opts = spec[1] if isinstance(spec, list | tuple) and len(spec) > 1 and isinstance(spec[1], Mapping) else {}
    if isinstance(kind, list | tuple):  # old-style combo: the options list is the type
        return "COMBO", {**opts, "options": list(kind)}
    return str(kind), opts


def _default(kind: str, opts: Mapping[str, Any]) -> str:
    parts = []
    if "default" in opts:
        parts.append(f"`{opts['default']!r}`")
    if "min" in opts or "max" in opts:
        parts.append(f"{opts.get('min', '')}..{opts.get('max', '')}")
    if kind == "COMBO" and opts.get("options"):
        parts.append("one of " + ", ".join(f"`{o}`" for o in opts["options"]))
    return "; ".join(parts)


def labels() -> dict[str, dict[str, str]]:
    """``{node id: {input name: label in the editor}}`` from ``locales/en/nodeDefs.json``."""
    data = json.loads(LABELS.read_text(encoding="utf-8")) if LABELS.is_file() else {}
    return {node: {name: spec["name"] for name, spec in entry.get("inputs", {}).items() if "name" in spec}
            for node, entry in data.items()}


def node_section(node_id: str, info: Mapping[str, Any], label: Mapping[str, str] | None = None) -> str:
    """The markdown section of one node from its ``/object_info`` entry and its inputs' editor labels."""
    label = label or {}
    lines = [f"## {info.get('display_name') or node_id}", "",
             f"`{node_id}` · category `{info.get('category', '')}`", "", _cell(info.get("description", "")), ""]
    inputs, order = info.get("input", {}), info.get("input_order", {})
    rows = []
    for section in ("required", "optional"):
        for name in order.get(section, list(inputs.get(section, {}))):
            kind, opts = _input_type(inputs[section][name])
            optional = " (optional)" if section == "optional" else ""
            rows.append(f"| `{name}`{optional} | {_cell(label.get(name, ''))} | {kind} | "
                        f"{_cell(_default(kind, opts))} | {_cell(opts.get('tooltip', ''))} |")
    if rows:
        lines += ["| input | label | type | default | tooltip |", "|---|---|---|---|---|", *rows, ""]
    outputs = info.get("output", [])
    names = info.get("output_name", outputs)
    tips = info.get("output_tooltips") or [""] * len(outputs)
    if outputs:
        lines += ["| output | type | tooltip |", "|---|---|---|"]
        lines += [f"| `{name}` | {kind} | {_cell(tip or '')} |" for name, kind, tip in zip(names, outputs, tips,
                                                                                           strict=False)]
        lines.append("")
    return "\n".join(lines)


def render(node_ids: list[str], node_info: Callable[[str], Mapping[str, Any]],
           input_labels: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """NODES.md text: nodes grouped by category (sorted), then by node id."""
    input_labels = input_labels or {}
    infos = {node_id: node_info(node_id) for node_id in node_ids}
    ordered = sorted(infos, key=lambda k: (infos[k].get("category", ""), k))
    toc = [f"- [{infos[k].get('display_name') or k}](#{_anchor(infos[k].get('display_name') or k)}) "
           f"(`{k}`)" for k in ordered]
    return "\n".join([HEADER, *toc, "", *(node_section(k, infos[k], input_labels.get(k)) for k in ordered)]).rstrip() + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


def generate(session) -> str:
    """NODES.md for the pack as loaded in a :mod:`flowdps_dev.comfy_env` session."""
    return render(session.pack_node_ids(), lambda k: session.node_classes[k].GET_NODE_INFO_V1(), labels())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=NODES_MD)
    args = parser.parse_args(argv)
    from flowdps_dev import comfy_env

    args.out.write_text(generate(comfy_env.start()), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
