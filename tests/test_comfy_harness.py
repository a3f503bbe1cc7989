"""The ComfyUI harness itself: the pack loads through ComfyUI's own loader, core SD3 graphs run headless on
the tiny models (in-process and over HTTP), and the two formats of the tiny transformer agree."""

from __future__ import annotations

import io as _io

import pytest
import torch
from PIL import Image

from flowdps_dev import graphs

pytestmark = pytest.mark.comfy


def test_pack_registers_through_v3_entrypoint(comfy):
    ids = comfy.pack_node_ids()
    assert "FlowDPSInfo" in ids
    from comfy_api.latest import io

    for node_id in ids:
        cls = comfy.node_classes[node_id]
        assert issubclass(cls, io.ComfyNode), f"{node_id} is not a V3 node"
        schema = cls.GET_SCHEMA()
        assert schema.node_id == node_id
        assert node_id.startswith(("FlowDPS", "FlowChef", "AFDPS"))
        assert schema.description, f"{node_id} has no description"
        for inp in schema.inputs:
            assert getattr(inp, "tooltip", None), f"{node_id}.{inp.id} has no tooltip"
    assert not [line for line in comfy.load_log if "IMPORT FAILED" in line and "flowdps" in line]


def test_graph_nodes_with_schema_defaults(comfy):
    """add_node_with_defaults sends every required widget (its schema default unless given), links and given
    values as passed, optional widgets only when given; an unknown input name is refused."""
    g = graphs.GraphBuilder()
    g.add_node_with_defaults("FlowDPSRestore", "restore", model=["loader", 0], seed=5, steps=4)
    inputs = g.build()["restore"]["inputs"]
    info = comfy.node_info("FlowDPSRestore")
    required, optional = info["input"]["required"], info["input"].get("optional", {})
    assert (inputs["model"], inputs["seed"], inputs["steps"]) == (["loader", 0], 5, 4)
    for name in ("cfg", "shift", "method", "dc_steps", "step_size", "step_size_end", "residual", "norm", "sigma_y"):
        assert inputs[name] == required[name][1]["default"], name
    assert "scheduler" in optional
    assert "scheduler" not in inputs
    assert "measurement" not in inputs                 # a socket: the caller links it
    with pytest.raises(ValueError, match="no input named"):
        g.add_node_with_defaults("FlowDPSSampler", "s", stepsize=3.0)


def test_pack_module_is_the_module_comfyui_loaded(comfy):
    """Not flowdps.samplers.flowdps (the tests' own import of the pack): the copy ComfyUI's loader made."""
    import flowdps.samplers.flowdps

    node_module = comfy.node_classes["FlowDPSRestore"].__module__
    module = comfy.pack_module("samplers.flowdps")
    assert module.__name__ == node_module[:node_module.index(".nodes.")] + ".samplers.flowdps"
    assert module is not flowdps.samplers.flowdps


def test_info_node_runs_in_a_graph(comfy):
    import flowdps

    result = comfy.run({"1": {"class_type": "FlowDPSInfo", "inputs": {}}}).raise_for_error()
    text = result.output("1")
    assert f"comfyui-flowdps {flowdps.__version__}" in text
    assert f"torch {torch.__version__}" in text
    assert "comfy torch device: cpu" in text
    assert result.ui["1"]["text"] == [text] or result.ui["1"]["text"] == (text,)


@pytest.mark.parametrize(("loader", "width", "height"), [("unet", 64, 96), ("checkpoint", 96, 64)])
def test_sd3_text_to_image_in_process(comfy, loader, width, height):
    prompt = graphs.sd3_text_to_image(width=width, height=height, loader=loader, filename_prefix=f"t2i_{loader}")
    result = comfy.run(prompt).raise_for_error()
    latent = result.output("sampler")["samples"]
    assert tuple(latent.shape) == (1, 16, height // 8, width // 8)
    assert torch.isfinite(latent).all()
    image = result.output("decode")
    assert tuple(image.shape) == (1, height, width, 3)
    assert float(image.min()) >= 0.0
    assert float(image.max()) <= 1.0
    assert float(image.std()) > 1e-3, "the decoded image is flat: the tiny VAE or sampler is broken"
    files = result.image_files("save")
    assert len(files) == 1
    assert files[0].is_file()
    with Image.open(files[0]) as png:
        assert png.size == (width, height)
        assert "prompt" in png.info, "SaveImage embeds the API prompt in the PNG"


def test_invalid_prompt_is_rejected_before_running(comfy):
    from flowdps_dev.comfy_env import GraphValidationError

    prompt = graphs.sd3_text_to_image(width=64, height=64)
    prompt["latent"]["inputs"]["width"] = 8  # below EmptySD3LatentImage's minimum of 16
    with pytest.raises(GraphValidationError, match="width"):
        comfy.run(prompt)


def test_node_failure_is_reported_not_raised(comfy):
    # 1024 px gives 128x128 latents, beyond the tiny MMDiT's 32x32-patch position table: the model asserts.
    result = comfy.run(graphs.sd3_text_to_image(width=1024, height=64, filename_prefix="too_big"))
    assert result.success is False
    assert result.error is not None
    assert result.error.node_id == "sampler"
    assert result.error.node_type == "SamplerCustomAdvanced"
    assert result.error.exception_type.endswith("AssertionError")
    assert "mmdit.py" in result.error.traceback
    assert result.image_files() == []
    # The session keeps working after a failed graph.
    assert comfy.run(graphs.sd3_text_to_image(seed=11, filename_prefix="after_failure")).success


def test_diffusers_and_comfy_formats_give_the_same_sample(comfy):
    # The same weights saved by diffusers and in ComfyUI's MMDiT layout, each loaded by UNETLoader.
    latents = []
    for unet in (graphs.TINY_UNET, graphs.TINY_UNET_DIFFUSERS):
        prompt = graphs.sd3_text_to_image(unet_name=unet, steps=3, seed=7, width=64, height=64,
                                          filename_prefix="fmt")
        latents.append(comfy.run(prompt, fresh=True).raise_for_error().output("sampler")["samples"])
    assert latents[0].abs().max() > 0
    torch.testing.assert_close(latents[0], latents[1], rtol=0, atol=1e-6)


def test_comfy_transformer_matches_diffusers_forward(comfy):
    # Independent check of the weights and of ComfyUI's conversion: diffusers' own SD3 forward pass and
    # ComfyUI's MMDiT give the same velocity for the same input.
    import comfy.sd as comfy_sd
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    models = comfy.models_dir
    diffusers_sd = load_file(str(models / "diffusion_models" / graphs.TINY_UNET_DIFFUSERS))
    from flowdps_dev.tiny_models import TinyMMDiTConfig

    config = TinyMMDiTConfig()
    ref = SD3Transformer2DModel(**config.diffusers_kwargs()).eval()
    ref.load_state_dict(diffusers_sd, strict=True)
    patcher = comfy_sd.load_diffusion_model(str(models / "diffusion_models" / graphs.TINY_UNET))
    mmdit = patcher.model.diffusion_model

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 12, 8, generator=g)
    context = torch.randn(2, 10, 4096, generator=g) * 0.5
    pooled = torch.randn(2, 2048, generator=g) * 0.5
    t = torch.tensor([900.0, 250.0])
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
        got = mmdit(x, t, y=pooled, context=context)
    assert expected.abs().mean() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_server_starts_with_the_pack_and_runs_a_graph(comfy_server):
    log = comfy_server.log_text()
    assert "comfyui-flowdps" in log, "the server log does not mention loading the pack"
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and "flowdps" in line]
    info = comfy_server.get("/object_info/FlowDPSInfo")
    assert info["FlowDPSInfo"]["category"].startswith("FlowDPS")
    assert "FlowDPSInfo" in comfy_server.get("/object_info")

    outcome = comfy_server.run(graphs.sd3_text_to_image(width=64, height=80, filename_prefix="http_t2i"))
    assert outcome.status == "success", outcome.error
    images = outcome.images()
    assert len(images) == 1
    with Image.open(_io.BytesIO(comfy_server.view(images[0]))) as png:
        assert png.size == (64, 80)


def test_server_reports_node_errors_and_keeps_serving(comfy_server):
    bad = graphs.sd3_text_to_image()
    bad["loader"]["inputs"]["unet_name"] = "does_not_exist.safetensors"
    status, body = comfy_server.post("/prompt", {"prompt": bad})
    assert status == 400
    assert "loader" in body["node_errors"]
    outcome = comfy_server.run(graphs.sd3_text_to_image(seed=3, filename_prefix="after_error"))
    assert outcome.status == "success"
