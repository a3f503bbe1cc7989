"""Peak memory and time of one whole FlowDPS step against image size, per decoder memory mode.

Run (after ``make setup``)::

    source .cache/env.sh && .venv/bin/python benchmarks/flowdps_step_memory.py [--sizes 256 512] \\
        [--modes full checkpoint tiled] [--skip 512:full] [--budget-s 1800]

One step as ComfyUI runs it: every (size, mode) runs in its own worker process, which starts ComfyUI
in-process (``flowdps_dev.comfy_env``, CPU unless CUDA is present) and executes the graph

    UNETLoader(tiny SD3, SD3 medium's position grid) -> ModelSamplingSD3(shift 4) -> CFGGuider(cfg 2, CLIPTextEncode / ConditioningZeroOut)
    FlowDPSSampler(K=3, step 15, residual auto, paper norm, memory=<mode>)
        <- FlowDPSOperatorSRAvgPool(4) + EmptyImage(size/4) + VAELoader(full-size SD3 VAE, random weights)
    BasicScheduler(simple, 1 step) + RandomNoise + EmptySD3LatentImage(size) -> SamplerCustomAdvanced -> PreviewAny

through the real executor, with the pack's own nodes. The measured window is the pack's KSAMPLER function
(``nodes.bridge.sample_posterior``, wrapped in this process only): the private float32 decoder copy in the
given memory mode, the operator's float32 copy, one denoiser call (ComfyUI's CFG model call of the tiny
2-layer MMDiT, both branches) and K = 3 data-consistency gradients through the decoder copy and the operator,
the blend. The model, CLIP and VAE loading, ComfyUI's model load before sampling and the graph's other nodes
are outside the window. With one step the noise levels are ``[1, 0]``: the step's result is the
data-consistent estimate (no renoising, which is a few element-wise operations on the latent). Per worker:

* ``peak MiB``: extra resident memory of the window, measured like ``decoder_memory.py`` (``malloc_trim(0)``,
  ``/proc/self/clear_refs`` = 5, then ``VmHWM`` minus the RSS at the start). It includes the decoder copy's
  float32 weights (``decoder copy MiB``), which ``decoder_memory.py`` leaves out (its copy exists before its
  window). With CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes at the start, instead;
* ``time s``: wall time of the window; ``denoise s``: the part inside the denoiser call (the transformer here
  is a toy: a real SD3 adds its own time and weights).

Writes ``benchmarks/results/flowdps_step_memory.json`` and ``.md`` (the table that benchmarks/README.md
quotes). ``benchmarks/plot_memory.py`` draws it with the decoder gradient's results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoder_memory import merge_results, reset_peak, rss_hwm_mib  # a sibling script, not a package

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VAE_FILE = "tiny_sd3_vae_full.safetensors"
UNET_FILE = "tiny_sd3_pos192.safetensors"
POS_EMBED_MAX_SIZE = 192
"""SD3 medium's position-embedding grid (192 x patch 2 x 8 = 3072 px); the test models' 32 stops at 512 px."""
MODES = ("full", "checkpoint", "tiled")
SR_FACTOR = 4
DC_STEPS = 3
STEP_SIZE = 15.0
CFG = 2.0
SHIFT = 4.0


def step_graph(size: int, mode: str) -> dict:
    """API-format graph of one FlowDPS step at ``size`` px: SR x4 of a (size/4)^2 measurement, latent
    (1, 16, size/8, size/8), decoder gradient in memory mode ``mode``."""
    from flowdps_dev import graphs

    g = graphs.GraphBuilder()
    model = g.add("UNETLoader", "loader", unet_name=UNET_FILE, weight_dtype="default").out()
    clip = g.add("CLIPLoader", "clip", clip_name=graphs.TINY_CLIP_L, type="sd3", device="default").out()
    vae = g.add("VAELoader", "vae", vae_name=VAE_FILE).out()
    model = g.add("ModelSamplingSD3", "shift", model=model, shift=SHIFT).out()
    pos = g.add("CLIPTextEncode", "positive", clip=clip, text="a photo").out()
    neg = g.add("ConditioningZeroOut", "negative", conditioning=pos).out()
    guider = g.add("CFGGuider", "guider", model=model, positive=pos, negative=neg, cfg=CFG).out()
    op = g.add("FlowDPSOperatorSRAvgPool", "operator", factor=SR_FACTOR).out()
    y = g.add("EmptyImage", "measurement", width=size // SR_FACTOR, height=size // SR_FACTOR, batch_size=1,
              color=0xC86432).out()
    sampler = g.add("FlowDPSSampler", "sampler_select", vae=vae, operator=op, measurement=y, dc_steps=DC_STEPS,
                    step_size=STEP_SIZE, step_size_end=-1.0, residual="auto", norm="paper", sigma_y=0.015,
                    memory=mode).out()
    sigmas = g.add("BasicScheduler", "sigmas", model=model, scheduler="simple", steps=1, denoise=1.0).out()
    noise = g.add("RandomNoise", "noise", noise_seed=0).out()
    latent = g.add("EmptySD3LatentImage", "latent", width=size, height=size, batch_size=1).out()
    out = g.add("SamplerCustomAdvanced", "sampler", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                latent_image=latent)
    g.add("PreviewAny", "preview", source=out.out(0))
    return g.build()


def ensure_step_model(models_dir: Path) -> Path:
    """The tiny 2-layer SD3 MMDiT with SD3 medium's position grid (built once, about 2 s, under
    ``models_dir/diffusion_models``), so that the step accepts 1024 and 2048 px like the real model."""
    path = models_dir / "diffusion_models" / UNET_FILE
    if not path.is_file():
        from safetensors.torch import save_file

        from flowdps_dev import tiny_models

        config = tiny_models.TinyMMDiTConfig(pos_embed_max_size=POS_EMBED_MAX_SIZE)
        diffusers_sd = tiny_models.build_diffusers_transformer(config).state_dict()
        sd = tiny_models._contiguous(tiny_models.comfy_mmdit_state_dict(diffusers_sd))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(sd, str(tmp))
        tmp.replace(path)
    return path


def pack_module(relative: str) -> Any:
    """The pack's module as ComfyUI loaded it (e.g. ``"nodes/bridge.py"``), found by file path."""
    target = (ROOT / relative).resolve()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve() == target and "." in module.__name__:
            return module
    raise RuntimeError(f"the pack's {relative} is not loaded: did ComfyUI load the pack?")


def measured_window(record: dict, cuda: bool):
    """Wrap the pack's KSAMPLER function and its denoiser factory so that ``record`` gets the window's time,
    peak and denoise time (this process only; the package files are not modified)."""
    import torch

    bridge = pack_module("nodes/bridge.py")
    sampler_nodes = pack_module("nodes/sampler_nodes.py")
    sample_posterior, make_denoiser = sampler_nodes.sample_posterior, bridge.denoiser

    def timed_denoiser(model, extra_args):
        denoise = make_denoiser(model, extra_args)

        def timed(z, sigma):                                # (B, 16, h, w), (B,) -> (B, 16, h, w)
            start = time.perf_counter()
            z0 = denoise(z, sigma)
            record["denoise_s"] = record.get("denoise_s", 0.0) + time.perf_counter() - start
            return z0

        return timed

    def window(*args, **kwargs):
        record["decoder_copy_mib"] = bridge.decoder_weight_bytes(kwargs["problem"].vae) / 2**20
        base = reset_peak()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = sample_posterior(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
            record["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        record["time_s"] = time.perf_counter() - start
        record["peak_mib"] = rss_hwm_mib()[1] - base
        record["rss_before_mib"] = base
        return out

    sampler_nodes.sample_posterior = window
    bridge.denoiser = timed_denoiser


def worker(size: int, mode: str) -> dict:
    """One FlowDPS step at ``size`` px in memory mode ``mode`` in this process; the measured record."""
    sys.path.insert(0, str(ROOT))
    import torch

    from flowdps_dev import comfy_env

    session = comfy_env.start(work_dir=tempfile.mkdtemp(prefix="flowdps-step-bench-"))
    ensure_step_model(Path(os.environ["FLOWDPS_MODELS"]))  # after start: the converter imports ComfyUI
    cuda = torch.cuda.is_available()
    record: dict = {"size": size, "mode": mode, "device": "cuda" if cuda else "cpu",
                    "torch_threads": torch.get_num_threads()}
    measured_window(record, cuda)
    session.run(step_graph(size, mode)).raise_for_error()
    if "time_s" not in record:
        raise RuntimeError("the FlowDPS sampler function did not run")
    return record


def markdown(results: list[dict], env: dict) -> str:
    """The report table: per (size, mode), peak MiB, time, time per megapixel and the ratio to checkpoint."""
    lines = [
        "# One FlowDPS step vs image size, per memory mode",
        "",
        f"{env['machine']}; torch {env['torch']}; {env['device']}. One step of the FlowDPSSampler node through "
        f"ComfyUI's executor (SamplerCustomAdvanced, CFG {CFG}, tiny 2-layer SD3 MMDiT with SD3's "
        f"{POS_EMBED_MAX_SIZE}-patch position grid), K = {DC_STEPS} decoder "
        f"gradients through the full-size SD3 VAE architecture (random weights, float32 copy), SR x{SR_FACTOR} "
        "(average pooling), batch 1. Peak: extra resident memory of the step including the decoder copy's "
        "weights (CUDA: max allocated); denoise: the transformer call's share of the time.",
        "",
        "| size | mode | peak MiB | decoder copy MiB | time s | s / MPx | denoise s | time / checkpoint |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    ref = {r["size"]: r for r in results if r["mode"] == "checkpoint" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['mode']} | - | - | - | - | - | {r['error']} |")
            continue
        peak = r.get("cuda_peak_mib", r["peak_mib"])
        ratio = f"{r['time_s'] / ref[r['size']]['time_s']:.2f}" if r["size"] in ref else "-"
        per_mpx = r["time_s"] / (r["size"] ** 2 / 1e6)
        lines.append(f"| {r['size']} | {r['mode']} | {peak:.0f} | {r['decoder_copy_mib']:.0f} | {r['time_s']:.1f} "
                     f"| {per_mpx:.0f} | {r.get('denoise_s', 0.0):.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--skip", nargs="*", default=[], metavar="SIZE:MODE",
                   help="runs to leave out (e.g. 512:full where plain autograd does not fit)")
    p.add_argument("--budget-s", type=float, default=1800.0, help="skip the remaining runs after this many seconds")
    p.add_argument("--out", type=Path, default=RESULTS / "flowdps_step_memory")
    p.add_argument("--merge", action="store_true",
                   help="keep the results already in --out's JSON for the (size, mode) pairs not run now")
    p.add_argument("--worker", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        size, mode = args.worker
        print("RESULT " + json.dumps(worker(int(size), mode)), flush=True)
        return
    import torch

    env = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}
    start = time.perf_counter()
    results: list[dict] = []
    for size in args.sizes:
        for mode in args.modes:
            if f"{size}:{mode}" in args.skip:
                continue
            if time.perf_counter() - start > args.budget_s:
                results.append({"size": size, "mode": mode, "error": "skipped (time budget)"})
                continue
            load = os.getloadavg()[0]
            proc = subprocess.run([sys.executable, __file__, "--worker", str(size), mode],
                                  capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({"size": size, "mode": mode, "error": f"failed (rc {proc.returncode}): {tail[:80]}"})
            else:
                results.append({**json.loads(line[7:]), "load_avg_1m": [load, os.getloadavg()[0]]})
            print(json.dumps(results[-1]), flush=True)
    out = args.out.with_suffix(".json")
    if args.merge:
        results = merge_results(out, results, lambda r: (r["size"], MODES.index(r["mode"])))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "results": results}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results, env))
    print(markdown(results, env))


if __name__ == "__main__":
    main()
