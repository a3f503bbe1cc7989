"""AFDPS nodes (AFDPSSampler in SamplerCustomAdvanced, AFDPSRestore) run headless through ComfyUI on the tiny
models with the real operator nodes: output shapes, resampling and its report, reproducible seeds, a lower
measurement residual than with the data term switched off, clear errors, progress and interruption."""

from __future__ import annotations

import logging
import re
import sys

import pytest
import torch

from flowdps_dev import graphs
from flowdps_dev.graphs import residual

pytestmark = pytest.mark.comfy

SIZE = 32
PARTICLES = 4
STEPS = 3
PHOTO = "afdps_task_photo.png"
PHOTO_SEED = 3
SIGMA_Y = 0.05
KAPPA = 0.2  # kappa 1 overshoots with the tiny random decoder (stiffness); any kappa keeps the weights exact
NO_DATA = 1000.0  # sigma_y so large that the likelihood (and its guidance) is negligible: the prior alone
RATIO = 0.95  # measured (seed 0, 3 steps): best 0.89, mean 0.88 on both tasks; kappa 0.1-0.3, seeds 0-2: 0.85-0.94

TASKS = {
    "sr_bicubic_x2": ("FlowDPSOperatorSRBicubic", {"factor": 2}, SIZE // 2),
    "box_inpaint": ("FlowDPSOperatorBoxInpaint", {"width": SIZE, "height": SIZE, "box_left": 8, "box_top": 8,
                                                  "box_width": 16, "box_height": 16}, SIZE),
}


def restore_graph(task: str, *, seed: int = 0, steps: int = STEPS, sigma_y: float = SIGMA_Y,
                  ess_threshold: float = 1.0, kappa: float = KAPPA, **late) -> dict:
    """``late``: the optional inputs added later (variant, kappa_clip); absent = their defaults."""
    op_class, op_inputs, _ = TASKS[task]
    return graphs.restore_graph("AFDPSRestore", PHOTO, (op_class, op_inputs), particles=PARTICLES, steps=steps,
                                cfg=1.5, shift=3.0, seed=seed, kappa=kappa, ess_threshold=ess_threshold,
                                chunk_size=2, sigma_y=sigma_y, **late)


def sampler_graph(task: str, *, seed: int = 0, sigma_y: float = SIGMA_Y, output: str = "best", batch: int = 1,
                  width: int = SIZE, kappa: float = KAPPA) -> dict:
    g = graphs.GraphBuilder()
    model, vae, pos, neg = graphs.prior_loaders(g, graphs.TINY_PRIORS["sd3"])
    model = g.add("ModelSamplingSD3", "shift", model=model, shift=3.0).out()
    op_class, op_inputs, _ = TASKS[task]
    op, y = graphs.simulated_measurement(g, PHOTO, op_class, **op_inputs)
    guider = g.add("CFGGuider", "guider", model=model, positive=pos, negative=neg, cfg=1.5).out()
    sampler = g.add_node_with_defaults("AFDPSSampler", "afdps", vae=vae, operator=op, measurement=y,
                                       particles=PARTICLES, kappa=kappa, ess_threshold=1.0, chunk_size=0,
                                       sigma_y=sigma_y, output=output).out()
    sigmas = g.add("BasicScheduler", "sigmas", model=model, scheduler="simple", steps=STEPS, denoise=1.0).out()
    noise = g.add("RandomNoise", "noise", noise_seed=seed).out()
    latent = g.add("EmptySD3LatentImage", "latent", width=width, height=SIZE, batch_size=batch).out()
    out = g.add("SamplerCustomAdvanced", "sampler", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                latent_image=latent)
    g.add("VAEDecode", "restore", samples=out.out(0), vae=vae)
    g.add("PreviewImage", "preview", images=["restore", 0])
    return g.build()


@pytest.mark.parametrize("task", list(TASKS))
def test_restore_outputs_and_residual(comfy, photo, task):
    """All outputs have the documented shapes, resampling happens (ESS threshold 1) and is reported, and the
    best and mean images fit the measurement better than the same run with the data term off."""
    ours = comfy.run(restore_graph(task), fresh=True).raise_for_error()
    best, mean, particles, heat, mask, report = (ours.output("restore", i) for i in range(6))
    assert tuple(best.shape) == tuple(mean.shape) == (1, SIZE, SIZE, 3)
    assert tuple(particles.shape) == (PARTICLES, SIZE, SIZE, 3)
    assert tuple(heat.shape) == (1, SIZE, SIZE, 3)
    assert tuple(mask.shape) == (1, SIZE, SIZE)
    for image in (best, mean, particles, heat, mask):
        assert torch.isfinite(image).all()
        assert float(image.min()) >= 0.0
        assert float(image.max()) <= 1.0
    # the map on an absolute scale: the std itself ([0, 1] image scale; <= 0.5 for values in [0, 1]), never scaled
    # to its maximum, and the heat map its colouring with full scale UNCERTAINTY_FULL_SCALE
    nodes = comfy.pack_module("nodes.afdps_nodes")
    assert float(mask.max()) <= 0.5
    torch.testing.assert_close(heat, nodes.heat_map(mask / nodes.UNCERTAINTY_FULL_SCALE), rtol=0, atol=1e-6)
    assert re.search(r"uncertainty map (NOT )?calibrated \((weighted|unweighted|none); ", report), report
    torch.testing.assert_close(best, particles[:1], rtol=0, atol=0)  # particles come best first
    n_resampled = int(re.search(r"resampled (\d+) times", report).group(1))
    assert n_resampled == STEPS - 1  # threshold 1: after every step but the last
    assert "ESS trace [4.00" in report
    assert "final weights [" in report

    plain = comfy.run(restore_graph(task, sigma_y=NO_DATA), fresh=True).raise_for_error()
    assert "resampled 0 times" in plain.output("restore", 5)  # uniform weights: the particles all count
    assert "uncertainty map calibrated (weighted; " in plain.output("restore", 5)  # healthy weights
    assert 1e-3 < float(plain.output("restore", 4).max()) <= 0.5                  # absolute, not 1 (scaled)
    assert float(plain.output("restore", 3).std()) > 1e-3
    for index, name in ((0, "best"), (1, "mean")):
        r_ours, r_plain = residual(ours, index=index), residual(plain, index=index)
        assert r_ours < RATIO * r_plain, (task, name, r_ours, r_plain)


def test_restore_same_seed_reproduces(comfy, photo):
    a = comfy.run(restore_graph("sr_bicubic_x2", seed=7), fresh=True).raise_for_error()
    b = comfy.run(restore_graph("sr_bicubic_x2", seed=7), fresh=True).raise_for_error()
    c = comfy.run(restore_graph("sr_bicubic_x2", seed=8), fresh=True).raise_for_error()
    for index in range(5):
        torch.testing.assert_close(a.output("restore", index), b.output("restore", index), rtol=0, atol=0)
    assert a.output("restore", 5) == b.output("restore", 5)
    assert (a.output("restore", 2) - c.output("restore", 2)).abs().max() > 1e-3


@pytest.mark.parametrize("task", list(TASKS))
def test_sampler_node_lowers_the_residual(comfy, photo, task):
    ours = comfy.run(sampler_graph(task), fresh=True).raise_for_error()
    plain = comfy.run(sampler_graph(task, sigma_y=NO_DATA), fresh=True).raise_for_error()
    assert tuple(ours.output("sampler")["samples"].shape) == (1, 16, SIZE // 8, SIZE // 8)
    r_ours, r_plain = residual(ours), residual(plain)
    assert r_ours < RATIO * r_plain, (task, r_ours, r_plain)


def test_sampler_node_keeps_the_batch_and_reproduces(comfy, photo):
    """Batch 2 gives 2 latents (one ensemble each); every output mode runs; a seed reproduces exactly."""
    outs = {}
    for output in ("mean", "sample"):
        result = comfy.run(sampler_graph("sr_bicubic_x2", output=output, batch=2, seed=4), fresh=True)
        outs[output] = result.raise_for_error().output("sampler")["samples"]
        assert tuple(outs[output].shape) == (2, 16, SIZE // 8, SIZE // 8)
        assert torch.isfinite(outs[output]).all()
        assert (outs[output][0] - outs[output][1]).abs().max() > 1e-3  # independent ensembles
    again = comfy.run(sampler_graph("sr_bicubic_x2", output="sample", batch=2, seed=4), fresh=True)
    torch.testing.assert_close(again.raise_for_error().output("sampler")["samples"], outs["sample"], rtol=0, atol=0)
    other = comfy.run(sampler_graph("sr_bicubic_x2", output="sample", batch=2, seed=5), fresh=True)
    assert (other.raise_for_error().output("sampler")["samples"] - outs["sample"]).abs().max() > 1e-3


def test_sampler_latent_that_does_not_fit_is_a_clear_error(comfy, photo):
    result = comfy.run(sampler_graph("sr_bicubic_x2", width=48), fresh=True)
    assert not result.success
    assert result.error.node_id == "sampler"
    assert "measurement is 16x16" in result.error.message
    assert "maps that to 24x16" in result.error.message


def test_restore_measurement_that_does_not_fit_the_operator_is_a_clear_error(comfy, photo):
    prompt = restore_graph("box_inpaint")
    prompt["op2"] = {"class_type": "FlowDPSOperatorBoxInpaint",
                     "inputs": {"width": 48, "height": 48, "box_left": 8, "box_top": 8, "box_width": 16,
                                "box_height": 16}}
    prompt["restore"]["inputs"]["operator"] = ["op2", 0]
    result = comfy.run(prompt, fresh=True)
    assert not result.success
    assert result.error.node_id == "restore"
    assert "32x32" in result.error.message
    assert "48" in result.error.message


def test_bad_widget_values_are_rejected(comfy, photo):
    result = comfy.run(sampler_graph("sr_bicubic_x2", output="all"), fresh=True)
    assert not result.success
    assert "output must be one of" in result.error.message


def test_restore_progress_previews_interruption_and_decoder_release(comfy, photo, progress, monkeypatch):
    """Progress and a preview every step; an interrupt stops at the next step; the private decoder copy is
    released after a run, also an interrupted one."""
    import sys

    import comfy.model_management as mm

    package = comfy.node_classes["AFDPSRestore"].__module__.rsplit(".", 1)[0]
    module = sys.modules[f"{package}.bridge"]  # where the samplers make their decoder copies
    decoders = []

    class RecordingDecoder(module.GradDecoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            decoders.append(self)

    monkeypatch.setattr(module, "GradDecoder", RecordingDecoder)
    probe = progress()
    comfy.run(restore_graph("sr_bicubic_x2", steps=4), fresh=True).raise_for_error()
    assert [v for v, total in probe.values if total == 4] == [1, 2, 3, 4]
    assert probe.previews >= 4
    assert len(decoders) == 1
    assert decoders[0].module is None

    probe = progress(interrupt_at=2)
    result = comfy.run(restore_graph("sr_bicubic_x2", steps=40), fresh=True)
    mm.interrupt_current_processing(False)
    assert not result.success
    assert result.error.exception_type.endswith("InterruptProcessingException")
    assert max(v for v, total in probe.values if total == 40) <= 3
    assert len(decoders) == 2
    assert decoders[1].module is None


def test_particles_do_not_reuse_the_noise_inputs_stream(comfy):
    """Particle 0 starts from the NOISE input (CPU stream of `seed`); the other particles' generator must not
    replay that stream, or particle 1 would start where particle 0 does."""
    import sys

    from comfy.sample import prepare_noise

    package = comfy.node_classes["AFDPSSampler"].__module__.rsplit(".", 1)[0]
    bridge = sys.modules[f"{package}.bridge"]
    latent = torch.zeros(1, 16, 4, 4)
    for seed in (0, 7, 2**64 - 1):
        noise = prepare_noise(latent, seed)
        for item in range(3):
            generator = bridge.sampler_generator(seed, torch.device("cpu"), stream=item)  # item's particle stream
            assert not torch.equal(torch.randn(latent.shape, generator=generator), noise)


@pytest.mark.parametrize(("late", "steps", "bound"), [
    ({"variant": "ode"}, 6, 0.95),
    ({"kappa_clip": 0.5}, STEPS, 0.95),
], ids=["ode-noised", "paper-kappa-clipped"])
def test_restore_ode_variant_and_kappa_clip_lower_the_residual(comfy, photo, late, steps, bound):
    """The ODE + Langevin variant (latent 'noised' potential) and the paper's kappa = 1 with the stiffness clip
    both fit the measurement better than the data term off. (Unclipped kappa = 1 gives 1.02 here: overshoot.)

    measured (seed 0, SR x2): ODE 3 steps 0.981, 6 steps 0.928; SDE kappa 1 clipped at 0.5, 3 steps 0.898."""
    ours = comfy.run(restore_graph("sr_bicubic_x2", kappa=1.0, steps=steps, **late), fresh=True).raise_for_error()
    plain = comfy.run(restore_graph("sr_bicubic_x2", kappa=1.0, steps=steps, sigma_y=NO_DATA, **late),
                      fresh=True).raise_for_error()
    ratio = residual(ours) / residual(plain)
    logging.getLogger(__name__).warning("AFDPS %s, %d steps: residual ratio %.3f", late, steps, ratio)
    assert ratio < bound, (late, ratio)
    assert torch.isfinite(ours.output("restore", 2)).all()


class _ProgressTextServer:
    """``server.PromptServer.instance`` as far as ``send_progress_text`` goes: records (text, node id)."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def send_progress_text(self, text: str, node_id: str) -> None:
        self.texts.append((text, node_id))


def test_restore_shows_the_uncertainty_state_on_the_node(comfy, photo, monkeypatch):
    """With a server, the Restore node sends whether its map is calibrated (and why) to its own node in the
    frontend (``send_progress_text``); collapsed weights after resampling are flagged not calibrated. Without
    a server (every other test here) nothing is sent and nothing fails."""
    import types

    messages = comfy.pack_module("nodes.messages")
    assert messages.show("no server") is False
    fake = _ProgressTextServer()
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=fake)))
    assert messages.show("no node executing") is False                 # outside a node: nothing sent
    result = comfy.run(restore_graph("box_inpaint", sigma_y=0.01), fresh=True).raise_for_error()
    report = result.output("restore", 5)
    ((text, node_id),) = fake.texts
    assert node_id == "restore"
    assert text.startswith("image 0: uncertainty map ")
    assert text.split("image 0: ")[1] in report                               # the report carries the same line
    # ESS threshold 1 resamples after every step: healthy weights give the weighted (calibrated) map, collapsed
    # ones the plain spread of clones, flagged with what to change
    state = re.search(r"uncertainty map (calibrated \(weighted|NOT calibrated \(unweighted); ", text)
    assert state, text
    if state.group(1).startswith("NOT"):
        assert "set the ESS threshold to 0" in text
