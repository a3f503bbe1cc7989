"""PSLD's two private copies, proved inside a running graph (under the executor's ``torch.inference_mode()``):

* the loaded diffusion model cannot be differentiated (its weights are inference tensors);
* the proxy of :class:`GradDiffusionModel` predicts exactly what the loaded model predicts, and its gradient
  with respect to the latent matches central finite differences;
* :class:`GradEncoder` gives what ComfyUI's ``VAE.encode`` gives, and its gradient matches finite differences.
"""

from __future__ import annotations

import pytest
import torch

from flowdps_dev import graphs

pytestmark = pytest.mark.comfy


def _probe():
    import comfy.model_management as mm
    from flowdps.nodes.decoder import GradEncoder, clone_for_grad, grad_enabled
    from flowdps.nodes.model_copy import GradDiffusionModel

    def central_difference(f, x, direction, eps):
        with torch.no_grad():
            return float((f(x + eps * direction) - f(x - eps * direction)) / (2 * eps))

    class FlowDPSTestPSLDGradients:
        RETURN_TYPES = ("FLOWDPS_TEST_REPORT",)
        FUNCTION = "run"
        OUTPUT_NODE = True
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",), "vae": ("VAE",)}}

        def run(self, model, vae):
            report = {"inference_mode_in_node": torch.is_inference_mode_enabled()}
            g = torch.Generator().manual_seed(0)
            mm.load_models_gpu([model])
            base = model.model
            net = base.diffusion_model
            ctx = torch.randn(1, 5, net.context_embedder.in_features, generator=g)
            pooled = torch.randn(1, net.y_embedder.mlp[0].in_features, generator=g)
            x_inf = torch.randn(1, 16, 4, 4, generator=g)
            sigma = torch.full((1,), 0.7)
            weights = torch.randn(1, 16, 4, 4, generator=g)

            def predict(m, x):                                    # sigma multiplies x: an ordinary tensor
                return m.apply_model(x, clone_for_grad(sigma), c_crossattn=ctx, y=pooled)

            with grad_enabled():                                  # the loaded model: no gradient possible
                x = clone_for_grad(x_inf).requires_grad_()
                try:
                    torch.autograd.grad((predict(base, x) * weights).sum(), x)
                    report["loaded_error"] = None
                except RuntimeError as e:
                    report["loaded_error"] = str(e)

            copy = GradDiffusionModel(base)
            report["copy_mb"] = copy.nbytes / 2**20
            with grad_enabled():
                x = clone_for_grad(x_inf).requires_grad_()
                out = predict(copy.proxy, x)
                (grad,) = torch.autograd.grad((out * clone_for_grad(weights)).sum(), x)
                direction = torch.randn(x.shape, generator=g)
                report["model_ad"] = float((grad * direction).sum())
                report["model_fd"] = central_difference(
                    lambda v: (predict(copy.proxy, v) * weights).sum().double(), x.detach(), direction, 1e-2)
            with torch.no_grad():
                report["max_diff_vs_loaded"] = float((out.detach() - predict(base, x_inf)).abs().max())
            report["base_untouched"] = base.diffusion_model is net and all(p.is_inference() for p in net.parameters())

            encoder = GradEncoder(vae, base.process_latent_in, dtype=torch.float64)
            image = torch.rand(1, 32, 32, 3, generator=g)                  # ComfyUI IMAGE in [0, 1]
            expected = base.process_latent_in(vae.encode(image))
            with grad_enabled():
                pixels = clone_for_grad(image).movedim(-1, 1).double() * 2 - 1
                latent = encoder(pixels)
                report["encode_max_diff"] = float((latent.float() - expected).abs().max())
                report["latent_shape"] = tuple(latent.shape)
                w = torch.randn(latent.shape, generator=g, dtype=torch.float64)
                pixels.requires_grad_()
                (grad,) = torch.autograd.grad((encoder(pixels) * w).sum(), pixels)
                direction = torch.randn(pixels.shape, generator=g, dtype=torch.float64)
                report["encoder_ad"] = float((grad * direction).sum())
                report["encoder_fd"] = central_difference(lambda v: (encoder(v) * w).sum(), pixels.detach(),
                                                          direction, 1e-5)
            return (report,)

    return FlowDPSTestPSLDGradients


@pytest.fixture
def probe_node(comfy):
    comfy.node_classes["FlowDPSTestPSLDGradients"] = _probe()
    yield "FlowDPSTestPSLDGradients"
    comfy.node_classes.pop("FlowDPSTestPSLDGradients", None)


def test_model_and_encoder_copies_are_exact_and_differentiable(comfy, probe_node):
    prompt = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": graphs.TINY_UNET, "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": graphs.TINY_VAE}},
        "probe": {"class_type": probe_node, "inputs": {"model": ["unet", 0], "vae": ["vae", 0]}},
    }
    report = comfy.run(prompt, fresh=True).raise_for_error().output("probe")
    assert report["inference_mode_in_node"] is True
    assert "Inference tensors cannot be saved for backward" in report["loaded_error"]
    assert report["max_diff_vs_loaded"] == 0.0                   # same weights, same prediction
    assert report["base_untouched"] is True
    assert report["copy_mb"] > 1
    assert report["model_ad"] != 0
    assert report["model_ad"] == pytest.approx(report["model_fd"], rel=2e-2)   # float32 weights
    assert report["latent_shape"] == (1, 16, 4, 4)
    assert report["encode_max_diff"] < 1e-5                      # == ComfyUI's VAEEncode (+ process_in)
    assert report["encoder_ad"] == pytest.approx(report["encoder_fd"], rel=1e-4)   # ReLU kinks


REPORTS: list[dict] = []


def _guided_probe():
    """A test-only SAMPLER: inside a real SamplerCustomAdvanced run, the gradient of ``<w, denoised>`` through the
    GUIDER (CFG 2: cond and uncond passes and their combination) with the private copy swapped in, against
    central finite differences; then it returns the latent unchanged."""
    import comfy.samplers
    from flowdps.nodes.decoder import clone_for_grad, grad_enabled
    from flowdps.nodes.model_copy import GradDiffusionModel

    def probe(model, x, sigmas, extra_args=None, callback=None, disable=None):
        guider = model.inner_model
        original = guider.inner_model
        copy = GradDiffusionModel(original)
        g = torch.Generator().manual_seed(1)
        w = clone_for_grad(torch.randn(x.shape, generator=g))       # made in the sampler: inference tensors
        direction = clone_for_grad(torch.randn(x.shape, generator=g))
        report = {"cfg": guider.cfg}
        with grad_enabled(), copy.swapped_into(guider):
            z = clone_for_grad(x).requires_grad_()
            sigma = clone_for_grad(sigmas[1] * x.new_ones(x.shape[0]))
            assert guider.inner_model is copy.proxy
            out = model(z, sigma, **extra_args)
            (grad,) = torch.autograd.grad((out * w).sum(), z)
            report["ad"] = float((grad * direction).sum())
            with torch.no_grad():
                plus = (model(z + 1e-2 * direction, sigma, **extra_args) * w).sum()
                minus = (model(z - 1e-2 * direction, sigma, **extra_args) * w).sum()
            report["fd"] = float((plus - minus) / 2e-2)
        report["restored"] = guider.inner_model is original
        with torch.no_grad():
            report["max_diff_vs_loaded"] = float((out.detach() - model(x, sigma, **extra_args)).abs().max())
        REPORTS.append(report)
        return x

    class FlowDPSTestGuidedGradient:
        RETURN_TYPES = ("SAMPLER",)
        FUNCTION = "make"
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def make(self):
            return (comfy.samplers.KSAMPLER(probe),)

    return FlowDPSTestGuidedGradient


@pytest.fixture
def guided_probe(comfy):
    comfy.node_classes["FlowDPSTestGuidedGradient"] = _guided_probe()
    REPORTS.clear()
    yield "FlowDPSTestGuidedGradient"
    comfy.node_classes.pop("FlowDPSTestGuidedGradient", None)


def test_gradient_through_the_guider_with_cfg(comfy, guided_probe):
    g = graphs.GraphBuilder()
    model = g.add("UNETLoader", "loader", unet_name=graphs.TINY_UNET, weight_dtype="default").out()
    clip = g.add("CLIPLoader", "clip", clip_name=graphs.TINY_CLIP_L, type="sd3", device="default").out()
    vae = g.add("VAELoader", "vae", vae_name=graphs.TINY_VAE).out()
    model = g.add("ModelSamplingSD3", "shift", model=model, shift=4.0).out()
    pos = g.add("CLIPTextEncode", "positive", clip=clip, text="a photo").out()
    neg = g.add("CLIPTextEncode", "negative", clip=clip, text="blurry").out()
    guider = g.add("CFGGuider", "guider", model=model, positive=pos, negative=neg, cfg=2.0).out()
    sampler = g.add(guided_probe, "probe").out()
    sigmas = g.add("BasicScheduler", "sigmas", model=model, scheduler="simple", steps=4, denoise=1.0).out()
    noise = g.add("RandomNoise", "noise", noise_seed=0).out()
    latent = g.add("EmptySD3LatentImage", "latent", width=32, height=32, batch_size=2).out()
    out = g.add("SamplerCustomAdvanced", "sampler", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                latent_image=latent)
    g.add("VAEDecode", "decode", samples=out.out(0), vae=vae)
    g.add("PreviewImage", "preview", images=["decode", 0])
    comfy.run(g.build(), fresh=True).raise_for_error()
    (report,) = REPORTS
    assert report["cfg"] == 2.0
    assert report["restored"] is True                                   # the guider has its model back
    assert report["max_diff_vs_loaded"] < 1e-5                          # the copy predicts what the model does
    assert report["ad"] != 0
    assert report["ad"] == pytest.approx(report["fd"], rel=2e-2)
