"""FlowDPS / FlowChef SAMPLER nodes and the Restore node, run headless through ComfyUI's executor on the tiny
models, with the pack's 2x average-pool SR operator (its operator node); the residual is measured with
``F.avg_pool2d`` written inline, independently of the operator package."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flowdps_dev import graphs

pytestmark = pytest.mark.comfy


def measurement_nodes(g: graphs.GraphBuilder, size: int) -> tuple[list, list]:
    op = g.add("FlowDPSOperatorSRAvgPool", "operator", factor=2).out()
    y = g.add("EmptyImage", "measurement", width=size, height=size, batch_size=1, color=0xC86432).out()
    return op, y


def custom_sampler_graph(sampler: str | None, *, seed: int = 0, steps: int = 4, size: int = 32, **params) -> dict:
    """SamplerCustomAdvanced with our SAMPLER (or plain euler when ``sampler`` is None), tiny SD3 models."""
    g = graphs.GraphBuilder()
    model = g.add("UNETLoader", "loader", unet_name=graphs.TINY_UNET, weight_dtype="default").out()
    clip = g.add("CLIPLoader", "clip", clip_name=graphs.TINY_CLIP_L, type="sd3", device="default").out()
    vae = g.add("VAELoader", "vae", vae_name=graphs.TINY_VAE).out()
    model = g.add("ModelSamplingSD3", "shift", model=model, shift=4.0).out()
    pos = g.add("CLIPTextEncode", "positive", clip=clip, text="a photo").out()
    neg = g.add("ConditioningZeroOut", "negative", conditioning=pos).out()
    guider = g.add("CFGGuider", "guider", model=model, positive=pos, negative=neg, cfg=2.0).out()
    op, y = measurement_nodes(g, size)
    if sampler is None:
        smp = g.add("KSamplerSelect", "sampler_select", sampler_name="euler").out()
    else:
        defaults = {"residual": "auto", "norm": "paper", "sigma_y": 0.015, "step_size": 15.0}
        if sampler == "FlowDPSSampler":
            defaults.update(dc_steps=3, step_size_end=-1.0)
        smp = g.add(sampler, "sampler_select", vae=vae, operator=op, measurement=y, **{**defaults, **params}).out()
    sigmas = g.add("BasicScheduler", "sigmas", model=model, scheduler="simple", steps=steps, denoise=1.0).out()
    noise = g.add("RandomNoise", "noise", noise_seed=seed).out()
    latent = g.add("EmptySD3LatentImage", "latent", width=2 * size, height=2 * size, batch_size=1).out()
    out = g.add("SamplerCustomAdvanced", "sampler", noise=noise, guider=guider, sampler=smp, sigmas=sigmas,
                latent_image=latent)
    g.add("VAEDecode", "decode", samples=out.out(0), vae=vae)
    g.add("PreviewImage", "preview", images=["decode", 0])
    return g.build()


def residual(result, y_image, size: int) -> float:
    image = result.output("decode").movedim(-1, 1) * 2 - 1           # (1, 3, 2s, 2s) in [-1, 1]
    y = y_image.movedim(-1, 1) * 2 - 1                               # (1, 3, s, s)
    assert image.shape[-1] == 2 * size
    return float(torch.linalg.vector_norm(F.avg_pool2d(image, 2) - y))


@pytest.mark.parametrize("sampler", ["FlowDPSSampler", "FlowChefSampler"])
def test_sampler_node_lowers_the_measurement_residual(comfy, sampler):
    plain = comfy.run(custom_sampler_graph(None), fresh=True).raise_for_error()
    ours = comfy.run(custom_sampler_graph(sampler), fresh=True).raise_for_error()
    y = ours.output("measurement")
    r_plain, r_ours = residual(plain, y, 32), residual(ours, y, 32)
    assert r_ours < 0.8 * r_plain, (r_ours, r_plain)


def test_same_seed_same_image_and_other_seed_differs(comfy):
    a = comfy.run(custom_sampler_graph("FlowDPSSampler", seed=5), fresh=True).raise_for_error().output("decode")
    b = comfy.run(custom_sampler_graph("FlowDPSSampler", seed=5), fresh=True).raise_for_error().output("decode")
    c = comfy.run(custom_sampler_graph("FlowDPSSampler", seed=6), fresh=True).raise_for_error().output("decode")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3


def test_latent_that_does_not_match_the_measurement_is_a_clear_error(comfy):
    prompt = custom_sampler_graph("FlowDPSSampler")
    prompt["latent"]["inputs"]["width"] = 96  # decodes to 96 px wide; A maps it to 48, the measurement is 32
    result = comfy.run(prompt, fresh=True)
    assert not result.success
    assert result.error.node_id == "sampler"
    assert "measurement is 32x32" in result.error.message
    assert "maps that to 48x32" in result.error.message


def test_bad_widget_values_are_rejected(comfy):
    from flowdps_dev.comfy_env import GraphValidationError

    prompt = custom_sampler_graph("FlowDPSSampler", dc_steps=0)
    with pytest.raises(GraphValidationError, match="dc_steps"):
        comfy.run(prompt)
    result = comfy.run(custom_sampler_graph("FlowDPSSampler", residual="sideways"), fresh=True)
    assert not result.success
    assert "residual must be one of" in result.error.message


def restore_graph(size: int = 24, seed: int = 0, method: str = "flowdps") -> dict:
    g = graphs.GraphBuilder()
    model, vae, pos, neg = graphs.prior_loaders(g, graphs.TINY_PRIORS["sd3"])
    op, y = measurement_nodes(g, size)
    g.add("FlowDPSRestore", "restore", model=model, positive=pos, negative=neg, vae=vae, measurement=y, operator=op,
          seed=seed, steps=3, cfg=2.0, shift=4.0, method=method, dc_steps=2, step_size=15.0, step_size_end=-1.0,
          residual="auto", norm="paper", sigma_y=0.015)
    g.add("SaveImage", "save", images=["restore", 0], filename_prefix="restore")
    return g.build()


@pytest.mark.parametrize("method", ["flowdps", "flowchef"])
def test_restore_node_derives_the_output_size(comfy, method):
    # SR x2 of a 24x24 photo: the restored image is 48x48 (a multiple of 16, so no crop).
    result = comfy.run(restore_graph(24, method=method), fresh=True).raise_for_error()
    image = result.output("restore")
    latent = result.output("restore", 1)["samples"]
    assert tuple(image.shape) == (1, 48, 48, 3)
    assert tuple(latent.shape) == (1, 16, 6, 6)
    assert result.image_files("save")


def test_restore_node_pads_to_a_multiple_of_16_and_crops_back(comfy):
    result = comfy.run(restore_graph(20), fresh=True).raise_for_error()
    assert tuple(result.output("restore").shape) == (1, 40, 40, 3)  # 20 -> 24 (x2 = 48) -> cropped to 2 x 20
    assert tuple(result.output("restore", 1)["samples"].shape) == (1, 16, 6, 6)  # the sampled (padded) latent
