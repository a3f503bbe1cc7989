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
