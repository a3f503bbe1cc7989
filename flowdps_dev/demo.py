"""``make demo``: FlowDPS super-resolution of a real photograph through the shipped workflow, headless.

What it does, in order (each stage is timed)::

    setup         ComfyUI imported in this process with the pack (flowdps_dev.comfy_env);
                  "example_workflows/1 - Upscale a photo 4x (SD3).json" converted to an API prompt (ui_to_api with the real
                  node info) with the checkpoint, measurement file, factor, seed and steps substituted
    measurement   a CC0 photo that ships in the scikit-image wheel (no download) -> centre crop -> 256x256
                  ground truth -> bicubic SR x4 (the pack's BicubicSR) + seeded Gaussian noise (sigma_y 0.015
                  on [0, 1]) -> 64x64 measurement PNG, also written to ComfyUI's input folder
    model load    the workflow's loader and prompt nodes (their outputs stay in the executor's cache)
    pseudo-inverse  the workflow's Pseudo-inverse preview branch
    sampling      the whole workflow: FlowDPS Restore and Save Image run, everything else is cached
    saving        ground_truth / measurement / pseudo_inverse / restored / side_by_side PNGs, PSNRs and
                  timings.json in the output folder (ComfyUI's own input/output folders are in comfyui/)

Without real weights it runs the tiny random-weight SD3 checkpoint of ``make setup``: the picture then
only proves the wiring (a random prior restores noise). With SD3 weights::

    make demo DEMO_ARGS="--ckpt /path/to/sd3_medium_incl_clips.safetensors"
    make demo DEMO_ARGS="--models /path/to/ComfyUI/models"         # uses checkpoints/sd3_medium_incl_clips...

Run ``python flowdps_dev/demo.py --help`` for every option.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "example_workflows" / "1 - Upscale a photo 4x (SD3).json"
DEFAULT_OUT = Path("out") / "demo"
TASKS = {"sr4": 4, "sr8": 8, "sr12": 12}
DEFAULT_SIZE = 256
DEFAULT_STEPS = 28
SIGMA_Y = 0.015  # the paper's measurement noise on the [0, 1] scale (nodes/convert.py PAPER_SIGMA_Y)
SD3_MULTIPLE = 16  # SD3 image sides are multiples of 16 pixels (8x VAE, 2x2 patches)
TINY_MAX_SIZE = 512  # the tiny transformer's position embedding covers 64x64 latents
MEASUREMENT_FILE = "flowdps_demo_measurement.png"  # name in ComfyUI's input folder
LABEL_HEIGHT = 16  # pixels of the caption strip above each panel of side_by_side.png
STAGES = ("setup", "measurement", "model_load", "pseudo_inverse", "sampling", "saving")


@dataclass(frozen=True)
class Photo:
    """A photograph shipped in the scikit-image wheel (``skimage/data/<file>``)."""

    file: str
    title: str
    licence: str


# Licences as stated in the docstrings of skimage.data (scikit-image 0.26.0, skimage/data/_fetchers.py).
PHOTOS: Mapping[str, Photo] = {
    "chelsea": Photo("chelsea.png", "Chelsea the cat",
                     "CC0, no copyright restrictions (photographer: Stefan van der Walt)"),
    "coffee": Photo("coffee.png", "a coffee cup (courtesy of Pikolo Espresso Bar)",
                    "CC0, no copyright restrictions (photographer: Rachel Michetti)"),
    "astronaut": Photo("astronaut.png", "astronaut Eileen Collins (NASA)",
                       "public domain, no known copyright restrictions (NASA Great Images)"),
}


class DemoError(RuntimeError):
    """A problem the user can fix (missing photo package, unknown checkpoint, bad size); printed plainly."""


# --------------------------------------------------------------------------------------------- the photo


def photo_path(name: str) -> Path:
    """``skimage/data/<file>`` of the installed scikit-image wheel, located without importing skimage."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DemoError("scikit-image is not installed in this venv: run `make setup` (it installs the photo "
                        "package scikit-image==0.26.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / PHOTOS[name].file
    if not path.is_file():
        raise DemoError(f"{path} is missing from the scikit-image installation")
    return path


def ground_truth(path: Path, size: int):
    """The photo centre-cropped to a square and resized (Lanczos) to ``size`` x ``size``: (size, size, 3) uint8."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8).copy()


def pack_operators():
    """The pack's pure-PyTorch ``operators`` package, with the pack imported as ``flowdps`` (as the tests do)."""
    from flowdps_dev.pack import import_pack

    import_pack()
    return importlib.import_module("flowdps.operators")


def to_pixels(image):
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1]."""
    import torch

    return torch.from_numpy(image).float().div(255.0).mul(2.0).sub(1.0).permute(2, 0, 1).unsqueeze(0)


def to_uint8(pixels):
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8 (rounded)."""
    return ((pixels[0].permute(1, 2, 0).double() + 1.0) / 2.0 * 255.0).round().clamp(0, 255).byte().numpy()


def comfy_image_to_uint8(image):
    """ComfyUI IMAGE (B, H, W, 3) in [0, 1] -> first entry as (H, W, 3) uint8 (rounded)."""
    return (image[0, ..., :3].double() * 255.0).round().clamp(0, 255).byte().cpu().numpy()


def simulate_measurement(gt, factor: int, sigma_y: float, seed: int):
    """``y = BicubicSR(factor)(x) + sigma_y N(0, I)`` on the pack's [-1, 1] scale, seeded; (h, w, 3) uint8.

    ``sigma_y`` is on the [0, 1] scale (doubled for the operators' [-1, 1], as the node does); the noise is drawn on
    the CPU from ``torch.Generator().manual_seed(seed)``, as FlowDPSSimulateMeasurement does.
    """
    import torch

    ops = pack_operators()
    y = ops.BicubicSR(factor).forward(to_pixels(gt))
    y = ops.GaussianNoise(2.0 * sigma_y).apply(y, torch.Generator().manual_seed(seed))
    return to_uint8(y)


def psnr(a, b) -> float:
    """PSNR in dB of two uint8 images on the [0, 1] scale."""
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) / 255.0 - b.astype(np.float64) / 255.0) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


def side_by_side(panels: Iterable[tuple[Any, str]], size: int):
    """Panels (uint8 images, any size: nearest-neighbour resized to ``size``) in a row, each captioned."""
    from PIL import Image, ImageDraw

    panels = list(panels)
    canvas = Image.new("RGB", (size * len(panels), size + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (image, label) in enumerate(panels):
        tile = Image.fromarray(image)
        if tile.size != (size, size):
            tile = tile.resize((size, size), Image.Resampling.NEAREST)
        canvas.paste(tile, (k * size, LABEL_HEIGHT))
        draw.text((k * size + 4, 2), label, fill="black")
    return canvas


def save_png(image, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(image).save(path)
    return path


# ------------------------------------------------------------------------------------------ the workflow


def node_info_of(session) -> Callable[[str], dict]:
    """``node_info(class_type)`` as ComfyUI's ``GET /object_info`` reports it (``ComfySession.node_info``), with
    a :class:`DemoError` naming a node type this ComfyUI does not have."""

    def node_info(class_type: str) -> dict:
        if class_type not in session.node_classes:
            raise DemoError(f"the workflow uses the node type {class_type!r}, which this ComfyUI does not have")
        return session.node_info(class_type)

    return node_info


@dataclass(frozen=True)
class WorkflowNodes:
    """API node ids of the workflow's parts, found by type and by what links to the restore node."""

    loader: str
    positive: str
    negative: str
    restore: str
    measurement: str
    operator: str
    pseudo_inverse: str
    pseudo_inverse_out: str
    save: str


def _only(prompt: Mapping[str, dict], class_type: str) -> str:
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    if len(ids) != 1:
        raise DemoError(f"the workflow must contain exactly one {class_type} node, it has {len(ids)}")
    return ids[0]


def _consumers(prompt: Mapping[str, dict], node_id: str) -> list[str]:
    return [k for k, v in prompt.items()
            if any(isinstance(x, list) and len(x) == 2 and x[0] == node_id for x in v["inputs"].values())]


def find_nodes(prompt: Mapping[str, dict]) -> WorkflowNodes:
    restore_id = _only(prompt, "FlowDPSRestore")
    restore = prompt[restore_id]["inputs"]
    pinv = _only(prompt, "FlowDPSPseudoInverse")
    pinv_out = [k for k in _consumers(prompt, pinv) if prompt[k]["class_type"] in ("PreviewImage", "SaveImage")]
    save = [k for k in _consumers(prompt, restore_id) if prompt[k]["class_type"] == "SaveImage"]
    if len(pinv_out) != 1 or len(save) != 1:
        raise DemoError("the workflow must show the pseudo-inverse (one Preview/Save Image) and save the "
                        "restoration (one Save Image)")
    return WorkflowNodes(loader=_only(prompt, "CheckpointLoaderSimple"), positive=restore["positive"][0],
                         negative=restore["negative"][0], restore=restore_id, measurement=_only(prompt, "LoadImage"),
                         operator=_only(prompt, "FlowDPSOperatorSRBicubic"), pseudo_inverse=pinv,
                         pseudo_inverse_out=pinv_out[0], save=save[0])


def load_workflow(path: Path = WORKFLOW) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def prepare_prompt(workflow: Mapping[str, Any], node_info: Callable[[str], dict], *, ckpt_name: str,
                   measurement: str, factor: int, seed: int, steps: int,
                   sigma_y: float = SIGMA_Y) -> tuple[dict, WorkflowNodes]:
    """The workflow as an API prompt with the demo's checkpoint, measurement file and settings substituted."""
    from flowdps_dev.workflow_convert import ui_to_api

    prompt = ui_to_api(workflow, node_info)
    ids = find_nodes(prompt)
    prompt[ids.loader]["inputs"]["ckpt_name"] = ckpt_name
    prompt[ids.measurement]["inputs"]["image"] = measurement
    prompt[ids.operator]["inputs"]["factor"] = factor
    prompt[ids.restore]["inputs"].update(seed=seed, steps=steps, sigma_y=sigma_y)
    prompt[ids.save]["inputs"]["filename_prefix"] = f"FlowDPS/superres_x{factor}"
    return prompt, ids


def subgraph(prompt: Mapping[str, dict], roots: Iterable[str]) -> dict:
    """The nodes ``roots`` and everything they depend on (same ids and inputs, so ComfyUI's cache hits)."""
    keep: set[str] = set()
    todo = list(roots)
    while todo:
        node_id = todo.pop()
        if node_id in keep:
            continue
        keep.add(node_id)
        todo.extend(x[0] for x in prompt[node_id]["inputs"].values() if isinstance(x, list) and len(x) == 2)
    return {k: v for k, v in prompt.items() if k in keep}


# ------------------------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class Checkpoint:
    name: str  # as CheckpointLoaderSimple lists it
    models_dir: Path | None  # given to comfy_env.start (None: $FLOWDPS_MODELS)
    extra_dir: Path | None  # a folder added to ComfyUI's checkpoints search path (from a file path)
    tiny: bool


def choose_checkpoint(ckpt: str | None, models: str | None, workflow_ckpt: str) -> Checkpoint:
    """Decide what to load from ``--ckpt`` (a file path or a checkpoint name) and ``--models``."""
    from flowdps_dev.graphs import TINY_CHECKPOINT

    models_dir = Path(models).expanduser().resolve() if models else None
    if models_dir is not None and models_dir.is_file():  # --models given a checkpoint file
        if ckpt:
            raise DemoError(f"--models {models} is a file: pass a models folder with --ckpt, or the file alone")
        ckpt, models_dir = str(models_dir), None
    if models_dir is not None and not models_dir.is_dir():
        raise DemoError(f"--models {models}: no such folder")
    extra_dir = None
    if ckpt and Path(ckpt).expanduser().is_file():
        path = Path(ckpt).expanduser().resolve()
        ckpt, extra_dir = path.name, path.parent
    elif ckpt and (ckpt.startswith((".", "~")) or os.path.isabs(ckpt)):
        raise DemoError(f"--ckpt {ckpt}: no such file")
    name = ckpt or (workflow_ckpt if models_dir is not None else TINY_CHECKPOINT)
    return Checkpoint(name=name, models_dir=models_dir, extra_dir=extra_dir, tiny=name == TINY_CHECKPOINT)


def register_checkpoint(checkpoint: Checkpoint) -> None:
    """Add a checkpoint file's folder to ComfyUI's search path and check that the name is listed."""
    import folder_paths

    if checkpoint.extra_dir is not None:
        folder_paths.add_model_folder_path("checkpoints", str(checkpoint.extra_dir), is_default=True)
    names = folder_paths.get_filename_list("checkpoints")
    if checkpoint.name not in names:
        folders = folder_paths.get_folder_paths("checkpoints")
        raise DemoError(f"checkpoint {checkpoint.name!r} not found in {folders}; available: {names or 'none'}. "
                        "Pass --ckpt /path/to/file.safetensors or --models /path/to/ComfyUI/models")


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make demo DEMO_ARGS=...",
        description="FlowDPS super-resolution of a real photograph through the first shipped workflow "
                    "(example_workflows/1 - Upscale a photo 4x (SD3).json) "
                    "in an in-process ComfyUI. Without --ckpt/--models it uses the tiny random-weight models "
                    "of `make setup` (the result then only proves the wiring).",
    )
    parser.add_argument("--task", choices=sorted(TASKS, key=TASKS.get), default="sr4",
                        help="super-resolution factor: sr4 (default), sr8, sr12 (the paper's; needs --size 768)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"ground-truth side in pixels (default {DEFAULT_SIZE}; a multiple of 16 and of the factor)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the measurement noise and of the sampler")
    parser.add_argument("--sigma-y", type=float, default=SIGMA_Y,
                        help=f"measurement noise std on the [0, 1] scale (default {SIGMA_Y}, the paper's)")
    parser.add_argument("--photo", choices=list(PHOTOS), default="chelsea",
                        help="which scikit-image photograph (default chelsea)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--ckpt", help="an SD3 checkpoint with its text encoders: a file path, or a name in the "
                                       "checkpoints folder of --models (e.g. sd3_medium_incl_clips.safetensors)")
    parser.add_argument("--models", help="a ComfyUI models folder (checkpoints/ inside it), or a checkpoint file")
    args = parser.parse_args(argv)
    factor = TASKS[args.task]
    multiple = math.lcm(SD3_MULTIPLE, factor)
    if args.size <= 0 or args.size % multiple:
        parser.error(f"--size {args.size} must be a positive multiple of {multiple} for {args.task} (the output "
                     f"side is a multiple of {SD3_MULTIPLE} and of the factor; the paper's sr12 uses 768)")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if not 0 <= args.sigma_y <= 1:
        parser.error("--sigma-y must be in [0, 1]")
    return args


class Clock:
    """Wall-clock seconds per stage."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}
        self._last = self.start

    def lap(self, stage: str) -> float:
        now = time.perf_counter()
        self.stages[stage] = now - self._last
        self._last = now
        return self.stages[stage]

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def run(args: argparse.Namespace) -> dict:
    """The demo; returns what timings.json holds. Raises DemoError or RuntimeError (graph failure)."""
    clock = Clock()
    factor = TASKS[args.task]
    size, low = args.size, args.size // factor
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    workflow = load_workflow()
    workflow_ckpt = next(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple")
    checkpoint = choose_checkpoint(args.ckpt, args.models, workflow_ckpt)
    if checkpoint.tiny and size > TINY_MAX_SIZE:
        raise DemoError(f"--size {size}: the tiny test model handles up to {TINY_MAX_SIZE} px")
    photo = PHOTOS[args.photo]
    source = photo_path(args.photo)

    print(f"FlowDPS demo: SR x{factor}, {photo.title} ({source.name} from the scikit-image 0.26 wheel; "
          f"licence: {photo.licence})")
    print(f"  ground truth {size}x{size} -> measurement {low}x{low} (bicubic x{factor}, sigma_y {args.sigma_y} "
          f"on [0, 1], seed {args.seed}) -> FlowDPS, {args.steps} step{'s' if args.steps != 1 else ''}")
    if checkpoint.tiny:
        print("  MODELS: tiny random-weight SD3 test models (make setup), NOT real SD3 weights. The restoration of "
              "a random prior is noise: this picture only proves the wiring (photo -> measurement -> workflow "
              "-> ComfyUI -> images). For a real result: make demo DEMO_ARGS=\"--ckpt "
              "/path/to/sd3_medium_incl_clips.safetensors\"")
    else:
        print(f"  models: checkpoint {checkpoint.name}" + (f" from {checkpoint.extra_dir}" if checkpoint.extra_dir
                                                          else f" from {checkpoint.models_dir or 'the models folders'}"))

    # setup -------------------------------------------------------------------------------------------
    from flowdps_dev import comfy_env

    session = comfy_env.start(models_dir=checkpoint.models_dir, work_dir=out / "comfyui")
    register_checkpoint(checkpoint)
    prompt, ids = prepare_prompt(workflow, node_info_of(session), ckpt_name=checkpoint.name,
                                 measurement=MEASUREMENT_FILE, factor=factor, seed=args.seed, steps=args.steps,
                                 sigma_y=args.sigma_y)
    import comfy.model_management as mm

    device = str(mm.get_torch_device())
    print(f"  ComfyUI {session.comfy_dir} on {device}; workflow {WORKFLOW.relative_to(ROOT)}")
    clock.lap("setup")

    # measurement -------------------------------------------------------------------------------------
    gt = ground_truth(source, size)
    y = simulate_measurement(gt, factor, args.sigma_y, args.seed)
    files = {"ground_truth": save_png(gt, out / "ground_truth.png"),
             "measurement": save_png(y, out / "measurement.png")}
    save_png(y, session.input_dir / MEASUREMENT_FILE)  # what the workflow's Load Image reads
    clock.lap("measurement")

    # model load: the loader and both prompts. Each run's graph contains the previous one: ComfyUI drops
    # cached outputs of nodes that are not in the current prompt, so the full run below reuses them all.
    sinks = {f"demo_{role}_sink": {"class_type": "PreviewAny", "inputs": {"source": [getattr(ids, role), 0]}}
             for role in ("positive", "negative")}
    session.run({**subgraph(prompt, [ids.positive, ids.negative]), **sinks}).raise_for_error()
    clock.lap("model_load")

    # pseudo-inverse branch -----------------------------------------------------------------------------
    session.run({**subgraph(prompt, [ids.positive, ids.negative, ids.pseudo_inverse_out]), **sinks}).raise_for_error()
    clock.lap("pseudo_inverse")

    # the whole workflow (FlowDPS Restore runs; everything else comes from the cache) -------------------
    with sampling_progress():
        result = session.run(prompt).raise_for_error()
    clock.lap("sampling")
    executed = executed_nodes(result, prompt)
    if executed != {ids.restore, ids.save}:  # the stage timings would be mixed up
        print(f"  note: the full run executed {sorted(prompt[k]['class_type'] for k in executed)}")

    # saving ----------------------------------------------------------------------------------------------
    pinv = comfy_image_to_uint8(result.output(ids.pseudo_inverse, 0))
    restored = comfy_image_to_uint8(result.output(ids.restore, 0))
    if restored.shape != gt.shape or pinv.shape != gt.shape:
        raise RuntimeError(f"unexpected output sizes: restored {restored.shape}, pseudo-inverse {pinv.shape}, "
                           f"ground truth {gt.shape}")
    files["pseudo_inverse"] = save_png(pinv, out / "pseudo_inverse.png")
    files["restored"] = save_png(restored, out / "restored.png")
    scores = {"pseudo_inverse": psnr(pinv, gt), "restored": psnr(restored, gt)}
    panels = [(gt, f"ground truth {size}px"), (y, f"measurement {low}px (nearest)"),
              (pinv, f"pseudo-inverse {scores['pseudo_inverse']:.1f} dB"),
              (restored, f"FlowDPS{' (tiny random)' if checkpoint.tiny else ''} {scores['restored']:.1f} dB")]
    side_by_side(panels, size).save(out / "side_by_side.png")
    files["side_by_side"] = out / "side_by_side.png"
    files["comfyui_save_image"] = next(iter(result.image_files(ids.save)), None)
    clock.lap("saving")

    report = {
        "stages_s": {stage: round(clock.stages[stage], 3) for stage in STAGES},
        "total_s": round(clock.total, 3),
        "psnr_db": {k: round(v, 3) for k, v in scores.items()},
        "run": {
            "task": args.task, "factor": factor, "size": size, "measurement_size": low, "steps": args.steps,
            "seed": args.seed, "sigma_y": args.sigma_y, "checkpoint": checkpoint.name,
            "tiny_random_weights": checkpoint.tiny, "photo": f"skimage/data/{photo.file}",
            "photo_licence": photo.licence, "workflow": str(WORKFLOW.relative_to(ROOT)), "device": device,
            "python": platform.python_version(), "torch_threads": _torch_threads(),
        },
    }
    (out / "timings.json").write_text(json.dumps(report, indent=2) + "\n")
    files["timings"] = out / "timings.json"

    labels = {"measurement": "measurement (photo, crop, SR, noise)", "setup": "set-up (ComfyUI + pack import)",
              "model_load": "model load + prompt encoding", "pseudo_inverse": "pseudo-inverse preview",
              "sampling": f"sampling (FlowDPS, {args.steps} step{'s' if args.steps != 1 else ''} + decode)", "saving": "saving + PSNR"}
    print("stage timings:")
    for stage in STAGES:
        print(f"  {labels[stage]:<40} {clock.stages[stage]:8.1f} s")
    print(f"  {'total':<40} {report['total_s']:8.1f} s")
    print(f"PSNR vs ground truth ([0, 1] scale): pseudo-inverse {scores['pseudo_inverse']:.2f} dB, "
          f"FlowDPS {scores['restored']:.2f} dB" + (" (tiny random weights: meaningless)" if checkpoint.tiny else ""))
    print("files:")
    for path in files.values():
        if path is not None:
            print(f"  {_shown(path)}")
    return report


@contextlib.contextmanager
def sampling_progress():
    """Show the sampler's step count on a terminal (ComfyUI's progress-bar hook, as its server sets one)."""
    import comfy.utils

    if not sys.stdout.isatty():
        yield
        return
    start = time.perf_counter()

    def hook(value, total, preview=None, node_id=None):
        elapsed = time.perf_counter() - start
        eta = elapsed / value * (total - value) if value else 0.0
        print(f"\r  sampling: step {value}/{total}, {elapsed:.0f} s, about {eta:.0f} s left   ", end="", flush=True)

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        print()


def executed_nodes(result, prompt: Mapping[str, dict]) -> set[str]:
    """Ids of the prompt's nodes that ran (not served from ComfyUI's cache) in ``result``."""
    cached = {n for event, data in result.messages if event == "execution_cached" for n in data.get("nodes", [])}
    return set(prompt) - cached


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    from flowdps_dev.comfy_env import ComfyNotFoundError

    args = parse_args(argv)
    try:
        run(args)
    except (DemoError, ComfyNotFoundError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Run as a script (make demo): import flowdps_dev from the repository root, not from this folder
    # (whose server.py would shadow ComfyUI's `server`). The root is appended, as in tests/conftest.py.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(here)]
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    sys.exit(main())
