"""The 16-bit (bfloat16) memory modes of the decoder gradient ("full 16-bit", "checkpoint 16-bit", "tiled 16-bit"):
the mode names, the bfloat16 private copy, its gradient against the float32 one, the estimates, "auto"'s rule
and the refusals, on the full-size SD3 VAE architecture (random weights) at 32x40 px.

Tolerance. A bfloat16 decoder rounds every weight and every stored activation to 8 mantissa bits (relative
2^-9, about 2e-3, per value) over some thirty layers. Measured against the float32 gradient through
GradDecoder (model-space latents, SD3's latent map): relative L2 0.038-0.049, cosine 0.99888-0.99929 for latents
of 4x5, 5x3, 8x8 and 16x16 (all three layouts); rounding only the weights to bfloat16 and computing in float32
already gives 0.014. No part dominates: GroupNorm in float32 (torch's CPU kernel already accumulates bfloat16 in
float32), the attention in float32 or the output convolution in float32 each moved the relative L2 by under
0.001. Bound: twice the largest measurement, ``HALF_REL_L2`` = 0.1, and cosine >= 1 - 0.1^2 / 2 = 0.995. A
wrong gradient is far outside: the tiled gradient with frozen GroupNorm statistics measured cosine 0.89
(nodes/decoder_tiles.py). Two 16-bit layouts round differently, so they differ from each other as much as
from float32 (measured 0.037-0.049): the same bound applies between them.
"""

from __future__ import annotations

import logging

import pytest
import torch

from flowdps_dev import graphs

pytestmark = pytest.mark.comfy

HALF_REL_L2 = 0.1
"""Bound of a 16-bit gradient against the float32 one (measured at most 0.049; module docstring)."""
HALF_COSINE = 1 - HALF_REL_L2**2 / 2
"""The cosine that relative L2 implies for gradients of equal norm (0.995; measured at least 0.9989)."""
MIN_HALF_REL_L2 = 1e-3
"""A 16-bit gradient differs from the float32 one by at least this (measured 0.038): it really ran in bfloat16
(two float32 layouts differ by about 3e-6)."""

LAYOUTS = ("full", "checkpoint", "tiled")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _process_out(t: torch.Tensor) -> torch.Tensor:
    return t / 1.5305 + 0.0609


@pytest.fixture(autouse=True)
def _comfy_loaded(comfy):
    """ComfyUI on the path for every test (the pack's nodes layer imports it)."""


@pytest.fixture(scope="module")
def full_vae(comfy):
    models = comfy.models_dir
    import comfy.sd
    import comfy.utils

    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models / "vae" / graphs.TINY_VAE_FULL)))


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor]:
    """A 4x5 latent (32x40 px) and the fixed upstream weight of ``<w, D(z)>``."""
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 16, 4, 5, generator=g), torch.randn(1, 3, 32, 40, generator=g)


def _gradient(decoder, z: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from flowdps.nodes.decoder import grad_enabled

    with grad_enabled():
        zr = z.clone().requires_grad_()
        image = decoder(zr)
        (g,) = torch.autograd.grad((image * w).sum(), zr)
    return image.detach(), g


@pytest.fixture(scope="module")
def float32_gradient(full_vae, problem) -> torch.Tensor:
    from flowdps.nodes.decoder import GradDecoder

    return _gradient(GradDecoder(full_vae, _process_out), *problem)[1]


@pytest.fixture(scope="module")
def half_gradients(full_vae, problem) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``layout -> (image, gradient)`` of each 16-bit mode, through GradDecoder."""
    from flowdps.nodes.decoder import GradDecoder

    return {layout: _gradient(GradDecoder(full_vae, _process_out, memory=f"{layout} 16-bit"), *problem)
            for layout in LAYOUTS}


# --- names ----------------------------------------------------------------------------------------------------


def test_16bit_modes_are_appended_to_the_widget():
    from flowdps.nodes.decoder_memory import HALF_MODES, MEMORY_MODES

    assert MEMORY_MODES[:4] == ("auto", "full", "checkpoint", "tiled")      # saved workflows keep their values
    assert MEMORY_MODES[4:] == HALF_MODES == ("full 16-bit", "checkpoint 16-bit", "tiled 16-bit")


@pytest.mark.parametrize(("mode", "expected"), [
    ("full", ("full", torch.float32)),
    ("checkpoint", ("checkpoint", torch.float32)),
    ("tiled 16-bit", ("tiled", torch.bfloat16)),
    ("full 16-bit", ("full", torch.bfloat16)),
    ("checkpoint 16-bit", ("checkpoint", torch.bfloat16)),
])
def test_split_mode(mode, expected):
    from flowdps.nodes.decoder_memory import split_mode

    assert split_mode(mode) == expected


@pytest.mark.parametrize("mode", ["auto", "tiled 8-bit", "16-bit", "Tiled 16-bit", ""])
def test_split_mode_refuses_other_names(mode):
    from flowdps.nodes.decoder_memory import split_mode

    with pytest.raises(ValueError, match="memory mode must be one of"):
        split_mode(mode)


# --- the bfloat16 copy and its gradient ---------------------------------------------------------------------


def test_16bit_copy_is_bfloat16_with_float32_image_and_gradient(full_vae, problem, half_gradients):
    from flowdps.nodes.decoder import GradDecoder

    decoder = GradDecoder(full_vae, _process_out, memory="tiled 16-bit")
    assert decoder.module is not None
    assert {p.dtype for p in decoder.module.parameters()} == {torch.bfloat16}
    assert GradDecoder(full_vae, None, memory="tiled").dtype == torch.float32
    z, _ = problem
    for image, g in half_gradients.values():
        assert image.dtype == g.dtype == torch.float32
        assert image.shape == (1, 3, 32, 40)
        assert g.shape == z.shape
        assert torch.isfinite(g).all()


def test_16bit_mode_refuses_another_dtype(full_vae):
    from flowdps.nodes.decoder import GradDecoder

    with pytest.raises(ValueError, match="memory 'full 16-bit' needs a bfloat16 decoder copy, got dtype"):
        GradDecoder(full_vae, None, memory="full 16-bit", dtype=torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_16bit_gradient_close_to_float32(half_gradients, float32_gradient, layout):
    """Measured at this size: relative L2 0.039-0.040, cosine 0.99922-0.99925 (all three layouts)."""
    g = half_gradients[layout][1]
    assert _rel(g, float32_gradient) <= HALF_REL_L2
    assert _cos(g, float32_gradient) >= HALF_COSINE
    assert _rel(g, float32_gradient) >= MIN_HALF_REL_L2


@pytest.mark.parametrize("layout", ["checkpoint", "tiled"])
def test_bounded_16bit_gradient_equals_full_16bit(half_gradients, layout):
    """Measured at this size: checkpoint 0.037, tiled 0.039 relative L2 against full 16-bit."""
    g, full = half_gradients[layout][1], half_gradients["full"][1]
    assert _rel(g, full) <= HALF_REL_L2
    assert _cos(g, full) >= HALF_COSINE


# --- estimates and the plan ------------------------------------------------------------------------------------


def test_16bit_estimates_and_weights(full_vae):
    """Full and checkpoint halve; tiled keeps float32 gradient maps and a float32-rate band graph, so it saves
    less (measured 0.69-0.87x of float32 tiled at 256 px): between half and all of the float32 estimate."""
    from flowdps.nodes.decoder_memory import activation_bytes, copy_bytes, kl_decoder

    decoder = kl_decoder(full_vae.first_stage_model)
    assert decoder is not None
    for shape in ((1, 16, 4, 5), (2, 16, 64, 64), (1, 16, 128, 128)):
        for layout in ("full", "checkpoint"):
            full32, half = activation_bytes(decoder, layout, shape), activation_bytes(decoder, f"{layout} 16-bit", shape)
            assert abs(2 * half - full32) <= 1, (layout, shape)
            assert activation_bytes(decoder, layout, shape, element_size=2) == half
        tiled32, tiled16 = activation_bytes(decoder, "tiled", shape), activation_bytes(decoder, "tiled 16-bit", shape)
        assert tiled32 / 2 < tiled16 < tiled32, shape
    assert copy_bytes(1000, "tiled 16-bit") == 500
    assert copy_bytes(1000, "tiled") == 1000


def test_auto_uses_16bit_only_when_allowed_and_no_float32_mode_fits(full_vae):
    from flowdps.nodes.decoder_memory import copy_bytes, kl_decoder, plan_memory, tiled_budget

    model = full_vae.first_stage_model
    shape = (1, 16, 64, 64)
    weights = 4 * 10**6
    plan = plan_memory("auto", model, shape, None, allow_16bit=True)
    est = plan.estimates
    assert set(est) == {"full", "checkpoint", "tiled", "full 16-bit", "checkpoint 16-bit", "tiled 16-bit"}
    assert set(plan_memory("auto", model, shape, None).estimates) == {"full", "checkpoint", "tiled"}

    def auto(free: int, allow: bool) -> str:
        return plan_memory("auto", model, shape, free, weight_bytes=weights, allow_16bit=allow).mode

    def need(mode: str) -> int:
        return est[mode] + copy_bytes(weights, mode)

    assert need("full 16-bit") > need("tiled")          # 16-bit full is not picked over float32 tiled
    assert auto(need("full"), True) == "full"
    assert auto(need("tiled"), True) == "tiled"
    # below that, float32 tiled keeping fewer tensors (exact, slower) still comes before any 16-bit mode
    lean = plan_memory("auto", model, shape, need("tiled") - 1, weight_bytes=weights, allow_16bit=True)
    assert lean.mode == "tiled"
    assert lean.keep_budget is not None
    smallest32 = tiled_budget(kl_decoder(model), shape, 1)[1] + copy_bytes(weights, "tiled") - 1
    expected = next((m for m in ("full 16-bit", "checkpoint 16-bit") if need(m) <= smallest32), "tiled 16-bit")
    assert auto(smallest32, True) == expected
    assert auto(smallest32, False) == "tiled"           # no native bfloat16: float32 tiled (refused if too big)
    assert auto(1, True) == "tiled 16-bit"              # nothing fits: the smallest (then refused)
    assert plan_memory("tiled 16-bit", model, shape, 0).mode == "tiled 16-bit"   # explicit: never on the device


def test_16bit_bounded_modes_need_the_kl_decoder(comfy):
    models = comfy.models_dir
    import comfy.sd
    import comfy.utils
    from flowdps.nodes.decoder_memory import plan_memory

    taesd = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models / "vae" / graphs.TINY_VAE)))
    with pytest.raises(ValueError, match=r"memory 'tiled 16-bit' needs ComfyUI's KL VAE decoder.*'full 16-bit'"):
        plan_memory("tiled 16-bit", taesd.first_stage_model, (1, 16, 8, 8), None)
    plan = plan_memory("full 16-bit", taesd.first_stage_model, (1, 16, 8, 8), None, fallback_bytes=10)
    assert (plan.mode, plan.estimate) == ("full 16-bit", 5)


# --- refusals -------------------------------------------------------------------------------------------------


def test_check_16bit_allowed():
    from flowdps.nodes.decoder_memory import check_16bit_allowed

    check_16bit_allowed("tiled 16-bit", [torch.bfloat16, torch.float32])
    check_16bit_allowed("tiled 16-bit", None)
    check_16bit_allowed("tiled", [torch.float32])
    with pytest.raises(ValueError, match=r"memory 'tiled 16-bit' runs the decoder in bfloat16, but ComfyUI runs "
                                         r"this VAE only in float16, float32: use memory 'tiled' \(float32\)"):
        check_16bit_allowed("tiled 16-bit", [torch.float16, torch.float32])


def test_16bit_refused_for_a_vae_without_bfloat16_before_any_work(full_vae, monkeypatch):
    """The node-time problem (made before any model loads) refuses it."""
    assert torch.bfloat16 in full_vae.working_dtypes                  # ComfyUI's KL VAE: bfloat16 and float32
    monkeypatch.setattr(full_vae, "working_dtypes", [torch.float32])
    with pytest.raises(ValueError, match="ComfyUI runs this VAE only in float32"):
        _sr_problem(full_vae, "checkpoint 16-bit")
    _sr_problem(full_vae, "checkpoint")


def test_refusal_names_the_16bit_modes_where_the_device_has_bfloat16(full_vae):
    from flowdps.nodes.bridge import memory_fixes
    from flowdps.nodes.decoder_memory import plan_memory

    model = full_vae.first_stage_model
    plan = plan_memory("full", model, (1, 16, 64, 64), 0, allow_16bit=True)
    assert any("'tiled 16-bit'" in fix for fix in memory_fixes(plan, True, 1))
    assert not any("16-bit" in fix for fix in memory_fixes(plan, False, 1))
    half = plan_memory("full 16-bit", model, (1, 16, 64, 64), 0)
    assert memory_fixes(half, True, 1)[0] == "memory 'tiled 16-bit'"


def _sr_problem(vae, memory: str):
    from flowdps.nodes.bridge import RestorationProblem
    from flowdps.operators import AvgPoolSR

    return RestorationProblem.from_inputs(vae, AvgPoolSR(2), torch.zeros(1, 16, 16, 3), "auto", "paper", 0.015,
                                          memory=memory)


def test_bridge_offers_16bit_only_on_a_device_with_native_bfloat16(full_vae, monkeypatch):
    """plan_decoder_memory on a 512 px latent with just too little free for float32 tiled (keeping the least it
    can): refused on this CPU (ComfyUI's should_use_bf16 is False there), 'tiled 16-bit' where the device computes
    bfloat16."""
    import comfy.model_management as mm
    from flowdps.nodes.bridge import decoder_weight_bytes, plan_decoder_memory
    from flowdps.nodes.decoder_memory import copy_bytes, kl_decoder, tiled_budget

    shape, cpu = (1, 16, 64, 64), torch.device("cpu")
    weights = decoder_weight_bytes(full_vae)
    decoder = kl_decoder(full_vae.first_stage_model)
    free = tiled_budget(decoder, shape, 1)[1] + weights - 1      # just below float32 tiled's least (lean) need
    half = copy_bytes(weights, "tiled 16-bit")
    assert tiled_budget(decoder, shape, free - half, "tiled 16-bit")[1] + half <= free
    with pytest.raises(MemoryError, match="memory mode 'tiled'") as refused:
        plan_decoder_memory(_sr_problem(full_vae, "auto"), shape, cpu, "FlowDPS", free=free)
    assert "16-bit" not in str(refused.value)
    monkeypatch.setattr(mm, "should_use_bf16", lambda *args, **kwargs: True)
    assert plan_decoder_memory(_sr_problem(full_vae, "auto"), shape, cpu, "FlowDPS", free=free).mode == "tiled 16-bit"
    with pytest.raises(MemoryError, match=r"'full' needs about .*'tiled 16-bit': about half the memory"):
        plan_decoder_memory(_sr_problem(full_vae, "full"), shape, cpu, "FlowDPS", free=free)
    monkeypatch.setattr(full_vae, "working_dtypes", [torch.float16, torch.float32])   # the VAE not in bfloat16
    with pytest.raises(MemoryError, match="memory mode 'tiled'"):
        plan_decoder_memory(_sr_problem(full_vae, "auto"), shape, cpu, "FlowDPS", free=free)


# --- through the real executor --------------------------------------------------------------------------------


def _restore_graph(memory: str) -> dict:
    """FlowDPS Restore at 32 px (a 16 px photo, SR x2), one step, the full-size SD3 VAE architecture."""
    g = graphs.GraphBuilder()
    model, vae, pos, neg = graphs.prior_loaders(g, graphs.TINY_PRIORS["sd3"], vae_name=graphs.TINY_VAE_FULL)
    image = g.add("EmptyImage", "image", width=16, height=16, batch_size=1, color=0x808080).out()
    op = g.add("FlowDPSOperatorSRAvgPool", "op", factor=2).out()
    g.add("FlowDPSRestore", "target", model=model, positive=pos, negative=neg, vae=vae, measurement=image,
          operator=op, seed=0, steps=1, cfg=2.0, shift=4.0, method="flowdps", dc_steps=1, step_size=15.0,
          step_size_end=-1.0, residual="auto", norm="paper", sigma_y=0.015, memory=memory)
    g.add("PreviewImage", "preview", images=["target", 0])
    return g.build()


def test_tiled_16bit_runs_through_the_restore_node(comfy, caplog):
    with caplog.at_level(logging.INFO):
        result = comfy.run(_restore_graph("tiled 16-bit"), fresh=True)
    result.raise_for_error()
    assert "memory mode 'tiled 16-bit' (tiled 16-bit)" in caplog.text
    image = result.outputs["target"][0][0]
    assert image.shape == (1, 32, 32, 3)
    assert torch.isfinite(image).all()
