"""Rectified-flow identities (SD3 / ComfyUI ``CONST`` convention).

``z_s = (1 - s) z0 + s eps`` with ``s`` ("sigma") in [0, 1], ``s = 1`` pure noise, ``s = 0`` data, and the
velocity ``v = eps - z0``. A network predicts ``v ~ E[eps - z0 | z_s]``; ComfyUI's model call returns the
x0 estimate ``z0_hat = z - s v`` instead. The estimates follow from each other (FlowDPS paper, Section 1):

    z0_hat = z - s v          eps_hat = z + (1 - s) v          v = (z - z0_hat) / s

Every function takes ``z`` and the estimates as tensors of the same shape ``(B, ...)`` (e.g. a latent
``(B, C, h, w)``) and ``sigma`` as a Python float, a 0-d tensor, or a ``(B,)`` tensor (one level per sample,
broadcast over the remaining dimensions). Functions that divide by ``s`` (or ``1 - s``) need it nonzero.
"""

from __future__ import annotations

from torch import Tensor

from .loop import batch_view

__all__ = [
    "interpolate",
    "noise_from_velocity",
    "noise_from_x0",
    "velocity_from_x0",
    "x0_from_noise",
    "x0_from_velocity",
]


def _per_sample(sigma: float | Tensor, z: Tensor) -> float | Tensor:
    """Reshape a ``(B,)`` sigma to ``(B, 1, ..., 1)`` so it broadcasts against ``z: (B, ...)``."""
    if isinstance(sigma, Tensor) and sigma.ndim == 1 and z.ndim > 1:
        return batch_view(sigma, z)
    return sigma


def interpolate(z0: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    """Forward process ``z_s = (1 - s) z0 + s eps``."""
    s = _per_sample(sigma, z0)
    return (1 - s) * z0 + s * noise


def x0_from_velocity(z: Tensor, v: Tensor, sigma: float | Tensor) -> Tensor:
    """``z0_hat = z - s v``."""
    return z - _per_sample(sigma, z) * v


def noise_from_velocity(z: Tensor, v: Tensor, sigma: float | Tensor) -> Tensor:
    """``eps_hat = z + (1 - s) v``."""
    return z + (1 - _per_sample(sigma, z)) * v


def velocity_from_x0(z: Tensor, z0_hat: Tensor, sigma: float | Tensor) -> Tensor:
    """``v = (z - z0_hat) / s``; needs ``s > 0``."""
    return (z - z0_hat) / _per_sample(sigma, z)


def noise_from_x0(z: Tensor, z0_hat: Tensor, sigma: float | Tensor) -> Tensor:
    """``eps_hat = z + (1 - s) v = (z - (1 - s) z0_hat) / s``; needs ``s > 0`` (at ``s = 1`` it is ``z``)."""
    s = _per_sample(sigma, z)
    return (z - (1 - s) * z0_hat) / s


def x0_from_noise(z: Tensor, noise_hat: Tensor, sigma: float | Tensor) -> Tensor:
    """``z0_hat = (z - s eps_hat) / (1 - s)``; needs ``s < 1``."""
    s = _per_sample(sigma, z)
    return (z - s * noise_hat) / (1 - s)

