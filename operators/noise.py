"""Measurement noise, kept apart from the operator: ``y = A x + n``.

``sigma_y`` is stated on the [0, 1] image scale (what users see in ComfyUI) and converted once to the
[-1, 1] scale the operators work on (x 2). The paper's ``y = A x + 0.03 N(0, I)`` is on the [-1, 1] scale,
i.e. ``sigma_y = 0.015`` here (:data:`PAPER_SIGMA_Y`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .base import check_finite_float

PAPER_SIGMA_Y = 0.015
"""FlowDPS's measurement noise on the [0, 1] scale (0.03 on the [-1, 1] scale of solve.py)."""


@dataclasses.dataclass(frozen=True)
class GaussianNoise:
    """Additive white Gaussian noise of standard deviation ``sigma_y`` ([0, 1] scale, >= 0)."""

    sigma_y: float = PAPER_SIGMA_Y

    def __post_init__(self) -> None:
        sigma_y = check_finite_float(self.sigma_y, "sigma_y")
        if sigma_y < 0:
            raise ValueError(f"sigma_y {sigma_y} must be >= 0")
        object.__setattr__(self, "sigma_y", sigma_y)

    @property
    def sigma(self) -> float:
        """Standard deviation on the [-1, 1] scale of the operators: ``2 sigma_y``."""
        return 2.0 * self.sigma_y

    def apply(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``y + sigma * N(0, I)`` (a new tensor). y: clean measurement on the [-1, 1] scale, any shape.

        The noise is drawn in float32 on the generator's device (CPU when ``generator`` is None, then from
        torch's global RNG) and moved to y, so a seed gives the same noise on every device and dtype.
        """
        if self.sigma_y == 0:
            return y.clone()
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(y.shape, generator=generator, device=device, dtype=torch.float32)
        return y + (self.sigma * noise).to(device=y.device, dtype=y.dtype)
