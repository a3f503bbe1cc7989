"""``python -m evaluation`` / ``make eval DATA=... MODEL=...``: the paper's protocol through ComfyUI servers.

Examples::

    # two GPU servers already running (one per GPU), the checkpoint in their models/checkpoints:
    python -m evaluation --data afhq_val/ --model sd3_medium_incl_clips.safetensors \\
        --server http://gpu1:8188 --server http://gpu2:8188 --out out/eval/afhq_sr12

    # start local servers from this checkout ($COMFYUI_PATH), the model given as a file:
    make eval DATA=afhq_val/ MODEL=/models/sd3_medium_incl_clips.safetensors EVAL_ARGS="--local-servers 1 --gpu"
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

from .client import ComfyClient, ComfyClientError
from .protocol import Protocol
from .runner import EvalConfig, run
from .workflow import WorkflowError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKFLOW = ROOT / "example_workflows" / "1 - Upscale a photo 4x (SD3).json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", required=True, help="folder of clean images (png, jpg, ...), not recursive")
    p.add_argument("--model", required=True, help="checkpoint name as the servers list it (CheckpointLoaderSimple), "
                   "or, with local servers, a .safetensors file")
    p.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="shipped UI workflow with a FlowDPS / "
                   "AFDPS Restore node fed by a Load Image (default: %(default)s)")
    p.add_argument("--server", action="append", default=[], help="ComfyUI server URL (repeatable: one per GPU)")
    p.add_argument("--local-servers", type=int, default=0, help="start N local ComfyUI servers from $COMFYUI_PATH "
                   "(default: 1 when no --server is given)")
    p.add_argument("--gpu", action="store_true", help="local servers use the GPU (server i on CUDA device i)")
    p.add_argument("--models", help="models folder for local servers (default: $FLOWDPS_MODELS)")
    p.add_argument("--out", type=Path, help="output folder (default: out/eval/<data folder name>)")
    p.add_argument("--dataset", default="", help="dataset name in the table (default: the data folder's name)")
    p.add_argument("--size", type=int, default=Protocol.size, help="ground-truth side (default %(default)s)")
    p.add_argument("--steps", type=int, default=Protocol.steps, help="sampling steps / NFE (default %(default)s)")
    p.add_argument("--cfg", type=float, default=Protocol.cfg)
    p.add_argument("--shift", type=float, default=Protocol.shift)
    p.add_argument("--sigma-y", type=float, default=Protocol.sigma_y, help="noise std on [0, 1] (default %(default)s)")
    p.add_argument("--seed", type=int, default=Protocol.seed)
    p.add_argument("--limit", type=int, default=0, help="only the first N images (sorted by name)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per image")
    return p.parse_args(argv)


def local_model(model: str, models: str | None) -> tuple[str, tuple[Path, ...]]:
    """(checkpoint name, extra checkpoint folders) for local servers: a file path adds its folder."""
    path = Path(model).expanduser()
    if path.suffix in (".safetensors", ".ckpt", ".pt", ".sft") and ("/" in model or path.is_file()):
        if not path.is_file():
            raise FileNotFoundError(f"--model {model}: no such checkpoint file")
        return path.name, (path.resolve().parent,)
    return model, ()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[eval] %(message)s")
    args = parse_args(argv)
    try:
        protocol = Protocol(size=args.size, sigma_y=args.sigma_y, seed=args.seed, steps=args.steps, cfg=args.cfg,
                            shift=args.shift)
        n_local = args.local_servers or (0 if args.server else 1)
        checkpoint, extra_dirs = local_model(args.model, args.models) if n_local else (args.model, ())
        config = EvalConfig(data=Path(args.data), workflow=args.workflow, checkpoint=checkpoint,
                            out=args.out or Path("out") / "eval" / Path(args.data).name, protocol=protocol,
                            dataset=args.dataset, limit=args.limit, timeout=args.timeout)
        with contextlib.ExitStack() as stack:
            urls = list(args.server)
            for i in range(n_local):
                urls.append(stack.enter_context(start_local_server(i, args, extra_dirs)).url)
            clients = [ComfyClient(url) for url in urls]
            outcome = run(config, clients)
    except (FileNotFoundError, ValueError, ComfyClientError, WorkflowError) as e:
        logging.error("%s", e)
        return 2
    s = outcome.summary
    logging.info("%d finished, %d skipped, %d failed; per server %s", len(outcome.finished), len(outcome.skipped),
                 len(outcome.failed), outcome.per_server)
    if s.get("images"):
        logging.info("%s, %s, %s: PSNR %.2f, SSIM %.3f over %d images; %s", s["dataset"], s["task"], s["method"],
                     s["psnr"], s["ssim"], s["images"], config.out / "summary.md")
    for key, error in outcome.failed.items():
        logging.error("failed: %s: %s", key, error)
    return 1 if outcome.failed else 0


@contextlib.contextmanager
def start_local_server(index: int, args: argparse.Namespace, extra_dirs: tuple[Path, ...]):
    """A local ComfyUI server (flowdps_dev.server) with only this pack, stopped on exit."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    from flowdps_dev.server import ComfyServer

    work = Path(tempfile.mkdtemp(prefix=f"flowdps-eval-server{index}-"))
    extra = ("--cuda-device", str(index)) if args.gpu else ()
    server = ComfyServer(models_dir=args.models or os.environ.get("FLOWDPS_MODELS"), work_dir=work,
                         checkpoint_dirs=extra_dirs, cpu=not args.gpu, extra_args=extra)
    logging.info("starting local ComfyUI server %d (log %s)", index, server.log_path)
    with server:
        yield server
