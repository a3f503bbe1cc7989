"""SD3.5 and Flux as priors (issue 10): the FlowDPS and AFDPS nodes run headless on tiny random-weight models of
every rectified-flow family with that family's latent format, VAE and defaults; a non-flow (SD1.5, EPS) model
and a VAE of the wrong latent width get clear errors before any sampling."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from flowdps_dev import graphs
from flowdps_dev.graphs import residual

pytestmark = pytest.mark.comfy

SIZE = 32  # restored image side; SR x2 of a 16 px measurement
PHOTO = "families_photo.png"
PHOTO_SEED = 5
PHOTO_FLIP_Y = True
OPERATOR = ("FlowDPSOperatorSRBicubic", {"factor": 2})
FLOW_FAMILIES = ("sd3.5-medium", "sd3.5-large", "flux-dev", "flux-schnell")
FLOWDPS_RATIO = 0.8  # as tests/test_restore_tasks.py: FlowDPS vs the same run with step size 0
AFDPS_RATIO = 0.95  # as tests/test_afdps_nodes.py: AFDPS vs the same run with the data term off
NO_DATA = 1000.0  # AFDPS sigma_y that switches the likelihood off (the prior alone)
PARTICLES = 4
AFDPS_STEPS = 3


@pytest.fixture(scope="module")
def family(comfy):
    """The pack's nodes/model_family.py, as loaded by ComfyUI."""
    return comfy.pack_module("nodes.model_family")


def flowdps_restore_graph(prior: graphs.TinyPrior, *, step_size: float = 15.0, shift: float = 0.0,
                          cfg: float = 0.0, vae_name: str | None = None, steps: int = 4) -> dict:
    return graphs.restore_graph("FlowDPSRestore", PHOTO, OPERATOR, prior=prior, vae_name=vae_name, steps=steps,
                                cfg=cfg, shift=shift, step_size=step_size)


def afdps_restore_graph(prior: graphs.TinyPrior, *, sigma_y: float = 0.05, vae_name: str | None = None) -> dict:
    return graphs.restore_graph("AFDPSRestore", PHOTO, OPERATOR, prior=prior, vae_name=vae_name,
                                particles=PARTICLES, steps=AFDPS_STEPS, kappa=0.2, chunk_size=0, sigma_y=sigma_y)


def sampler_graph(prior: graphs.TinyPrior, method: str, *, data: bool = True, vae_name: str | None = None) -> dict:
    """SamplerCustomAdvanced with the family's own core nodes: ModelSamplingFlux + BasicGuider (CFG 1) for Flux,
    ModelSamplingSD3 + CFGGuider otherwise."""
    g = graphs.GraphBuilder()
    model, vae, pos, neg = graphs.prior_loaders(g, prior, vae_name=vae_name)
    op, y = graphs.simulated_measurement(g, PHOTO, OPERATOR[0], **OPERATOR[1])
    if prior.family == "flux-dev":
        model = g.add("ModelSamplingFlux", "shift", model=model, max_shift=1.15, base_shift=0.5, width=SIZE,
                      height=SIZE).out()
    elif prior.family == "sd1.5":
        pass
    else:
        model = g.add("ModelSamplingSD3", "shift", model=model, shift=3.0).out()
    if prior.family.startswith("flux"):
        guider = g.add("BasicGuider", "guider", model=model, conditioning=pos).out()
    else:
        guider = g.add("CFGGuider", "guider", model=model, positive=pos, negative=neg, cfg=2.0).out()
    if method == "flowdps":
        steps = 4
        sampler = g.add_node_with_defaults("FlowDPSSampler", "method", vae=vae, operator=op, measurement=y,
                                           step_size=15.0 if data else 0.0).out()
    else:
        steps = AFDPS_STEPS
        sampler = g.add_node_with_defaults("AFDPSSampler", "method", vae=vae, operator=op, measurement=y,
                                           particles=PARTICLES, kappa=0.2, chunk_size=0,
                                           sigma_y=0.05 if data else NO_DATA).out()
    sigmas = g.add("FlowDPSSigmas", "sigmas", model=model, steps=steps).out()   # the Restore nodes' default grid
    noise = g.add("RandomNoise", "noise", noise_seed=0).out()
    latent = g.add("EmptySD3LatentImage", "latent", width=SIZE, height=SIZE, batch_size=1).out()
    out = g.add("SamplerCustomAdvanced", "sampler", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                latent_image=latent)
    g.add("VAEDecode", "restore", samples=out.out(0), vae=vae)
    g.add("PreviewImage", "preview", images=["restore", 0])
    return g.build()


def load(comfy, prior: graphs.TinyPrior):
    """The MODEL of a tiny prior, through the same loader node a graph uses."""
    cls = comfy.node_classes[prior.loader]
    if prior.loader == "UNETLoader":
        return cls().load_unet(prior.unet, "default")[0]
    return cls().load(prior.unet)[0]


class CallCounter:
    """Counts calls of a method (monkeypatched on its class) and passes them through."""

    def __init__(self, monkeypatch, owner, name: str) -> None:
        self.calls = 0
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


# ------------------------------------------------------------------------------------------- detection


EXPECTED = {  # family -> (ComfyUI supported-model class, model_sampling base class, latent format)
    "sd3": ("SD3", "ModelSamplingDiscreteFlow", "SD3"),
    "sd3.5-medium": ("SD3", "ModelSamplingDiscreteFlow", "SD3"),
    "sd3.5-large": ("SD3", "ModelSamplingDiscreteFlow", "SD3"),
    "flux-dev": ("Flux", "ModelSamplingFlux", "Flux"),
    "flux-schnell": ("FluxSchnell", "ModelSamplingDiscreteFlow", "Flux"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tiny_models_load_as_their_family(comfy, tiny_families, family, name):
    prior = tiny_families[name]
    model = load(comfy, prior)
    config_class, sampling_class, latent_format = EXPECTED[name]
    assert type(model.model.model_config).__name__ == config_class
    sampling = model.get_model_object("model_sampling")
    assert sampling_class in [c.__name__ for c in type(sampling).__mro__]
    assert type(model.model.latent_format).__name__ == latent_format
    assert family.detect_family(model) == name
    family.check_rectified_flow(model)
    defaults = family.FAMILY_DEFAULTS[name]
    assert model.model.latent_format.latent_channels == defaults.latent_channels == 16
    unet = model.model.model_config.unet_config
    if name == "sd3.5-medium":  # MMDiT-X: the extra image self-attention, and q/k RMS norm
        assert unet["x_block_self_attn_layers"] == [0]
        assert unet["qk_norm"] == "rms"
    if name == "flux-dev":
        assert unet["guidance_embed"] is True


def test_defaults_table(family):
    table = family.FAMILY_DEFAULTS
    assert (table["sd3"].shift, table["sd3"].cfg) == (4.0, 2.0)  # the FlowDPS paper's SD3 settings
    assert table["sd3.5-medium"].shift == table["sd3.5-large"].shift == 3.0
    assert table["flux-dev"].shift is None  # from the image size
    assert (table["flux-dev"].cfg, table["flux-dev"].guidance) == (1.0, 3.5)
    assert (table["flux-schnell"].shift, table["flux-schnell"].cfg, table["flux-schnell"].guidance) == (1.0, 1.0, None)
    assert all(d.source for d in table.values())
    with pytest.raises(TypeError):
        table["sd3"] = table["flux-dev"]  # frozen
    # ModelSamplingFlux's rule: mu 0.5 at 256 patches (256 px), 1.15 at 4096 (1024 px); s = e^mu
    assert family.FLUX_SHIFT.shift(256, 256) == pytest.approx(math.exp(0.5))
    assert family.FLUX_SHIFT.shift(1024, 1024) == pytest.approx(math.exp(1.15))


@pytest.mark.parametrize("name", ["sd3", "sd3.5-medium", "flux-dev", "flux-schnell"])
def test_restore_settings_pick_the_family_default_unless_overridden(comfy, tiny_families, family, name):
    model = load(comfy, tiny_families[name])
    defaults = family.FAMILY_DEFAULTS[name]
    picked = family.restore_settings(model, 0.0, 0.0, 1024, 1024)
    assert (picked.family, picked.cfg, picked.shift_is_default, picked.cfg_is_default) == (name, defaults.cfg, True, True)
    assert picked.shift == pytest.approx(math.exp(1.15) if name == "flux-dev" else defaults.shift)
    chosen = family.restore_settings(model, 2.5, 1.5, 1024, 1024)
    assert (chosen.shift, chosen.cfg, chosen.shift_is_default, chosen.cfg_is_default) == (2.5, 1.5, False, False)
    with pytest.raises(ValueError, match=r"shift must be > 0, or 0 for the model family's default, got -1"):
        family.restore_settings(model, -1.0, 0.0, 64, 64)


def test_one_shift_means_one_schedule_on_every_family(comfy, tiny_families, family):
    """A shift s gives the same sigmas on SD3 (ModelSamplingDiscreteFlow, x1000 timesteps), Flux dev
    (ModelSamplingFlux with mu = ln s, timestep = sigma) and schnell (discrete flow, x1 timesteps), and each
    keeps its own timestep scale."""
    from comfy.samplers import calculate_sigmas

    sigmas = {}
    for name in ("sd3", "flux-dev", "flux-schnell"):
        patched = family.with_shift(load(comfy, tiny_families[name]), 2.0)
        sampling = patched.get_model_object("model_sampling")
        sigmas[name] = calculate_sigmas(sampling, "simple", 8)
        scale = {"sd3": 1000.0, "flux-dev": 1.0, "flux-schnell": 1.0}[name]
        assert float(sampling.timestep(torch.tensor(0.5))) == pytest.approx(0.5 * scale, rel=1e-3)
    t = torch.linspace(1, 0, 9)[:-1]
    expected = 2.0 * t / (1 + t)  # time_snr_shift(2, t)
    for name, s in sigmas.items():
        torch.testing.assert_close(s[:-1].float(), expected, atol=2e-3, rtol=0, msg=name)
    sampling = family.with_shift(load(comfy, tiny_families["flux-dev"]), 2.0).get_model_object("model_sampling")
    assert float(sampling.shift) == pytest.approx(math.log(2.0))


# ------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", FLOW_FAMILIES)
def test_flowdps_restore_on_each_family(comfy, photo, tiny_families, name, caplog):
    prior = tiny_families[name]
    caplog.set_level(logging.INFO)
    ours = comfy.run(flowdps_restore_graph(prior)).raise_for_error()
    plain = comfy.run(flowdps_restore_graph(prior, step_size=0.0)).raise_for_error()
    assert tuple(ours.output("restore").shape) == (1, SIZE, SIZE, 3)
    assert torch.isfinite(ours.output("restore")).all()
    r_ours, r_plain = residual(ours), residual(plain)
    assert r_ours < FLOWDPS_RATIO * r_plain, (name, r_ours, r_plain)
    display = {"sd3.5-medium": "SD3.5 medium", "sd3.5-large": "SD3.5 large", "flux-dev": "Flux.1 dev",
               "flux-schnell": "Flux.1 schnell"}[name]
    cfg = "CFG 1 (family default)" if name.startswith("flux") else "CFG 2 (family default)"
    assert any(f"FlowDPS Restore: {display}: shift" in m and cfg in m for m in caplog.messages), caplog.messages


@pytest.mark.parametrize("name", FLOW_FAMILIES)
def test_afdps_restore_on_each_family(comfy, photo, tiny_families, name):
    prior = tiny_families[name]
    ours = comfy.run(afdps_restore_graph(prior)).raise_for_error()
    plain = comfy.run(afdps_restore_graph(prior, sigma_y=NO_DATA)).raise_for_error()
    assert tuple(ours.output("restore", 2).shape) == (PARTICLES, SIZE, SIZE, 3)
    for index in (0, 1):  # best, mean
        r_ours, r_plain = residual(ours, index=index), residual(plain, index=index)
        assert r_ours < AFDPS_RATIO * r_plain, (name, index, r_ours, r_plain)


@pytest.mark.parametrize("method", ["flowdps", "afdps"])
@pytest.mark.parametrize("name", ["sd3.5-medium", "flux-dev"])
def test_sampler_nodes_with_each_familys_core_nodes(comfy, photo, tiny_families, name, method):
    prior = tiny_families[name]
    ours = comfy.run(sampler_graph(prior, method)).raise_for_error()
    plain = comfy.run(sampler_graph(prior, method, data=False)).raise_for_error()
    ratio = FLOWDPS_RATIO if method == "flowdps" else AFDPS_RATIO
    assert residual(ours) < ratio * residual(plain), (name, method, residual(ours), residual(plain))


@pytest.mark.parametrize("name", ["sd3.5-medium", "flux-dev"])
def test_restore_defaults_equal_the_familys_core_nodes(comfy, photo, tiny_families, name):
    """FlowDPS Restore with shift 0 and CFG 0 gives exactly the SamplerCustomAdvanced route built with the
    family's own core nodes: ModelSamplingSD3 3.0 + CFGGuider 2.0 for SD3.5; for Flux dev ModelSamplingFlux
    at the image size + BasicGuider (CFG 1), i.e. the image-size shift through mu = ln s."""
    prior = tiny_families[name]
    restore = comfy.run(flowdps_restore_graph(prior)).raise_for_error().output("restore")
    custom = comfy.run(sampler_graph(prior, "flowdps")).raise_for_error().output("restore")
    torch.testing.assert_close(restore, custom, rtol=0, atol=1e-5)
    other = comfy.run(flowdps_restore_graph(prior, shift=6.0)).raise_for_error().output("restore")
    assert (other - restore).abs().max() > 1e-3  # an explicit shift overrides the default


def test_flux_data_term_decodes_with_fluxs_latent_format(comfy, photo, tiny_families, monkeypatch):
    """The decoder inside the data term maps model space to VAE space with Flux's scale/shift (0.3611/0.1159),
    not SD3's: count the latent-format calls while FlowDPS runs on the tiny Flux."""
    from comfy import latent_formats

    flux = CallCounter(monkeypatch, latent_formats.Flux, "process_out")
    sd3 = CallCounter(monkeypatch, latent_formats.SD3, "process_out")
    comfy.run(flowdps_restore_graph(tiny_families["flux-dev"], steps=2)).raise_for_error()
    assert flux.calls >= 2 * 3  # at least one per gradient step (2 steps x K = 3)
    assert sd3.calls == 0


# ------------------------------------------------------------------------------------------- errors


def test_a_flow_model_with_the_vae_of_another_family_is_a_warning(comfy, photo, tiny_families, caplog):
    """Same 16 channels, other latent scale: allowed (full VAEs carry no scale) but logged."""
    caplog.set_level(logging.WARNING)
    comfy.run(flowdps_restore_graph(tiny_families["flux-dev"], vae_name=graphs.TINY_VAE, steps=1)).raise_for_error()
    assert any("latent scale 1.5305 differs from the model's latent format Flux (0.3611)" in m
               for m in caplog.messages), caplog.messages


BUILDERS = {
    "flowdps_restore": lambda prior, **kw: flowdps_restore_graph(prior, **kw),
    "afdps_restore": lambda prior, **kw: afdps_restore_graph(prior, **kw),
    "flowdps_sampler": lambda prior, **kw: sampler_graph(prior, "flowdps", **kw),
    "afdps_sampler": lambda prior, **kw: sampler_graph(prior, "afdps", **kw),
}


@pytest.mark.parametrize("path", list(BUILDERS))
def test_an_epsilon_model_is_refused_before_sampling(comfy, photo, tiny_families, path, monkeypatch):
    """SD1.5 (EPS prediction): a clear error naming the model type, and no model call or decoder copy."""
    from comfy import model_base

    calls = CallCounter(monkeypatch, model_base.BaseModel, "apply_model")
    copies = CallCounter(monkeypatch, comfy.pack_module("nodes.decoder").GradDecoder, "__init__")
    result = comfy.run(BUILDERS[path](tiny_families["sd1.5"]))
    assert not result.success
    assert result.error.exception_type.endswith("ValueError")
    assert "needs a rectified-flow model (ComfyUI sampling type CONST" in result.error.message
    assert "SD15 with model type EPS" in result.error.message
    assert (calls.calls, copies.calls) == (0, 0)


@pytest.mark.parametrize("path", list(BUILDERS))
def test_a_vae_with_other_latent_channels_is_refused_before_sampling(comfy, photo, tiny_families, path, monkeypatch):
    """SD3.5 (16 latent channels) with a 4-channel VAE: a clear error naming both widths."""
    from comfy import model_base

    calls = CallCounter(monkeypatch, model_base.BaseModel, "apply_model")
    result = comfy.run(BUILDERS[path](tiny_families["sd3.5-medium"], vae_name=graphs.TINY_SD15_VAE))
    assert not result.success
    assert "the VAE has 4 latent channels but the model SD3.5 medium" in result.error.message
    assert "uses 16 (SD3 latent format)" in result.error.message
    assert calls.calls == 0
