"""Run the protocol over a folder of clean images on one or more ComfyUI servers, resumably.

Output folder layout (``out``)::

    run.json                     protocol, workflow, model, servers, fingerprint of the settings
    records/<key>.json           one finished image: metrics, server, prompt id, seconds (resume skips these)
    images/<key>/ground_truth.png, images/<key>/restored.png
    results.csv, results.json    every finished image of this fingerprint
    summary.json, summary.md     means, the table row in the format of the paper's tables

Images go through a shared queue with one worker thread per server; each worker uploads the prepared ground
truth to its server, queues the evaluation prompt on that server's own queue, waits for it and scores the
result, so a faster server takes more images.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import metrics
from .client import ComfyClient, ComfyClientError
from .protocol import Protocol, decode_image, fingerprint, list_images, load_ground_truth, png_bytes
from .workflow import EvalGraph, checkpoint_names, evaluation_prompt, load_ui_workflow, to_api

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: data, workflow, model (checkpoint name on the servers), protocol, output folder."""

    data: Path
    workflow: Path
    checkpoint: str
    out: Path
    protocol: Protocol = field(default_factory=Protocol)
    dataset: str = ""
    limit: int = 0
    timeout: float = 3600.0


@dataclass(frozen=True)
class Job:
    index: int
    path: Path
    key: str


@dataclass
class Outcome:
    """What a run did: finished (new), skipped (already done), failed (key -> error), per server counts."""

    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    per_server: dict[str, int] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def image_key(path: Path) -> str:
    """A file-system-safe, unique key per image file (its stem plus a short hash of the name)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)[:60]
    return f"{safe}-{hashlib.sha1(path.name.encode()).hexdigest()[:6]}"


def jobs_for(config: EvalConfig) -> list[Job]:
    paths = list_images(config.data)
    if config.limit:
        paths = paths[: config.limit]
    return [Job(i, p, image_key(p)) for i, p in enumerate(paths)]


class Progress:
    """A one-line progress bar on stderr: done / total, skipped, failed, seconds per image, ETA."""

    def __init__(self, total: int, stream=None, width: int = 30) -> None:
        self.total, self.done, self.skipped, self.failed = total, 0, 0, 0
        self.stream = stream if stream is not None else sys.stderr
        self.width, self.start, self.lock = width, time.monotonic(), threading.Lock()

    def update(self, *, skipped: bool = False, failed: bool = False) -> None:
        with self.lock:
            self.done += 1
            self.skipped += skipped
            self.failed += failed
            worked = self.done - self.skipped
            rate = (time.monotonic() - self.start) / worked if worked else math.nan
            eta = rate * (self.total - self.done) if worked else math.nan
            filled = int(self.width * self.done / max(self.total, 1))
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r[eval] [{bar}] {self.done}/{self.total} (skipped {self.skipped}, failed "
                              f"{self.failed}) {rate:.1f} s/image, ETA {eta:.0f} s ")
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()


def check_servers(clients: Sequence[ComfyClient], checkpoint: str) -> dict[str, dict]:
    """Reachability, the pack's nodes and the checkpoint on every server; returns each one's ``/object_info``."""
    if not clients:
        raise ValueError("no ComfyUI server: give --server URL (repeatable) or --local-servers N")
    infos = {}
    for client in clients:
        client.check()
        info = client.object_info()
        if "FlowDPSSimulateMeasurement" not in info:
            raise ComfyClientError(f"{client.url} has no FlowDPS nodes: install the comfyui-flowdps pack there")
        names = checkpoint_names(info)
        if checkpoint not in names:
            raise ComfyClientError(f"checkpoint {checkpoint!r} is not in {client.url}'s models/checkpoints; it has: "
                                   f"{names or 'none'}")
        infos[client.url] = info
    return infos


def record_path(out: Path, key: str) -> Path:
    return out / "records" / f"{key}.json"


def load_record(out: Path, key: str, run_fingerprint: str) -> dict | None:
    """The finished record of ``key`` if it exists and was made with the same settings."""
    path = record_path(out, key)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return record if record.get("fingerprint") == run_fingerprint else None


def write_json(path: Path, data) -> None:
    """Write atomically (temp file + rename), so an interrupted run never leaves a half record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def evaluate_one(client: ComfyClient, api: dict, job: Job, config: EvalConfig, run_fingerprint: str) -> dict:
    """Prepare, upload, restore on ``client``'s server, fetch and score one image; returns its record."""
    start = time.monotonic()
    truth = load_ground_truth(job.path, config.protocol.size)
    folder = config.out / "images" / job.key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ground_truth.png").write_bytes(png_bytes(truth))
    name = client.upload_image(f"flowdps_eval_{job.key}.png", png_bytes(truth))
    prompt, graph = evaluation_prompt(api, checkpoint=config.checkpoint, image_name=name, protocol=config.protocol,
                                      prefix=f"flowdps_eval/{run_fingerprint}/{job.key}")
    finished = client.wait(client.submit(prompt), timeout=config.timeout)
    images = finished.images.get(graph.save, [])
    if len(images) != 1:
        raise ComfyClientError(f"{client.url}: prompt {finished.prompt_id} saved {len(images)} images, expected 1")
    restored = decode_image(client.view(images[0]))
    if restored.shape != truth.shape:
        raise ComfyClientError(f"restored image {restored.shape} does not match the ground truth {truth.shape}")
    (folder / "restored.png").write_bytes(png_bytes(restored))
    a, b = metrics.to_unit(restored), metrics.to_unit(truth)
    return {"key": job.key, "image": job.path.name, "index": job.index, "psnr": metrics.psnr(a, b),
            "ssim": metrics.ssim(a, b), "server": client.url, "prompt_id": finished.prompt_id,
            "seconds": time.monotonic() - start, "server_seconds": finished.seconds, "task": graph.task,
            "method": graph.method, "fingerprint": run_fingerprint}


def run(config: EvalConfig, clients: Sequence[ComfyClient], *, progress_stream=None,
        on_record: Callable[[dict], None] | None = None) -> Outcome:
    """Evaluate every image of ``config.data`` not finished yet, spread over ``clients``; write the files."""
    jobs = jobs_for(config)
    infos = check_servers(clients, config.checkpoint)
    workflow = load_ui_workflow(config.workflow)
    apis = {url: to_api(workflow, info) for url, info in infos.items()}
    run_fingerprint = fingerprint(config.protocol, workflow, config.checkpoint)
    config.out.mkdir(parents=True, exist_ok=True)
    first_api = next(iter(apis.values()))
    _, graph = evaluation_prompt(first_api, checkpoint=config.checkpoint, image_name="x.png",
                                 protocol=config.protocol, prefix="x")
    write_json(config.out / "run.json", {
        "fingerprint": run_fingerprint, "protocol": asdict(config.protocol), "workflow": str(config.workflow),
        "checkpoint": config.checkpoint, "data": str(config.data), "dataset": config.dataset or config.data.name,
        "servers": [c.url for c in clients], "task": graph.task, "method": graph.method})
    outcome = Outcome(per_server={c.url: 0 for c in clients})
    bar = Progress(len(jobs), progress_stream)
    todo: queue.Queue[Job] = queue.Queue()
    for job in jobs:
        if load_record(config.out, job.key, run_fingerprint) is not None:
            outcome.skipped.append(job.key)
            bar.update(skipped=True)
        else:
            todo.put(job)
    lock = threading.Lock()

    def worker(client: ComfyClient) -> None:
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            try:
                record = evaluate_one(client, apis[client.url], job, config, run_fingerprint)
            except Exception as e:  # one bad image or server must not stop the others; reported at the end
                logger.error("%s on %s: %s", job.path.name, client.url, e)
                with lock:
                    outcome.failed[job.key] = f"{client.url}: {e}"
                bar.update(failed=True)
                continue
            write_json(record_path(config.out, job.key), record)
            with lock:
                outcome.finished.append(job.key)
                outcome.per_server[client.url] += 1
            if on_record is not None:
                on_record(record)
            bar.update()

    threads = [threading.Thread(target=worker, args=(c,), name=f"eval-{c.url}", daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = [r for job in jobs if (r := load_record(config.out, job.key, run_fingerprint)) is not None]
    outcome.summary = write_reports(config, records, graph, run_fingerprint)
    return outcome


# ---------------------------------------------------------------------------------------------- reports


CSV_FIELDS = ("key", "image", "psnr", "ssim", "seconds", "server", "prompt_id")


def learned_metrics(out: Path, records: Sequence[dict]) -> tuple[dict[str, str], dict[str, float]]:
    """LPIPS / FID over the saved images, computed only when their weights are already on disk.

    Returns (status per metric: how it was computed or why it was skipped, values per metric).
    """
    status, values = {}, {}
    pairs = [(np.asarray(decode_image((out / "images" / r["key"] / "restored.png").read_bytes())),
              np.asarray(decode_image((out / "images" / r["key"] / "ground_truth.png").read_bytes())))
             for r in records] if records else []
    for check, compute in ((metrics.lpips_availability, lambda: float(np.mean(metrics.lpips_scores(pairs)))),
                           (metrics.fid_availability, lambda: metrics.fid_score([a for a, _ in pairs],
                                                                                [b for _, b in pairs]))):
        a = check()
        status[a.name] = a.reason
        if a.available and pairs:
            try:
                values[a.name] = compute()
            except Exception as e:  # a broken optional metric must not lose PSNR / SSIM
                status[a.name] = f"skipped: {type(e).__name__}: {e}"
    return status, values


def summarize(records: Sequence[dict]) -> dict:
    """Means (and standard deviations) of PSNR / SSIM and seconds over finished records."""
    if not records:
        return {"images": 0}
    psnr = np.array([r["psnr"] for r in records], dtype=np.float64)
    ssim = np.array([r["ssim"] for r in records], dtype=np.float64)
    return {"images": len(records), "psnr": float(psnr.mean()), "psnr_std": float(psnr.std()),
            "ssim": float(ssim.mean()), "ssim_std": float(ssim.std()),
            "seconds_per_image": float(np.mean([r["seconds"] for r in records]))}


def table_row(dataset: str, graph: EvalGraph, stats: dict, learned: dict[str, str],
              values: dict[str, float] | None = None) -> str:
    values = values or {}

    def cell(name: str) -> str:
        if name in values:
            return f"{values[name]:.3f}" if name == "LPIPS" else f"{values[name]:.2f}"
        return "skipped" if learned[name].startswith("skipped") else "n/a"

    if not stats.get("images"):
        return f"| {dataset}, {graph.task} | {graph.method} | - | - | {cell('LPIPS')} | {cell('FID')} | 0 | - |"
    return (f"| {dataset}, {graph.task} | {graph.method} | {stats['psnr']:.2f} | {stats['ssim']:.3f} "
            f"| {cell('LPIPS')} | {cell('FID')} | {stats['images']} | {stats['seconds_per_image']:.1f} |")


def write_reports(config: EvalConfig, records: Sequence[dict], graph: EvalGraph, run_fingerprint: str) -> dict:
    out = config.out
    records = sorted(records, key=lambda r: r["index"])
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    write_json(out / "results.json", records)
    dataset = config.dataset or config.data.name
    stats = summarize(records)
    learned, values = learned_metrics(out, records)
    p = config.protocol
    summary = {"dataset": dataset, "task": graph.task, "method": graph.method, "fingerprint": run_fingerprint,
               "checkpoint": config.checkpoint, "workflow": str(config.workflow), **stats,
               **{name.lower(): v for name, v in values.items()}, "learned": learned, "protocol": asdict(p)}
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(f"""# Evaluation: {dataset}, {graph.task}

Protocol: resize + centre-crop to {p.size}, measurement noise sigma_y {p.sigma_y} on [0, 1] ({2 * p.sigma_y:g} on
[-1, 1]), seed {p.seed}, NFE {p.steps}, cfg {p.cfg:g}, shift {p.shift:g}; checkpoint `{config.checkpoint}`, workflow
`{config.workflow}`. PSNR (dB) and SSIM (Gaussian 11x11, sigma 1.5) on [0, 1] RGB, higher is better.

| dataset, task | method | PSNR | SSIM | LPIPS | FID | images | s / image |
|---|---|---:|---:|---:|---:|---:|---:|
{table_row(dataset, graph, stats, learned, values)}

LPIPS: {learned['LPIPS']}. FID: {learned['FID']}.
""")
    return summary
