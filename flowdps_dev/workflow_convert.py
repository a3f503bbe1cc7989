"""Convert a UI-format workflow (what the editor saves; format 0.4 with a ``links`` array) to an API prompt.

ComfyUI has no Python converter (the frontend's ``graphToPrompt`` does it); this one follows the same
rules for the subset our workflows use:

* nodes in mode 2 (never) or 4 (bypass) and virtual nodes (``Note``, ``MarkdownNote``) are dropped;
  links through ``Reroute`` nodes are followed to their source;
* each linked input becomes ``[source_node_id, source_slot]``;
* widget values are matched to the node's widget inputs in declaration order (``input_order`` of the
  node's info, as ``/object_info`` reports it). After an INT with ``control_after_generate`` the editor stores
  one extra value ("fixed", "randomize", ...), which is skipped; trailing frontend-only values (LoadImage's
  upload button) are ignored. A widget converted to a linked input keeps its slot in ``widgets_values``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

VIRTUAL_NODES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
MUTED_MODES = frozenset({2, 4})

NodeInfo = Mapping[str, Any]


def _is_widget(spec: Any) -> bool:
    kind = spec[0] if isinstance(spec, list | tuple) else spec
    return isinstance(kind, list | tuple) or kind in WIDGET_TYPES


def input_specs(info: NodeInfo) -> list[tuple[str, Any]]:
    """(name, spec) of a node's required then optional inputs, in the editor's order."""
    inputs = info["input"]
    order = info.get("input_order") or {k: list(v) for k, v in inputs.items() if k != "hidden"}
    specs = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = inputs.get(section, {}).get(name)
            if spec is not None:
                specs.append((name, spec))
    return specs


def _widget_specs(info: NodeInfo) -> list[tuple[str, dict]]:
    """(name, options) of the widget inputs of a node, in the editor's order."""
    return [
        (name, spec[1] if isinstance(spec, list | tuple) and len(spec) > 1 and isinstance(spec[1], dict) else {})
        for name, spec in input_specs(info)
        if _is_widget(spec)
    ]


_NO_DEFAULT = object()


def widget_default(spec: Any, opts: Mapping[str, Any]) -> Any:
    """The value a new node's widget starts with: the schema's ``default``, else a combo's first option; a
    private sentinel (``widget_default(...) is NO_DEFAULT``) when the schema gives neither."""
    kind = spec[0] if isinstance(spec, list | tuple) else spec
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list | tuple) and kind:
        return kind[0]
    return _NO_DEFAULT


NO_DEFAULT = _NO_DEFAULT
"""What :func:`widget_default` returns for a widget without a default (e.g. a required text)."""


def widget_defaults(info: NodeInfo, *, optional: bool = False) -> dict[str, Any]:
    """``{name: default}`` of a node's required widget inputs (and its optional ones with ``optional``) that
    have a default (:func:`widget_default`), in the editor's order."""
    required = info["input"].get("required", {})
    specs = {**required, **info["input"].get("optional", {})}
    defaults = {}
    for name, opts in _widget_specs(info):
        value = widget_default(specs[name], opts)
        if value is not NO_DEFAULT and (optional or name in required):
            defaults[name] = value
    return defaults


def _has_control_value(name: str, opts: dict, spec_type: Any) -> bool:
    if opts.get("control_after_generate"):
        return True
    return spec_type == "INT" and name in ("seed", "noise_seed")


def ui_to_api(workflow: Mapping[str, Any], node_info: Callable[[str], NodeInfo]) -> dict[str, dict[str, Any]]:
    """Return the API prompt of ``workflow``; ``node_info(class_type)`` gives ``/object_info``'s entry."""
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {int(link[0]): link for link in workflow.get("links", [])}

    def source(link_id: int) -> list | None:
        link = links.get(int(link_id))
        if link is None:
            return None
        origin = nodes.get(int(link[1]))
        if origin is None or origin.get("mode") in MUTED_MODES:
            return None
        if origin["type"] == "Reroute":
            upstream = next((i.get("link") for i in origin.get("inputs", []) if i.get("link") is not None), None)
            return source(upstream) if upstream is not None else None
        return [str(link[1]), int(link[2])]

    prompt: dict[str, dict[str, Any]] = {}
    for node_id, node in sorted(nodes.items()):
        if node.get("mode") in MUTED_MODES or node["type"] in VIRTUAL_NODES:
            continue
        info = node_info(node["type"])
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            values = []
            inputs.update(node["widgets_values"])
        all_specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        pos = 0
        for name, opts in _widget_specs(info):
            if pos >= len(values):
                break
            inputs[name] = values[pos]
            pos += 1
            spec = all_specs[name]
            spec_type = spec[0] if isinstance(spec, list | tuple) else spec
            if _has_control_value(name, opts, spec_type) and pos < len(values) and isinstance(values[pos], str):
                pos += 1
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            src = source(slot["link"])
            name = slot.get("widget", {}).get("name", slot["name"]) if slot.get("widget") else slot["name"]
            if src is not None:
                inputs[name] = src
        entry: dict[str, Any] = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node_id)] = entry
    return prompt
