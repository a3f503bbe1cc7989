"""The decoder's memory modes through the real executor: the Restore node's optional ``memory`` input, "auto"
following the free memory ComfyUI reports, and the refusal before any sampling step when nothing fits.

The free memory is what ``comfy.model_management.get_free_memory`` returns, replaced here by a fixed number;
the VAE is the full-size SD3 architecture (the bounded modes need its KL decoder) at 32 px, one step, K = 1.
"""

from __future__ import annotations

import logging

import pytest

from flowdps_dev import graphs

pytestmark = pytest.mark.comfy

MiB = 2**20


def restore_graph(memory: str | None) -> dict:
    g = graphs.GraphBuilder()
    model, vae, pos, neg = graphs.prior_loaders(g, graphs.TINY_PRIORS["sd3"], vae_name=graphs.TINY_VAE_FULL)
    image = g.add("EmptyImage", "image", width=16, height=16, batch_size=1, color=0x808080).out()
    op = g.add("FlowDPSOperatorSRAvgPool", "op", factor=2).out()
    inputs = {"seed": 0, "steps": 1, "cfg": 2.0, "shift": 4.0, "method": "flowdps", "dc_steps": 1,
              "step_size": 15.0, "step_size_end": -1.0, "residual": "auto", "norm": "paper", "sigma_y": 0.015}
    if memory is not None:
        inputs["memory"] = memory
    g.add("FlowDPSRestore", "target", model=model, positive=pos, negative=neg, vae=vae, measurement=image,
          operator=op, **inputs)
    g.add("PreviewImage", "preview", images=["target", 0])
    return g.build()


@pytest.fixture
def free_memory(monkeypatch):
    """``free_memory(nbytes)``: ComfyUI reports ``nbytes`` free on every device for this test."""
    import comfy.model_management as mm

    def set_free(nbytes: int) -> None:
        def get_free_memory(dev=None, torch_free_too=False):
            return (nbytes, nbytes) if torch_free_too else nbytes

        monkeypatch.setattr(mm, "get_free_memory", get_free_memory)

    return set_free


def _estimates():
    """The modes' activation estimates for the graph's 32 px decoder gradient (and the tiled mode's when it keeps
    the least it can), and the decoder copy's weights."""
    import comfy.sd
    import comfy.utils
    import folder_paths
    from flowdps.nodes.decoder_memory import plan_memory, tiled_budget

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(folder_paths.get_full_path("vae", graphs.TINY_VAE_FULL)))
    decoder = vae.first_stage_model.decoder
    weights = 4 * sum(p.numel() for p in decoder.parameters())
    estimates = plan_memory("auto", vae.first_stage_model, (1, 16, 4, 4), None).estimates
    estimates["tiled, least kept"] = tiled_budget(decoder, (1, 16, 4, 4), 1)[1]
    return estimates, weights


def test_refused_before_sampling_when_nothing_fits(comfy, progress, free_memory):
    estimates, weights = _estimates()
    free_memory(weights + min(estimates.values()) - 1)
    probe = progress()
    result = comfy.run(restore_graph("auto"), fresh=True)
    assert not result.success
    assert result.error.node_id == "target"
    message = result.error.message
    for part in ("FlowDPS Restore", "32x32 pixels", "memory mode", "GiB free", "smaller output"):
        assert part in message, (part, message)
    assert probe.values == []


def test_explicit_full_mode_refused_with_the_fix(comfy, progress, free_memory):
    estimates, weights = _estimates()
    free_memory(weights + estimates["checkpoint"])
    probe = progress()
    result = comfy.run(restore_graph("full"), fresh=True)
    assert not result.success
    assert "memory mode 'full'" in result.error.message
    assert "use memory 'tiled' (or 'auto')" in result.error.message
    assert probe.values == []


def test_auto_picks_the_mode_that_fits(comfy, free_memory, caplog):
    estimates, weights = _estimates()
    assert estimates["checkpoint"] < estimates["full"]
    free_memory(weights + estimates["checkpoint"])
    with caplog.at_level(logging.INFO):
        comfy.run(restore_graph(None), fresh=True).raise_for_error()   # no memory input: a saved workflow
    assert "memory mode 'checkpoint' (auto)" in caplog.text


def test_tiled_mode_runs_through_the_restore_node(comfy, caplog):
    with caplog.at_level(logging.INFO):
        comfy.run(restore_graph("tiled"), fresh=True).raise_for_error()
    assert "memory mode 'tiled' (tiled)" in caplog.text
