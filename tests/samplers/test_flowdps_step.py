"""One step of the core against the published updates, computed by hand.

FlowDPS: z0 = z - s v, z1 = z + (1 - s) v; u = z0, K times u -= eta * grad loss(u); z0_y = (1 - s) z0 + s u;
n = sqrt(s') z1 + sqrt(1 - s') xi; z' = (1 - s') z0_y + s' n.
FlowChef: z' = z0 + s' (z1 - z0) - eta * grad loss(z0).
The fresh noise xi is what ``torch.randn(shape, generator=g, dtype=float32)`` draws from the seeded generator.
"""

import math

import pytest
import torch
from flowdps.samplers import (
    FlowChefConfig,
    FlowDPSConfig,
    NonFiniteError,
    PSLDConfig,
    Schedule,
    data_consistency,
    data_gradient,
    measurement_loss,
    sample_flow_posterior,
)


def const_denoiser(z0):
    """A denoiser that always returns ``z0`` (so v = (z - z0) / s is known)."""
    return lambda z, sigma: z0.expand_as(z).to(z.dtype)


def half_squared(c):
    """0.5 ||z0 - c||^2 per sample: gradient z0 - c."""
    return lambda z0: 0.5 * (z0 - c).square().flatten(1).sum(1)


def seeded(seed=5):
    return torch.Generator().manual_seed(seed)


def one(x):
    return torch.tensor([[x]], dtype=torch.float64)


def test_flowdps_step_literal_numbers():
    # z = 0.5, z0 = 0.2, c = 1, eta = 0.1, K = 3, s = 0.8:
    # u = 1 + 0.9^3 (0.2 - 1) = 0.4168;  z0_y = 0.2 * 0.2 + 0.8 * 0.4168 = 0.37344;  z1 = 0.46 / 0.8 = 0.575
    config = FlowDPSConfig(step_size=0.1)
    loss = half_squared(one(1.0))
    out = sample_flow_posterior(const_denoiser(one(0.2)), one(0.5), torch.tensor([0.8, 0.0]), loss, config)
    torch.testing.assert_close(out, one(0.37344))                  # s' = 0: z' = z0_y, no noise
    xi = torch.randn((1, 1), generator=seeded(), dtype=torch.float32).double()
    out = sample_flow_posterior(const_denoiser(one(0.2)), one(0.5), torch.tensor([0.8, 0.5]), loss, config,
                                generator=seeded())
    # z' = 0.5 * 0.37344 + 0.5 * (sqrt(0.5) * 0.575 + sqrt(0.5) * xi)
    torch.testing.assert_close(out, 0.18672 + 0.5 * math.sqrt(0.5) * (0.575 + xi))


def test_flowdps_step_paper_norm_literal():
    # loss = ||c - u|| with c = (3, 4), u0 = 0: grad = (u - c) / ||u - c||, so 3 unit-length steps towards c
    # give u = 3 * (0.6, 0.8) = (1.8, 2.4); s = 0.8, s' = 0: z' = 0.2 * 0 + 0.8 * u = (1.44, 1.92)
    c = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    loss = measurement_loss(None, lambda x: x, c)                   # norm="paper", no projection
    z0 = torch.zeros(1, 2, dtype=torch.float64)
    out = sample_flow_posterior(const_denoiser(z0), torch.ones(1, 2, dtype=torch.float64),
                                torch.tensor([0.8, 0.0]), loss, FlowDPSConfig(step_size=1.0))
    torch.testing.assert_close(out, torch.tensor([[1.44, 1.92]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flowdps_step_from_velocity(generator, dtype):
    """General tensors (B=2, C=3, 5x7): the published update written from z, v, xi and sigmas."""
    shape = (2, 3, 5, 7)
    z, v, c = (torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3))
    s, s_next, eta = 0.9, 0.6, 0.3
    z0 = z - s * v
    z1 = z + (1 - s) * v
    u = z0
    for _ in range(3):
        u = u - eta * (u - c)
    z0_y = (1 - s) * z0 + s * u
    xi = torch.randn(shape, generator=seeded(11), dtype=torch.float32).to(dtype)
    expected = (1 - s_next) * z0_y + s_next * (math.sqrt(s_next) * z1 + math.sqrt(1 - s_next) * xi)
    out = sample_flow_posterior(lambda zz, sig: zz - sig.reshape(-1, 1, 1, 1) * v, z,
                                torch.tensor([s, s_next], dtype=dtype), half_squared(c),
                                FlowDPSConfig(step_size=eta), generator=seeded(11))
    torch.testing.assert_close(out, expected)


def test_flowdps_step_with_blend_and_noise_weights(generator):
    shape = (2, 3, 5, 7)
    z, z0, c = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    s, s_next, eta = 0.7, 0.4, 0.2
    u = c + (1 - eta) ** 2 * (z0 - c)                               # K = 2
    z0_y = 0.75 * z0 + 0.25 * u                                     # blend weight 0.25
    z1 = (z - (1 - s) * z0) / s
    xi = torch.randn(shape, generator=seeded(), dtype=torch.float32).double()
    expected = (1 - s_next) * z0_y + s_next * (0.8 * z1 + 0.6 * xi)  # fresh-noise weight 0.6
    config = FlowDPSConfig(dc_steps=2, step_size=eta, blend=0.25, noise_mixing=Schedule(0.6))
    out = sample_flow_posterior(const_denoiser(z0), z, torch.tensor([s, s_next]), half_squared(c), config,
                                generator=seeded())
    torch.testing.assert_close(out, expected)


def test_flowchef_step_literal_numbers():
    # z0 + s' (z1 - z0) - eta * g = 0.2 + 0.5 * (0.575 - 0.2) - 0.1 * (0.2 - 1) = 0.4675 (no noise drawn)
    out = sample_flow_posterior(const_denoiser(one(0.2)), one(0.5), torch.tensor([0.8, 0.5]),
                                half_squared(one(1.0)), FlowChefConfig(step_size=0.1))
    torch.testing.assert_close(out, one(0.4675))
    # paper norm: g = (z0 - c) / |z0 - c| = -1, so 0.2 + 0.1875 + 0.1 = 0.4875
    out = sample_flow_posterior(const_denoiser(one(0.2)), one(0.5), torch.tensor([0.8, 0.5]),
                                measurement_loss(None, lambda x: x, one(1.0)), FlowChefConfig(step_size=0.1))
    torch.testing.assert_close(out, one(0.4875))
    # s' = 0: z0 - eta * g = 0.2 + 0.08
    out = sample_flow_posterior(const_denoiser(one(0.2)), one(0.5), torch.tensor([0.8, 0.0]),
                                half_squared(one(1.0)), FlowChefConfig(step_size=0.1))
    torch.testing.assert_close(out, one(0.28))


def test_callback_payload_and_denoiser_calls():
    z0, z = one(0.2), one(0.5)
    seen, payloads = [], []

    def denoise(zz, sigma):
        assert not torch.is_grad_enabled()                        # the denoiser is never back-propagated
        seen.append((sigma.shape, float(sigma[0]), zz.clone()))
        return z0.clone()

    sigmas = torch.tensor([0.8, 0.5, 0.0])
    out = sample_flow_posterior(denoise, z, sigmas, half_squared(one(1.0)), FlowDPSConfig(step_size=0.1),
                                callback=payloads.append)
    assert [p["i"] for p in payloads] == [0, 1]
    assert [(shape, sigma) for shape, sigma, _ in seen] == [((1,), pytest.approx(0.8)), ((1,), pytest.approx(0.5))]
    assert torch.equal(payloads[0]["x"], z)                       # x: the state before the step
    assert torch.equal(payloads[1]["x"], seen[1][2])
    assert payloads[1]["sigma"] == sigmas[1]
    assert payloads[1]["sigma_hat"] == sigmas[1]
    torch.testing.assert_close(payloads[0]["denoised"], one(0.37344))   # z0_y of the first step
    torch.testing.assert_close(out, payloads[1]["denoised"])            # last step lands on s' = 0


def test_default_generator_follows_the_global_rng(generator):
    """generator=None behaves like torch.randn: torch.manual_seed reproduces a run, and two runs in a row differ
    (a loop over restorations must not silently repeat one)."""
    z = torch.randn(2, 3, 4, 5, generator=generator)
    z0 = torch.randn(2, 3, 4, 5, generator=generator)
    args = (const_denoiser(z0), z, torch.tensor([0.9, 0.5, 0.2]), lambda u: torch.zeros(u.shape[0]),
            FlowDPSConfig())
    torch.manual_seed(1234)
    a = sample_flow_posterior(*args)
    b = sample_flow_posterior(*args)
    torch.manual_seed(1234)
    c = sample_flow_posterior(*args)
    assert not torch.equal(a, b)
    assert torch.equal(a, c)
    # an explicit generator is used as given, and the global RNG is then left alone
    state = torch.random.get_rng_state()
    d = sample_flow_posterior(*args, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(d, sample_flow_posterior(*args, generator=torch.Generator().manual_seed(7)))
    # noise_mixing=0 and FlowChef are deterministic: the generator does not matter
    for config in (FlowDPSConfig(noise_mixing=0.0), FlowChefConfig()):
        runs = [sample_flow_posterior(*args[:4], config, generator=torch.Generator().manual_seed(k)) for k in (1, 2)]
        assert torch.equal(*runs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_gradient_dtype_and_output_dtype(generator, dtype):
    seen = []

    def loss(z0):
        seen.append(z0.dtype)
        return 0.5 * z0.float().square().flatten(1).sum(1).to(z0.dtype)

    z = torch.randn(2, 3, 5, 7, generator=generator).to(dtype)
    out = sample_flow_posterior(lambda zz, s: 0.5 * zz, z, torch.tensor([1.0, 0.6, 0.0]), loss,
                                FlowDPSConfig(step_size=0.1))
    assert out.dtype == dtype
    assert out.isfinite().all()
    assert set(seen) == {torch.float64 if dtype == torch.float64 else torch.float32}


def test_batch_entries_are_independent(generator):
    c = torch.randn(3, 4, generator=generator)
    z0 = torch.randn(3, 4, generator=generator)
    loss = measurement_loss(None, lambda x: 2 * x, c, norm="paper")   # per-sample norms
    together = data_consistency(z0, loss, step_size=0.3, dc_steps=3)
    for b in range(3):
        alone = data_consistency(z0[b:b + 1], measurement_loss(None, lambda x: 2 * x, c[b:b + 1]),
                                 step_size=0.3, dc_steps=3)
        torch.testing.assert_close(together[b:b + 1], alone)
    # the gradient of the summed per-sample norms: 2 * (2 z0 - c) / ||2 z0 - c|| per sample
    r = 2 * z0 - c
    torch.testing.assert_close(data_gradient(z0, loss), 2 * r / r.norm(dim=1, keepdim=True))


def test_zero_data_term_and_zero_step_skip_the_loss(generator):
    z0 = torch.randn(2, 3, generator=generator)
    calls = []

    def loss(u):
        calls.append(1)
        return torch.zeros(u.shape[0])                              # no graph: gradient zero

    assert torch.equal(data_gradient(z0, loss), torch.zeros_like(z0))
    assert data_consistency(z0, loss, step_size=0.0, dc_steps=3) is z0
    assert len(calls) == 1
    # a Schedule that reaches 0 at the last step evaluates the loss only K times, at the first step
    sample_flow_posterior(const_denoiser(z0), z0, torch.tensor([0.9, 0.5, 0.2]), loss,
                          FlowDPSConfig(step_size=Schedule(1.0, 0.0)))
    assert len(calls) == 1 + 3


def test_wrong_loss_or_denoiser_shape(generator):
    z = torch.randn(2, 3, 4, generator=generator)
    with pytest.raises(ValueError, match=r"one value per sample.*\(2,\).*\(\)"):
        data_gradient(z, lambda u: u.square().sum())
    with pytest.raises(ValueError, match=r"denoise returned \(2, 3\) for z of shape \(2, 3, 4\)"):
        sample_flow_posterior(lambda zz, s: zz[..., 0], z, torch.tensor([1.0, 0.0]),
                              lambda u: torch.zeros(2), FlowDPSConfig())


@pytest.mark.parametrize("config", [FlowDPSConfig(), FlowChefConfig(), PSLDConfig(gluing_weight=0.0)],
                         ids=["flowdps", "flowchef", "psld"])  # psld: the path that differentiates the denoiser
def test_a_nan_from_the_model_stops_the_run_naming_the_step(generator, config):
    """A test hook: the denoiser returns NaN in batch item 1 at the third call; the run stops there with an
    error naming step 3 of 4, its sigma and the item, and no later step runs."""
    z = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    calls = []

    def denoise(x, sigma):
        calls.append(float(sigma[0]))
        out = x * 0.0                                  # depends on x: PSLD differentiates through it
        if len(calls) == 3:
            out[1, 0] = float("nan")
        return out

    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"step 3 of 4 \(sigma 0\.5\): the model's prediction .* batch item\(s\) \[1\]"):
        sample_flow_posterior(denoise, z, sigmas, half_squared(torch.zeros(2, 3, dtype=torch.float64)), config,
                              generator=generator)
    assert len(calls) == 3


def test_a_non_finite_data_update_stops_the_run(generator):
    """An infinite loss gradient (a step size far too large) is caught after the update, naming the step."""
    z = torch.randn(1, 3, generator=generator, dtype=torch.float64)
    sigmas = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"step 1 of 2 .*data-consistency update"):
        sample_flow_posterior(lambda x, s: x * 0 + 1.0, z, sigmas, half_squared(torch.zeros(1, 3, dtype=torch.float64)),
                              FlowDPSConfig(step_size=1e308), generator=generator)
