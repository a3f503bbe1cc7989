"""Measurement noise, kept apart from the operator: ``y = A x + n``.

``sigma`` is the standard deviation on the [-1, 1] scale of the images the operators work on (the paper's
``y = A x + 0.03 N(0, I)`` has ``sigma = 0.03``). The nodes state it on ComfyUI's [0, 1] image scale and
convert it (``nodes/convert.py``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .base import ParameterError, check_finite_float


@dataclasses.dataclass(frozen=True)
class GaussianNoise:
    """Additive white Gaussian noise of standard deviation ``sigma`` (the [-1, 1] image scale, >= 0)."""

    sigma: float

    def __post_init__(self) -> None:
        sigma = check_finite_float(self.sigma, "sigma")
        if sigma < 0:
            raise ParameterError("sigma", f" {sigma} must be >= 0")
        object.__setattr__(self, "sigma", sigma)

    def apply(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``y + sigma * N(0, I)`` (a new tensor). y: clean measurement on the [-1, 1] scale, any shape.

        The noise is drawn in float32 on the generator's device (CPU when ``generator`` is None, then from
        torch's global RNG) and moved to y, so a seed gives the same noise on every device and dtype.
        """
        if self.sigma == 0:
            return y.clone()
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(y.shape, generator=generator, device=device, dtype=torch.float32)
        return y + (self.sigma * noise).to(device=y.device, dtype=y.dtype)
