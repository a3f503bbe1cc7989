"""The pack's defaults against the official FlowDPS code: the sigma grid of the Restore nodes and of the
'FlowDPS sigmas' node, a renoising stream that is independent of ComfyUI's initial noise, and a simulated
measurement that can stay unclipped (``y = A x + noise`` exactly). Real ComfyUI, tiny models."""

from __future__ import annotations

import pytest
import torch

from flowdps_dev import graphs

pytestmark = pytest.mark.comfy

SIZE = 32
PHOTO = "flowdps_official_defaults.png"
PHOTO_SEED = 11


def schema_default(node_class, name: str):
    (entry,) = [i for i in node_class.define_schema().inputs if i.id == name]
    return entry.default


@pytest.mark.parametrize("steps", [8, 28])
def test_restore_default_grid_is_the_official_grid(comfy, steps):
    """Both Restore nodes default to the official grid: with SD3 at shift 4 it equals the diffusers-SD3 grid
    (samplers.flowdps_sigmas, itself tested against diffusers) to float32 rounding."""
    from comfy.model_sampling import ModelSamplingDiscreteFlow

    sampling_mod = comfy.pack_module("nodes.bridge")
    schedules = comfy.pack_module("samplers.schedules")
    for node in ("FlowDPSRestore", "AFDPSRestore"):
        assert schema_default(comfy.node_classes[node], "scheduler") == "flowdps", node
    sampling = ModelSamplingDiscreteFlow()
    sampling.set_parameters(shift=4.0)
    ours = sampling_mod.restore_sigmas(sampling, "flowdps", steps).double()
    official = schedules.flowdps_sigmas(steps, 4.0)
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-6)        # float32 storage of values <= 1
    assert float(ours[-2]) == pytest.approx(0.011869, abs=2e-6)
    simple = sampling_mod.restore_sigmas(sampling, "simple", steps).double()
    assert float((simple - official).abs().max()) > 0.1                # the old default was far from it


def test_flowdps_sigmas_node_gives_the_official_grid(comfy):
    g = graphs.GraphBuilder()
    model, _, _, _ = graphs.prior_loaders(g, graphs.TINY_PRIORS["sd3"])
    shifted = g.add("ModelSamplingSD3", "shift", model=model, shift=4.0).out()
    g.add("FlowDPSSigmas", "sigmas", model=shifted, steps=28)
    result = comfy.run(_with_output(g.build(), "sigmas"), fresh=True).raise_for_error()
    sigmas = result.output("sigmas").double()
    torch.testing.assert_close(sigmas, comfy.pack_module("samplers.schedules").flowdps_sigmas(28), rtol=0, atol=1e-6)


def _with_output(prompt: dict, node: str) -> dict:
    """Make ``node`` reach an output node (the executor only runs what an output depends on)."""
    prompt["probe"] = {"class_type": "FlowDPSTestSigmasSink", "inputs": {"sigmas": [node, 0]}}
    return prompt


class FlowDPSTestSigmasSink:
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sigmas": ("SIGMAS",)}}

    def run(self, sigmas):
        return (sigmas,)


@pytest.fixture(autouse=True)
def sink_node(comfy):
    comfy.node_classes["FlowDPSTestSigmasSink"] = FlowDPSTestSigmasSink
    yield
    comfy.node_classes.pop("FlowDPSTestSigmasSink", None)


def test_sampler_seed_is_never_the_node_seed():
    from flowdps.nodes.bridge import SEED_MODULUS, sampler_seed

    seeds = [0, 1, 2, 12345, 2**32, 2**63, SEED_MODULUS - 1]
    for seed in seeds:
        derived = [sampler_seed(seed, stream) for stream in range(8)]
        assert seed not in derived
        assert len(set(derived)) == len(derived)
        assert all(0 <= d < SEED_MODULUS for d in derived)


def _comfy_stream(seed: int, numel: int, chunks: int) -> list[torch.Tensor]:
    """What ComfyUI's CPU stream for ``seed`` gives: the initial noise, then the draws that would follow it."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g) for _ in range(chunks)]


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.dot(a - a.mean(), b - b.mean()) / ((a - a.mean()).norm() * (b - b.mean()).norm()))


@pytest.mark.parametrize("seed", [0, 7])
def test_flowdps_renoising_is_independent_of_the_initial_noise(comfy, photo, monkeypatch, seed):
    """FlowDPS's fresh noise at every step is neither ComfyUI's initial noise (which a generator seeded with the
    node seed itself reproduces bit for bit on the CPU) nor the continuation of that stream."""
    from comfy.sample import prepare_noise

    flowdps = comfy.pack_module("samplers.flowdps")
    draws: list[torch.Tensor] = []
    original = flowdps.fresh_noise

    def recording(like, generator):
        xi = original(like, generator)
        draws.append(xi.detach().clone())
        return xi

    monkeypatch.setattr(flowdps, "fresh_noise", recording)
    prompt = graphs.restore_graph("FlowDPSRestore", PHOTO, ("FlowDPSOperatorSRBicubic", {"factor": 2}), seed=seed,
                                  steps=3, cfg=2.0, shift=4.0, dc_steps=1, step_size=1.0)
    comfy.run(prompt, fresh=True).raise_for_error()
    assert len(draws) == 2                                           # 3 steps: renoise before steps 2 and 3
    latent = torch.zeros(1, 16, SIZE // 8, SIZE // 8)
    initial = prepare_noise(latent, seed)
    stream = _comfy_stream(seed, latent.numel(), 4)
    torch.testing.assert_close(stream[0].view_as(initial), initial)  # the model of ComfyUI's noise is right
    bound = 5 / latent.numel() ** 0.5                                 # 5 sigma of a sample correlation
    for xi in draws:
        for chunk in stream:
            assert abs(_corr(xi, chunk)) < bound


def test_simulated_measurement_can_stay_unclipped(comfy, photo):
    """clip off: y = A x + noise exactly (values outside [0, 1] kept, noise std = sigma_y); clip on: [0, 1]."""
    sigma = 0.2
    g = graphs.GraphBuilder()
    image = g.add("LoadImage", "photo", image=PHOTO).out()
    op = g.add("FlowDPSOperatorIdentity", "op").out()
    g.add("FlowDPSSimulateMeasurement", "raw", image=image, operator=op, sigma_y=sigma, seed=3, clip=False)
    g.add("FlowDPSSimulateMeasurement", "clipped", image=image, operator=op, sigma_y=sigma, seed=3)
    g.add("PreviewImage", "p1", images=["raw", 0])
    g.add("PreviewImage", "p2", images=["clipped", 0])
    result = comfy.run(g.build(), fresh=True).raise_for_error()
    clean = result.output("photo")
    raw, clipped = result.output("raw"), result.output("clipped")
    assert float(raw.min()) < 0.0 or float(raw.max()) > 1.0
    assert float(clipped.min()) >= 0.0
    assert float(clipped.max()) <= 1.0
    torch.testing.assert_close(raw.clamp(0, 1), clipped)
    noise = (raw - clean).flatten().double()
    n = noise.numel()
    assert abs(float(noise.std()) - sigma) < 5 * sigma / (2 * n) ** 0.5     # 5 sigma of the std estimate
    assert float(((clipped - clean).flatten().double()).std()) < sigma - 5 * sigma / (2 * n) ** 0.5
