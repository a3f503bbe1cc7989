"""Fuzzing our nodes through ComfyUI's real HTTP API (issue: hardening §2).

A seeded, bounded loop builds graphs around a random operator node and one of our consumers (Simulate
measurement, Pseudo-inverse preview, FlowDPS Restore, AFDPS Restore) with random widget values drawn from
the server's own ``/object_info`` (mostly inside the declared ranges, sometimes outside them, sizes that may
not fit), submits each to a ComfyUI started on loopback with the tiny models, and after every prompt checks:

* the server answered: 200 (then the prompt finishes within a time limit, as a success or as an execution
  error) or 400 with node errors (a value outside its declared range);
* an execution error of ours is a clear, deliberate one (``ValueError``, or ComfyUI's interruption), never an
  internal crash (``TypeError``, ``IndexError``, ``AttributeError``, ``KeyError``, ``ZeroDivisionError``...),
  and its message is not empty;
* ``/object_info`` still answers with our nodes, and every ``CHECK_EVERY`` prompts a known-good graph gives
  the same image as at the start.

``FLOWDPS_FUZZ_PROMPTS`` (default 40) and ``FLOWDPS_FUZZ_SECONDS`` (default 300) bound it; it stops by itself.
"""

from __future__ import annotations

import logging
import os
import random
import time

import pytest

from flowdps_dev import graphs
from flowdps_dev.server import ServerError

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

N_PROMPTS = int(os.environ.get("FLOWDPS_FUZZ_PROMPTS", "40"))
SECONDS = float(os.environ.get("FLOWDPS_FUZZ_SECONDS", "300"))
SEED = 20261123
CHECK_EVERY = 10
OPERATORS = ("FlowDPSOperatorSRAvgPool", "FlowDPSOperatorSRBicubic", "FlowDPSOperatorGaussianBlur",
             "FlowDPSOperatorPaperGaussianBlur", "FlowDPSOperatorMotionBlur", "FlowDPSOperatorBoxInpaint",
             "FlowDPSOperatorRandomInpaint", "FlowDPSOperatorIdentity", "FlowDPSOperatorGrayscale")
CONSUMERS = ("FlowDPSSimulateMeasurement", "FlowDPSPseudoInverse", "FlowDPSRestore", "AFDPSRestore")
# Inputs whose cost grows with the value: drawn from a small range so that the loop stays bounded in time.
CHEAP = {"steps": (1, 2), "particles": (1, 3), "dc_steps": (1, 2), "max_iterations": (1, 8), "chunk_size": (0, 3),
         "width": (8, 48), "height": (8, 48), "box_width": (1, 48), "box_height": (1, 48), "box_left": (0, 48),
         "box_top": (0, 48), "kernel_size": (1, 41), "factor": (1, 8)}
DELIBERATE = ("ValueError", "InterruptProcessingException")


def widget_value(rng: random.Random, name: str, spec: list, outside: bool = False) -> object:
    """A random value for one widget inside its declared range (cheap inputs in a small band), or just
    outside it (``outside``, numbers only)."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        return rng.choice(kind)
    if kind == "COMBO":
        return rng.choice(opts.get("options", []) or [None])
    if kind == "BOOLEAN":
        return rng.random() < 0.5
    lo, hi = opts.get("min", 0), opts.get("max", 100)
    if outside:                                                  # out of the declared range: a 400 answer
        return lo - 1 if rng.random() < 0.5 else hi + 1
    if name in CHEAP:
        lo, hi = max(lo, CHEAP[name][0]), min(hi, CHEAP[name][1])
    elif kind == "FLOAT":
        hi = min(hi, max(4.0 * abs(opts.get("default", 1.0)), lo + 1.0))
    else:
        hi = min(hi, lo + 1000)
    if kind == "INT":
        return rng.randint(int(lo), int(max(lo, hi)))
    return round(rng.uniform(lo, max(lo, hi)), 4)


def random_widgets(rng: random.Random, info: dict, outside_rate: float = 0.1) -> dict:
    """Random values for every widget of a node; with probability ``outside_rate`` one number is out of range."""
    specs = {name: spec for section in ("required", "optional") for name, spec in info["input"].get(section, {}).items()
             if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "BOOLEAN", "COMBO")}
    numbers = [name for name, spec in specs.items() if spec[0] in ("INT", "FLOAT")]
    outside = rng.choice(numbers) if numbers and rng.random() < outside_rate else None
    return {name: widget_value(rng, name, spec, name == outside) for name, spec in specs.items()}


def random_graph(rng: random.Random, object_info: dict) -> dict:
    g = graphs.GraphBuilder()
    side = rng.choice([16, 24, 30, 32, 33, 48])
    image = g.add("EmptyImage", "image", width=side, height=rng.choice([side, 32]), batch_size=rng.choice([1, 1, 2]),
                  color=rng.randint(0, 0xFFFFFF)).out()
    op_type = rng.choice(OPERATORS)
    op = g.add(op_type, "op", **random_widgets(rng, object_info[op_type])).out()
    consumer = rng.choice(CONSUMERS)
    widgets = random_widgets(rng, object_info[consumer])
    if consumer in ("FlowDPSRestore", "AFDPSRestore"):
        model, vae, pos, neg = graphs.prior_loaders(g, graphs.TINY_PRIORS["sd3"])
        target = g.add(consumer, "target", model=model, positive=pos, negative=neg, vae=vae, measurement=image,
                       operator=op, **widgets)
    elif consumer == "FlowDPSSimulateMeasurement":
        target = g.add(consumer, "target", image=image, operator=op, **widgets)
    else:
        target = g.add(consumer, "target", measurement=image, operator=op, **widgets)
    g.add("PreviewImage", "preview", images=target.out(0))
    return g.build()


def known_good() -> dict:
    g = graphs.GraphBuilder()
    image = g.add("EmptyImage", "image", width=32, height=32, batch_size=1, color=0x336699).out()
    op = g.add("FlowDPSOperatorSRBicubic", "op", factor=2).out()
    sim = g.add("FlowDPSSimulateMeasurement", "sim", image=image, operator=op, sigma_y=0.05, seed=7).out()
    g.add("SaveImage", "save", images=sim, filename_prefix="fuzz_known_good")
    return g.build()


def known_good_bytes(server) -> bytes:
    outcome = server.run(known_good(), timeout=120)
    assert outcome.status == "success", outcome.error
    (image,) = outcome.images()
    return server.view(image)


def test_random_graphs_never_crash_or_hang_the_server(comfy_server):
    rng = random.Random(SEED)
    object_info = comfy_server.get("/object_info")
    reference = known_good_bytes(comfy_server)
    counts = {"400": 0, "success": 0, "error": 0}
    crashes, t0, done, by_consumer = [], time.monotonic(), 0, {}
    while done < N_PROMPTS and time.monotonic() - t0 < SECONDS:
        prompt = random_graph(rng, object_info)
        consumer = prompt["target"]["class_type"]
        by_consumer[consumer] = by_consumer.get(consumer, 0) + 1
        status, body = comfy_server.post("/prompt", {"prompt": prompt, "client_id": "fuzz"})
        if status == 400:
            counts["400"] += 1
            assert body.get("node_errors") or body.get("error"), body
        else:
            assert status == 200, (status, body)
            try:
                outcome = comfy_server.wait(body["prompt_id"], timeout=180)
            except ServerError as e:
                pytest.fail(f"prompt {done} hung or killed the server: {e}\n{prompt}")
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
            if outcome.status != "success":
                error = outcome.error or {}
                if error.get("exception_type") not in DELIBERATE or not error.get("exception_message"):
                    crashes.append((error.get("node_type"), error.get("exception_type"),
                                    error.get("exception_message"), prompt))
        done += 1
        info = comfy_server.get("/object_info/FlowDPSRestore")
        assert "FlowDPSRestore" in info
        if done % CHECK_EVERY == 0:
            assert known_good_bytes(comfy_server) == reference
    assert known_good_bytes(comfy_server) == reference
    logging.getLogger(__name__).warning(f"fuzz: {done} prompts in {time.monotonic() - t0:.0f} s: {counts}; by consumer {by_consumer}")
    assert done >= min(N_PROMPTS, 10), f"only {done} prompts in {SECONDS} s"
    assert counts["success"] > 0
    assert counts["error"] + counts["400"] > 0
    assert not crashes, "\n\n".join(f"{t}: {e}: {m}\n{p}" for t, e, m, p in crashes[:5])
