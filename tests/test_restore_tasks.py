"""FlowDPS through real ComfyUI for every task (SR, Gaussian and motion deblurring, inpainting) with the real
operator nodes: the SAMPLER node in SamplerCustomAdvanced and the Restore node, on the tiny models. Also the
ComfyUI behaviours users expect: progress per step, live previews, interruption, reproducible seeds."""

from __future__ import annotations

import pytest
import torch

from flowdps_dev import graphs

pytestmark = pytest.mark.comfy

SIZE = 32  # restored image side (pixels): a multiple of 16 for SD3
PHOTO = "flowdps_task_photo.png"
PHOTO_SEED = 3

# task -> (operator node, its inputs, measurement side)
TASKS = {
    "sr_bicubic_x2": ("FlowDPSOperatorSRBicubic", {"factor": 2}, SIZE // 2),
    "gaussian_deblur": ("FlowDPSOperatorGaussianBlur", {"kernel_size": 7, "sigma": 2.0, "boundary": "reflect"}, SIZE),
    "motion_deblur": ("FlowDPSOperatorMotionBlur", {"kernel_size": 9, "intensity": 0.5, "seed": 1,
                                                    "boundary": "reflect"}, SIZE),
    "box_inpaint": ("FlowDPSOperatorBoxInpaint", {"width": SIZE, "height": SIZE, "box_left": 8, "box_top": 8,
                                                  "box_width": 16, "box_height": 16}, SIZE),
}


def restore_graph(task: str, *, seed: int = 0, steps: int = 4, step_size: float = 15.0,
                  method: str = "flowdps") -> dict:
    op_class, op_inputs, _ = TASKS[task]
    return graphs.restore_graph("FlowDPSRestore", PHOTO, (op_class, op_inputs),
                                save_prefix=f"restore_{task}", seed=seed, steps=steps, cfg=2.0, shift=4.0,
                                method=method, step_size=step_size)


def custom_sampler_graph(task: str, *, seed: int = 0, steps: int = 4, step_size: float = 15.0) -> dict:
    g = graphs.GraphBuilder()
    model, vae, pos, neg = graphs.prior_loaders(g, graphs.TINY_PRIORS["sd3"])
    model = g.add("ModelSamplingSD3", "shift", model=model, shift=4.0).out()
    op_class, op_inputs, _ = TASKS[task]
    op, y = graphs.simulated_measurement(g, PHOTO, op_class, **op_inputs)
    guider = g.add("CFGGuider", "guider", model=model, positive=pos, negative=neg, cfg=2.0).out()
    sampler = g.add_node_with_defaults("FlowDPSSampler", "flowdps", vae=vae, operator=op, measurement=y,
                                       step_size=step_size).out()
    sigmas = g.add("BasicScheduler", "sigmas", model=model, scheduler="simple", steps=steps, denoise=1.0).out()
    noise = g.add("RandomNoise", "noise", noise_seed=seed).out()
    latent = g.add("EmptySD3LatentImage", "latent", width=SIZE, height=SIZE, batch_size=1).out()
    out = g.add("SamplerCustomAdvanced", "sampler", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                latent_image=latent)
    g.add("VAEDecode", "restore", samples=out.out(0), vae=vae)
    g.add("SaveImage", "save", images=["restore", 0], filename_prefix=f"custom_{task}")
    return g.build()


BUILDERS = {"restore": restore_graph, "custom": custom_sampler_graph}


@pytest.mark.parametrize("path", list(BUILDERS))
@pytest.mark.parametrize("task", list(TASKS))
def test_flowdps_lowers_the_residual_for_every_task(comfy, photo, task, path):
    """Same seed, same graph: FlowDPS (step 15) against the same sampler with the data term off (step 0)."""
    build = BUILDERS[path]
    ours = comfy.run(build(task), fresh=True).raise_for_error()
    plain = comfy.run(build(task, step_size=0.0), fresh=True).raise_for_error()
    assert tuple(ours.output("restore").shape) == (1, SIZE, SIZE, 3)
    assert tuple(ours.output("sim").shape[1:3]) == (TASKS[task][2],) * 2
    r_ours, r_plain = graphs.residual(ours), graphs.residual(plain)
    assert r_ours < 0.8 * r_plain, (task, path, r_ours, r_plain)


@pytest.mark.parametrize("path", list(BUILDERS))
def test_same_seed_reproduces(comfy, photo, path):
    build = BUILDERS[path]
    a = comfy.run(build("gaussian_deblur", seed=9), fresh=True).raise_for_error().output("restore")
    b = comfy.run(build("gaussian_deblur", seed=9), fresh=True).raise_for_error().output("restore")
    c = comfy.run(build("gaussian_deblur", seed=10), fresh=True).raise_for_error().output("restore")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3


def test_restore_batch_gives_independent_restorations(comfy, photo):
    prompt = restore_graph("sr_bicubic_x2")
    prompt["batch"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["photo", 0], "amount": 2}}
    prompt["sim"]["inputs"]["image"] = ["batch", 0]
    result = comfy.run(prompt, fresh=True).raise_for_error()
    images = result.output("restore")
    assert tuple(images.shape) == (2, SIZE, SIZE, 3)
    assert (images[0] - images[1]).abs().max() > 1e-3  # own noise per sample
    assert len(result.image_files("save")) == 2


@pytest.mark.parametrize("path", list(BUILDERS))
def test_progress_and_live_previews_every_step(comfy, photo, progress, path):
    probe = progress()
    comfy.run(BUILDERS[path]("sr_bicubic_x2", steps=5), fresh=True).raise_for_error()
    sampling = [v for v in probe.values if v[1] == 5]
    assert [v for v, _ in sampling] == [1, 2, 3, 4, 5]
    assert probe.previews >= 5


@pytest.mark.parametrize("path", list(BUILDERS))
def test_interrupt_stops_sampling_and_the_next_graph_runs(comfy, photo, progress, path):
    import comfy.model_management as mm

    probe = progress(interrupt_at=2)
    result = comfy.run(BUILDERS[path]("motion_deblur", steps=50), fresh=True)
    mm.interrupt_current_processing(False)
    assert not result.success
    assert result.error is not None
    assert result.error.exception_type.endswith("InterruptProcessingException")
    assert max(v for v, total in probe.values if total == 50) <= 3  # stopped at the next step, not at 50
    progress()  # a fresh probe without interruption
    comfy.run(BUILDERS[path]("motion_deblur", steps=2), fresh=True).raise_for_error()
