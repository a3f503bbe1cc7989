"""PSLD through real ComfyUI on the tiny models: the SAMPLER node in SamplerCustomAdvanced and the Restore node
with method=psld. PSLD back-propagates through the diffusion model, whose loaded weights are inference tensors:
these tests check that the private copy makes that work, leaves the loaded model untouched, is released after
the run (also when interrupted), and that errors are clear."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from flowdps_dev import graphs
from flowdps_dev.graphs import residual

pytestmark = pytest.mark.comfy

SIZE = 32  # restored image side (pixels)
PHOTO = "flowdps_psld_photo.png"
PHOTO_SEED = 4
OPERATOR = ("FlowDPSOperatorSRBicubic", {"factor": 2})


def custom_graph(*, steps: int = 4, step_size: float = 15.0, seed: int = 0, **params) -> dict:
    g = graphs.GraphBuilder()
    model, vae, pos, neg = graphs.prior_loaders(g, graphs.TINY_PRIORS["sd3"])
    op, y = graphs.simulated_measurement(g, PHOTO, OPERATOR[0], **OPERATOR[1])
    model = g.add("ModelSamplingSD3", "shift", model=model, shift=4.0).out()
    guider = g.add("CFGGuider", "guider", model=model, positive=pos, negative=neg, cfg=2.0).out()
    sampler = g.add_node_with_defaults("FlowDPSPSLDSampler", "psld", vae=vae, operator=op, measurement=y,
                                       **{"step_size": step_size, **params}).out()
    sigmas = g.add("BasicScheduler", "sigmas", model=model, scheduler="simple", steps=steps, denoise=1.0).out()
    noise = g.add("RandomNoise", "noise", noise_seed=seed).out()
    latent = g.add("EmptySD3LatentImage", "latent", width=SIZE, height=SIZE, batch_size=1).out()
    out = g.add("SamplerCustomAdvanced", "sampler", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                latent_image=latent)
    g.add("VAEDecode", "restore", samples=out.out(0), vae=vae)
    g.add("PreviewImage", "preview", images=["restore", 0])
    return g.build()


def restore_graph(*, steps: int = 4, step_size: float = 15.0, seed: int = 0, method: str = "psld") -> dict:
    return graphs.restore_graph("FlowDPSRestore", PHOTO, OPERATOR, seed=seed, steps=steps, cfg=2.0, shift=4.0,
                                method=method, step_size=step_size)


BUILDERS = {"custom": custom_graph, "restore": restore_graph}


@pytest.fixture
def recorded_copies(comfy, monkeypatch):
    """Weak references to every private copy (diffusion model, its proxy, VAE encoder) PSLD makes."""
    bridge = comfy.pack_module("nodes.bridge")   # the module ComfyUI loaded, not flowdps.nodes

    refs: list[weakref.ref] = []
    seen: list[dict] = []

    class RecordingModel(bridge.GradDiffusionModel):
        def __init__(self, base):
            super().__init__(base)
            refs.extend([weakref.ref(self.module), weakref.ref(self.proxy)])
            originals = list(base.diffusion_model.parameters())
            copies = list(self.module.parameters())
            seen.append({"original_inference": all(p.is_inference() for p in originals),
                         "copy_inference": any(p.is_inference() for p in copies),
                         "copy_requires_grad": any(p.requires_grad for p in copies),
                         "shares_sampling": self.proxy.model_sampling is base.model_sampling,
                         "nbytes": self.nbytes})

    class RecordingEncoder(bridge.GradEncoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            refs.append(weakref.ref(self.module))

    monkeypatch.setattr(bridge, "GradDiffusionModel", RecordingModel)
    monkeypatch.setattr(bridge, "GradEncoder", RecordingEncoder)
    return refs, seen


@pytest.mark.parametrize("path", list(BUILDERS))
def test_psld_lowers_the_measurement_residual(comfy, photo, recorded_copies, path):
    """Same seed and graph: PSLD (step 15) against the same sampler with the data term off (step 0, Euler)."""
    _refs, seen = recorded_copies
    ours = comfy.run(BUILDERS[path](), fresh=True).raise_for_error()
    assert len(seen) == 1                                   # one copy for the run, made at the first step
    assert seen[0]["original_inference"]                    # the loaded model is untouched ...
    assert not seen[0]["copy_inference"]                    # ... the copy is gradient-capable ...
    assert not seen[0]["copy_requires_grad"]                # ... and frozen: gradients go to the latent only
    assert seen[0]["shares_sampling"]                       # the shift of ModelSamplingSD3 / the node is kept
    plain = comfy.run(BUILDERS[path](step_size=0.0), fresh=True).raise_for_error()
    assert len(seen) == 1                                   # step 0: plain Euler, no copy made
    assert tuple(ours.output("restore").shape) == (1, SIZE, SIZE, 3)
    r_ours, r_plain = residual(ours), residual(plain)
    assert r_ours < 0.8 * r_plain, (path, r_ours, r_plain)


def test_private_copies_are_released_after_the_run(comfy, photo, recorded_copies):
    refs, _seen = recorded_copies
    result = comfy.run(custom_graph(steps=2), fresh=True).raise_for_error()
    assert len(refs) == 3
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert result.output("restore").isfinite().all()


def peak_rss_growth(run) -> float:
    """Peak resident memory (bytes) above the level before ``run()``, sampled every 0.2 ms."""
    import threading
    import time

    import psutil

    process = psutil.Process()
    gc.collect()
    base = process.memory_info().rss
    peak, done = [base], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.0002)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return peak[0] - base


def test_repeated_runs_do_not_accumulate_memory(comfy, photo, recorded_copies):
    """A leaked copy would add its size (the diffusion model and the encoder) to every later run's peak."""
    _refs, seen = recorded_copies
    seeds = iter(range(10, 20))
    # the shared executor keeps the loaded models; a new seed re-runs the sampler only
    run = lambda: comfy.run(custom_graph(steps=2, seed=next(seeds))).raise_for_error()  # noqa: E731
    run()                                                   # loads the models, warms the allocator up
    run()
    growth = [peak_rss_growth(run) for _ in range(3)]
    copy_bytes = seen[0]["nbytes"]
    assert sum(growth) < copy_bytes, (growth, copy_bytes)   # three leaks would add 3x the copy at least


def test_interrupt_stops_psld_and_releases_the_copy(comfy, photo, progress, recorded_copies):
    import comfy.model_management as mm

    refs, _ = recorded_copies
    probe = progress(interrupt_at=2)
    result = comfy.run(custom_graph(steps=50), fresh=True)
    mm.interrupt_current_processing(False)
    assert not result.success
    assert result.error.exception_type.endswith("InterruptProcessingException")
    assert max(v for v, total in probe.values if total == 50) <= 3
    del result
    gc.collect()
    assert refs
    assert all(r() is None for r in refs)
    progress()
    comfy.run(custom_graph(steps=2), fresh=True).raise_for_error()


def test_psld_is_deterministic(comfy, photo):
    a = comfy.run(custom_graph(steps=3, seed=3), fresh=True).raise_for_error().output("restore")
    b = comfy.run(custom_graph(steps=3, seed=3), fresh=True).raise_for_error().output("restore")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs_are_clear_errors(comfy, photo):
    from flowdps_dev.comfy_env import GraphValidationError

    with pytest.raises(GraphValidationError, match="gluing_weight"):
        comfy.run(custom_graph(gluing_weight=-1.0))
    prompt = custom_graph()
    prompt["latent"]["inputs"]["width"] = 48                # decodes to 48 px wide; A maps it to 24, y is 16
    result = comfy.run(prompt, fresh=True)
    assert not result.success
    assert result.error.node_id == "sampler"
    assert "measurement is 16x16" in result.error.message
    result = comfy.run(custom_graph(residual="sideways"), fresh=True)
    assert not result.success
    assert "residual must be one of" in result.error.message
