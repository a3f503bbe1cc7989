"""The whole sampler under torch.inference_mode(), as ComfyUI runs every node.

The "VAE decoder" is a conv built inside inference mode, so its weights are inference tensors like those of
a VAE loaded by ComfyUI, and autograd refuses to save them for backward. A node therefore makes a private
copy once, inside ``torch.inference_mode(False)`` (``copy.deepcopy``, as ``nodes/decoder.py``'s GradDecoder
does with ``vae.first_stage_model``), and clones the operator's tensors (the inpainting mask) there too. The
measurement stays an inference tensor: ``measurement_loss`` copies it itself. The denoiser is a conv with
inference weights as well: it is never back-propagated, so it needs no copy. Latents have C = 3 channels
and a 5 x 7 grid: nothing assumes 4/16 channels or square images.
"""

import copy

import pytest
import torch
from flowdps.samplers import FlowChefConfig, FlowDPSConfig, measurement_loss, sample_flow_posterior
from flowdps.samplers.testing import shifted_sigmas

SHAPE = (2, 3, 5, 7)


def build_problem():
    """Everything a graph would build inside inference mode; returns tensors that are inference tensors."""
    g = torch.Generator().manual_seed(0)
    assert torch.is_inference_mode_enabled()
    decoder = torch.nn.Conv2d(3, 3, 3, padding=1)
    decoder.weight.copy_(0.1 * torch.randn(decoder.weight.shape, generator=g))
    decoder.bias.zero_()
    model = torch.nn.Conv2d(3, 3, 1, bias=False)                       # stands in for the transformer
    model.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
    mask = (torch.rand(1, 3, 5, 7, generator=g) > 0.5).float()
    y = decoder(torch.randn(1, 3, 5, 7, generator=g)) * mask + 0.03 * torch.randn(1, 3, 5, 7, generator=g)

    def denoise(z, sigma):                                             # exact for an N(0, I) latent prior
        s = sigma.reshape(-1, 1, 1, 1)
        return (1 - s) / ((1 - s) ** 2 + s**2) * model(z)

    z = torch.randn(SHAPE, generator=g)
    assert decoder.weight.is_inference()
    assert mask.is_inference()
    assert y.is_inference()
    return decoder, mask, y, denoise, z


def residual(decoder, mask, y, x):
    return torch.linalg.vector_norm((decoder(x) * mask - y).flatten(1), dim=1)


@pytest.mark.parametrize("config", [FlowDPSConfig(), FlowChefConfig(step_size=3.0)], ids=["flowdps", "flowchef"])
def test_sampler_under_inference_mode(config):
    sigmas = shifted_sigmas(12, shift=4.0)
    with torch.inference_mode():
        decoder, mask, y, denoise, z = build_problem()
        with torch.inference_mode(False):                              # what the node does, once per run
            grad_decoder = copy.deepcopy(decoder).requires_grad_(False)
            grad_mask = mask.clone()
        loss = measurement_loss(grad_decoder, lambda x: x * grad_mask, y)
        out = sample_flow_posterior(denoise, z, sigmas, loss, config, generator=torch.Generator().manual_seed(1))
        prior = sample_flow_posterior(denoise, z, sigmas, loss, type(config)(step_size=0.0),
                                      generator=torch.Generator().manual_seed(1))
        assert out.shape == SHAPE
        assert out.isfinite().all()
        after, before = residual(decoder, mask, y, out), residual(decoder, mask, y, prior)
    # measured: FlowDPS (paper defaults) [1.24, 1.30] vs [5.19, 4.21] without the data term;
    # FlowChef (step 3) [0.62, 0.60] vs [4.53, 4.94]. The paper norm's step is a distance: 15 suits this
    # 210-dimensional latent and this decoder (weights of std 0.1); FlowChef overshoots with it.
    assert (after < 0.5 * before).all(), (after, before)


def test_inference_weights_in_the_loss_fail_loudly():
    """Why the copy is needed: the loop itself does not hide this error."""
    with torch.inference_mode():
        decoder, mask, y, denoise, z = build_problem()
        loss = measurement_loss(decoder, lambda x: x * mask, y)
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            sample_flow_posterior(denoise, z, shifted_sigmas(2), loss, FlowDPSConfig())
