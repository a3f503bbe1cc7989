"""benchmarks/memory_reach.py: the largest image each decoder memory mode reaches from the nodes' estimates."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from flowdps_dev import graphs

pytestmark = pytest.mark.comfy

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_reach.py"
GIB = 2**30


@pytest.fixture(scope="module")
def reach():
    spec = importlib.util.spec_from_file_location("memory_reach", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def decoder(comfy):
    models = comfy.models_dir
    import comfy.sd
    import comfy.utils
    from flowdps.nodes.decoder_memory import kl_decoder

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models / "vae" / graphs.TINY_VAE_FULL)))
    return kl_decoder(vae.first_stage_model)


@pytest.mark.parametrize("mode", ["full", "checkpoint", "tiled", "tiled 16-bit"])
def test_the_largest_size_fits_and_the_next_one_does_not(reach, decoder, mode):
    weights = sum(p.numel() * 4 for p in decoder.parameters())
    free = 4 * GIB
    side = reach.largest(decoder, mode, free, weights)
    assert side % reach.STEP == 0
    assert side > 0
    assert reach.need_bytes(decoder, mode, side, free, weights) <= free
    assert reach.need_bytes(decoder, mode, side + reach.STEP, free, weights) > free


def test_the_bounded_modes_reach_further_and_more_memory_reaches_further(reach, decoder):
    weights = sum(p.numel() * 4 for p in decoder.parameters())
    sides = {mode: reach.largest(decoder, mode, 6 * GIB, weights) for mode in ("full", "checkpoint", "tiled")}
    assert sides["full"] < sides["checkpoint"] < sides["tiled"]
    assert reach.largest(decoder, "tiled", 3 * GIB, weights) < sides["tiled"]
    assert reach.largest(decoder, "full", GIB // 8, weights) == 0  # the weights alone do not fit
