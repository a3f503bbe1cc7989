"""Per-step time split of FlowDPS sampling on the tiny SD3 models: transformer / decoder fwd+bwd / rest.

Run (after ``make setup``)::

    source .cache/env.sh && .venv/bin/python benchmarks/step_time_split.py [--steps 6] [--size 256] [--repeats 1]

Each configuration (the full-size SD3 VAE, then TAESD for comparison) runs in its own worker process, so
model loading and peak RSS do not mix. A worker starts ComfyUI in-process (``flowdps_dev.comfy_env``), loads
the models with ComfyUI's own loaders and runs the graph

    UNETLoader -> ModelSamplingSD3(shift 4) -> CFGGuider(cfg 2, CLIPTextEncode / ConditioningZeroOut)
    FlowDPSSampler(K=3, step 15, AvgPoolSR(4), EmptyImage size/4) + BasicScheduler(simple) + RandomNoise
    + EmptySD3LatentImage(size) -> SamplerCustomAdvanced -> VAEDecode -> PreviewImage

with timers wrapped around two seams of the pack (monkeypatched in this process only, the package is not
modified):

* ``nodes.sampling.sample_flow_posterior``: replaced by a wrapper that times the ``denoise`` callable
  (ComfyUI's model call: CFG-combined transformer evaluations) and marks the step boundaries through the
  step ``callback`` (called once per step, after the update);
* ``samplers.flowdps.data_gradient``: timed as a whole (clone, decode through ``GradDecoder``, operator,
  pseudo-inverse residual, norm, autograd backward to ``z0``); its ``data_loss`` argument is timed too,
  which splits it into forward and backward. FlowDPS calls it K times per step.

The rest of a step (blend, renoise, the ``u - step * g`` updates, ComfyUI's callback) is the step's wall
time minus those two. The first step of every repeat is excluded as warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {  # configuration name -> VAE file in $FLOWDPS_MODELS/vae
    "full-vae": "tiny_sd3_vae_full.safetensors",
    "taesd": "tiny_sd3_taesd.safetensors",
}
SR_FACTOR = 4
DC_STEPS = 3
STEP_SIZE = 15.0
CFG = 2.0
SHIFT = 4.0
OPERATOR_NODE = "FlowDPSBenchAvgPoolSR"


# ----------------------------------------------------------------------------------------- timing records


@dataclass
class StepTimes:
    """Wall-clock seconds of one sampling step, split by part."""

    total: float = 0.0
    transformer: float = 0.0
    grad: float = 0.0           # data_gradient calls: decoder forward + backward (+ clone / cast)
    grad_forward: float = 0.0   # the data_loss part of them (decode, operator, residual, norm)
    mmdit: float = 0.0          # the MMDiT forward passes inside denoise (no ComfyUI wrapping)
    grad_calls: int = 0
    denoise_calls: int = 0


@dataclass
class Recorder:
    """Steps of every sampling run; ``runs[r][i]`` is step ``i`` of run ``r``."""

    runs: list[list[StepTimes]] = field(default_factory=list)
    rss_at_start_mib: list[float] = field(default_factory=list)
    _step: StepTimes | None = None
    _step_start: float = 0.0

    def begin_run(self) -> None:
        self.runs.append([])
        self.rss_at_start_mib.append(current_rss_mib())
        self.begin_step()

    def begin_step(self) -> None:
        self._step = StepTimes()
        self._step_start = time.perf_counter()

    def end_step(self) -> None:
        self._step.total = time.perf_counter() - self._step_start
        self.runs[-1].append(self._step)
        self.begin_step()

    @property
    def step(self) -> StepTimes:
        return self._step


def current_rss_mib() -> float:
    """Resident set size of this process now, MiB (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------ pack seams


def pack_module(relative: str) -> Any:
    """The module of the pack as ComfyUI loaded it (e.g. ``"nodes/bridge.py"``), found by file path.

    ComfyUI registers the pack under a path-derived module name, so the classes the sampler checks
    (``isinstance(op, AvgPoolSR)``) and the globals it calls are those of that copy, not of a second import.
    """
    target = (ROOT / relative).resolve()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve() == target and "." in module.__name__:
            return module
    raise RuntimeError(f"the pack's {relative} is not loaded: did ComfyUI load the pack?")


def timed_data_gradient(original, recorder: Recorder):
    """``data_gradient(z0: (B, 16, h, w), data_loss) -> (B, 16, h, w)`` with its time and its forward's."""

    def wrapper(z0, data_loss):
        def timed_loss(u):
            start = time.perf_counter()
            loss = data_loss(u)                                         # (B,)
            recorder.step.grad_forward += time.perf_counter() - start
            return loss

        start = time.perf_counter()
        g = original(z0, timed_loss)
        recorder.step.grad += time.perf_counter() - start
        recorder.step.grad_calls += 1
        return g

    return wrapper


def timed_sample_flow_posterior(original, recorder: Recorder):
    """``sample_flow_posterior`` with a timed ``denoise`` and a step-boundary ``callback``."""

    def wrapper(denoise, z, sigmas, data_loss, config, *, generator=None, callback=None):
        def timed_denoise(zt, sigma):                                   # (B, 16, h, w), (B,)
            start = time.perf_counter()
            z0 = denoise(zt, sigma)
            recorder.step.transformer += time.perf_counter() - start
            recorder.step.denoise_calls += 1
            return z0

        def step_callback(payload):
            if callback is not None:
                callback(payload)
            recorder.end_step()

        recorder.begin_run()
        return original(timed_denoise, z, sigmas, data_loss, config, generator=generator,
                        callback=step_callback)

    return wrapper


def timed_mmdit_forward(original, recorder: Recorder):
    """ComfyUI's SD3 MMDiT ``forward(x: (2B, 16, h, w), timesteps, context, y, ...)`` with a timer."""

    def forward(self, *args, **kwargs):
        start = time.perf_counter()
        out = original(self, *args, **kwargs)
        if recorder.step is not None:
            recorder.step.mmdit += time.perf_counter() - start
        return out

    return forward


def install_timers(recorder: Recorder) -> None:
    """Monkeypatch the two seams in the loaded pack and ComfyUI's MMDiT forward (this process only)."""
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    sampling = pack_module("nodes/bridge.py")
    flowdps = pack_module("samplers/flowdps.py")
    sampling.sample_flow_posterior = timed_sample_flow_posterior(sampling.sample_flow_posterior, recorder)
    flowdps.data_gradient = timed_data_gradient(flowdps.data_gradient, recorder)
    wrapper = OpenAISignatureMMDITWrapper
    wrapper.forward = timed_mmdit_forward(wrapper.forward, recorder)


def register_operator_node(session) -> str:
    """A V1-style node returning the pack's ``AvgPoolSR(SR_FACTOR)`` (the real operator nodes are elsewhere)."""
    avg_pool_sr = pack_module("operators/__init__.py").AvgPoolSR
    if avg_pool_sr(SR_FACTOR).auto_residual != "pinv":
        raise RuntimeError("residual 'auto' would not pick pinv for the pack's AvgPoolSR")

    class BenchAvgPoolSR:
        RETURN_TYPES = ("FLOWDPS_OPERATOR",)
        FUNCTION = "make"
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802  (ComfyUI's V1 node API)
            return {"required": {}}

        def make(self):
            return (avg_pool_sr(SR_FACTOR),)

    session.node_classes[OPERATOR_NODE] = BenchAvgPoolSR
    return OPERATOR_NODE


# --------------------------------------------------------------------------------------------- the graph


def flowdps_graph(vae_name: str, *, size: int, steps: int, seed: int) -> dict:
    """API-format FlowDPS SR x4 graph: latent (1, 16, size/8, size/8), measurement (1, size/4, size/4, 3)."""
    from flowdps_dev import graphs

    g = graphs.GraphBuilder()
    model = g.add("UNETLoader", "loader", unet_name=graphs.TINY_UNET, weight_dtype="default").out()
    clip = g.add("CLIPLoader", "clip", clip_name=graphs.TINY_CLIP_L, type="sd3", device="default").out()
    vae = g.add("VAELoader", "vae", vae_name=vae_name).out()
    model = g.add("ModelSamplingSD3", "shift", model=model, shift=SHIFT).out()
    pos = g.add("CLIPTextEncode", "positive", clip=clip, text="a photo").out()
    neg = g.add("ConditioningZeroOut", "negative", conditioning=pos).out()
    guider = g.add("CFGGuider", "guider", model=model, positive=pos, negative=neg, cfg=CFG).out()
    op = g.add(OPERATOR_NODE, "operator").out()
    y = g.add("EmptyImage", "measurement", width=size // SR_FACTOR, height=size // SR_FACTOR, batch_size=1,
              color=0xC86432).out()
    sampler = g.add("FlowDPSSampler", "sampler_select", vae=vae, operator=op, measurement=y, dc_steps=DC_STEPS,
                    step_size=STEP_SIZE, step_size_end=-1.0, residual="auto", norm="paper",
                    sigma_y=0.015).out()
    sigmas = g.add("BasicScheduler", "sigmas", model=model, scheduler="simple", steps=steps, denoise=1.0).out()
    noise = g.add("RandomNoise", "noise", noise_seed=seed).out()
    latent = g.add("EmptySD3LatentImage", "latent", width=size, height=size, batch_size=1).out()
    out = g.add("SamplerCustomAdvanced", "sampler", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                latent_image=latent)
    image = g.add("VAEDecode", "decode", samples=out.out(0), vae=vae).out()
    g.add("PreviewImage", "preview", images=image)
    return g.build()


def parameter_counts(result) -> dict[str, int]:
    """Parameters of the loaded transformer and VAE decoder (from the graph's loader outputs)."""
    unet = result.output("loader").model.diffusion_model
    first_stage = result.output("vae").first_stage_model
    decoder = getattr(first_stage, "decoder", None) or getattr(first_stage, "taesd_decoder", first_stage)
    return {"transformer_params": sum(p.numel() for p in unet.parameters()),
            "decoder_params": sum(p.numel() for p in decoder.parameters())}


# ------------------------------------------------------------------------------------------------ worker


def split(steps: list[StepTimes]) -> dict:
    """Mean ms per step of each part over ``steps``, and each part's share of the step in %."""

    def mean_ms(get) -> float:
        return 1000 * statistics.fmean(get(s) for s in steps)

    total = mean_ms(lambda s: s.total)
    parts = {
        "transformer": mean_ms(lambda s: s.transformer),
        "decoder_fwd_bwd": mean_ms(lambda s: s.grad),
        "rest": mean_ms(lambda s: s.total - s.transformer - s.grad),
    }
    return {
        "steps": len(steps),
        "total_ms": total,
        "total_ms_stdev": 1000 * statistics.stdev([s.total for s in steps]) if len(steps) > 1 else 0.0,
        "parts_ms": parts,
        "parts_pct": {k: 100 * v / total for k, v in parts.items()},
        "mmdit_forward_ms": mean_ms(lambda s: s.mmdit),
        "decoder_forward_ms": mean_ms(lambda s: s.grad_forward),
        "decoder_backward_ms": mean_ms(lambda s: s.grad - s.grad_forward),
    }


def summarize(recorder: Recorder, warmup: int = 1) -> dict:
    """Split of the timed steps (``warmup`` first steps of each run dropped): their mean and the fastest one.

    The fastest step is the least disturbed by other processes on a shared machine.
    """
    timed = [s for run in recorder.runs for s in run[warmup:]]
    if not timed:
        raise RuntimeError("no timed steps: use --steps >= 2")
    return {
        "timed_steps": len(timed),
        "mean": split(timed),
        "fastest": split([min(timed, key=lambda s: s.total)]),
        "grad_calls_per_step": statistics.fmean(s.grad_calls for s in timed),
        "denoise_calls_per_step": statistics.fmean(s.denoise_calls for s in timed),
        "warmup_step_ms": [1000 * run[0].total for run in recorder.runs],
    }


def run_worker(name: str, args: argparse.Namespace) -> dict:
    """Time one configuration in this process and return its summary (plain JSON types)."""
    import torch

    from flowdps_dev import comfy_env

    session = comfy_env.start(work_dir=tempfile.mkdtemp(prefix="flowdps-bench-"))
    register_operator_node(session)
    recorder = Recorder()
    install_timers(recorder)
    wall = time.perf_counter()
    result = None
    for repeat in range(args.repeats):
        graph = flowdps_graph(CONFIGS[name], size=args.size, steps=args.steps, seed=repeat)
        result = session.run(graph).raise_for_error()
    summary = summarize(recorder)
    summary.update(
        config=name, vae=CONFIGS[name], size=args.size, latent=[1, 16, args.size // 8, args.size // 8],
        steps=args.steps, repeats=args.repeats, torch_threads=torch.get_num_threads(),
        rss_at_sampling_start_mib=max(recorder.rss_at_start_mib), peak_rss_mib=peak_rss_mib(),
        worker_wall_s=time.perf_counter() - wall, raw_steps=[[asdict(s) for s in run] for run in recorder.runs],
        **parameter_counts(result),
    )
    return summary


# ---------------------------------------------------------------------------------------------- reports


def environment() -> dict:
    """Date, machine and versions for the report."""
    import torch

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "nproc": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "device": "cpu"}


def table_row(r: dict, stat: str) -> str:
    """One markdown row: configuration ``r``'s ``stat`` ("mean" or "fastest") split."""
    t = r[stat]
    ms, pct = t["parts_ms"], t["parts_pct"]
    spread = f" ± {t['total_ms_stdev']:.0f}" if t["steps"] > 1 else ""
    label = f"mean of {t['steps']}" if stat == "mean" else "fastest step"
    return (f"| {r['config']} | {label} "
            f"| {ms['transformer']:.1f} ({pct['transformer']:.1f}%) [{t['mmdit_forward_ms']:.1f}] "
            f"| {ms['decoder_fwd_bwd']:.0f} ({pct['decoder_fwd_bwd']:.1f}%) "
            f"[{t['decoder_forward_ms']:.0f} / {t['decoder_backward_ms']:.0f}] "
            f"| {ms['rest']:.1f} ({pct['rest']:.2f}%) | {t['total_ms']:.0f}{spread} | {r['peak_rss_mib']:.0f} |")


def table(results: list[dict]) -> str:
    """Markdown table: per configuration, the mean and the fastest timed step, ms and % of each part."""
    lines = ["| config | steps | transformer ms (%) [MMDiT fwd] | decoder fwd+bwd ms (%) [fwd / bwd] "
             "| rest ms (%) | total ms/step | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [table_row(r, stat) for r in results for stat in ("mean", "fastest")]
    return "\n".join(lines)


def markdown(env: dict, results: list[dict]) -> str:
    """The full report written to ``results/step_time_split.md``."""
    first = results[0]
    configs = "\n".join(
        f"- `{r['config']}`: VAE `{r['vae']}` ({r['decoder_params'] / 1e6:.1f} M decoder params), transformer "
        f"{r['transformer_params'] / 1e6:.2f} M params; {r['grad_calls_per_step']:.0f} decoder gradients and "
        f"{r['denoise_calls_per_step']:.0f} denoise call(s) per step; RSS at sampling start "
        f"{r['rss_at_sampling_start_mib']:.0f} MiB; warm-up step(s) {', '.join(f'{t:.0f}' for t in r['warmup_step_ms'])} ms; "
        f"1-min load average {r['load_avg_1m']['before']:.2f} before, {r['load_avg_1m']['after']:.2f} after"
        for r in results)
    return f"""# FlowDPS per-step time split (CPU)

- date: {env['date']}
- machine: {env['machine']}, nproc {env['nproc']} ({env['platform']}), torch {env['torch']} on CPU \
({first['torch_threads']} threads), Python {env['python']}
- sampling: FlowDPSSampler K={DC_STEPS}, step size {STEP_SIZE}, residual auto (= pinv), paper norm; SR x{SR_FACTOR} \
(AvgPoolSR) of a {first['size'] // SR_FACTOR}x{first['size'] // SR_FACTOR} EmptyImage; {first['size']}x{first['size']} px \
(latent {'x'.join(map(str, first['latent']))}); tiny SD3 MMDiT (2 layers, random weights), ModelSamplingSD3 \
shift {SHIFT}, CFGGuider cfg {CFG}, BasicScheduler simple, {first['steps']} steps x {first['repeats']} repeat(s), \
first step of each repeat excluded as warm-up
{configs}

{table(results)}

What is measured: wall-clock per sampling step, mean (± stdev of the step total) over the timed steps and the
fastest timed step (the least disturbed by other processes). *transformer* is the time
inside the sampler's `denoise` callable (ComfyUI's model call: both CFG branches of the MMDiT, batched, plus
ComfyUI's per-call overhead), with the bare MMDiT `forward` in brackets; *decoder fwd+bwd* is the time
inside `data_gradient` (K calls per step: decode `z0` through the private float32 `GradDecoder`, AvgPoolSR, pseudo-inverse residual, norm, autograd backward to
`z0`), split into the loss forward and the remainder (backward); *rest* is the step minus both (blend,
renoise, gradient updates, ComfyUI's step callback). Peak RSS is the worker process's high-water mark (one
process per configuration, including ComfyUI, the CLIP-L text encoder and model loading). The transformer
here is a 2-layer random-weight toy, so its share is far below a real SD3 (2B-8B parameters); the decoder
numbers are those of the real SD3 VAE architecture at this size. Wall-clock on a possibly shared machine:
a 1-min load average above the core count means other processes competed for the CPU.
"""


def run_configs(args: argparse.Namespace) -> list[dict]:
    """Run each configuration in its own worker process; return their summaries."""
    results = []
    for name in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-out", str(out),
                   "--steps", str(args.steps), "--size", str(args.size), "--repeats", str(args.repeats)]
            print(f"[bench] {name}: {' '.join(cmd[2:])}", flush=True)
            load_before = os.getloadavg()
            subprocess.run(cmd, check=True, cwd=ROOT)
            result = json.loads(out.read_text())
            result["load_avg_1m"] = {"before": load_before[0], "after": os.getloadavg()[0]}
            results.append(result)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="sampling steps per run (first is warm-up)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (multiple of 32)")
    parser.add_argument("--repeats", type=int, default=1, help="sampling runs per configuration")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2 or args.repeats < 1 or args.size % 32:
        parser.error("need --steps >= 2, --repeats >= 1 and --size a multiple of 32")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    if args.worker:
        args.worker_out.write_text(json.dumps(run_worker(args.worker, args)))
        return
    env = environment()
    results = run_configs(args)
    report = markdown(env, results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "step_time_split.md").write_text(report)
    (args.out_dir / "step_time_split.json").write_text(json.dumps({"environment": env, "results": results},
                                                                  indent=2))
    print(report)


if __name__ == "__main__":
    main()
