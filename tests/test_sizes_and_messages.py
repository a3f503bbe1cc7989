"""Sizes an artist never works out by hand, and messages shown on the node, through real ComfyUI (tiny models).

* Photos whose result is not a multiple of 16 px are padded and the result cropped back: SR x2 of a 20 x 20
  photo is exactly 40 x 40 (padding in measurement space), a 40 x 40 deblur stays 40 x 40, an inpainting mask
  is padded as unknown (the padded strip never constrains the photo), AFDPS's outputs are cropped alike.
* ``Inpainting operator (box, relative)``: the box is a fraction of the photo, whatever its size.
* ``Latent for measurement`` sizes the SAMPLER route's latent from the photo and the operator (padded when
  needed, with ``Crop to result size`` after the decoder).
* Warnings reach the editor through ``PromptServer.send_progress_text`` (captured with a stub server here;
  the real one is exercised by the browser test) and the log.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from flowdps_dev import graphs

pytestmark = pytest.mark.comfy

SIZE = 20  # the photo's side: SR x2 gives 40, not a multiple of 16
PHOTO = "sizes_photo.png"
PHOTO_SEED = 11
FAST = {"steps": 1, "cfg": 2.0, "shift": 4.0}


# --------------------------------------------------------------------------------------- pure padding rules


@pytest.fixture(scope="module")
def padding(comfy):
    return comfy.pack_module("nodes.padding")


@pytest.fixture(scope="module")
def ops(comfy):
    return comfy.pack_module("operators")


@pytest.mark.parametrize(("factor", "side", "padded", "image"), [
    (2, 20, 24, 40), (4, 50, 52, 200), (12, 64, 64, 768), (3, 7, 16, 21), (1, 40, 48, 40)])
def test_sr_pads_in_measurement_space_so_the_result_is_factor_times_the_photo(padding, ops, factor, side, padded,
                                                                              image):
    plan = padding.plan(ops.BicubicSR(factor), (1, 3, side, side))
    assert plan.image == (image, image)                                  # exactly factor x the photo
    assert plan.padded_measurement == (padded, padded)
    assert plan.padded_image == (padded * factor, padded * factor)
    assert plan.padded_image[0] % 16 == 0
    assert plan.padded_image[0] - image < 16 * factor
    assert plan.needed == (padded != side)


def test_a_blur_pads_to_the_next_multiple_of_16_with_mirrored_pixels(padding, ops):
    blur = ops.gaussian_blur(5, 1.0, "reflect")
    plan = padding.plan(blur, (1, 3, 40, 33))
    assert (plan.padded_measurement, plan.image, plan.padded_image) == ((48, 48), (40, 33), (48, 48))
    y = torch.arange(40 * 33, dtype=torch.float32).view(1, 1, 40, 33).expand(1, 3, 40, 33)
    padded = padding.pad_measurement(y, plan)
    assert padded.shape == (1, 3, 48, 48)
    torch.testing.assert_close(padded[..., :40, :33], y)                   # the photo itself is untouched
    torch.testing.assert_close(padded[..., 40, :33], y[..., 38, :])       # mirrored about the last row
    assert padding.pad_operator(blur, plan) is blur                      # a blur accepts any size


def test_an_inpainting_mask_is_padded_as_unknown(padding, ops):
    keep = ops.box_mask(20, 20, 5, 5, 4, 4)
    op = ops.Inpainting(keep)
    plan = padding.plan(op, (1, 3, 20, 20))
    assert (plan.padded_measurement, plan.padded_image, plan.image) == ((32, 32), (32, 32), (20, 20))
    padded = padding.pad_operator(op, plan)
    assert padded.mask.shape[-2:] == (32, 32)
    torch.testing.assert_close(padded.mask[..., :20, :20], op.mask)       # the photo's mask is unchanged
    assert padded.mask[..., 20:, :].sum() == 0
    assert padded.mask[..., :, 20:].sum() == 0
    # so the padded strip never constrains the photo: A x is zero there whatever the measurement holds
    x = torch.randn(1, 3, 32, 32)
    assert padded.forward(x)[..., 20:, :].abs().sum() == 0


def test_a_tiny_photo_is_replicated_where_it_cannot_be_mirrored(padding, ops):
    plan = padding.plan(ops.Identity(), (1, 3, 3, 3))
    assert plan.padded_measurement == (16, 16)
    padded = padding.pad_measurement(torch.rand(1, 3, 3, 3), plan)
    assert padded.shape == (1, 3, 16, 16)
    assert torch.isfinite(padded).all()


def test_a_composition_with_a_mask_cannot_be_padded_and_says_which_size_works(padding, ops):
    op = ops.Composed(outer=ops.Inpainting(torch.ones(1, 1, 10, 10)), inner=ops.AvgPoolSR(2))
    with pytest.raises(ValueError, match=r"fixed size.*multiple of 16 px \(e\.g\. 32 px\)"):
        padding.plan(op, (1, 3, 10, 10))


@pytest.mark.parametrize(("left", "top", "width", "height", "expected"), [
    (0.25, 0.25, 0.5, 0.5, (25, 50, 50, 100, False)),      # (top, left, box height, box width, cut) of 100x200
    (0.0, 0.0, 1.0, 1.0, (0, 0, 100, 200, False)),
    (0.9, 0.5, 0.5, 0.2, (50, 180, 20, 20, True)),          # past the right edge: cut there
    (0.5, 0.5, 0.0, 0.0, (50, 100, 1, 1, False)),           # at least one pixel
    (1.0, 1.0, 0.1, 0.1, (99, 199, 1, 1, True)),
])
def test_relative_box_in_pixels(comfy, left, top, width, height, expected):
    relative_box = comfy.pack_module("nodes.operator_nodes").relative_box
    assert relative_box(100, 200, left, top, width, height) == expected


# ------------------------------------------------------------------------------ through ComfyUI, end to end


def sr_restore_graph(photo: str, *, restore: str = "FlowDPSRestore", factor: int = 2, **widgets) -> dict:
    return graphs.restore_graph(restore, photo, ("FlowDPSOperatorSRBicubic", {"factor": factor}),
                                **{**FAST, **widgets})


def test_flowdps_restore_returns_exactly_factor_times_the_photo(comfy, write_photo):
    """A 20x20 measurement (the simulation of a 40x40 photo): restored 48x48 from a mirrored 24x24, cropped to 40x40."""
    name = write_photo("sizes_40.png", 40, PHOTO_SEED)
    prompt = sr_restore_graph(name)
    result = comfy.run(prompt, fresh=True).raise_for_error()
    assert tuple(result.output("sim").shape) == (1, 20, 20, 3)
    assert tuple(result.output("restore").shape) == (1, 40, 40, 3)
    assert tuple(result.output("restore", 1)["samples"].shape) == (1, 16, 6, 6)  # the sampled latent: 48 px


def test_afdps_restore_crops_every_image_output(comfy, write_photo):
    name = write_photo("sizes_40.png", 40, PHOTO_SEED)
    prompt = sr_restore_graph(name, restore="AFDPSRestore", particles=2)
    result = comfy.run(prompt, fresh=True).raise_for_error()
    assert tuple(result.output("restore", 0).shape) == (1, 40, 40, 3)   # best
    assert tuple(result.output("restore", 1).shape) == (1, 40, 40, 3)   # mean
    assert tuple(result.output("restore", 2).shape) == (2, 40, 40, 3)   # particles
    assert tuple(result.output("restore", 3).shape) == (1, 40, 40, 3)   # uncertainty heat map
    assert tuple(result.output("restore", 4).shape) == (1, 40, 40)      # uncertainty mask


def test_painted_mask_inpainting_of_an_odd_sized_photo_keeps_every_pixel(comfy, write_photo):
    """Inpainting a 36x28 photo: the mask is padded as unknown, the known pixels are kept exactly where they were."""
    name = write_photo("sizes_36.png", 36, PHOTO_SEED)
    g = graphs.GraphBuilder()
    model, vae, pos, neg = graphs.prior_loaders(g, graphs.TINY_PRIORS["sd3"])
    photo = g.add("LoadImage", "photo", image=name).out()
    crop = g.add("ImageCrop", "crop", image=photo, width=28, height=36, x=0, y=0).out()
    box = g.add_node_with_defaults("FlowDPSOperatorBoxInpaintRelative", "op", image=crop)
    g.add_node_with_defaults("FlowDPSRestore", "restore", model=model, positive=pos, negative=neg, vae=vae,
                             measurement=crop, operator=box.out(0), **FAST)
    g.add("PreviewImage", "preview", images=["restore", 0])
    g.add("PreviewImage", "mask_preview", images=g.add("MaskToImage", "mask_image", mask=box.out(1)).out())
    result = comfy.run(g.build(), fresh=True).raise_for_error()
    assert tuple(result.output("restore").shape) == (1, 36, 28, 3)
    mask = result.output("op", 1)[0]
    assert tuple(mask.shape) == (36, 28)
    assert mask.sum() == 18 * 14
    assert mask[9:27, 7:21].min() == 1


def test_relative_box_follows_the_photo_and_the_old_box_still_works(comfy, write_photo):
    name = write_photo("sizes_64.png", 64, PHOTO_SEED)
    g = graphs.GraphBuilder()
    photo = g.add("LoadImage", "photo", image=name).out()
    g.add("FlowDPSOperatorBoxInpaintRelative", "relative", image=photo, box_left=0.5, box_top=0.0, box_width=0.5,
          box_height=0.25)
    g.add("FlowDPSOperatorBoxInpaint", "absolute", width=64, height=64, box_left=32, box_top=0, box_width=32,
          box_height=16)
    for node in ("relative", "absolute"):
        g.add("PreviewImage", f"{node}_preview", images=g.add("MaskToImage", f"{node}_image", mask=[node, 1]).out())
    result = comfy.run(g.build(), fresh=True).raise_for_error()
    torch.testing.assert_close(result.output("relative", 1), result.output("absolute", 1))


def latent_route_graph(photo: str, *, crop: bool = True) -> dict:
    """SR x2 through SamplerCustomAdvanced with the latent from 'Latent for measurement' (and the crop node)."""
    g = graphs.GraphBuilder()
    model, vae, pos, neg = graphs.prior_loaders(g, graphs.TINY_PRIORS["sd3"])
    model = g.add("ModelSamplingSD3", "shift", model=model, shift=4.0).out()
    op, y = graphs.simulated_measurement(g, photo, "FlowDPSOperatorSRBicubic", factor=2)
    guider = g.add("CFGGuider", "guider", model=model, positive=pos, negative=neg, cfg=2.0).out()
    sampler = g.add_node_with_defaults("FlowDPSSampler", "flowdps", vae=vae, operator=op, measurement=y).out()
    sigmas = g.add("FlowDPSSigmas", "sigmas", model=model, steps=1).out()
    noise = g.add("RandomNoise", "noise", noise_seed=0).out()
    latent = g.add("FlowDPSLatentForMeasurement", "latent", measurement=y, operator=op, vae=vae).out()
    out = g.add("SamplerCustomAdvanced", "sampler", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                latent_image=latent)
    image = g.add("VAEDecode", "decode", samples=out.out(0), vae=vae).out()
    if crop:
        image = g.add("FlowDPSCropToResult", "crop", image=image, measurement=y, operator=op).out()
    g.add("PreviewImage", "preview", images=image)
    return g.build()


def test_latent_for_measurement_sizes_the_sampler_route(comfy, write_photo):
    name = write_photo("sizes_40.png", 40, PHOTO_SEED)
    result = comfy.run(latent_route_graph(name), fresh=True).raise_for_error()
    assert tuple(result.output("latent")["samples"].shape) == (1, 16, 6, 6)   # 48 px: 2 x 20 padded to 16
    assert (result.output("latent", 1), result.output("latent", 2)) == (40, 40)
    assert tuple(result.output("decode").shape) == (1, 48, 48, 3)
    assert tuple(result.output("crop").shape) == (1, 40, 40, 3)


def test_latent_for_measurement_of_a_multiple_of_16_is_exact(comfy, write_photo):
    name = write_photo("sizes_64.png", 64, PHOTO_SEED)
    result = comfy.run(latent_route_graph(name), fresh=True).raise_for_error()
    assert tuple(result.output("latent")["samples"].shape) == (1, 16, 8, 8)
    assert tuple(result.output("decode").shape) == tuple(result.output("crop").shape) == (1, 64, 64, 3)


# -------------------------------------------------------------------------------------------- messages


class RecordingServer:
    """The one method of ``PromptServer`` that node messages use."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def send_progress_text(self, text, node_id, sid=None) -> None:
        self.texts.append((str(node_id), text))


@pytest.fixture
def server(monkeypatch):
    """A stub ``server.PromptServer.instance`` (what ComfyUI's server sets) that records node messages."""
    recorder = RecordingServer()
    module = sys.modules.get("server") or types.ModuleType("server")
    monkeypatch.setitem(sys.modules, "server", module)
    monkeypatch.setattr(module, "PromptServer", types.SimpleNamespace(instance=recorder), raising=False)
    return recorder


def test_padding_is_shown_on_the_restore_node_and_logged(comfy, write_photo, server, caplog):
    name = write_photo("sizes_40.png", 40, PHOTO_SEED)
    caplog.set_level(logging.INFO)
    comfy.run(sr_restore_graph(name), fresh=True).raise_for_error()
    shown = [text for node, text in server.texts if node == "restore"]
    assert shown
    assert "the photo is 20x20 px, so the result is 40x40 px" in shown[-1]
    assert "cropped the result back to 40x40: no pixels lost" in shown[-1]
    assert any(m.startswith("FlowDPS Restore: the photo is 20x20 px") for m in caplog.messages)


def test_without_a_server_messages_only_go_to_the_log(comfy, write_photo, monkeypatch, caplog):
    name = write_photo("sizes_40.png", 40, PHOTO_SEED)
    monkeypatch.delitem(sys.modules, "server", raising=False)
    caplog.set_level(logging.INFO)
    comfy.run(sr_restore_graph(name), fresh=True).raise_for_error()
    assert any("no pixels lost" in m for m in caplog.messages)


def test_a_vae_of_another_family_is_a_warning_on_the_node(comfy, write_photo, tiny_families, server, caplog):
    name = write_photo("sizes_64.png", 64, PHOTO_SEED)
    prompt = graphs.restore_graph("FlowDPSRestore", name, ("FlowDPSOperatorSRBicubic", {"factor": 2}),
                                  prior=tiny_families["flux-dev"], vae_name=graphs.TINY_VAE, **FAST)
    comfy.run(prompt, fresh=True).raise_for_error()
    shown = "\n".join(text for node, text in server.texts if node == "restore")
    assert "another model family's VAE" in shown
    assert "wrong colours" in shown
    assert "guidance-distilled" in shown                  # cfg 2 on Flux: the second warning, on its own line
    assert len(shown.splitlines()) >= 2


def test_messages_of_one_node_accumulate_within_a_run(comfy, server):
    messages = comfy.pack_module("nodes.messages")
    from comfy_execution.utils import CurrentNodeContext

    with CurrentNodeContext("prompt-a", "7"):
        messages.warn("Node", "first")
        messages.warn("Node", "second")
    with CurrentNodeContext("prompt-b", "7"):
        messages.note("Node", "third")
    assert [t for _, t in server.texts] == ["⚠ first", "⚠ first\n⚠ second", "third"]
    assert messages.show("outside a node") is False
