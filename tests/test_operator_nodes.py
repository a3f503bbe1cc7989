"""Operator and measurement nodes in real ComfyUI (headless): LoadImage -> operator -> Simulate measurement ->
SaveImage, the pseudo-inverse preview, and clear node errors for bad inputs."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from flowdps_dev.comfy_env import GraphValidationError
from flowdps_dev.graphs import GraphBuilder

pytestmark = pytest.mark.comfy

WIDTH, HEIGHT = 96, 64
PHOTO = "flowdps_test_photo.png"


@pytest.fixture(scope="module")
def photo(comfy) -> torch.Tensor:
    """A textured RGB test picture in ComfyUI's input folder; returns it as an IMAGE (1, H, W, 3)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, HEIGHT), torch.linspace(0, 1, WIDTH), indexing="ij")
    smooth = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(12 * xx * yy)], dim=-1)
    image = (0.7 * smooth + 0.3 * torch.rand(HEIGHT, WIDTH, 3, generator=g)).clamp(0, 1)
    array = (image.numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(comfy.input_dir / PHOTO)
    return torch.from_numpy(array.astype(np.float32) / 255.0)[None]


def schema(comfy, node_id: str):
    return comfy.node_classes[node_id].GET_SCHEMA()


def defaults(comfy, node_id: str) -> dict:
    return {inp.id: getattr(inp, "default", None) for inp in schema(comfy, node_id).inputs}


def test_operator_nodes_have_the_papers_defaults(comfy):
    assert defaults(comfy, "FlowDPSOperatorSRAvgPool")["factor"] == 12
    assert defaults(comfy, "FlowDPSOperatorSRBicubic")["factor"] == 12
    assert defaults(comfy, "FlowDPSOperatorGaussianBlur") == {"kernel_size": 61, "sigma": 3.0, "boundary": "reflect"}
    assert defaults(comfy, "FlowDPSOperatorPaperGaussianBlur") == {"kernel_size": 61, "sigma": 3.0}
    motion = defaults(comfy, "FlowDPSOperatorMotionBlur")
    assert (motion["kernel_size"], motion["intensity"]) == (61, 0.5)
    assert defaults(comfy, "FlowDPSSimulateMeasurement")["sigma_y"] == 0.015
    for node_id in comfy.pack_node_ids():
        if node_id.startswith("FlowDPSOperator"):
            outputs = schema(comfy, node_id).outputs
            assert outputs[0].io_type == "FLOWDPS_OPERATOR", node_id


# (name, operator node, its inputs, expected measurement size (w, h), expected operator)
def _expected(name: str):
    from flowdps import operators as ops

    return {
        "avgpool_x4": ops.AvgPoolSR(4),
        "bicubic_x2": ops.BicubicSR(2),
        "gauss": ops.gaussian_blur(9, 2.0, "reflect"),
        "gauss_circular": ops.gaussian_blur(7, 1.5, "circular"),
        "paper_gauss": ops.PaperGaussianBlur(9, 1.0),
        "motion": ops.motion_blur(15, 0.5, torch.Generator().manual_seed(3), "zero"),
        "box": ops.Inpainting(ops.box_mask(HEIGHT, WIDTH, 10, 20, 30, 40)),
        "random": ops.Inpainting(ops.random_mask(HEIGHT, WIDTH, 0.5, torch.Generator().manual_seed(7))),
        "identity": ops.Identity(),
        "grey": ops.Grayscale(ops.BT601_WEIGHTS),
        "blur_then_pool": ops.AvgPoolSR(2) @ ops.gaussian_blur(5, 1.0, "reflect"),
    }[name]


CASES = [
    ("avgpool_x4", "FlowDPSOperatorSRAvgPool", {"factor": 4}, (24, 16)),
    ("bicubic_x2", "FlowDPSOperatorSRBicubic", {"factor": 2}, (48, 32)),
    ("gauss", "FlowDPSOperatorGaussianBlur", {"kernel_size": 9, "sigma": 2.0, "boundary": "reflect"}, (96, 64)),
    ("gauss_circular", "FlowDPSOperatorGaussianBlur", {"kernel_size": 7, "sigma": 1.5, "boundary": "circular"},
     (96, 64)),
    ("paper_gauss", "FlowDPSOperatorPaperGaussianBlur", {"kernel_size": 9, "sigma": 1.0}, (96, 64)),
    ("motion", "FlowDPSOperatorMotionBlur", {"kernel_size": 15, "intensity": 0.5, "seed": 3, "boundary": "zero"},
     (96, 64)),
    ("box", "FlowDPSOperatorBoxInpaint", {"width": WIDTH, "height": HEIGHT, "box_left": 20, "box_top": 10,
                                          "box_width": 40, "box_height": 30}, (96, 64)),
    ("random", "FlowDPSOperatorRandomInpaint", {"width": WIDTH, "height": HEIGHT, "missing_ratio": 0.5, "seed": 7},
     (96, 64)),
    ("identity", "FlowDPSOperatorIdentity", {}, (96, 64)),
    ("grey", "FlowDPSOperatorGrayscale", {"weights": "bt601"}, (96, 64)),
]


def simulate_graph(op_class: str, op_inputs: dict, *, sigma_y: float = 0.0, seed: int = 0,
                   max_iterations: int = 20, prefix: str = "sim") -> dict:
    g = GraphBuilder()
    image = g.add("LoadImage", "load", image=PHOTO).out()
    op = g.add(op_class, "op", **op_inputs).out()
    sim = g.add("FlowDPSSimulateMeasurement", "sim", image=image, operator=op, sigma_y=sigma_y, seed=seed)
    g.add("SaveImage", "save_y", images=sim.out(0), filename_prefix=f"{prefix}_y")
    pinv = g.add("FlowDPSPseudoInverse", "pinv", measurement=sim.out(0), operator=op, max_iterations=max_iterations)
    g.add("SaveImage", "save_pinv", images=pinv.out(0), filename_prefix=f"{prefix}_pinv")
    return g.build()


def reference_measurement(op, photo: torch.Tensor) -> torch.Tensor:
    """What the node must produce with sigma_y = 0: A x on [-1, 1], shown as an RGB IMAGE in [0, 1]."""
    y = op.forward(photo.movedim(-1, 1).double() * 2 - 1)
    y = y.expand(-1, 3, -1, -1) if y.shape[1] == 1 else y
    return ((y + 1) / 2).clamp(0, 1).movedim(1, -1).float()


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


@pytest.mark.parametrize(("name", "op_class", "op_inputs", "size"), CASES, ids=[c[0] for c in CASES])
def test_simulate_and_preview_through_comfyui(comfy, photo, name, op_class, op_inputs, size):
    result = comfy.run(simulate_graph(op_class, op_inputs, prefix=f"sim_{name}")).raise_for_error()
    op = result.output("op")
    assert op.output_shape((1, 3, HEIGHT, WIDTH))[2:] == (size[1], size[0])
    y = result.output("sim", 0)
    assert tuple(y.shape) == (1, size[1], size[0], 3)
    torch.testing.assert_close(y, reference_measurement(_expected(name), photo), rtol=0, atol=2e-5)
    assert png_size(result.image_files("save_y")[0]) == size
    assert png_size(result.image_files("save_pinv")[0]) == (WIDTH, HEIGHT)

    unknown = result.output("sim", 1)
    assert tuple(unknown.shape) == (1, size[1], size[0])
    if name == "box":
        assert unknown.sum() == 30 * 40
        assert unknown[0, 10:40, 20:60].min() == 1
        torch.testing.assert_close(result.output("op", 1), unknown)
    elif name == "random":
        assert unknown.sum() == round(0.5 * WIDTH * HEIGHT)
    else:
        assert unknown.sum() == 0


@pytest.mark.parametrize(
    ("op_class", "op_inputs"),
    [
        ("FlowDPSOperatorSRAvgPool", {"factor": 4}),
        ("FlowDPSOperatorBoxInpaint", CASES[6][2]),
        ("FlowDPSOperatorIdentity", {}),
        ("FlowDPSOperatorGrayscale", {"weights": "mean"}),  # bt601's pinv leaves [0, 1] (1.33 x green)
    ],
    ids=["avgpool_x4", "box", "identity", "grey_mean"],
)
def test_preview_is_an_exact_pseudo_inverse_for_closed_forms(comfy, photo, op_class, op_inputs):
    """A A+ y = y for the measurement the graph simulated (closed forms whose A+ y stays inside [0, 1])."""
    result = comfy.run(simulate_graph(op_class, op_inputs, prefix="pinv_exact")).raise_for_error()
    op, y, x = result.output("op"), result.output("sim", 0), result.output("pinv", 0)
    y_pixels = y.movedim(-1, 1) * 2 - 1
    again = op.forward(x.movedim(-1, 1) * 2 - 1)
    if again.shape[1] == 1:
        y_pixels = y_pixels.mean(dim=1, keepdim=True)
    torch.testing.assert_close(again, y_pixels, rtol=0, atol=1e-5)


def test_noise_is_seeded_and_has_the_stated_level(comfy, photo):
    ops = {"factor": 2}
    first = comfy.run(simulate_graph("FlowDPSOperatorSRAvgPool", ops, sigma_y=0.05, seed=11)).raise_for_error()
    again = comfy.run(simulate_graph("FlowDPSOperatorSRAvgPool", ops, sigma_y=0.05, seed=11), fresh=True)
    other = comfy.run(simulate_graph("FlowDPSOperatorSRAvgPool", ops, sigma_y=0.05, seed=12)).raise_for_error()
    y1, y2, y3 = (r.output("sim", 0) for r in (first, again.raise_for_error(), other))
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert (y1 - y3).abs().max() > 0.01
    from flowdps.operators import AvgPoolSR

    clean = reference_measurement(AvgPoolSR(2), photo)
    inside = (clean > 0.2) & (clean < 0.8)  # away from the [0, 1] clip
    std = (y1 - clean)[inside].std().item()
    assert 0.045 < std < 0.055, std


def test_compose_applies_first_then_then(comfy, photo):
    g = GraphBuilder()
    image = g.add("LoadImage", "load", image=PHOTO).out()
    blur = g.add("FlowDPSOperatorGaussianBlur", "blur", kernel_size=5, sigma=1.0, boundary="reflect").out()
    pool = g.add("FlowDPSOperatorSRAvgPool", "pool", factor=2).out()
    op = g.add("FlowDPSOperatorCompose", "op", first=blur, then=pool).out()
    sim = g.add("FlowDPSSimulateMeasurement", "sim", image=image, operator=op, sigma_y=0.0, seed=0)
    pinv = g.add("FlowDPSPseudoInverse", "pinv", measurement=sim.out(0), operator=op, max_iterations=5)
    g.add("SaveImage", "save", images=pinv.out(0), filename_prefix="compose")
    result = comfy.run(g.build()).raise_for_error()
    torch.testing.assert_close(result.output("sim", 0), reference_measurement(_expected("blur_then_pool"), photo),
                               rtol=0, atol=2e-5)
    assert tuple(result.output("pinv", 0).shape) == (1, HEIGHT, WIDTH, 3)


def test_kernel_blur_from_the_motion_nodes_kernel_image(comfy, photo):
    """The kernel IMAGE output of the motion node, fed back as a custom kernel, gives the same blur."""
    g = GraphBuilder()
    image = g.add("LoadImage", "load", image=PHOTO).out()
    motion = g.add("FlowDPSOperatorMotionBlur", "motion", kernel_size=15, intensity=0.5, seed=3, boundary="zero")
    custom = g.add("FlowDPSOperatorKernelBlur", "custom", kernel_image=motion.out(1), boundary="zero")
    sim_a = g.add("FlowDPSSimulateMeasurement", "a", image=image, operator=motion.out(0), sigma_y=0.0, seed=0)
    sim_b = g.add("FlowDPSSimulateMeasurement", "b", image=image, operator=custom.out(0), sigma_y=0.0, seed=0)
    g.add("SaveImage", "save_a", images=sim_a.out(0), filename_prefix="motion_a")
    g.add("SaveImage", "save_b", images=sim_b.out(0), filename_prefix="motion_b")
    result = comfy.run(g.build()).raise_for_error()
    kernel = result.output("motion", 1)
    assert tuple(kernel.shape) == (1, 15, 15, 3)
    assert kernel.max() == 1
    torch.testing.assert_close(result.output("a", 0), result.output("b", 0), rtol=0, atol=1e-5)


def test_mask_inpaint_uses_comfyuis_mask_convention(comfy, photo):
    """A ComfyUI MASK marks the area to fill with 1: those pixels become unknown in the measurement."""
    g = GraphBuilder()
    image = g.add("LoadImage", "load", image=PHOTO).out()
    canvas = g.add("SolidMask", "canvas", value=0.0, width=WIDTH, height=HEIGHT).out()
    hole = g.add("SolidMask", "hole", value=1.0, width=16, height=8).out()
    mask = g.add("MaskComposite", "mask", destination=canvas, source=hole, x=4, y=2, operation="add").out()
    op = g.add("FlowDPSOperatorMaskInpaint", "op", mask=mask, invert=False).out()
    sim = g.add("FlowDPSSimulateMeasurement", "sim", image=image, operator=op, sigma_y=0.0, seed=0)
    g.add("SaveImage", "save", images=sim.out(0), filename_prefix="mask_inpaint")
    result = comfy.run(g.build()).raise_for_error()
    unknown = result.output("sim", 1)
    assert unknown.sum() == 16 * 8
    assert unknown[0, 2:10, 4:20].min() == 1
    y = result.output("sim", 0)
    assert (y[0, 2:10, 4:20] == 0.5).all()  # unknown pixels are 0 on [-1, 1], mid-grey on [0, 1]
    torch.testing.assert_close(y[0, 20:], photo[0, 20:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("invert", [False, True])
def test_mask_value_one_half_counts_as_known(comfy, photo, invert):
    """The cut is at 0.5 and exactly 0.5 is known either way (ComfyUI's inpainting nodes round 0.5 to 0, i.e.
    keep it); the description says so."""
    g = GraphBuilder()
    image = g.add("LoadImage", "load", image=PHOTO).out()
    mask = g.add("SolidMask", "mask", value=0.5, width=WIDTH, height=HEIGHT).out()
    op = g.add("FlowDPSOperatorMaskInpaint", "op", mask=mask, invert=invert).out()
    sim = g.add("FlowDPSSimulateMeasurement", "sim", image=image, operator=op, sigma_y=0.0, seed=0)
    g.add("SaveImage", "save", images=sim.out(0), filename_prefix="mask_half")
    result = comfy.run(g.build()).raise_for_error()
    assert result.output("sim", 1).sum() == 0
    torch.testing.assert_close(result.output("sim", 0), photo, rtol=0, atol=1e-6)
    node = schema(comfy, "FlowDPSOperatorMaskInpaint")
    assert "exactly 0.5 counts as keep" in node.description
    assert ">= 0.5" not in node.description


def error_of(comfy, prompt: dict):
    result = comfy.run(prompt, fresh=True)
    assert not result.success
    assert result.error is not None
    return result.error


@pytest.mark.parametrize(
    ("op_class", "op_inputs", "node", "message"),
    [
        ("FlowDPSOperatorSRAvgPool", {"factor": 5}, "sim", "height 64 is not divisible by the scale factor 5"),
        ("FlowDPSOperatorSRBicubic", {"factor": 7}, "sim", "is not divisible by the scale factor 7"),
        ("FlowDPSOperatorGaussianBlur", {"kernel_size": 81, "sigma": 3.0, "boundary": "reflect"}, "sim",
         "kernel 81x81 is larger than the image 64x96"),
        ("FlowDPSOperatorGaussianBlur", {"kernel_size": 8, "sigma": 3.0, "boundary": "reflect"}, "op",
         "kernel_size 8 is even"),
        ("FlowDPSOperatorMotionBlur", {"kernel_size": 12, "intensity": 0.5, "seed": 0, "boundary": "reflect"}, "op",
         "kernel_size 12 is even"),
        ("FlowDPSOperatorBoxInpaint", {"width": 64, "height": 64, "box_left": 0, "box_top": 0, "box_width": 8,
                                       "box_height": 8}, "sim", "mask 64x64 does not match the image 64x96"),
        ("FlowDPSOperatorBoxInpaint", {"width": 96, "height": 64, "box_left": 90, "box_top": 0, "box_width": 8,
                                       "box_height": 8}, "op", "does not fit in the image 64x96"),
        ("FlowDPSOperatorKernelBlur", {"boundary": "reflect"}, "op", "connect exactly one kernel"),
    ],
)
def test_bad_inputs_give_node_errors_that_name_the_value(comfy, photo, op_class, op_inputs, node, message):
    error = error_of(comfy, simulate_graph(op_class, op_inputs, prefix="bad"))
    assert error.node_id == node
    assert message in error.message


def test_out_of_range_widget_is_rejected_before_running(comfy, photo):
    bad = simulate_graph("FlowDPSOperatorGaussianBlur", {"kernel_size": 9, "sigma": 0.0, "boundary": "reflect"})
    with pytest.raises(GraphValidationError, match="sigma"):
        comfy.run(bad)


def test_measurement_of_the_wrong_size_is_refused_by_the_preview(comfy, photo):
    g = GraphBuilder()
    y = g.add("LoadImage", "load", image=PHOTO).out()
    op = g.add("FlowDPSOperatorBoxInpaint", "op", width=32, height=32, box_left=0, box_top=0, box_width=8,
               box_height=8).out()
    pinv = g.add("FlowDPSPseudoInverse", "pinv", measurement=y, operator=op, max_iterations=5)
    g.add("SaveImage", "save", images=pinv.out(0), filename_prefix="bad_pinv")
    error = error_of(comfy, g.build())
    assert error.node_id == "pinv"
    assert "measurement (96x64 pixels, W x H) does not fit the operator" in error.message
    assert "mask 32x32 does not match the image 64x96" in error.message


def test_alpha_and_grey_images_are_read_as_rgb(comfy):
    from flowdps.nodes.convert import image_to_pixels

    rgba = torch.rand(2, 5, 7, 4)
    torch.testing.assert_close(image_to_pixels(rgba), image_to_pixels(rgba[..., :3]))
    grey = torch.rand(1, 5, 7, 1)
    assert image_to_pixels(grey).shape == (1, 3, 5, 7)
    bad = torch.rand(1, 2, 2, 3)
    bad[0, 1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="measurement: contains 1 NaN"):
        image_to_pixels(bad, name="measurement")


def test_server_reports_operator_errors_and_keeps_serving(comfy_server):
    def graph(factor: int) -> dict:
        g = GraphBuilder()
        image = g.add("EmptyImage", "image", width=WIDTH, height=HEIGHT, batch_size=1, color=0x406080).out()
        op = g.add("FlowDPSOperatorSRAvgPool", "op", factor=factor).out()
        sim = g.add("FlowDPSSimulateMeasurement", "sim", image=image, operator=op, sigma_y=0.0, seed=0)
        g.add("SaveImage", "save", images=sim.out(0), filename_prefix=f"server_sr{factor}")
        return g.build()

    outcome = comfy_server.run(graph(5))
    assert outcome.status == "error"
    assert "height 64 is not divisible by the scale factor 5" in outcome.error["exception_message"]
    outcome = comfy_server.run(graph(4))
    assert outcome.status == "success", outcome.error
    assert len(outcome.images()) == 1


@pytest.mark.parametrize("op_class", ["FlowDPSOperatorBoxInpaint", "FlowDPSOperatorRandomInpaint"])
def test_a_mask_larger_than_the_free_memory_is_refused_before_it_is_built(comfy, photo, monkeypatch, op_class):
    import comfy.model_management as mm
    from flowdps.operators import inpainting

    def refuse(*args, **kwargs):
        raise AssertionError("a full-size mask was built before the memory check")

    monkeypatch.setattr(inpainting, "box_mask", refuse)
    monkeypatch.setattr(inpainting, "random_mask", refuse)
    monkeypatch.setattr(mm, "get_free_memory", lambda *args, **kwargs: 2**29)
    inputs = ({"box_left": 0, "box_top": 0, "box_width": 8, "box_height": 8}
              if op_class.endswith("BoxInpaint") else {"missing_ratio": 0.5, "seed": 0})
    started = time.perf_counter()
    error = error_of(comfy, simulate_graph(op_class, {"width": 16384, "height": 16384, **inputs}, prefix="huge"))
    assert time.perf_counter() - started < 10
    assert error.node_id == "op"
    assert "a 16384x16384 mask needs about" in error.message
    assert "only 0.5 GiB is free" in error.message


def test_the_box_nodes_mask_output_is_the_operators_mask_inverted(comfy):
    node = comfy.node_classes["FlowDPSOperatorBoxInpaint"]
    op, mask = node.execute(width=10, height=6, box_left=3, box_top=1, box_width=4, box_height=2).result
    assert not op.mask_built
    assert mask.shape == (1, 6, 10)
    assert torch.equal(mask, 1.0 - op.mask[:, 0])
    assert float(mask.sum()) == 8
