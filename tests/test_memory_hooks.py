"""The operators' matrix caches are dropped when ComfyUI frees memory (``unload_all_models``: the ``/free``
route, out-of-memory errors), through the real executor and through the real server's POST /free."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

from flowdps_dev.graphs import GraphBuilder

pytestmark = pytest.mark.comfy

PHOTO = "flowdps_memory_hooks_photo.png"


def _write_photo(folder) -> None:
    g = torch.Generator().manual_seed(0)
    array = (torch.rand(48, 40, 3, generator=g).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(folder / PHOTO)


def _bicubic_graph(prefix: str) -> dict:
    """LoadImage -> bicubic SR x2 -> Simulate measurement -> SaveImage (fills the bicubic matrix cache)."""
    g = GraphBuilder()
    image = g.add("LoadImage", "load", image=PHOTO).out()
    op = g.add("FlowDPSOperatorSRBicubic", "op", factor=2).out()
    sim = g.add("FlowDPSSimulateMeasurement", "sim", image=image, operator=op, sigma_y=0.0, seed=0)
    g.add("SaveImage", "save", images=sim.out(0), filename_prefix=prefix)
    return g.build()


def test_unloading_models_drops_the_caches_filled_through_the_executor(comfy):
    import comfy.model_management as mm

    cache = comfy.pack_module("operators.cache")
    hooks = comfy.pack_module("nodes.memory_hooks")
    assert hooks.installed(), "loading the pack did not install the hook"
    _write_photo(comfy.input_dir)
    cache.clear_tensor_caches()
    result = comfy.run(_bicubic_graph("hooks_inproc"), fresh=True)
    assert result.success, result.error
    assert cache.cached_tensor_bytes() > 0, "the graph did not fill the bicubic cache"
    mm.unload_all_models()
    assert cache.cached_tensor_bytes() == 0


def test_the_hook_is_installed_once_and_can_be_removed(comfy):
    import comfy.model_management as mm

    hooks = comfy.pack_module("nodes.memory_hooks")
    sr = comfy.pack_module("operators.sr")
    cache = comfy.pack_module("operators.cache")
    wrapped = mm.unload_all_models
    assert not hooks.install()
    assert mm.unload_all_models is wrapped
    try:
        assert hooks.uninstall()
        assert not hooks.installed()
        assert not hooks.uninstall()
        sr.bicubic_matrices(16, 2)
        mm.unload_all_models()
        assert cache.cached_tensor_bytes() > 0, "the caches were dropped without the hook"
    finally:
        assert hooks.install()
    mm.unload_all_models()
    assert cache.cached_tensor_bytes() == 0


def test_post_free_on_the_real_server_drops_the_caches(comfy_server):
    _write_photo(comfy_server.work_dir / "input")
    outcome = comfy_server.run(_bicubic_graph("hooks_server"), timeout=120)
    assert outcome.status == "success", outcome.messages
    pattern = re.compile(r"dropped (\d+) bytes \(\S+ MiB\) of cached operator matrices, (\d+) bytes cached now")
    deadline = time.monotonic() + 30
    match = None
    while match is None and time.monotonic() < deadline:
        # posted again until it is seen: ComfyUI's worker can miss the wake-up of a /free that arrives while it
        # collects garbage after a prompt (the flag then waits for the next prompt)
        status, _ = comfy_server.post("/free", {"unload_models": True, "free_memory": True})
        assert status == 200
        time.sleep(0.5)
        match = pattern.search(comfy_server.log_text())
    assert match is not None, f"no cache drop logged after POST /free:\n{comfy_server.log_tail()}"
    assert int(match.group(1)) > 0
    assert int(match.group(2)) == 0
