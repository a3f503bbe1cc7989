"""The largest image each decoder memory mode reaches for a given free memory, from the pack's own estimates.

Run (after ``make setup``; a few seconds, no gradient is computed)::

    source .cache/env.sh && .venv/bin/python benchmarks/memory_reach.py [--free-gib 8 12 16 22]

For the full-size SD3 VAE architecture (``tiny_sd3_vae_full.safetensors``, loaded by ComfyUI's ``comfy.sd.VAE``)
and square images in steps of 64 px, the largest side whose estimated need fits each free-memory budget: the
decoder copy's weights (float32, bfloat16 for the 16-bit modes) plus ``nodes.decoder_memory``'s activation
estimate of one decoder gradient, i.e. what the Restore and SAMPLER nodes check before they run. The tiled
modes are planned as ``auto`` plans them (:func:`~nodes.decoder_memory.tiled_budget`): everything kept when that
fits, else fewer tensors (slower). Measured peaks from ``results/decoder_memory.json`` are set beside the
estimates of the same runs, so the table says how far the estimates are from what was measured.

Writes ``benchmarks/results/memory_reach.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VAE_FILE = "tiny_sd3_vae_full.safetensors"
STEP = 64
MAX_SIZE = 16384


def need_bytes(decoder, mode: str, size: int, free_bytes: int, weight_bytes: int) -> int:
    """Bytes one gradient at ``size`` px needs in ``mode`` with ``free_bytes`` available (weights included)."""
    from flowdps.nodes.decoder_memory import activation_bytes, copy_bytes, split_mode, tiled_budget

    shape = (1, 16, size // 8, size // 8)
    weights = copy_bytes(weight_bytes, mode)
    if split_mode(mode)[0] == "tiled":
        return weights + tiled_budget(decoder, shape, free_bytes - weights, mode)[1]
    return weights + activation_bytes(decoder, mode, shape)


def largest(decoder, mode: str, free_bytes: int, weight_bytes: int) -> int:
    """The largest side (a multiple of :data:`STEP`, at most :data:`MAX_SIZE`) that fits ``free_bytes``; 0: none."""
    best = 0
    for size in range(STEP, MAX_SIZE + 1, STEP):
        if need_bytes(decoder, mode, size, free_bytes, weight_bytes) > free_bytes:
            break                                  # every estimate grows with the size
        best = size
    return best


def measured_against_estimates(decoder) -> list[dict]:
    """Measured peaks (``results/decoder_memory.json``) beside the current estimate of the same run."""
    from flowdps.nodes.decoder_memory import activation_bytes, tiled_budget

    path = RESULTS / "decoder_memory.json"
    if not path.is_file():
        return []
    rows = []
    for r in json.loads(path.read_text())["results"]:
        if "error" in r:
            continue
        mode, _, gib = r["mode"].partition("@")
        shape = (1, 16, r["size"] // 8, r["size"] // 8)
        if gib:
            estimate = tiled_budget(decoder, shape, int(float(gib) * 2**30), mode)[1]
        else:
            estimate = activation_bytes(decoder, mode, shape)
        peak = r.get("cuda_peak_mib", r["peak_mib"])
        rows.append({"size": r["size"], "mode": r["mode"], "peak_mib": peak, "estimate_mib": estimate / 2**20,
                     "estimate_over_peak": estimate / 2**20 / peak})
    return rows


def markdown(reach: dict[str, dict[str, int]], budgets: list[float], checks: list[dict], weight_mib: float) -> str:
    lines = [
        "# The largest image per decoder memory mode (estimated)",
        "",
        "Full-size SD3 VAE architecture, batch 1, one decoder gradient: the decoder copy's weights "
        f"({weight_mib:.0f} MiB in float32) plus the activation estimate the nodes check before a run. Largest "
        f"square side in steps of {STEP} px whose estimate fits the free memory; the tiled modes keep fewer "
        "tensors (slower) when keeping everything does not fit. A FlowDPS step adds the transformer and its "
        "activations, the latent and the operator; AFDPS multiplies the activations by the particles of a chunk.",
        "",
        "| mode | " + " | ".join(f"{b:g} GiB free" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for mode, row in reach.items():
        lines.append(f"| {mode} | " + " | ".join(f"{row[f'{b:g}']} px" if row[f"{b:g}"] else "-" for b in budgets)
                     + " |")
    if checks:
        lines += [
            "",
            "Estimates against measured peaks (`decoder_memory.md`, activations only):",
            "",
            "| size | mode | measured MiB | estimate MiB | estimate / measured |",
            "|---:|---|---:|---:|---:|",
        ]
        lines += [f"| {c['size']} | {c['mode']} | {c['peak_mib']:.0f} | {c['estimate_mib']:.0f} "
                  f"| {c['estimate_over_peak']:.2f} |" for c in checks]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--free-gib", type=float, nargs="+", default=[8.0, 12.0, 16.0, 22.0])
    p.add_argument("--out", type=Path, default=RESULTS / "memory_reach")
    args = p.parse_args(argv)
    sys.path.append(str(ROOT))
    import importlib

    importlib.import_module("flowdps_dev.pack").import_pack("flowdps")
    from flowdps_dev import comfy_env

    comfy_env.add_comfy_to_path()
    import comfy.sd
    import comfy.utils
    from flowdps.nodes.decoder_memory import HALF_MODES, LAYOUTS, kl_decoder

    models = Path(os.environ["FLOWDPS_MODELS"])
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models / "vae" / VAE_FILE)))
    decoder = kl_decoder(vae.first_stage_model)
    weight_bytes = sum(p.numel() * 4 for p in decoder.parameters())
    reach = {mode: {f"{b:g}": largest(decoder, mode, int(b * 2**30), weight_bytes) for b in args.free_gib}
             for mode in (*LAYOUTS, *HALF_MODES)}
    checks = measured_against_estimates(decoder)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"free_gib": args.free_gib, "step_px": STEP, "weight_mib": weight_bytes / 2**20, "reach": reach,
         "estimate_checks": checks}, indent=1) + "\n")
    table = markdown(reach, args.free_gib, checks, weight_bytes / 2**20)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
