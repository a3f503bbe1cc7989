"""Every linked input of every node of the pack refuses a literal value by name.

ComfyUI's validation passes a literal value sent through the API where a link belongs (an IMAGE, a MASK, an
operator, a MODEL...) on to the node; the node must refuse it with a ValueError that names the input and what
it must be, before any work (not ``'str' object has no attribute 'ndim'`` from deep inside). The catalogue
(tests/data/bad_inputs.json) runs a few of these through ComfyUI's executor; this test covers them all.
"""

from __future__ import annotations

import re

import pytest
import torch

pytestmark = pytest.mark.comfy

LINK_TYPES = ("IMAGE", "MASK", "FLOWDPS_OPERATOR", "MODEL", "VAE", "CONDITIONING")
LITERALS = {"abc": "the text 'abc'", 3.5: "the number 3.5", None: "the value None"}
WHAT = {"IMAGE": "an IMAGE", "MASK": "a MASK", "FLOWDPS_OPERATOR": "an operator", "MODEL": "a MODEL", "VAE": "a VAE",
        "CONDITIONING": "a CONDITIONING"}


def good_values(comfy) -> dict:
    """A value of each linked socket type that passes the up-front check (the operator from our own node, so
    that it is an instance of the operator class ComfyUI loaded)."""
    identity = comfy.node_classes["FlowDPSOperatorIdentity"].execute().args[0]
    opaque = object()
    return {"IMAGE": torch.rand(1, 16, 16, 3), "MASK": torch.zeros(1, 16, 16), "FLOWDPS_OPERATOR": identity,
            "MODEL": opaque, "VAE": opaque, "CONDITIONING": opaque}


def linked_inputs(comfy) -> list[tuple[str, str]]:
    return [(node_id, spec.id) for node_id in comfy.pack_node_ids()
            for spec in comfy.node_classes[node_id].GET_SCHEMA().inputs if spec.io_type in LINK_TYPES]


def arguments(comfy, node_id: str, good: dict) -> dict:
    """Widget defaults and good linked values for every input of the node."""
    return {spec.id: good[spec.io_type] if spec.io_type in LINK_TYPES else getattr(spec, "default", None)
            for spec in comfy.node_classes[node_id].GET_SCHEMA().inputs}


def test_the_linked_inputs_are_all_found(comfy):
    found = set(linked_inputs(comfy))
    assert {("FlowDPSSimulateMeasurement", "image"), ("FlowDPSPseudoInverse", "measurement"),
            ("FlowDPSOperatorMaskInpaint", "mask"), ("FlowDPSOperatorKernelBlur", "kernel_image"),
            ("FlowDPSOperatorKernelBlur", "kernel_mask"), ("FlowDPSOperatorCompose", "first"),
            ("FlowDPSOperatorCompose", "then"), ("FlowDPSRestore", "positive"), ("AFDPSRestore", "model"),
            ("AFDPSSampler", "operator"), ("FlowDPSPSLDSampler", "vae"), ("FlowChefSampler", "measurement")} <= found
    assert len(found) >= 30


def test_every_linked_input_refuses_a_literal_by_name(comfy):
    good = good_values(comfy)
    wrong = []
    for node_id, name in linked_inputs(comfy):
        node = comfy.node_classes[node_id]
        spec = next(s for s in node.GET_SCHEMA().inputs if s.id == name)
        for literal, shown in LITERALS.items():
            if literal is None and spec.optional:
                continue  # an optional input that is not connected
            kwargs = {**arguments(comfy, node_id, good), name: literal}
            expected = f"{name} must be {WHAT[spec.io_type]} (a link from "
            try:
                node.execute(**kwargs)
            except ValueError as e:
                if re.match(re.escape(expected) + r".*, got " + re.escape(shown) + "$", str(e)):
                    continue
                wrong.append(f"{node_id}.{name} = {literal!r}: ValueError {e}")
            except Exception as e:
                wrong.append(f"{node_id}.{name} = {literal!r}: {type(e).__name__}: {e}")
            else:
                wrong.append(f"{node_id}.{name} = {literal!r}: accepted")
    assert not wrong, "\n".join(wrong)


def test_a_list_where_an_image_belongs_is_named(comfy):
    """``{"__value__": [...]}`` reaches the node as a list (ComfyUI unwraps it)."""
    node = comfy.node_classes["FlowDPSSimulateMeasurement"]
    with pytest.raises(ValueError, match=r"^image must be an IMAGE \(a link from Load Image or another image "
                                         r"node\), got a list$"):
        node.execute(image=[1, 2, 3], operator=good_values(comfy)["FLOWDPS_OPERATOR"], sigma_y=0.0, seed=0)


def test_long_text_is_shortened(comfy):
    from flowdps.nodes.inputs import describe_value

    assert describe_value("x" * 100) == f"the text '{'x' * 37}...'"
    assert describe_value(True) == "the value True"
    assert describe_value({"a": 1}) == "a dict"


def test_an_empty_image_is_named(comfy):
    from flowdps.nodes.convert import image_to_pixels

    with pytest.raises(ValueError, match=re.escape("measurement: the IMAGE is empty (shape (1, 0, 4, 3), B, H, W, C)")):
        image_to_pixels(torch.zeros(1, 0, 4, 3), name="measurement")
