"""The memory-bounded decoder gradients (``nodes/decoder_tiles.py``, ``nodes/decoder_memory.py``) against plain
autograd through the pack's private float32 copy of the full-size SD3 VAE architecture (random weights).

Tolerance. Both gradients are float32 computations of the same function in different orders (bands, halos,
float64 GroupNorm statistics, chunked attention), so neither is the exact one: each is within
``F32_GRADIENT_REL_L2`` of the float64 gradient (tests/test_decoder_gradient.py: measured at most 9.4e-6 for
the full decoder over the CPU kernel families torch can be forced to, bound 1e-4), and by the triangle
inequality they differ by at most twice that. Measured here: 2.4e-6 to 2.9e-6 for gradients, 1.9e-6 for the
decoded image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flowdps_dev import graphs

pytestmark = pytest.mark.comfy

F32_GRADIENT_REL_L2 = 1e-4
"""Bound of one float32 decoder gradient against the float64 one (tests/test_decoder_gradient.py)."""
TWO_F32_REL_L2 = 2 * F32_GRADIENT_REL_L2
"""Bound between two float32 computations of the same gradient (triangle inequality)."""
ATTENTION_REL_L2 = 1e-5
"""Chunked attention against the materialised softmax, float32, 64 tokens of 32 channels: the rounding of a
softmax and two small matrix products (measured 2e-7); 50x margin."""

ROOT = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def full_vae(comfy):
    models = comfy.models_dir
    import comfy.sd
    import comfy.utils

    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models / "vae" / graphs.TINY_VAE_FULL)))


@pytest.fixture(scope="module")
def decoder(full_vae):
    """The KL ``Decoder`` of the pack's private float32 copy."""
    from flowdps.nodes.decoder import GradDecoder

    return GradDecoder(full_vae, None).module.decoder


def _problem(batch: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, h, w, generator=g), torch.randn(batch, 3, 8 * h, 8 * w, generator=g)


def _gradient(decode, z: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from flowdps.nodes.decoder import grad_enabled

    with grad_enabled():
        zr = z.clone().requires_grad_()
        image = decode(zr)
        (g,) = torch.autograd.grad((image * w).sum(), zr)
    return image.detach(), g


@pytest.mark.parametrize(("batch", "h", "w", "band_pixels", "keep_budget"), [
    (1, 5, 3, 64, None),       # odd sides, one latent row per band: every halo and band edge
    pytest.param(2, 3, 4, 100, 0, marks=pytest.mark.slow),  # batch 2, nothing above the latent level kept:
                                                             # every tensor recomputed band by band
    (1, 9, 3, 1 << 17, None),  # tall and narrow, one band per level
])
def test_tiled_gradient_equals_plain_autograd(decoder, batch, h, w, band_pixels, keep_budget):
    from flowdps.nodes.decoder_tiles import TiledDecoder, tiled_decode

    z, weight = _problem(batch, h, w)
    image, g = _gradient(decoder, z, weight)
    engine = TiledDecoder(decoder, band_pixels=band_pixels, keep_budget=keep_budget)
    tiled_image, tiled_g = _gradient(lambda t: tiled_decode(engine, t), z, weight)
    assert tiled_image.shape == image.shape == (batch, 3, 8 * h, 8 * w)
    assert _rel(tiled_image, image) <= TWO_F32_REL_L2
    assert _rel(tiled_g, g) <= TWO_F32_REL_L2
    # batch items are independent: the second item's gradient is not the first's
    if batch > 1:
        assert _rel(tiled_g[1], tiled_g[0]) > 0.1


def test_checkpointed_gradient_equals_plain_autograd(decoder):
    from flowdps.nodes.decoder_memory import checkpointed_decode

    z, weight = _problem(2, 5, 3, seed=1)
    image, g = _gradient(decoder, z, weight)
    ck_image, ck_g = _gradient(lambda t: checkpointed_decode(decoder, t), z, weight)
    assert _rel(ck_image, image) <= TWO_F32_REL_L2
    assert _rel(ck_g, g) <= TWO_F32_REL_L2


@pytest.mark.parametrize("mode", ["checkpoint", "tiled"])
def test_grad_decoder_modes_match_full(full_vae, mode):
    """Through GradDecoder (model-space latents, ComfyUI's decode entry point) the modes give full's gradient."""
    from flowdps.nodes.decoder import GradDecoder

    def process_out(t: torch.Tensor) -> torch.Tensor:
        return t / 1.5305 + 0.0609

    z, weight = _problem(1, 4, 5, seed=2)
    _, g = _gradient(GradDecoder(full_vae, process_out), z, weight)
    _, g_mode = _gradient(GradDecoder(full_vae, process_out, memory=mode), z, weight)
    assert _rel(g_mode, g) <= TWO_F32_REL_L2


def test_exact_attention_equals_softmax_attention():
    from flowdps.nodes.decoder_tiles import exact_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 32, 8, 8, generator=g, requires_grad=True) for _ in range(3))
    upstream = torch.randn(2, 32, 8, 8, generator=g)

    def reference(q, k, v):
        b, c, h, w = q.shape
        qf, kf, vf = (t.reshape(b, c, h * w) for t in (q, k, v))
        weights = torch.softmax(qf.transpose(1, 2) @ kf / c**0.5, -1)          # (b, N, N)
        return (vf @ weights.transpose(1, 2)).reshape(b, c, h, w)

    out = exact_attention(q, k, v, chunk=5)                                      # chunks not dividing N = 64
    ref = reference(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    ref_grads = torch.autograd.grad(ref, (q, k, v), upstream)
    assert _rel(out.detach(), ref.detach()) <= ATTENTION_REL_L2
    for a, b in zip(grads, ref_grads, strict=True):
        assert _rel(a, b) <= ATTENTION_REL_L2


def test_group_stats_over_bands_equal_whole_tensor_statistics():
    from flowdps.nodes.decoder_tiles import GroupStats

    g = torch.Generator().manual_seed(4)
    t = torch.randn(2, 8, 13, 5, generator=g) * 3 + 1
    stats = GroupStats(groups=4, eps=1e-6)
    for lo in range(0, 13, 4):                                                   # uneven last band
        stats.add(t[:, :, lo:lo + 4])
    stats.freeze()
    v = t.double().reshape(2, 4, -1)
    assert stats.mean is not None
    assert stats.rstd is not None
    torch.testing.assert_close(stats.mean.double(), v.mean(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.rstd.double(), torch.rsqrt(v.var(-1, unbiased=False) + 1e-6), rtol=1e-6, atol=0)


def test_tiled_decoder_checks_interrupt_between_bands(decoder):
    from flowdps.nodes.decoder_tiles import TiledDecoder

    calls = []

    class StopError(Exception):
        pass

    def interrupt() -> None:
        calls.append(1)
        if len(calls) > 3:
            raise StopError

    engine = TiledDecoder(decoder, band_pixels=64, interrupt=interrupt)
    with pytest.raises(StopError):
        engine.forward(torch.zeros(1, 16, 4, 4))
    assert len(calls) == 4


def test_bounded_modes_need_the_kl_decoder(comfy):
    models = comfy.models_dir
    import comfy.sd
    import comfy.utils
    from flowdps.nodes.decoder import GradDecoder
    from flowdps.nodes.decoder_memory import plan_memory

    taesd = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models / "vae" / graphs.TINY_VAE)))
    with pytest.raises(ValueError, match="memory 'tiled' needs ComfyUI's KL VAE decoder"):
        plan_memory("tiled", taesd.first_stage_model, (1, 16, 8, 8), None)
    with pytest.raises(ValueError, match="memory must be one of"):
        plan_memory("small", taesd.first_stage_model, (1, 16, 8, 8), None)
    assert plan_memory("auto", taesd.first_stage_model, (1, 16, 8, 8), 0, fallback_bytes=5).mode == "full"
    with pytest.raises(ValueError, match="needs ComfyUI's KL VAE decoder"):
        GradDecoder(taesd, None, memory="checkpoint")


def test_auto_mode_follows_free_memory(full_vae):
    from flowdps.nodes.decoder_memory import plan_memory

    model = full_vae.first_stage_model
    shape = (1, 16, 64, 64)
    plan = plan_memory("auto", model, shape, None)
    full, checkpoint = plan.estimates["full"], plan.estimates["checkpoint"]
    assert plan.mode == "full"
    assert full > checkpoint > plan.estimates["tiled"] > 0
    assert plan_memory("auto", model, shape, full).mode == "full"
    assert plan_memory("auto", model, shape, full - 1).mode == "checkpoint"
    assert plan_memory("auto", model, shape, checkpoint - 1).mode == "tiled"
    assert plan_memory("checkpoint", model, shape, 0).mode == "checkpoint"


# --- peak memory, each mode in its own process ----------------------------------------------------------------

PEAK_SCRIPT = textwrap.dedent("""
    import ctypes, importlib, json, sys
    from pathlib import Path
    sys.path.append(sys.argv[1])
    importlib.import_module("flowdps_dev.pack").import_pack("flowdps")
    from flowdps_dev import comfy_env
    comfy_env.add_comfy_to_path(cpu=True)
    import comfy.sd, comfy.utils, torch
    from flowdps.nodes.decoder import GradDecoder, grad_enabled
    from flowdps.nodes.decoder_memory import checkpointed_decode
    from flowdps.nodes.decoder_tiles import TiledDecoder, tiled_decode
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(sys.argv[2]))
    dec = GradDecoder(vae, None).module.decoder
    del vae
    mode, side = sys.argv[3], int(sys.argv[4])
    decode = {"full": dec, "checkpoint": lambda t: checkpointed_decode(dec, t),
              "tiled": lambda t: tiled_decode(TiledDecoder(dec, band_pixels=16 * 8 * side), t)}[mode]
    g = torch.Generator().manual_seed(0)
    z, w = torch.randn(1, 16, side, side, generator=g), torch.randn(1, 3, 8 * side, 8 * side, generator=g)
    def hwm_rss():
        f = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines())
        return int(f["VmHWM"].split()[0]) * 1024, int(f["VmRSS"].split()[0]) * 1024
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = hwm_rss()[1]
    with grad_enabled():
        zr = z.clone().requires_grad_()
        torch.autograd.grad((decode(zr) * w).sum(), zr)
    print("PEAK", json.dumps(hwm_rss()[0] - base))
""")


def _peak_bytes(mode: str, latent_side: int) -> int:
    vae = Path(os.environ.get("FLOWDPS_MODELS", ROOT / ".cache" / "models")) / "vae" / graphs.TINY_VAE_FULL
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(ROOT), str(vae), mode, str(latent_side)],
                          capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PEAK ")), None)
    assert line is not None, proc.stderr[-2000:]
    return int(json.loads(line[5:]))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_bounded_modes_peak_below_plain_autograd(comfy):
    """Peak extra resident memory of one gradient at 128 px (latent 16 x 16), each mode in a fresh process.

    Measured on 2 CPU cores: full 460-472 MiB, checkpoint 243-268 MiB (0.53-0.57 of full), tiled with bands of
    16 output rows 168 MiB (0.36). The bounds keep margin for allocator differences."""
    full = _peak_bytes("full", 16)
    checkpoint = _peak_bytes("checkpoint", 16)
    tiled = _peak_bytes("tiled", 16)
    assert full > 200 * 2**20
    assert checkpoint <= 0.75 * full, (checkpoint, full)
    assert tiled <= 0.5 * full, (tiled, full)
