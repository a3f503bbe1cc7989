"""NaN inside a run, through ComfyUI's own model wrapper (issue: hardening §4).

A test-only node wraps the MODEL with ``set_model_unet_function_wrapper`` (the mechanism other packs use) and
makes the diffusion model's output NaN at its N-th call, for one batch row or for all of them. FlowDPS must
stop with an error naming the step; AFDPS must quarantine the particle and finish while any is left, and stop
with an error naming the step when none is.
"""

from __future__ import annotations

import pytest
import torch

from flowdps_dev import graphs

pytestmark = pytest.mark.comfy

SIZE = 32


class DevNaNModel:
    """MODEL -> MODEL whose diffusion-model call number ``at_call`` returns NaN in row 0 or in every row."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "at_call": ("INT", {"default": 2, "min": 1, "max": 100}),
                             "rows": (["first", "all"],)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "FlowDPS tests"

    def patch(self, model, at_call, rows):
        calls = []

        def wrapper(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            calls.append(1)
            if len(calls) == at_call:
                out = out.clone()
                out[0 if rows == "first" else slice(None)] = float("nan")
            return out

        patched = model.clone()
        patched.set_model_unet_function_wrapper(wrapper)
        return (patched,)


@pytest.fixture(scope="module")
def session(comfy):
    import nodes

    nodes.NODE_CLASS_MAPPINGS.setdefault("FlowDPSDevNaNModel", DevNaNModel)
    return comfy


def graph(kind: str, at_call: int, rows: str, **inputs) -> dict:
    g = graphs.GraphBuilder()
    model, vae, pos, neg = graphs.prior_loaders(g, graphs.TINY_PRIORS["sd3"])
    model = g.add("FlowDPSDevNaNModel", "nan", model=model, at_call=at_call, rows=rows).out()
    image = g.add("EmptyImage", "image", width=SIZE // 2, height=SIZE // 2, batch_size=1, color=0x446688).out()
    op = g.add("FlowDPSOperatorSRBicubic", "op", factor=2).out()
    common = {"model": model, "positive": pos, "negative": neg, "vae": vae, "measurement": image, "operator": op,
              "steps": 3, "cfg": 2.0, "shift": 4.0, "seed": 0, "sigma_y": 0.015}
    if kind == "FlowDPSRestore":
        g.add(kind, "target", **common, method="flowdps", dc_steps=1, step_size=15.0, step_size_end=-1.0,
              residual="auto", norm="paper", **inputs)
    else:
        g.add(kind, "target", **common, particles=3, eta=1.0, kappa=1.0, ess_threshold=0.0, chunk_size=1, **inputs)
    g.add("PreviewImage", "preview", images=["target", 0])
    return g.build()


def test_flowdps_stops_with_an_error_naming_the_step(session):
    result = session.run(graph("FlowDPSRestore", at_call=2, rows="first"), fresh=True)
    assert not result.success
    assert result.error.node_id == "target"
    assert "step 2 of 3" in result.error.message
    assert "model's prediction has NaN or Inf values in batch item(s) [0]" in result.error.message


def test_afdps_quarantines_a_nan_particle_and_finishes(session):
    result = session.run(graph("AFDPSRestore", at_call=2, rows="first"), fresh=True)
    assert result.success, result.error
    particles = result.output("target", 2)
    assert particles.shape[0] == 3
    assert torch.isfinite(result.output("target", 0)).all()     # the best particle
    assert torch.isfinite(result.output("target", 1)).all()     # the weighted mean
    report = result.output("target", 5)
    assert "1 quarantined (NaN/Inf, weight 0)" in report, report


def test_afdps_with_every_particle_nan_stops_naming_the_step(session):
    result = session.run(graph("AFDPSRestore", at_call=2, rows="all"), fresh=True)
    assert not result.success
    assert "AFDPS step" in result.error.message
    assert "every particle has NaN or Inf values" in result.error.message
