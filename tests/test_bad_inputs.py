"""The catalogue of bad and awkward inputs (``tests/data/bad_inputs.json``) run through real ComfyUI.

Each entry builds a small graph around one of our nodes (``kind``), makes one input bad or awkward, and
states the outcome a user must get:

* ``validation``: ComfyUI refuses the prompt before running it (a widget out of its declared range, a
  missing input), with a message naming the input;
* ``error``: the node fails with a message that names the value and the rule (every ``message`` pattern must
  match), and when ``before_sampling`` is true no sampling step ran before it (progress hook silent);
* ``runs``: a documented automatic fix or a legitimate edge case: the graph succeeds, the outputs have the
  stated shapes and the stated log line appears.

Optional keys shape the graph: ``nodes`` adds nodes (API format, links as ``[node_id, output]``, e.g. the
two operators a composition takes), ``literals`` replaces inputs of a node with literal values (what an API
client can send where a link belongs), ``drop_inputs`` removes inputs; ``absent`` lists patterns the error
message must not contain (an internal name that the message replaced).

Test-only nodes (registered here, never shipped) make images and masks that a PNG cannot hold (NaN, Inf,
batches, one channel).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from flowdps_dev import graphs
from flowdps_dev.comfy_env import GraphValidationError

pytestmark = pytest.mark.comfy

CATALOGUE = json.loads((Path(__file__).parent / "data" / "bad_inputs.json").read_text(encoding="utf-8"))
SIZE = 32


class DevImage:
    """IMAGE (batch, height, width, channels) in [0, 1]: a smooth pattern, optionally with NaN/Inf pixels."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"height": ("INT", {"default": SIZE, "min": 1, "max": 4096}),
                             "width": ("INT", {"default": SIZE, "min": 1, "max": 4096}),
                             "channels": ("INT", {"default": 3, "min": 1, "max": 4}),
                             "batch": ("INT", {"default": 1, "min": 1, "max": 64}),
                             "fill": (["pattern", "nan", "inf", "zeros"],)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "FlowDPS tests"

    def make(self, height, width, channels, batch, fill):
        yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
        base = torch.stack([xx, yy, (xx - yy).abs(), torch.ones_like(xx)], dim=-1)[..., :channels]
        image = base[None].repeat(batch, 1, 1, 1) * 0.8 + 0.1
        if fill == "zeros":
            image = torch.zeros_like(image)
        if fill in ("nan", "inf"):
            image[:, height // 2, width // 2, 0] = float(fill)
        return (image,)


class DevMask:
    """MASK (batch, height, width): a centred box of ones (1 = to fill), all zeros or all ones."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"height": ("INT", {"default": SIZE, "min": 1, "max": 4096}),
                             "width": ("INT", {"default": SIZE, "min": 1, "max": 4096}),
                             "batch": ("INT", {"default": 1, "min": 1, "max": 64}),
                             "fill": (["box", "zeros", "ones"],)}}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "make"
    CATEGORY = "FlowDPS tests"

    def make(self, height, width, batch, fill):
        mask = torch.zeros(batch, height, width)
        if fill == "ones":
            mask += 1
        if fill == "box":
            mask[:, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1
        return (mask,)


DEV_NODES = {"FlowDPSDevTestImage": DevImage, "FlowDPSDevTestMask": DevMask}


@pytest.fixture(scope="module")
def session(comfy, tiny_families):
    import nodes

    for name, cls in DEV_NODES.items():
        nodes.NODE_CLASS_MAPPINGS.setdefault(name, cls)
    return comfy


def image_node(g: graphs.GraphBuilder, spec: dict, node_id: str) -> list:
    return g.add("FlowDPSDevTestImage", node_id, **{"height": SIZE, "width": SIZE, "channels": 3, "batch": 1,
                                                     "fill": "pattern", **spec}).out()


def loaders(g: graphs.GraphBuilder, case: dict) -> tuple[list, list, list, list]:
    """The tiny SD3 prior, or another family's tiny model (``case["model"]``, through the test-only loader),
    with ``case["vae"]`` if given."""
    prior = graphs.TINY_PRIORS["sd3"]
    if "model" in case:
        prior = graphs.TinyPrior("case", case["model"], prior.vae, graphs.TINY_MODEL_LOADER)
    return graphs.prior_loaders(g, prior, vae_name=case.get("vae"))


SAMPLER_DEFAULTS = {
    "FlowDPSSampler": {"dc_steps": 1, "step_size": 15.0, "step_size_end": -1.0, "residual": "auto", "norm": "paper",
                       "sigma_y": 0.015},
    "FlowChefSampler": {"step_size": 15.0, "residual": "auto", "norm": "paper", "sigma_y": 0.015},
    "AFDPSSampler": {"particles": 2, "variant": "sde", "eta": 1.0, "kappa": 1.0, "ess_threshold": 0.5,
                     "chunk_size": 1, "sigma_y": 0.015, "output": "best"},
}
RESTORE_DEFAULTS = {
    "FlowDPSRestore": {"seed": 0, "steps": 1, "cfg": 2.0, "shift": 4.0, "method": "flowdps", "dc_steps": 1,
                       "step_size": 15.0, "step_size_end": -1.0, "residual": "auto", "norm": "paper",
                       "sigma_y": 0.015},
    "AFDPSRestore": {"particles": 2, "steps": 1, "cfg": 2.0, "shift": 4.0, "seed": 0, "eta": 1.0, "kappa": 1.0,
                     "ess_threshold": 0.5, "chunk_size": 1, "sigma_y": 0.015},
}


def build(case: dict) -> dict:
    """The API prompt of a catalogue entry; the node under test has id ``target``."""
    g = graphs.GraphBuilder()
    kind = case["kind"]
    image = image_node(g, case.get("image", {}), "image")
    for node_id, node in case.get("nodes", {}).items():
        g.add(node["class_type"], node_id, **node["inputs"])
    op_inputs = dict(case.get("operator_inputs", {}))
    if "mask" in case:
        op_inputs["mask"] = g.add("FlowDPSDevTestMask", "mask", **{"height": SIZE, "width": SIZE, "batch": 1,
                                                                   "fill": "box", **case["mask"]}).out()
    if "kernel" in case:
        op_inputs["kernel_image"] = image_node(g, case["kernel"], "kernel")
    op = g.add(case.get("operator", "FlowDPSOperatorSRBicubic"), "op",
               **({"factor": 2} if "operator" not in case else {}), **op_inputs).out()
    inputs = dict(case.get("inputs", {}))
    if kind == "simulate":
        g.add("FlowDPSSimulateMeasurement", "target", image=image, operator=op,
              **{"sigma_y": 0.01, "seed": 0, **inputs})
    elif kind == "pinv":
        g.add("FlowDPSPseudoInverse", "target", measurement=image, operator=op, **{"max_iterations": 5, **inputs})
    elif kind in RESTORE_DEFAULTS:
        model, vae, pos, neg = loaders(g, case)
        g.add(kind, "target", model=model, positive=pos, negative=neg, vae=vae, measurement=image, operator=op,
              **{**RESTORE_DEFAULTS[kind], **inputs})
    elif kind in SAMPLER_DEFAULTS:
        model, vae, pos, neg = loaders(g, case)
        if "model" not in case:  # (ModelSamplingSD3 would make any model CONST: the user's explicit choice)
            model = g.add("ModelSamplingSD3", "shift", model=model, shift=4.0).out()
        guider = g.add("CFGGuider", "guider", model=model, positive=pos, negative=neg, cfg=2.0).out()
        sampler = g.add(kind, "target", vae=vae, operator=op, measurement=image,
                        **{**SAMPLER_DEFAULTS[kind], **inputs}).out()
        sigmas = g.add("BasicScheduler", "sigmas", model=model, scheduler="simple", steps=1, denoise=1.0).out()
        noise = g.add("RandomNoise", "noise", noise_seed=0).out()
        latent = g.add("EmptySD3LatentImage", "latent", **{"width": SIZE, "height": SIZE, "batch_size": 1,
                                                           **case.get("latent", {})}).out()
        out = g.add("SamplerCustomAdvanced", "custom", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                    latent_image=latent).out()
        g.add("VAEDecode", "decode", samples=out, vae=vae)
    else:
        raise ValueError(f"unknown kind {kind!r} in case {case['id']}")
    g.add("PreviewImage", "preview", images=["decode" if kind in SAMPLER_DEFAULTS else "target", 0])
    prompt = g.build()
    for node_id, names in case.get("drop_inputs", {}).items():
        for name in names:
            del prompt[node_id]["inputs"][name]
    for node_id, values in case.get("literals", {}).items():
        prompt[node_id]["inputs"].update(values)
    return prompt


def test_the_catalogue_is_large_and_well_formed():
    ids = [case["id"] for case in CATALOGUE]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 30
    for case in CATALOGUE:
        assert case["expect"] in ("validation", "error", "runs"), case["id"]
        assert case["why"], case["id"]
        if case["expect"] != "runs":
            assert case["message"], case["id"]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c["id"] for c in CATALOGUE])
def test_catalogue_entry(session, progress, caplog, case):
    prompt = build(case)
    if case["expect"] == "validation":
        with pytest.raises(GraphValidationError) as info:
            session.run(prompt, fresh=True)
        for pattern in case["message"]:
            assert re.search(pattern, str(info.value)), (pattern, str(info.value))
        return
    probe = progress()
    with caplog.at_level(logging.INFO):
        result = session.run(prompt, fresh=True)
    if case["expect"] == "error":
        assert not result.success, f"{case['id']}: expected an error, the graph succeeded"
        assert result.error.node_id == case.get("node", "target"), str(result.error)
        for pattern in case["message"]:
            assert re.search(pattern, result.error.message), (pattern, result.error.message)
        for pattern in case.get("absent", []):
            assert not re.search(pattern, result.error.message), (pattern, result.error.message)
        if case.get("before_sampling"):
            assert probe.values == [], f"{case['id']}: {len(probe.values)} sampling steps ran before the error"
        return
    assert result.success, f"{case['id']}: {result.error}\n{result.error.traceback if result.error else ''}"
    for node_id, index, shape in case.get("shapes", []):
        assert list(result.output(node_id, index).shape) == shape, (node_id, index)
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for pattern in case.get("log", []):
        assert re.search(pattern, logs), (pattern, logs[-2000:])
