"""Posterior samplers over a denoiser callable (pure PyTorch, no ComfyUI import).

FlowDPS (arXiv 2503.08136, official defaults) and the FlowChef and PSLD baselines share one loop,
:func:`sample_flow_posterior`; the config object chooses the data-consistency rule. Example (pixel space,
so the decoder is the identity; a latent problem passes a differentiable decoder instead of ``None``)::

    import torch
    import torch.nn.functional as F
    from flowdps.samplers import FlowDPSConfig, measurement_loss, sample_flow_posterior
    from flowdps.samplers.testing import GaussianMixture, shifted_sigmas

    prior = GaussianMixture.gaussian(torch.zeros(3 * 8 * 8), torch.eye(3 * 8 * 8))
    denoise = prior.denoise                                  # (z: (B, 3, 8, 8), sigma: (B,)) -> z0_hat
    forward = lambda x: F.avg_pool2d(x, 2)                   # A: 2x average-pool super-resolution
    g = torch.Generator().manual_seed(0)
    x_true = torch.randn(1, 3, 8, 8, generator=g)
    y = forward(x_true) + 0.03 * torch.randn(1, 3, 4, 4, generator=g)
    loss = measurement_loss(None, forward, y, norm="squared", sigma_y=0.03)
    z = torch.randn(4, 3, 8, 8, generator=g)                 # 4 independent restorations, start at s = 1
    sigmas = shifted_sigmas(28, shift=4.0)                   # or any SIGMAS from 1 (or less) down to 0
    x = sample_flow_posterior(denoise, z, sigmas, loss, FlowDPSConfig(step_size=3e-3), generator=g)

With the paper's un-squared norm (``norm="paper"``, the default) the step size is a distance, and the
paper's 15 is tuned for SD3 latents of 768 x 768 images; with ``"squared"`` it is a rate: keep
``step_size * ||A||^2 / sigma_y^2 < 2``.
"""

from .afdps import AFDPSConfig, AFDPSResult, AFDPSStepInfo, sample_afdps
from .data_term import image_loss, measurement_loss
from .flow import (
    interpolate,
    noise_from_velocity,
    noise_from_x0,
    velocity_from_x0,
    x0_from_noise,
    x0_from_velocity,
)
from .flowdps import (
    FlowChefConfig,
    FlowDPSConfig,
    PosteriorUpdate,
    data_consistency,
    data_gradient,
    sample_flow_posterior,
)
from .loop import NonFiniteError, check_sigmas, fresh_noise
from .psld import PSLDConfig, PSLDTerms, psld_data_term, psld_objective
from .schedules import FLOWDPS_SHIFT, Schedule, flowdps_sigmas
from .smc import (
    effective_sample_size,
    multinomial_resample,
    normalize_log_weights,
    quarantine,
    resample,
    reweight,
    systematic_resample,
)
from .types import ConfigError, DataLoss, Denoiser, StepInfo

__all__ = [
    "FLOWDPS_SHIFT",
    "AFDPSConfig",
    "AFDPSResult",
    "AFDPSStepInfo",
    "ConfigError",
    "DataLoss",
    "Denoiser",
    "FlowChefConfig",
    "FlowDPSConfig",
    "NonFiniteError",
    "PSLDConfig",
    "PSLDTerms",
    "PosteriorUpdate",
    "Schedule",
    "StepInfo",
    "check_sigmas",
    "data_consistency",
    "data_gradient",
    "effective_sample_size",
    "flowdps_sigmas",
    "fresh_noise",
    "image_loss",
    "interpolate",
    "measurement_loss",
    "multinomial_resample",
    "noise_from_velocity",
    "noise_from_x0",
    "normalize_log_weights",
    "psld_data_term",
    "psld_objective",
    "quarantine",
    "resample",
    "reweight",
    "sample_afdps",
    "sample_flow_posterior",
    "systematic_resample",
    "velocity_from_x0",
    "x0_from_noise",
    "x0_from_velocity",
]
