"""What the workflow tests put in place of a user's files, shared by the headless and the browser tests.

A shipped workflow names the canonical SD3 checkpoint and a photo the user picks (``photo.png``). For
test runs, :func:`substituted` swaps in the tiny checkpoint and writes a synthetic measurement of the right
size (and alpha mask, for mask inpainting) into ComfyUI's input folder; :func:`tiny_run_prompt` also makes
the run cheap: 1 step, 64 px, small blur kernels, 2 particles. Both work on API prompts, whichever
converter made them (``flowdps_dev.workflow_convert.ui_to_api`` or the frontend's ``app.graphToPrompt``).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
from PIL import Image

from .graphs import (
    TINY_CHECKPOINT,
    TINY_CLIP_L,
    TINY_FLUX_DEV_UNET,
    TINY_FLUX_VAE,
    TINY_MODEL_LOADER,
    TINY_SD35_MEDIUM_UNET,
    TINY_VAE,
)

SIZE = 64  # restored image side in the runs (tiny model, 1 step); SR x12 runs at 96 (a multiple of 12 and 16)
SMALL_KERNEL = 7  # blur kernel size in the runs (61 does not fit a 64 px image)
PARTICLES = 2  # AFDPS particles in the runs
SR_OPERATORS = ("FlowDPSOperatorSRBicubic", "FlowDPSOperatorSRAvgPool")
BLUR_OPERATORS = ("FlowDPSOperatorGaussianBlur", "FlowDPSOperatorPaperGaussianBlur", "FlowDPSOperatorMotionBlur")
BOX = (slice(16, 40), slice(20, 44))  # rows, columns of the inpainting test's missing area


def of_type(prompt: dict, *class_types: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] in class_types]


def only(prompt: dict, *class_types: str) -> str:
    ids = of_type(prompt, *class_types)
    assert len(ids) == 1, (class_types, ids)
    return ids[0]


def sr_factor(prompt: dict) -> int:
    """The SR operator's factor, 1 without one."""
    ids = of_type(prompt, *SR_OPERATORS)
    return prompt[only(prompt, *SR_OPERATORS)]["inputs"]["factor"] if ids else 1


def run_size(prompt: dict) -> int:
    """Side of the restored image in the test runs: SIZE, or the next multiple of 16 and the SR factor."""
    step = math.lcm(16, sr_factor(prompt))
    return step * math.ceil(SIZE / step)


def loaded_image_side(prompt: dict) -> int:
    """Side of the image the workflow's LoadImage reads in the runs: the measurement, or the clean photo of a
    workflow that simulates its measurement."""
    simulated = bool(of_type(prompt, "FlowDPSSimulateMeasurement"))
    return run_size(prompt) // (1 if simulated else sr_factor(prompt))


def write_test_image(input_dir: str | Path, prompt: dict) -> str:
    """Write the image this workflow loads (the measurement, or a clean photo to degrade) to ComfyUI's
    input folder; return its name."""
    side = loaded_image_side(prompt)
    rgb = np.zeros((side, side, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 255, side, dtype=np.uint8)[None]
    rgb[..., 1] = np.linspace(255, 0, side, dtype=np.uint8)[:, None]
    rgb[..., 2] = 90
    if of_type(prompt, "FlowDPSOperatorMaskInpaint"):
        alpha = np.full((side, side), 255, np.uint8)
        alpha[BOX] = 0  # transparent = missing: LoadImage's MASK is 1 - alpha
        name = f"workflow_test_{side}_rgba.png"
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(Path(input_dir) / name)
    else:
        name = f"workflow_test_{side}.png"
        Image.fromarray(rgb).save(Path(input_dir) / name)
    return name


USER_FILE_LOADERS = ("CheckpointLoaderSimple", "UNETLoader", "TripleCLIPLoader", "DualCLIPLoader", "VAELoader",
                     "LoadImage")


def family_of(prompt: dict) -> str:
    """The model family a shipped workflow's loaders name: "sd3", "sd35" or "flux"."""
    if of_type(prompt, "DualCLIPLoader"):
        return "flux"
    return "sd35" if of_type(prompt, "TripleCLIPLoader") else "sd3"


def substitute_models(prompt: dict) -> dict:
    """The tiny models in place of the user's (``prompt`` is changed): the SD3 checkpoint -> the tiny one;
    the SD3.5 checkpoint -> the tiny SD3.5 UNET plus the tiny SD3 VAE (its VAE output is rewired); Flux's UNET
    -> the tiny Flux through the test-only loader (ComfyUI cannot detect a config that small); the text
    encoders -> the tiny CLIP-L; Flux's VAE -> its tiny TAESD."""
    for node_id in of_type(prompt, "CheckpointLoaderSimple"):
        if not prompt[node_id]["inputs"]["ckpt_name"].startswith("sd3.5"):
            prompt[node_id]["inputs"]["ckpt_name"] = TINY_CHECKPOINT
            continue
        prompt[node_id] = {"class_type": "UNETLoader",
                           "inputs": {"unet_name": TINY_SD35_MEDIUM_UNET, "weight_dtype": "default"}}
        vae_id = f"{node_id}_tiny_vae"
        prompt[vae_id] = {"class_type": "VAELoader", "inputs": {"vae_name": TINY_VAE}}
        for node in list(prompt.values()):
            for name, value in node["inputs"].items():
                if value == [node_id, 2]:
                    node["inputs"][name] = [vae_id, 0]
    for node_id in of_type(prompt, "UNETLoader"):
        if prompt[node_id]["inputs"]["unet_name"].startswith("flux"):
            prompt[node_id] = {"class_type": TINY_MODEL_LOADER, "inputs": {"unet_name": TINY_FLUX_DEV_UNET}}
    for node_id in of_type(prompt, "TripleCLIPLoader", "DualCLIPLoader"):
        prompt[node_id] = {"class_type": "CLIPLoader",
                           "inputs": {"clip_name": TINY_CLIP_L, "type": "sd3", "device": "default"}}
    for node_id in of_type(prompt, "VAELoader"):
        if prompt[node_id]["inputs"]["vae_name"] == "ae.safetensors":
            prompt[node_id]["inputs"]["vae_name"] = TINY_FLUX_VAE
    return prompt


def write_test_photo(path: str | Path, side: int, seed: int, *, flip_y: bool = False) -> Path:
    """A side x side RGB test photo (smooth ramps + 20 % seeded noise, 8-bit PNG) at ``path``; ``flip_y``
    mirrors the green ramp. The photo of the node tests (their seeds keep their measured numbers)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    green = 1 - yy if flip_y else yy
    image = torch.stack([xx, green, (xx - yy).abs()], dim=-1) * 0.8 + 0.2 * torch.rand(side, side, 3, generator=g)
    Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)
    return Path(path)


def substituted(input_dir: str | Path, prompt: dict) -> dict:
    """What a user supplies (models, photo): the tiny models and a test image (``prompt`` is changed)."""
    substitute_models(prompt)
    image = write_test_image(input_dir, prompt)
    for node_id in of_type(prompt, "LoadImage"):
        prompt[node_id]["inputs"]["image"] = image
    return prompt


def tiny_run_prompt(input_dir: str | Path, prompt: dict) -> dict:
    """A copy of ``prompt`` with the user's files substituted; 1 step (1 data-consistency step), 64 px (96 for
    SR x12), small kernels and box, 2 particles."""
    prompt = substituted(input_dir, copy.deepcopy(prompt))
    size = run_size(prompt)
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind in BLUR_OPERATORS:
            inputs["kernel_size"] = SMALL_KERNEL
        if kind in ("FlowDPSRestore", "AFDPSRestore", "BasicScheduler", "FlowDPSSigmas"):
            inputs["steps"] = 1
        if kind in ("AFDPSRestore", "AFDPSSampler"):
            inputs["particles"] = PARTICLES
        if kind == "EmptySD3LatentImage":
            inputs.update(width=size, height=size)
        if kind == "FlowDPSOperatorBoxInpaint":
            inputs.update(width=size, height=size, box_top=BOX[0].start, box_left=BOX[1].start,
                          box_height=BOX[0].stop - BOX[0].start, box_width=BOX[1].stop - BOX[1].start)
        if kind in ("FlowDPSRestore", "FlowDPSSampler"):
            inputs["dc_steps"] = 1
        if kind == "FlowDPSPseudoInverse":
            inputs["max_iterations"] = 5
    return prompt


def expected_images(prompt: dict) -> dict[str, tuple[int, tuple[int, int]]]:
    """``{output node id: (image count, (width, height))}`` for every SaveImage / PreviewImage of a
    :func:`tiny_run_prompt`: a blur operator's kernel preview is ``SMALL_KERNEL`` px, the loaded image and a
    simulated measurement have their own sides, AFDPS Restore's particles output holds ``PARTICLES`` images,
    everything else is one image of :func:`run_size`."""
    expected = {}
    size = run_size(prompt)
    for node_id in of_type(prompt, "SaveImage", "PreviewImage"):
        source, slot = prompt[node_id]["inputs"]["images"]
        kind = prompt[source]["class_type"]
        side = size
        if kind in BLUR_OPERATORS and slot > 0:
            side = SMALL_KERNEL
        elif kind == "LoadImage":
            side = loaded_image_side(prompt)
        elif kind == "FlowDPSSimulateMeasurement":
            side = size // sr_factor(prompt)
        count = PARTICLES if kind == "AFDPSRestore" and slot == 2 else 1
        expected[node_id] = (count, (side, side))
    return expected
