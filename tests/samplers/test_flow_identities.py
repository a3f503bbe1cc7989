"""Rectified-flow identities: z_s = (1 - s) z0 + s eps, v = eps - z0 (samplers/flow.py)."""

import pytest
import torch
from flowdps.samplers import (
    interpolate,
    noise_from_velocity,
    noise_from_x0,
    velocity_from_x0,
    x0_from_noise,
    x0_from_velocity,
)


@pytest.mark.parametrize("sigma_kind", ["float", "0-d", "per-sample"])
def test_round_trips(generator, sigma_kind):
    z0 = torch.randn(3, 2, 5, 7, generator=generator, dtype=torch.float64)
    eps = torch.randn(3, 2, 5, 7, generator=generator, dtype=torch.float64)
    sigma = {"float": 0.3, "0-d": torch.tensor(0.3, dtype=torch.float64),
             "per-sample": torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)}[sigma_kind]
    s = sigma.reshape(-1, 1, 1, 1) if sigma_kind == "per-sample" else sigma
    z = interpolate(z0, eps, sigma)
    torch.testing.assert_close(z, (1 - s) * z0 + s * eps)
    v = eps - z0
    torch.testing.assert_close(x0_from_velocity(z, v, sigma), z0)
    torch.testing.assert_close(noise_from_velocity(z, v, sigma), eps)
    torch.testing.assert_close(velocity_from_x0(z, z0, sigma), v)
    torch.testing.assert_close(noise_from_x0(z, z0, sigma), eps)
    torch.testing.assert_close(x0_from_noise(z, eps, sigma), z0)


def test_endpoints(generator):
    z = torch.randn(2, 3, generator=generator)
    z0_hat = torch.randn(2, 3, generator=generator)
    assert torch.equal(noise_from_x0(z, z0_hat, 1.0), z)     # pure noise level: eps_hat = z
    assert torch.equal(x0_from_noise(z, z0_hat, 0.0), z)     # data level: z0_hat = z
    assert torch.equal(interpolate(z, z0_hat, 0.0), z)


def test_scalar_values():
    # z = 0.5, z0_hat = 0.2 at s = 0.8: v = 0.3 / 0.8 = 0.375, eps_hat = 0.5 + 0.2 * 0.375 = 0.575
    z, z0 = torch.tensor([0.5]), torch.tensor([0.2])
    torch.testing.assert_close(velocity_from_x0(z, z0, 0.8), torch.tensor([0.375]))
    torch.testing.assert_close(noise_from_x0(z, z0, 0.8), torch.tensor([0.575]))
