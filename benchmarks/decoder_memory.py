"""Peak memory, time and gradient error of one decoder gradient against image size, per memory mode.

Run (after ``make setup``)::

    source .cache/env.sh && .venv/bin/python benchmarks/decoder_memory.py [--sizes 256 512] \\
        [--modes full checkpoint tiled "tiled 16-bit"] [--budget-s 480] [--out /tmp/decoder_memory]

One decoder gradient is what every FlowDPS data-consistency step costs on top of the transformer: decode the
latent through the pack's private decoder copy (``nodes.decoder.GradDecoder``: float32, bfloat16 for the
"... 16-bit" modes) in the given memory mode,
take ``<w, D(z)>`` for a fixed random ``w``, back-propagate to ``z``. The decoder is the full-size SD3 VAE
architecture with random weights (``tiny_sd3_vae_full.safetensors``). Every (size, mode) runs in its own worker
process, sequentially. Per worker:

* ``peak MiB``: the extra resident memory of the gradient: free heap memory is returned to the OS
  (``malloc_trim(0)``), the kernel's high-water mark reset (``/proc/self/clear_refs`` = 5) and the RSS
  recorded just before the gradient; ``VmHWM`` minus that RSS afterwards. With CUDA present:
  ``torch.cuda.max_memory_allocated`` minus the allocated bytes before, instead;
* ``time s``: wall time of the decode plus the backward pass (the first gradient of the process);
* ``cosine`` and ``rel L2``: the gradient against the "full" mode's (plain autograd, float32) at the same size,
  when that ran, else against the "checkpoint" mode's (the same autograd arithmetic, blocks recomputed; used
  where plain autograd does not fit the machine). A 16-bit mode is always compared with a float32 one.

Writes ``benchmarks/results/decoder_memory.json`` and ``.md`` (the table that benchmarks/README.md quotes).
A lent GPU runs the same command (one short call: ``--sizes 512 1024 --budget-s 480``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VAE_FILE = "tiny_sd3_vae_full.safetensors"
MODES = ("full", "checkpoint", "tiled")
ALL_MODES = (*MODES, *(f"{m} 16-bit" for m in MODES))


def rss_hwm_mib() -> tuple[float, float]:
    values = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = float(rest.split()[0]) / 1024
    except OSError:
        pass
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def reset_peak() -> float:
    """Return free heap memory to the OS, reset the high-water mark; the RSS now (MiB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return rss_hwm_mib()[0]


def worker(size: int, mode: str, grad_path: str | None) -> dict:
    sys.path.append(str(ROOT))
    import importlib

    importlib.import_module("flowdps_dev.pack").import_pack("flowdps")
    from flowdps_dev import comfy_env

    comfy_env.add_comfy_to_path()
    import comfy.sd
    import comfy.utils
    import torch
    from flowdps.nodes.decoder import GradDecoder, grad_enabled

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    models = Path(os.environ["FLOWDPS_MODELS"])
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models / "vae" / VAE_FILE)))
    mode, _, gib = mode.partition("@")
    keep_budget, estimate = None, None
    if gib:            # the tiled mode planned for this much free activation memory (what "auto" would do)
        from flowdps.nodes.decoder_memory import kl_decoder, tiled_budget

        keep_budget, estimate = tiled_budget(kl_decoder(vae.first_stage_model), (1, 16, size // 8, size // 8),
                                             int(float(gib) * 2**30), mode)
    decoder = GradDecoder(vae, None, device=device, memory=mode, keep_budget=keep_budget)
    del vae
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, size // 8, size // 8, generator=g).to(device)
    w = torch.randn(1, 3, size, size, generator=g).to(device)
    base = reset_peak()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with grad_enabled():
        zr = z.clone().requires_grad_()
        (grad,) = torch.autograd.grad((decoder(zr) * w).sum(), zr)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = rss_hwm_mib()[1] - base
    result = {"size": size, "mode": mode + (f"@{gib}" if gib else ""), "time_s": seconds, "peak_mib": peak,
              "device": str(device)}
    if estimate is not None:
        result.update(estimate_mib=estimate / 2**20, keep_budget_mib=(keep_budget or 0) / 2**20)
    if cuda:
        result["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    if grad_path:
        torch.save(grad.cpu(), grad_path)
    return result


def _mode(text: str) -> str:
    name, _, gib = text.partition("@")
    if name not in ALL_MODES or (gib and (not name.startswith("tiled") or not gib.replace(".", "", 1).isdigit())):
        raise argparse.ArgumentTypeError(f"expected one of {ALL_MODES}, or a tiled mode @GIB, got {text!r}")
    return text


def merge_results(path: Path, results: list[dict], order: Callable[[dict], Any]) -> list[dict]:
    """``results`` plus those already in the JSON file ``path`` for (size, mode) pairs not in ``results``, sorted
    by ``order`` (``--merge``: add runs to an earlier results file)."""
    if not path.exists():
        return results
    done = {(r["size"], r["mode"]) for r in results}
    kept = [r for r in json.loads(path.read_text())["results"] if (r["size"], r["mode"]) not in done]
    return sorted(kept + results, key=order)


def _order(result: dict) -> tuple[int, int, float]:
    """Table order: size, then the mode's place in ALL_MODES, then the planned free memory (none first)."""
    name, _, gib = result["mode"].partition("@")
    return result["size"], ALL_MODES.index(name), float(gib) if gib else -1.0


def compare(grad_path: str, reference_path: str) -> dict:
    import torch

    a, b = torch.load(grad_path).double(), torch.load(reference_path).double()
    return {"cosine": float((a * b).sum() / (a.norm() * b.norm())), "rel_l2": float((a - b).norm() / b.norm())}


def markdown(results: list[dict], env: dict) -> str:
    lines = [
        "# One decoder gradient vs image size, per memory mode",
        "",
        f"{env['machine']}; torch {env['torch']}; {env['device']}; full-size SD3 VAE architecture (random weights), "
        "float32 (bfloat16 for the 16-bit modes), batch 1. Peak: extra resident memory of the gradient (CUDA: max "
        "allocated); error against the float32 full mode's gradient at the same size (the reference column).",
        "",
        "| size | mode | peak MiB | estimate MiB | time s | time / full | cosine | rel L2 | reference |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    full = {r["size"]: r for r in results if r["mode"] == "full" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['mode']} | - | - | - | - | - | - | {r['error']} |")
            continue
        peak = r.get("cuda_peak_mib", r["peak_mib"])
        ratio = f"{r['time_s'] / full[r['size']]['time_s']:.2f}" if r["size"] in full else "-"
        cos = f"{r['cosine']:.7f}" if "cosine" in r else "-"
        rel = f"{r['rel_l2']:.1e}" if "rel_l2" in r else "-"
        est = f"{r['estimate_mib']:.0f}" if "estimate_mib" in r else "-"
        lines.append(f"| {r['size']} | {r['mode']} | {peak:.0f} | {est} | {r['time_s']:.1f} | {ratio} | {cos} | {rel} "
                     f"| {r.get('reference', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--modes", nargs="+", default=list(MODES), type=_mode,
                   help=f"of {', '.join(ALL_MODES)}; 'tiled@GIB' (or 'tiled 16-bit@GIB'): the tiled mode planned "
                        "for GIB GiB of free activation memory (it then keeps only part of the decoder's tensors)")
    p.add_argument("--skip", nargs="*", default=[], metavar="SIZE:MODE",
                   help="runs to leave out (e.g. 512:full where plain autograd does not fit)")
    p.add_argument("--budget-s", type=float, default=1800.0, help="skip the remaining runs after this many seconds")
    p.add_argument("--out", type=Path, default=RESULTS / "decoder_memory")
    p.add_argument("--merge", action="store_true",
                   help="keep the results already in --out's JSON for the (size, mode) pairs not run now")
    p.add_argument("--worker", nargs=3, metavar=("SIZE", "MODE", "GRAD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        size, mode, grad = args.worker
        print("RESULT " + json.dumps(worker(int(size), mode, grad or None)), flush=True)
        return
    import torch

    env = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}
    start = time.perf_counter()
    results: list[dict] = []
    tmp = Path(tempfile.mkdtemp())
    for size in args.sizes:
        for mode in args.modes:
            if f"{size}:{mode}" in args.skip:
                continue
            if time.perf_counter() - start > args.budget_s:
                results.append({"size": size, "mode": mode, "error": "skipped (time budget)"})
                continue
            grad = tmp / f"{size}_{mode}.pt"
            proc = subprocess.run([sys.executable, __file__, "--worker", str(size), mode, str(grad)],
                                  capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({"size": size, "mode": mode, "error": f"failed (rc {proc.returncode}): {tail[:80]}"})
            else:
                r = json.loads(line[7:])
                reference = next((m for m in ("full", "checkpoint") if m != mode
                                  and (tmp / f"{size}_{m}.pt").exists()), None)
                if reference is not None:
                    r.update(compare(str(grad), str(tmp / f"{size}_{reference}.pt")), reference=reference)
                results.append(r)
            print(json.dumps(results[-1]), flush=True)
    if args.merge:
        results = merge_results(args.out.with_suffix(".json"), results, _order)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"env": env, "results": results}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results, env))
    print(markdown(results, env))


if __name__ == "__main__":
    main()
