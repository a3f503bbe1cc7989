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


def _keep_all_but_top(engine, h: int, w: int, batch: int, top_kept: int) -> int:
    """A keep budget for everything below the output level plus its first ``top_kept`` block outputs."""
    kept = engine.kept_bytes(h, w, batch, 4)
    top = max(t.scale for t in engine.tensors)
    names = [t.name for t in engine.tensors[1:-1] if t.scale == top]
    return sum(v for n, v in kept.items() if n not in names) + sum(kept[n] for n in names[:top_kept])


@pytest.mark.parametrize(("batch", "h", "w", "band_pixels", "keep", "lean"), [
    (1, 5, 3, 64, None, False),  # odd sides, one latent row per band: every halo and band edge
    (1, 5, 3, 64, None, True),   # the same with lean ResNet blocks (no map of conv1's gradient)
    pytest.param(2, 3, 4, 100, 0, None, marks=pytest.mark.slow),  # batch 2, nothing above the latent level
                                                                  # kept: every tensor recomputed band by band
    (1, 9, 3, 1 << 17, None, None),  # tall and narrow, one band per level
    (1, 6, 4, 150, 1, None),     # all but the output level's last two tensors: recomputed from the first, lean
])
def test_tiled_gradient_equals_plain_autograd(decoder, batch, h, w, band_pixels, keep, lean):
    from flowdps.nodes.decoder_tiles import TiledDecoder, tiled_decode

    z, weight = _problem(batch, h, w)
    image, g = _gradient(decoder, z, weight)
    engine = TiledDecoder(decoder, band_pixels=band_pixels)
    budget = None if keep is None else 0 if keep == 0 else _keep_all_but_top(engine, h, w, batch, keep)
    engine = TiledDecoder(decoder, band_pixels=band_pixels, keep_budget=budget, lean=lean)
    tiled_image, tiled_g = _gradient(lambda t: tiled_decode(engine, t), z, weight)
    assert tiled_image.shape == image.shape == (batch, 3, 8 * h, 8 * w)
    assert _rel(tiled_image, image) <= TWO_F32_REL_L2
    assert _rel(tiled_g, g) <= TWO_F32_REL_L2
    # batch items are independent: the second item's gradient is not the first's
    if batch > 1:
        assert _rel(tiled_g[1], tiled_g[0]) > 0.1


@pytest.mark.parametrize("direct", [True, False])
def test_kept_blocks_use_transposed_convolutions_and_the_autograd_fallback_agrees(decoder, monkeypatch, direct):
    """Keeping everything, every ResNet block of the SD3 decoder is differentiated with transposed convolutions
    (no convolution forward pass in its VJP); a decoder whose convolutions are not plain would fall back to
    autograd inside each band. Both give plain autograd's gradient."""
    from flowdps.nodes import decoder_tiles
    from flowdps.nodes.decoder_tiles import Block, TiledDecoder, tiled_decode

    if not direct:
        monkeypatch.setattr(decoder_tiles, "plain_conv", lambda conv: False)
    engine = TiledDecoder(decoder, band_pixels=64)
    blocks = [u for u in engine.units if isinstance(u, Block)]
    assert [engine._direct(u) for u in blocks] == [direct] * len(blocks)
    assert sum(u.upsample is not None for u in blocks) == 3
    transposed = []
    real = decoder_tiles.F.conv_transpose2d

    def counted(*args, **kwargs):
        transposed.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder_tiles.F, "conv_transpose2d", counted)
    z, weight = _problem(1, 5, 3, seed=3)
    image, g = _gradient(decoder, z, weight)
    tiled_image, tiled_g = _gradient(lambda t: tiled_decode(engine, t), z, weight)
    assert _rel(tiled_image, image) <= TWO_F32_REL_L2
    assert _rel(tiled_g, g) <= TWO_F32_REL_L2
    assert (len(transposed) > 0) == direct


def test_tiled_forward_never_materialises_what_it_does_not_keep(decoder):
    """With a keep budget the forward pass holds exactly the kept tensors: the others (here the output level's
    last two) only contribute their GroupNorm statistics, so they never take memory."""
    from flowdps.nodes.decoder_tiles import TiledDecoder

    z, _ = _problem(1, 4, 3)
    probe = TiledDecoder(decoder, band_pixels=150)
    budget = _keep_all_but_top(probe, 4, 3, 1, 1)
    engine = TiledDecoder(decoder, band_pixels=150, keep_budget=budget)
    assert engine.lean
    assert not engine.hold_temporaries
    sizes: list[int] = []
    original = engine._forward_unit

    def spy(unit, run, batch, materialize=True):
        out = original(unit, run, batch, materialize)
        sizes.append(sum(v.numel() * v.element_size() for v in run.values.values()))
        return out

    engine._forward_unit = spy
    image, run = engine.forward(z)
    top = max(t.scale for t in engine.tensors)
    dropped = {t.name for t in run.dropped}
    assert dropped == {t.name for t in engine.tensors[1:-1] if t.scale == top}.difference(
        [next(t.name for t in engine.tensors[1:-1] if t.scale == top)])
    assert not dropped.intersection(t.name for t in run.values)
    held = sum(v.numel() * v.element_size() for v in run.values.values()) - z.numel() * 4
    assert held == budget
    assert max(sizes) - z.numel() * 4 <= budget      # at no point during the forward pass more than that
    assert image.shape == (1, 3, 32, 24)


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


def test_tiled_budget_plans_what_the_engine_keeps(full_vae, monkeypatch):
    """The tiled mode's plan for a given free memory: everything when it fits; else a keep budget under which the
    engine keeps exactly the bytes the estimate counts (estimate = kept + gradient maps + one band), an estimate
    that decreases with the free memory and stays within it down to the minimum. An image so small that keeping
    fewer tensors would not need less (the band's graph is most of it) always keeps everything."""
    from flowdps.nodes import decoder_memory
    from flowdps.nodes.decoder_memory import kl_decoder, plan_memory, tiled_budget
    from flowdps.nodes.decoder_tiles import TiledDecoder

    model = full_vae.first_stage_model
    decoder = kl_decoder(model)
    shape = (1, 16, 6, 5)
    keep_all = plan_memory("tiled", model, shape, None)
    assert decoder_memory._lean_plan(decoder, shape, 1, "tiled")[1] > keep_all.estimate
    assert tiled_budget(decoder, shape, 1) == (None, keep_all.estimate)
    # bands of 64 pixels in the estimate: the band's graph is small and keeping fewer tensors saves memory
    monkeypatch.setattr(decoder_memory, "TILED_BAND_PIXELS", 64)
    keep_all = plan_memory("tiled", model, shape, None)
    assert keep_all.keep_budget is None
    assert tiled_budget(decoder, shape, keep_all.estimate) == (None, keep_all.estimate)
    minimum = tiled_budget(decoder, shape, 1)[1]
    z = torch.randn(shape)
    estimates, kept_seen = [], []
    for fraction in (0.95, 0.8, 0.6):
        free = minimum + int(fraction * (keep_all.estimate - minimum))
        budget, estimate = tiled_budget(decoder, shape, free)
        assert budget is not None
        assert estimate <= free
        plan = plan_memory("tiled", model, shape, free)
        assert (plan.mode, plan.keep_budget, plan.estimate) == ("tiled", budget, estimate)
        _, run = TiledDecoder(decoder, keep_budget=budget).forward(z)
        kept = sum(v.numel() * v.element_size() for v in run.values.values()) - z.numel() * 4
        estimates.append(estimate)
        kept_seen.append(kept)
    fixed = {e - k for e, k in zip(estimates, kept_seen, strict=True)}
    assert len(fixed) == 1, fixed                     # the estimate moves exactly with what the engine keeps
    assert estimates == sorted(estimates, reverse=True)
    assert len(set(kept_seen)) > 1
    assert tiled_budget(decoder, shape, minimum // 2)[1] == minimum   # over what is free: the bridge refuses


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
