"""Cost of AFDPS per step (time and peak memory) against FlowDPS, vs the particle count and the chunk size.

Run (after ``make setup``)::

    source .cache/env.sh && .venv/bin/python benchmarks/afdps_cost.py [--steps 8] [--setups taesd:128 full-vae:64]
        [--particles 1 2 4 8]

One run measures, on the tiny SD3 transformer with each VAE:SIZE setup (default: TAESD at 128 px, the full-size
SD3 VAE at 64 px), SR x4:

1. the per-step time of ``AFDPSSampler`` with P particles and ``chunk_size`` 1, as a multiple of the per-step
   time of ``FlowDPSSampler`` (K = 3 decoder gradients per step) in the same run, split into transformer
   (the ``denoise`` callable: ComfyUI's CFG model call, one batched call on all P particles) and decoder
   forward + VJP (``samplers.afdps_potentials.residual_value_and_grad``: P per step, ``chunk_size`` at a time);
2. the peak memory of sampling with ``chunk_size`` 1 against ``chunk_size`` P (all particles at once).

Every configuration runs in its own worker process (the graph of ``step_time_split.py`` with the sampler
node swapped; its helpers and timers are reused). Memory, per worker:

* ``peak RSS``: the process's high-water mark (``ru_maxrss``, includes ComfyUI and model loading);
* ``sampling peak delta``: at the start of sampling (after model loading and the GradDecoder copy) free heap
  memory is returned to the OS (``malloc_trim(0)``), the kernel's high-water mark is reset
  (``/proc/self/clear_refs`` = 5) and the RSS recorded; at the end ``VmHWM`` minus that RSS is the extra
  resident memory sampling needed;
* ``autograd saved``: the bytes of the distinct tensor storages autograd saved for the backward during one
  chunk's decoder forward (``torch.autograd.graph.saved_tensors_hooks``), maximum over chunks: the
  activation memory of one VJP chunk, exactly, independent of the allocator.

Steps: the first step (warm-up; for AFDPS it also holds the initial denoise) and the last step (AFDPS:
the final decode at s = 0 instead of a denoise + VJP) are excluded from the timings.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_time_split as sts  # the benchmark next to this one

ROOT = sts.ROOT
RESULTS = sts.RESULTS
VAES = {"taesd": "tiny_sd3_taesd.safetensors", "full-vae": "tiny_sd3_vae_full.safetensors"}
SIGMA_Y = 0.015
WARMUP, TAIL = 1, 1  # steps dropped at the start and at the end of each run


# ------------------------------------------------------------------------------------------------ memory


def rss_and_hwm_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process now, MiB (0, 0 off Linux)."""
    values = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    except (OSError, ValueError):
        pass
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def reset_peak() -> float:
    """Return free heap to the OS, reset the kernel's RSS high-water mark; the RSS now, MiB."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return rss_and_hwm_mib()[0]


class SavedBytes:
    """Bytes of distinct storages autograd saves while active, maximum over ``measure`` calls: ``peak`` for
    activations (tensors computed from the input, i.e. with a ``grad_fn`` or requiring grad), ``peak_leaves``
    for the rest (decoder weights and constants, resident anyway)."""

    def __init__(self) -> None:
        self.peak = 0
        self.peak_leaves = 0
        self._seen: set[int] = set()
        self._bytes = [0, 0]

    def _pack(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self._bytes[0 if (t.grad_fn is not None or t.requires_grad) else 1] += storage.nbytes()
        return t

    def measure(self, fn, *args):
        import torch

        self._seen, self._bytes = set(), [0, 0]
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            out = fn(*args)
        self.peak = max(self.peak, self._bytes[0])
        self.peak_leaves = max(self.peak_leaves, self._bytes[1])
        self._seen = set()
        return out


# ------------------------------------------------------------------------------------------------ timers


def timed_residual_value_and_grad(original, recorder: sts.Recorder, saved: SavedBytes):
    """``residual_value_and_grad(u: (P, ...), residual, chunk_size, need_grad)`` timed; the residual's
    forward (decode, operator, minus y) is timed and its saved tensors counted per chunk."""

    def wrapper(u, residual, chunk_size, need_grad=True):
        if not need_grad:
            return original(u, residual, chunk_size, need_grad=False)

        def timed_residual(part):
            start = time.perf_counter()
            r = saved.measure(residual, part)
            recorder.step.grad_forward += time.perf_counter() - start
            return r

        start = time.perf_counter()
        out = original(u, timed_residual, chunk_size, need_grad=True)
        recorder.step.grad += time.perf_counter() - start
        recorder.step.grad_calls += u.shape[0]
        return out

    return wrapper


def timed_data_loss_saved(original, saved: SavedBytes):
    """FlowDPS's ``data_gradient`` with the saved tensors of its loss forward counted."""

    def wrapper(z0, data_loss):
        return original(z0, lambda u: saved.measure(data_loss, u))

    return wrapper


def timed_sample_afdps(original, recorder: sts.Recorder, memory: dict):
    """``sample_afdps`` with a timed ``denoise``, step boundaries from ``callback`` and the memory marks."""

    def wrapper(denoise, z, sigmas, *, callback=None, **kwargs):
        def timed_denoise(zt, sigma):                                   # (P, 16, h, w), (P,)
            start = time.perf_counter()
            z0 = denoise(zt, sigma)
            recorder.step.transformer += time.perf_counter() - start
            recorder.step.denoise_calls += 1
            return z0

        def step_callback(info):
            if callback is not None:
                callback(info)
            recorder.end_step()

        memory["rss_at_sampling_start_mib"] = reset_peak()
        recorder.begin_run()
        result = original(timed_denoise, z, sigmas, callback=step_callback, **kwargs)
        memory["hwm_during_sampling_mib"] = rss_and_hwm_mib()[1]
        return result

    return wrapper


def memory_marks_flow_posterior(original, memory: dict):
    """``sample_flow_posterior`` (already timed) with the memory marks around it."""

    def wrapper(*args, **kwargs):
        memory["rss_at_sampling_start_mib"] = reset_peak()
        out = original(*args, **kwargs)
        memory["hwm_during_sampling_mib"] = rss_and_hwm_mib()[1]
        return out

    return wrapper


def install(recorder: sts.Recorder, saved: SavedBytes, memory: dict) -> None:
    """Monkeypatch the seams (this process only): FlowDPS's as ``step_time_split.py``, plus AFDPS's."""
    sts.install_timers(recorder)
    sampling = sts.pack_module("nodes/bridge.py")
    flowdps = sts.pack_module("samplers/flowdps.py")
    sampling.sample_flow_posterior = memory_marks_flow_posterior(sampling.sample_flow_posterior, memory)
    flowdps.data_gradient = timed_data_loss_saved(flowdps.data_gradient, saved)
    potentials = sts.pack_module("samplers/afdps_potentials.py")
    potentials.residual_value_and_grad = timed_residual_value_and_grad(potentials.residual_value_and_grad, recorder,
                                                                       saved)
    nodes = sts.pack_module("nodes/afdps_nodes.py")
    nodes.sample_afdps = timed_sample_afdps(nodes.sample_afdps, recorder, memory)


# --------------------------------------------------------------------------------------------- the graph


def graph(vae_name: str, sampler: str, *, particles: int, chunk: int, size: int, steps: int, seed: int) -> dict:
    """``step_time_split.flowdps_graph`` with the FlowDPSSampler node replaced by AFDPSSampler if asked."""
    g = sts.flowdps_graph(vae_name, size=size, steps=steps, seed=seed)
    if sampler == "afdps":
        node = g["sampler_select"]
        inputs = node["inputs"]
        node["class_type"] = "AFDPSSampler"
        node["inputs"] = {"vae": inputs["vae"], "operator": inputs["operator"],
                          "measurement": inputs["measurement"], "particles": particles, "variant": "sde",
                          "eta": 1.0, "kappa": 1.0, "ess_threshold": 0.5, "chunk_size": chunk,
                          "sigma_y": SIGMA_Y, "output": "best"}
    return g


# ------------------------------------------------------------------------------------------------ worker


def worker(spec: dict, args: argparse.Namespace) -> dict:
    import torch

    from flowdps_dev import comfy_env

    session = comfy_env.start(work_dir=tempfile.mkdtemp(prefix="flowdps-bench-"))
    sts.register_operator_node(session)
    recorder, saved, memory = sts.Recorder(), SavedBytes(), {}
    install(recorder, saved, memory)
    wall = time.perf_counter()
    g = graph(VAES[spec["vae"]], spec["sampler"], particles=spec["particles"], chunk=spec["chunk"],
              size=spec["size"], steps=args.steps, seed=0)
    result = session.run(g).raise_for_error()
    timed = [s for run in recorder.runs for s in run[WARMUP:len(run) - TAIL]]
    if not timed:
        raise RuntimeError("no timed steps: use --steps >= 3")
    out = dict(spec)
    out.update(
        timed_steps=len(timed), mean=sts.split(timed), fastest=sts.split([min(timed, key=lambda s: s.total)]),
        grads_per_step=statistics.fmean(s.grad_calls for s in timed),
        denoise_calls_per_step=statistics.fmean(s.denoise_calls for s in timed),
        warmup_step_ms=[1000 * run[0].total for run in recorder.runs],
        last_step_ms=[1000 * run[-1].total for run in recorder.runs],
        peak_rss_mib=sts.peak_rss_mib(), autograd_saved_peak_mib=saved.peak / 2**20,
        autograd_saved_leaves_mib=saved.peak_leaves / 2**20,
        sampling_peak_delta_mib=memory["hwm_during_sampling_mib"] - memory["rss_at_sampling_start_mib"],
        torch_threads=torch.get_num_threads(), worker_wall_s=time.perf_counter() - wall,
        raw_steps=[[asdict(s) for s in run] for run in recorder.runs], **memory, **sts.parameter_counts(result),
    )
    return out


# ---------------------------------------------------------------------------------------------- reports


def parse_setup(text: str) -> tuple[str, int]:
    """``"vae:size"`` (e.g. ``"taesd:128"``) -> (vae, size)."""
    vae, _, size = text.partition(":")
    if vae not in VAES or not size.isdigit() or int(size) % 32:
        raise argparse.ArgumentTypeError(f"setup must be VAE:SIZE with VAE in {list(VAES)} and SIZE a multiple "
                                         f"of 32, got {text!r}")
    return vae, int(size)


def specs(vae: str, size: int, particles: list[int]) -> list[dict]:
    """FlowDPS, then AFDPS chunk 1 for every P, then AFDPS chunk P for every P > 1."""
    common = {"setup": f"{vae}:{size}", "vae": vae, "size": size}
    out = [{"name": "flowdps", "sampler": "flowdps", "particles": 1, "chunk": 0}]
    out += [{"name": f"afdps-P{p}-c1", "sampler": "afdps", "particles": p, "chunk": 1} for p in particles]
    out += [{"name": f"afdps-P{p}-c{p}", "sampler": "afdps", "particles": p, "chunk": p} for p in particles if p > 1]
    return [{**common, **spec} for spec in out]


def median_ms(r: dict, part: str = "total") -> float:
    """Median over the timed steps of one part of a step (``StepTimes`` field), ms."""
    return 1000 * statistics.median(s[part] for run in r["raw_steps"] for s in run[WARMUP:len(run) - TAIL])


def time_table(results: list[dict]) -> str:
    base = results[0]["mean"]["total_ms"]
    base_fast = results[0]["fastest"]["total_ms"]
    base_median = median_ms(results[0])
    lines = ["| config | P | chunk | decoder grads/step | transformer ms | decoder fwd+VJP ms [fwd / bwd] "
             "| ms per grad | rest ms | total ms/step (± sd) | x FlowDPS (mean) | median ms | x FlowDPS (median) "
             "| fastest ms | x FlowDPS (fastest) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        med = median_ms(r)
        m, f = r["mean"], r["fastest"]
        ms = m["parts_ms"]
        per_grad = ms["decoder_fwd_bwd"] / r["grads_per_step"] if r["grads_per_step"] else float("nan")
        chunk = "-" if r["sampler"] == "flowdps" else str(r["chunk"])
        lines.append(
            f"| {r['name']} | {r['particles']} | {chunk} | {r['grads_per_step']:.0f} | {ms['transformer']:.0f} "
            f"| {ms['decoder_fwd_bwd']:.0f} [{m['decoder_forward_ms']:.0f} / {m['decoder_backward_ms']:.0f}] "
            f"| {per_grad:.0f} | {ms['rest']:.1f} | {m['total_ms']:.0f} ± {m['total_ms_stdev']:.0f} "
            f"| {m['total_ms'] / base:.2f} | {med:.0f} | {med / base_median:.2f} "
            f"| {f['total_ms']:.0f} | {f['total_ms'] / base_fast:.2f} |")
    return "\n".join(lines)


def memory_table(results: list[dict]) -> str:
    lines = ["| config | P | chunk | peak RSS MiB (process) | RSS at sampling start MiB | sampling peak delta MiB "
             "| autograd saved per chunk MiB: activations [weights, constants] |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        chunk = "-" if r["sampler"] == "flowdps" else str(r["chunk"])
        lines.append(f"| {r['name']} | {r['particles']} | {chunk} | {r['peak_rss_mib']:.0f} "
                     f"| {r['rss_at_sampling_start_mib']:.0f} | {r['sampling_peak_delta_mib']:.0f} "
                     f"| {r['autograd_saved_peak_mib']:.1f} [{r['autograd_saved_leaves_mib']:.1f}] |")
    return "\n".join(lines)


def section(results: list[dict]) -> str:
    """Report section of one setup (VAE, size): its problem line, load averages, time and memory tables."""
    first = results[0]
    size = first["size"]
    loads = "; ".join(f"{r['name']} {r['load_avg_1m']['before']:.2f} -> {r['load_avg_1m']['after']:.2f}"
                      for r in results)
    return f"""## VAE `{VAES[first['vae']]}`, {size}x{size} px

- SR x{sts.SR_FACTOR} (AvgPoolSR) of a {size // sts.SR_FACTOR}px EmptyImage, latent 1x16x{size // 8}x{size // 8}; \
{first['decoder_params'] / 1e6:.1f} M decoder params (float32 GradDecoder copy), tiny SD3 MMDiT \
{first['transformer_params'] / 1e6:.2f} M params; {first['timed_steps']} timed steps per configuration
- 1-min load average before -> after each worker: {loads}

### Time per step

{time_table(results)}

### Memory

{memory_table(results)}
"""


def markdown(env: dict, args: argparse.Namespace, results: list[dict], wall_s: float) -> str:
    first = results[0]
    setups = list(dict.fromkeys(r["setup"] for r in results))
    sections = "\n".join(section([r for r in results if r["setup"] == s]) for s in setups)
    return f"""# AFDPS cost per step and peak memory vs particles (CPU)

- date: {env['date']}; total run {wall_s:.0f} s
- machine: {env['machine']}, nproc {env['nproc']} ({env['platform']}), torch {env['torch']} on CPU \
({first['torch_threads']} threads), Python {env['python']}
- command: `.venv/bin/python benchmarks/afdps_cost.py --steps {args.steps} --setups {' '.join(setups)} \
--particles {' '.join(map(str, args.particles))}`
- graph: as `step_time_split.py` (tiny random-weight SD3 MMDiT, ModelSamplingSD3 shift {sts.SHIFT}, CFGGuider cfg \
{sts.CFG}, BasicScheduler simple, {args.steps} steps, SamplerCustomAdvanced); timed steps: all but the first \
(warm-up, and AFDPS's initial denoise + gamma^2 estimate) and the last (AFDPS: final decode without VJP)
- FlowDPS: K={sts.DC_STEPS}, step size {sts.STEP_SIZE}, residual auto (pinv), paper norm, sigma_y 0.015.
  AFDPS: variant sde, eta 1, kappa 1, ESS threshold 0.5, sigma_y {SIGMA_Y}, output best.

{sections}
## How to read it

*transformer*: time in the sampler's `denoise` callable (ComfyUI CFG model call; AFDPS: one batched call on all
P particles). *decoder fwd+VJP*: FlowDPS: K=3 `data_gradient` calls; AFDPS: `residual_value_and_grad` (P decoder
forwards + VJPs at z0_hat, `chunk` particles at a time), split into the residual forward and the rest (backward).
*ms per grad*: decoder fwd+VJP / gradients per step (means). *x FlowDPS*: total per step / FlowDPS's total per step
of the same setup (mean over the timed steps, median, and fastest step against fastest step). On a shared machine
the median and the fastest step are the least disturbed by other load.

*peak RSS (process)*: `ru_maxrss` of the worker (ComfyUI, CLIP-L, model loading included). *sampling peak delta*:
`VmHWM` during sampling minus the RSS at sampling start, after `malloc_trim(0)` and a reset of the high-water mark
(`/proc/self/clear_refs`); glibc may still serve part of the peak from memory already mapped, so this is a lower
bound of the allocations, with a few MiB of noise. *autograd saved per chunk*: bytes of the distinct storages
saved for backward during one chunk's decoder forward (maximum over chunks; FlowDPS: one `data_gradient` call),
exact and allocator-independent: activations (tensors computed from the chunk's latents), and in brackets the
saved leaves (decoder weights, constants; already resident, the same for every P). It excludes transient forward
buffers that are not saved and the gradient buffers of the backward.

The transformer is a 2-layer random-weight toy: with a real SD3 (2 B to 8 B parameters) the transformer share,
and with it the cost of AFDPS's P-particle batched model call, is far larger; the decoder numbers are those of
the real architectures at these small sizes, on CPU in float32. Wall-clock on a possibly shared machine.
"""


def run_all(args: argparse.Namespace) -> tuple[list[dict], float]:
    results = []
    start = time.perf_counter()
    for spec in (spec for vae, size in args.setups for spec in specs(vae, size, args.particles)):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--worker-out",
                   str(out), "--steps", str(args.steps)]
            print(f"[bench] {spec['setup']} {spec['name']}", flush=True)
            load_before = os.getloadavg()
            subprocess.run(cmd, check=True, cwd=ROOT)
            result = json.loads(out.read_text())
            result["load_avg_1m"] = {"before": load_before[0], "after": os.getloadavg()[0]}
            print(f"[bench] {spec['setup']} {spec['name']}: {result['mean']['total_ms']:.0f} ms/step, peak RSS "
                  f"{result['peak_rss_mib']:.0f} MiB, sampling delta {result['sampling_peak_delta_mib']:.0f} MiB, "
                  f"saved {result['autograd_saved_peak_mib']:.1f} MiB, worker {result['worker_wall_s']:.0f} s",
                  flush=True)
            results.append(result)
    return results, time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="sampling steps (first and last are not timed)")
    parser.add_argument("--setups", type=parse_setup, nargs="+", default=[("taesd", 128), ("full-vae", 64)],
                        help="VAE:SIZE pairs (VAE in taesd, full-vae; SIZE in px, a multiple of 32)")
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="afdps_cost", help="basename of the result files")
    parser.add_argument("--report", type=Path, help="only rewrite <name>.md from this result JSON (no run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 3 or min(args.particles) < 1:
        parser.error("need --steps >= 3 and particles >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    if args.worker:
        args.worker_out.write_text(json.dumps(worker(json.loads(args.worker), args)))
        return
    if args.report:
        saved = json.loads(args.report.read_text())
        run_args = saved["args"]
        args.steps, args.particles = int(run_args["steps"]), json.loads(run_args["particles"])
        report = markdown(saved["environment"], args, saved["results"], saved.get("wall_s", math.nan))
        (args.out_dir / f"{args.name}.md").write_text(report)
        print(report)
        return
    env = sts.environment()
    results, wall_s = run_all(args)
    report = markdown(env, args, results, wall_s)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.md").write_text(report)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(
        {"environment": env, "args": {k: str(v) for k, v in vars(args).items() if not k.startswith("worker")},
         "wall_s": wall_s, "results": results}, indent=2))
    print(report)


if __name__ == "__main__":
    main()
