"""Interrupting FlowDPS and AFDPS at several points (issue: hardening §3).

Points: after the first step and mid-run (through ComfyUI's progress hook, what the server's /interrupt
sets), inside a decoder gradient (the flag is raised while the private decoder copy runs, so ComfyUI's
per-layer check throws from inside it) and, for AFDPS, inside resampling. Each time the prompt ends as
interrupted, every private decoder copy is released (its module is gone and garbage-collected: memory goes
back to the baseline), and the next prompt runs normally.
"""

from __future__ import annotations

import gc
import sys
import weakref

import pytest

from flowdps_dev import graphs

pytestmark = pytest.mark.comfy

SIZE = 32
STEPS = 6


def graph(kind: str, steps: int = STEPS) -> dict:
    g = graphs.GraphBuilder()
    model, vae, pos, neg = graphs.prior_loaders(g, graphs.TINY_PRIORS["sd3"])
    image = g.add("EmptyImage", "image", width=SIZE // 2, height=SIZE // 2, batch_size=1, color=0x446688).out()
    op = g.add("FlowDPSOperatorSRBicubic", "op", factor=2).out()
    common = {"model": model, "positive": pos, "negative": neg, "vae": vae, "measurement": image, "operator": op,
              "steps": steps, "cfg": 2.0, "shift": 4.0, "seed": 0, "sigma_y": 0.015}
    if kind == "FlowDPSRestore":
        g.add(kind, "target", **common, method="flowdps", dc_steps=2, step_size=15.0, step_size_end=-1.0,
              residual="auto", norm="paper")
    else:  # resampling at every step (threshold 1), so an interrupt can land inside it
        g.add(kind, "target", **common, particles=3, eta=1.0, kappa=1.0, ess_threshold=1.0, chunk_size=1)
    g.add("PreviewImage", "preview", images=["target", 0])
    return g.build()


@pytest.fixture
def decoders(comfy, monkeypatch):
    """Records every private decoder copy; ``state["interrupt_at_call"] = n`` raises ComfyUI's interrupt flag
    just before the n-th decoder call, so the copy's own layers throw from inside the gradient pass."""
    import comfy.model_management as mm

    state = {"interrupt_at_call": None, "calls": 0, "refs": [], "instances": []}
    package = comfy.node_classes["FlowDPSRestore"].__module__.rsplit(".", 1)[0]
    bridge = sys.modules[f"{package}.bridge"]  # every sampler makes its decoder copy there

    class Recording(bridge.GradDecoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            state["instances"].append(self)
            state["refs"].append(weakref.ref(self.module))

        def __call__(self, z):
            state["calls"] += 1
            if state["calls"] == state["interrupt_at_call"]:
                mm.interrupt_current_processing(True)
            return super().__call__(z)

    monkeypatch.setattr(bridge, "GradDecoder", Recording)
    yield state
    mm.interrupt_current_processing(False)


def assert_interrupted_and_released(result, state):
    import comfy.model_management as mm

    mm.interrupt_current_processing(False)
    assert not result.success
    assert result.error.exception_type.endswith("InterruptProcessingException"), str(result.error)
    assert state["instances"], "no decoder copy was made"
    assert all(d.module is None for d in state["instances"])
    gc.collect()
    assert all(ref() is None for ref in state["refs"]), "a private decoder copy is still alive"


@pytest.mark.parametrize("kind", ["FlowDPSRestore", "AFDPSRestore"])
@pytest.mark.parametrize("point", ["first_step", "mid_run", "decoder_gradient"])
def test_interrupt_releases_the_decoder_and_the_next_prompt_runs(comfy, progress, decoders, kind, point):
    if point == "decoder_gradient":
        decoders["interrupt_at_call"] = 3
        probe = progress()
    else:
        probe = progress(interrupt_at=1 if point == "first_step" else STEPS // 2)
    result = comfy.run(graph(kind), fresh=True)
    assert_interrupted_and_released(result, decoders)
    done = [v for v, total in probe.values if total == STEPS]
    assert max(done, default=0) < STEPS, "the run was not stopped early"
    decoders["interrupt_at_call"] = None
    progress()                                              # a hook that does not interrupt
    again = comfy.run(graph(kind, steps=2), fresh=True)
    assert again.success, again.error
    assert tuple(again.output("target", 0).shape) == (1, SIZE, SIZE, 3)


def test_interrupt_during_afdps_resampling(comfy, progress, decoders, monkeypatch):
    import comfy.model_management as mm

    module = comfy.pack_module("samplers.afdps")
    original, calls = module.resample, []

    def interrupting_resample(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            mm.interrupt_current_processing(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "resample", interrupting_resample)
    result = comfy.run(graph("AFDPSRestore"), fresh=True)
    assert len(calls) >= 2
    assert_interrupted_and_released(result, decoders)
    monkeypatch.setattr(module, "resample", original)
    again = comfy.run(graph("AFDPSRestore", steps=2), fresh=True)
    assert again.success, again.error
