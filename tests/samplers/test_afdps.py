"""AFDPS-SDE (samplers/afdps.py): the pure pieces, the interface and the SMC plumbing on small problems.

The exact-posterior checks are in test_afdps_exact.py.
"""

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from flowdps.samplers.afdps import (
    AFDPSConfig,
    clipped_kappa,
    estimate_gamma2,
    estimate_jacobian_norm2,
    estimate_operator_norm2,
    girsanov_log_ratio,
    langevin_move,
    langevin_step_size,
    noise_variance,
    reference_mean,
    residual_value_and_grad,
    sample_afdps,
    tempered_variance,
    tweedie_gain,
)
from flowdps.samplers.afdps_research import adjoint_apply, noised_potential_rate, reaction_rate
from flowdps.samplers.flow import noise_from_x0, velocity_from_x0
from flowdps.samplers.loop import NonFiniteError
from flowdps.samplers.testing import GaussianMixture, shifted_sigmas
from flowdps.samplers.types import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


def test_config_defaults_are_the_recommended_configuration():
    """The recommended configuration for the moves, weights and resampling; measured on the exact image problems
    (docs/afdps_posterior_outputs.md): the run ends on the denoised estimate followed by one data-consistency
    step."""
    c = AFDPSConfig()
    assert (c.potential, c.weights, c.eta_v, c.kappa) == ("tweedie", "W2", 1.0, 1.0)
    assert (c.resample_threshold, c.resampling) == (0.5, "systematic")
    assert c.final_step == "dc"
    assert c.gamma2 is None                                   # ||A||_F^2 / m
    assert 1 <= c.chunk_size <= 4


@pytest.mark.parametrize("kwargs", [
    {"potential": "const"}, {"weights": "W3"}, {"resampling": "residual"}, {"eta_v": -1.0},
    {"kappa": math.nan}, {"gamma2": 0.0}, {"resample_threshold": 1.5}, {"chunk_size": 0},
    {"gamma_probes": 0}, {"chunk_size": True},
])
def test_config_validation(kwargs):
    with pytest.raises(ValueError, match="must"):
        AFDPSConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "field", "rule"), [
    ({"eta_v": math.nan}, "eta_v", "must be finite and >= 0"),
    ({"resample_threshold": math.nan}, "resample_threshold", "must lie in [0, 1]"),
    ({"chunk_size": 0}, "chunk_size", "must be an integer >= 1"),
])
def test_config_errors_name_the_field_for_a_caller_to_rename(kwargs, field, rule):
    """A node feeding eta_v from its input 'eta' re-raises the message with its own name."""
    with pytest.raises(ConfigError) as info:
        AFDPSConfig(**kwargs)
    value = next(iter(kwargs.values()))
    assert (info.value.field, info.value.rule) == (field, rule)
    assert str(info.value) == f"{field} {rule}, got {value!r}"
    assert info.value.message("the input") == f"the input {rule}, got {value!r}"


def test_scalar_pieces():
    assert noise_variance(0.5, 1.0) == 1.0
    assert noise_variance(1.0, 0.3) == pytest.approx(0.6)
    assert tweedie_gain(1.0) == 0.0
    assert tweedie_gain(0.0) == 1.0
    assert tweedie_gain(0.5) == pytest.approx(1.0)
    for family in ("tweedie", "noised"):
        assert tempered_variance(family, 0.0, 0.2, 0.7) == pytest.approx(0.04)
    assert tempered_variance("tweedie", 1.0, 0.2, 0.7) == pytest.approx(0.04 + 0.7)
    assert tempered_variance("noised", 1.0, 0.2, 0.7) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="no tempered variance"):
        tempered_variance("none", 0.5, 0.2, 1.0)


@pytest.mark.parametrize("sigma", [1.0, 0.7, 0.05])
@pytest.mark.parametrize("eta_v", [0.0, 1.0, 0.4])
def test_reference_mean_is_euler_maruyama_of_c_H(sigma, eta_v):
    """m_ref = z + dt c_H with c_H = -v - (V^2 / 2s) eps_hat, V^2 = 2 eta_v s."""
    g = torch.Generator().manual_seed(0)
    z, z0 = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    dt = 0.03
    v = velocity_from_x0(z, z0, sigma)
    eps = noise_from_x0(z, z0, sigma)
    c_h = -v - (noise_variance(sigma, eta_v) / (2 * sigma)) * eps
    torch.testing.assert_close(reference_mean(z, z0, sigma, dt, eta_v), z + dt * c_h)
    if eta_v == 0.0:                                           # the Euler probability-flow ODE
        torch.testing.assert_close(reference_mean(z, z0, sigma, dt, eta_v), z - dt * v)


def test_girsanov_log_ratio_is_the_gaussian_kernel_ratio():
    """kappa V sqrt(dt) g.xi - kappa^2 V^2 dt |g|^2 / 2 = log N(z'; m_ref, V^2 dt) - log N(z'; m_g, V^2 dt)."""
    gen = torch.Generator().manual_seed(1)
    g, xi, m_ref = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    v2, dt, kappa = 1.3, 0.02, 0.7
    m_g = m_ref - kappa * v2 * dt * g
    z_next = m_g + math.sqrt(v2 * dt) * xi
    log_ratio = ((z_next - m_g).square().sum(1) - (z_next - m_ref).square().sum(1)) / (2 * v2 * dt)
    out = girsanov_log_ratio(g, xi, math.sqrt(v2 * dt), kappa)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, log_ratio)
    assert (girsanov_log_ratio(g, xi, 0.0, kappa) == 0).all()


def linear_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(1, 3, generator=gen, dtype=torch.float64)
    u = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    return a, y, u


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_residual_value_and_grad_linear(chunk):
    a, y, u = linear_problem()
    sq, grad = residual_value_and_grad(u, lambda x: x @ a.T - y, chunk)
    r = u @ a.T - y
    assert sq.dtype == torch.float64
    torch.testing.assert_close(sq, r.square().sum(1))
    torch.testing.assert_close(grad, r @ a)                                 # A^T (A u - y)
    value_only, none = residual_value_and_grad(u, lambda x: x @ a.T - y, chunk, need_grad=False)
    assert none is None
    torch.testing.assert_close(value_only, sq)


def test_residual_value_and_grad_under_inference_mode_with_a_decoder():
    """A nonlinear decoder made outside inference mode; called from inside it (as ComfyUI does)."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(3, 2, 3, 3, generator=gen) * 0.3
    y = torch.randn(1, 3, 4, 4, generator=gen)

    def decode(z):
        return torch.tanh(F.conv2d(F.interpolate(z, scale_factor=2), weight, padding=1))

    def residual(z):
        return F.avg_pool2d(decode(z), 2) - y

    z = torch.randn(5, 2, 4, 4, generator=gen)
    with torch.inference_mode():
        zi = z.clone()
        sq, grad = residual_value_and_grad(zi, residual, 2)
    zz = z.clone().requires_grad_(True)
    loss = residual(zz).reshape(5, -1).square().sum(1)
    (ref,) = torch.autograd.grad(0.5 * loss.sum(), zz)
    torch.testing.assert_close(sq, loss.detach().double())
    torch.testing.assert_close(grad, ref)


def test_estimate_gamma2():
    a = torch.randn(3, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = float(a.square().sum() / 3)
    est = estimate_gamma2(lambda x: x @ a.T, (8,), n_probes=4000, dtype=torch.float64)
    assert est == pytest.approx(exact, rel=0.05)
    assert estimate_gamma2(lambda x: x @ a.T, (8,), n_probes=16, dtype=torch.float64) == estimate_gamma2(
        lambda x: x @ a.T, (8,), n_probes=16, dtype=torch.float64)                  # deterministic
    # A = average pooling 2x2 on images: A A^T = I / 4, gamma^2 = 1/4
    assert estimate_gamma2(lambda x: F.avg_pool2d(x, 2), (3, 8, 8), n_probes=64, dtype=torch.float32) == (
        pytest.approx(0.25, rel=0.05))


# --- the sampler on a small pixel-space problem --------------------------------------------------------------

PRIOR = GaussianMixture.from_lists([0.6, 0.4], [[-1.0, 0.5, 0.0], [1.5, 0.0, -0.5]],
                                   [torch.eye(3).tolist(), (0.5 * torch.eye(3)).tolist()])
A = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]], dtype=torch.float64)
Y = torch.tensor([[0.8, 0.1]], dtype=torch.float64)


def forward(x):
    return x @ A.T.to(x.dtype)


def run(n=64, steps=10, seed=0, dtype=torch.float64, config=None, denoise=PRIOR.denoise, sigma_y=0.3, **kwargs):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64).to(dtype)
    config = config or AFDPSConfig(chunk_size=None)
    return sample_afdps(denoise, z, shifted_sigmas(steps, 3.0), forward=forward, y=Y.to(dtype), sigma_y=sigma_y,
                        config=config, generator=g, **kwargs)


def test_result_and_callback():
    infos = []
    res = run(callback=infos.append, config=AFDPSConfig(chunk_size=None, resample_threshold=1.0))
    n, steps = 64, 10
    assert res.particles.shape == (n, 3)
    assert res.images.shape == (n, 3)
    assert torch.equal(res.images, res.particles)                          # pixel space
    assert res.log_weights.shape == (n,)
    assert abs(float(torch.logsumexp(res.log_weights, 0))) < 1e-9
    assert res.weights.sum().item() == pytest.approx(1.0)
    assert res.ess.shape == (steps + 1,)
    assert res.ess[0] == pytest.approx(n)                                  # tweedie: mu := 0 at s = 1
    assert ((res.ess >= 1 - 1e-9) & (res.ess <= n + 1e-9)).all()
    assert math.isfinite(res.log_evidence)
    assert res.best.shape == res.mean.shape == res.sample.shape == res.image_mean.shape == (1, 3)
    assert torch.equal(res.best[0], res.particles[int(res.log_weights.argmax())])
    torch.testing.assert_close(res.mean[0], res.weights @ res.particles)
    std = ((res.weights[:, None] * (res.particles - res.mean).square()).sum(0)).sqrt()
    torch.testing.assert_close(res.image_std[0], std)
    # threshold 1: resample after every step but the last
    assert [info["i"] for info in infos] == list(range(steps))
    assert [info["resampled"] for info in infos] == [True] * (steps - 1) + [False]
    assert res.n_resampled == steps - 1
    for info in infos:
        assert {"x", "i", "sigma", "sigma_hat", "denoised", "ess", "resampled", "log_weights"} <= set(info)
        assert info["x"].shape == info["denoised"].shape == (n, 3)
    assert infos[3]["ess"] == pytest.approx(float(res.ess[4]))
    assert float(infos[0]["sigma"]) == 1.0


def test_threshold_zero_never_resamples_and_unweighted_mode():
    res = run(config=AFDPSConfig(chunk_size=None, resample_threshold=0.0))
    assert res.n_resampled == 0
    res = run(config=AFDPSConfig(chunk_size=None, weights="none"))
    assert res.n_resampled == 0
    torch.testing.assert_close(res.ess, torch.full((11,), 64.0, dtype=torch.float64))
    assert math.isnan(res.log_evidence)


def test_reproducible_and_dtype():
    a, b, c = run(seed=1), run(seed=1), run(seed=2)
    assert torch.equal(a.particles, b.particles)
    assert torch.equal(a.log_weights, b.log_weights)
    assert a.sample_index == b.sample_index
    assert not torch.equal(a.particles, c.particles)
    no_resampling = AFDPSConfig(chunk_size=None, resample_threshold=0.0)
    f32 = run(seed=1, dtype=torch.float32, config=no_resampling)
    assert f32.particles.dtype == torch.float32
    assert f32.log_weights.dtype == torch.float64
    f64 = run(seed=1, config=no_resampling)                   # same noise for both dtypes
    torch.testing.assert_close(f32.particles.double(), f64.particles, atol=1e-4, rtol=0)
    torch.testing.assert_close(f32.log_weights, f64.log_weights, atol=1e-3, rtol=0)


def test_default_generator_follows_the_global_rng_and_default_config():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 3, generator=g, dtype=torch.float64)
    kwargs = {"forward": forward, "y": Y, "sigma_y": 0.3}
    torch.manual_seed(99)
    a = sample_afdps(PRIOR.denoise, z, shifted_sigmas(4, 3.0), **kwargs)
    b = sample_afdps(PRIOR.denoise, z, shifted_sigmas(4, 3.0), **kwargs)
    torch.manual_seed(99)
    c = sample_afdps(PRIOR.denoise, z, shifted_sigmas(4, 3.0), **kwargs)
    assert not torch.equal(a.particles, b.particles)
    assert torch.equal(a.particles, c.particles)
    explicit = sample_afdps(PRIOR.denoise, z, shifted_sigmas(4, 3.0), config=AFDPSConfig(),
                            generator=torch.Generator().manual_seed(3), **kwargs)
    again = sample_afdps(PRIOR.denoise, z, shifted_sigmas(4, 3.0), generator=torch.Generator().manual_seed(3),
                         **kwargs)
    assert torch.equal(explicit.particles, again.particles)


def test_prior_sampling_needs_no_measurement():
    """Without forward, y and sigma_y the run samples the prior: the same run as the 'none' potential."""
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = shifted_sigmas(4, 3.0)
    prior = sample_afdps(PRIOR.denoise, z, sigmas, generator=torch.Generator().manual_seed(5))
    none = sample_afdps(PRIOR.denoise, z, sigmas, forward=forward, y=Y, sigma_y=0.3,
                        config=AFDPSConfig(potential="none"), generator=torch.Generator().manual_seed(5))
    guided = sample_afdps(PRIOR.denoise, z, sigmas, forward=forward, y=Y, sigma_y=0.3,
                          generator=torch.Generator().manual_seed(5))
    assert torch.equal(prior.particles, none.particles)
    assert torch.equal(prior.log_weights, none.log_weights)
    assert not torch.equal(prior.particles, guided.particles)
    with pytest.raises(ValueError, match="missing: y, sigma_y"):
        sample_afdps(PRIOR.denoise, z, sigmas, forward=forward)
    with pytest.raises(ValueError, match="missing: forward"):
        sample_afdps(PRIOR.denoise, z, sigmas, y=Y, sigma_y=0.3)


def test_chunking_does_not_change_the_result():
    a = run(config=AFDPSConfig(chunk_size=None))
    b = run(config=AFDPSConfig(chunk_size=5))
    torch.testing.assert_close(a.particles, b.particles)
    torch.testing.assert_close(a.log_weights, b.log_weights)


def test_non_finite_particles_are_quarantined():
    """A denoiser that returns nan for particle 0 at one step: that particle gets weight 0 and is never the
    best, the summaries stay finite, and the others carry on (it is resampled away when threshold = 1)."""
    calls = []

    def broken(z, sigma):
        out = PRIOR.denoise(z, sigma)
        calls.append(1)
        if len(calls) == 4:
            out = out.clone()
            out[0] = math.nan
        return out

    res = run(denoise=broken, config=AFDPSConfig(chunk_size=None, resample_threshold=0.0))
    assert res.log_weights[0] == -math.inf
    assert res.best_index != 0
    assert res.particles.isfinite().all()
    assert res.mean.isfinite().all()
    assert res.image_std.isfinite().all()
    assert math.isfinite(res.log_evidence)
    calls.clear()
    res = run(denoise=broken, config=AFDPSConfig(chunk_size=None, resample_threshold=1.0))
    assert res.log_weights.isfinite().all()


def test_latent_problem_with_decoder_under_inference_mode():
    """Latent (B, 2, 4, 4) particles, a nonlinear conv decoder to (B, 3, 8, 8) images, 2x pooling, chunks of
    3, the whole call under inference mode: the decoded images are returned and fit y better than the prior."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(3, 2, 3, 3, generator=gen) * 0.4

    def decode(z):
        return torch.tanh(F.conv2d(F.interpolate(z, scale_factor=2), weight, padding=1))

    def pool(x):
        return F.avg_pool2d(x, 2)

    prior = GaussianMixture.gaussian(torch.zeros(1), torch.eye(1))

    def denoise(z, sigma):
        return prior.denoise(z.reshape(-1, 1), sigma.repeat_interleave(z[0].numel())).reshape(z.shape)

    x_true = decode(torch.randn(1, 2, 4, 4, generator=gen))
    y = pool(x_true) + 0.1 * torch.randn(1, 3, 4, 4, generator=gen)
    z = torch.randn(32, 2, 4, 4, generator=gen)
    infos = []
    with torch.inference_mode():
        res = sample_afdps(denoise, z, shifted_sigmas(20, 3.0), forward=pool, y=y, sigma_y=0.1, decode=decode,
                           config=AFDPSConfig(chunk_size=3), generator=gen, callback=infos.append)
    assert res.particles.shape == (32, 2, 4, 4)
    assert res.images.shape == (32, 3, 8, 8)
    assert res.image_mean.shape == res.image_std.shape == (1, 3, 8, 8)
    torch.testing.assert_close(res.images, decode(res.particles))
    assert len(infos) == 20
    # measured: 1.13-1.41 over 4 seeds vs 4.1-4.3 for prior draws (noise level ||n|| ~ 0.7)
    fit = torch.linalg.vector_norm((pool(res.image_mean) - y).flatten())
    prior_images = decode(torch.randn(64, 2, 4, 4, generator=gen))
    prior_fit = torch.linalg.vector_norm((pool(prior_images) - y).flatten(1), dim=1).mean()
    assert fit < 0.5 * prior_fit
    assert (res.image_std > 0).any()


def test_input_validation():
    z = torch.randn(4, 3, dtype=torch.float64)
    kwargs = {"forward": forward, "y": Y, "sigma_y": 0.3}
    with pytest.raises(ValueError, match="end"):
        sample_afdps(PRIOR.denoise, z, torch.tensor([1.0, 0.5, 0.1]), **kwargs)
    with pytest.raises(ValueError, match="sigma_y"):
        sample_afdps(PRIOR.denoise, z, shifted_sigmas(3), forward=forward, y=Y, sigma_y=0.0)
    with pytest.raises(ValueError, match="pixel space"):
        sample_afdps(PRIOR.denoise, z, shifted_sigmas(3), decode=lambda u: u,
                     config=AFDPSConfig(potential="noised", weights="W1"), **kwargs)
    with pytest.raises(ValueError, match="batch dimension of 1"):
        sample_afdps(PRIOR.denoise, z, shifted_sigmas(3), forward=forward, y=Y.expand(4, 2), sigma_y=0.3)
    with pytest.raises(ValueError, match="denoise returned"):
        sample_afdps(lambda u, s: u[:, :2], z, shifted_sigmas(3), **kwargs)


# --- W1 weights and the ODE + Langevin variant: the pure pieces ----------------------------------------------

def noised_mu(x, sigma, a, y, sigma_y, gamma2):
    tau2 = tempered_variance("noised", sigma, sigma_y, gamma2)
    return ((1 - sigma) * y - x @ a.T).square().sum(1) / (2 * tau2)


def test_noised_potential_rate_is_the_s_derivative():
    a, y, x = linear_problem(4)
    sigma_y, gamma2, s, eps = 0.3, 0.8, 0.4, 1e-6
    tau2 = tempered_variance("noised", s, sigma_y, gamma2)
    r = x @ a.T - (1 - s) * y
    rate = noised_potential_rate(r.square().sum(1), r @ y[0], s, sigma_y, gamma2)
    fd = (noised_mu(x, s + eps, a, y, sigma_y, gamma2) - noised_mu(x, s - eps, a, y, sigma_y, gamma2)) / (2 * eps)
    torch.testing.assert_close(rate, fd, rtol=1e-6, atol=1e-6)
    assert tau2 > 0


def test_w1_rate_is_the_small_step_limit_of_w2():
    """Across particles, W1's increment dt * rate(x) and the conditional mean of W2's increment,
    ``mu_s(x) - E mu_s'(x') - V^2 dt |g|^2 / 2`` (exact for a quadratic mu: E mu_s'(x') = mu_s'(m_g) + a
    particle-independent trace term), differ by O(dt^2) (kappa = 1; for kappa != 1 the two weights are
    different valid weights, not pointwise equal, and are checked against the exact posterior instead)."""
    kappa = 1.0
    a, y, _ = linear_problem(5)
    a, y = a[:, :3], y
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    prior = GaussianMixture.from_lists([0.5, 0.5], [[-1.0, 0.0, 0.5], [1.0, 1.0, 0.0]],
                                       [torch.eye(3).tolist(), (0.5 * torch.eye(3)).tolist()])
    sigma_y, gamma2, s, eta = 0.3, 0.8, 0.6, 1.0
    v2 = noise_variance(s, eta)
    x0 = prior.denoise(x, s)
    tau2 = tempered_variance("noised", s, sigma_y, gamma2)
    r = x @ a.T - (1 - s) * y
    g = r @ a / tau2
    rate = reaction_rate(g, x, x0, s, v2, kappa, noised_potential_rate(r.square().sum(1), r @ y[0], s, sigma_y,
                                                                       gamma2))
    gaps = []
    for dt in (1e-3, 1e-4):
        m_g = reference_mean(x, x0, s, dt, eta) - kappa * v2 * dt * g
        w2 = (noised_mu(x, s, a, y, sigma_y, gamma2) - noised_mu(m_g, s - dt, a, y, sigma_y, gamma2)
              - 0.5 * kappa**2 * v2 * dt * g.square().sum(1))
        w1 = dt * rate
        gap = (w2 - w2.mean()) - (w1 - w1.mean())
        gaps.append(float(gap.abs().max()))
        assert float((w1 - w1.mean()).abs().max()) > 10 * gaps[-1]       # the rate itself is not negligible
    assert gaps[0] / gaps[1] > 50                                        # O(dt^2): ratio ~100


def test_langevin_pieces():
    assert langevin_step_size(0.5, 0.0, 0.05) == pytest.approx(0.05 * 0.25)
    assert langevin_step_size(0.5, 1e6, 0.05) == pytest.approx(0.25 / (1e6 + 4))
    gen = torch.Generator().manual_seed(7)
    z, z0, gm, xi = torch.randn(4, 5, 2, generator=gen, dtype=torch.float64)
    s, h = 0.3, 0.01
    score = -(z - (1 - s) * z0) / s**2
    torch.testing.assert_close(langevin_move(z, z0, gm, s, h, xi), z + h * (score - gm) + math.sqrt(2 * h) * xi)


def test_operator_norm_and_adjoint():
    a = torch.randn(3, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(a, 2) ** 2)
    assert estimate_operator_norm2(lambda x: x @ a.T, (8,), dtype=torch.float64) == pytest.approx(exact, rel=1e-3)
    assert estimate_operator_norm2(lambda x: F.avg_pool2d(x, 2), (1, 4, 4), dtype=torch.float32) == (
        pytest.approx(0.25, rel=1e-4))
    y = torch.randn(1, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.inference_mode():
        aty = adjoint_apply(lambda x: x @ a.T, y, (8,), torch.float64)
    torch.testing.assert_close(aty, y @ a)


@pytest.mark.parametrize("kwargs", [
    {"variant": "euler"}, {"variant": "ode"}, {"weights": "W1"}, {"corrector_delta": 0.0},
    {"operator_norm2": -1.0}, {"corrector_steps": -1},
])
def test_config_validation_of_the_variants(kwargs):
    with pytest.raises(ValueError, match="must"):
        AFDPSConfig(**kwargs)                               # ode / W1 need an exact-gradient potential


@pytest.mark.parametrize("options", [{"weights": "W1"}, {"variant": "ode"}, {"variant": "ode", "weights": "W1"}])
def test_noised_variants_run_and_only_w1_rejects_latents(options):
    config = AFDPSConfig(potential="noised", chunk_size=None, **options)
    infos = []
    res = run(config=config, callback=infos.append)
    assert res.particles.isfinite().all()
    assert len(infos) == 10
    assert math.isnan(res.log_evidence) == (config.weights == "W1")
    latent = functools.partial(sample_afdps, PRIOR.denoise, torch.zeros(4, 3), shifted_sigmas(3), forward=forward,
                               y=Y.float(), sigma_y=0.3, decode=lambda u: u, config=config)
    if config.weights == "W1":
        with pytest.raises(ValueError, match="pixel space"):
            latent()
    else:
        assert latent().particles.isfinite().all()


@pytest.mark.parametrize("variant", ["sde", "ode"])
def test_latent_noised_form_equals_the_pixel_form_for_an_identity_decoder(variant):
    """Below s = 1, ||y - A D(z / (1 - s))||^2 / (2 (sigma_y^2 + gamma^2 (s / (1 - s))^2)) with D = I is the pixel
    form ||(1 - s) y - A z||^2 / (2 ((1 - s)^2 sigma_y^2 + gamma^2 s^2)); same gradients, so the same run."""
    sigmas = shifted_sigmas(8, 3.0)[1:]                  # start at s < 1, where both forms are defined
    # final_step 'denoised': the data-consistency step estimates ||A J_D||_F^2 by probes of A in pixel space and
    # through the decoder on latents (different draws), so only the runs up to it are the same
    config = AFDPSConfig(variant=variant, potential="noised", chunk_size=None, operator_norm2=2.0,
                         final_step="denoised")
    z = torch.randn(32, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    common = {"forward": forward, "y": Y, "sigma_y": 0.3, "config": config}
    pixel = sample_afdps(PRIOR.denoise, z, sigmas, generator=torch.Generator().manual_seed(4), **common)
    latent = sample_afdps(PRIOR.denoise, z, sigmas, decode=lambda u: u * 1.0,
                          generator=torch.Generator().manual_seed(4), **common)
    torch.testing.assert_close(latent.particles, pixel.particles)
    torch.testing.assert_close(latent.log_weights, pixel.log_weights)
    assert latent.n_resampled == pixel.n_resampled


def test_latent_noised_potential_starts_from_plain_noise():
    """At s = 1 the latent noised potential is 0: the initial weights are uniform (no Stage-I reweighting)."""
    infos = []
    config = AFDPSConfig(potential="noised", chunk_size=None, resample_threshold=0.0)
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = sample_afdps(PRIOR.denoise, z, shifted_sigmas(4, 3.0), forward=forward, y=Y, sigma_y=0.3,
                       decode=lambda u: u, config=config, callback=infos.append)
    assert float(res.ess[0]) == pytest.approx(16.0)
    pixel = sample_afdps(PRIOR.denoise, z, shifted_sigmas(4, 3.0), forward=forward, y=Y, sigma_y=0.3,
                         config=config)
    assert float(pixel.ess[0]) < 16.0                    # the pixel form reweights the noise by exp(-mu_1)


def test_clipped_kappa_and_jacobian_norm():
    assert clipped_kappa(1.0, None, 0.1, 2.0, 100.0) == 1.0
    assert clipped_kappa(1.0, 0.5, 0.1, 2.0, 100.0) == pytest.approx(0.5 / 20.0)
    assert clipped_kappa(0.01, 0.5, 0.1, 2.0, 100.0) == 0.01          # never above kappa
    assert clipped_kappa(1.0, 0.5, 0.1, 0.0, 100.0) == 1.0            # no noise, no guidance step to clip
    m = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(m, 2) ** 2)
    u0 = torch.randn(1, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert estimate_jacobian_norm2(lambda u: u @ m.T, u0, n_iter=30) == pytest.approx(exact, rel=1e-6)
    # a nonlinear map: the Jacobian of tanh(M u) at u0 is diag(1 - tanh^2) M
    jac = (1 - torch.tanh(u0 @ m.T)[0] ** 2)[:, None] * m
    value = estimate_jacobian_norm2(lambda u: torch.tanh(u @ m.T), u0, n_iter=30)
    assert value == pytest.approx(float(torch.linalg.matrix_norm(jac, 2) ** 2), rel=1e-4)


def test_kappa_clip_cuts_the_guidance_where_it_is_stiff():
    """sigma_y = 0.01: dt V^2 L >> 1 near the end, so the clip lowers kappa there and only there; the weights
    use the kappa actually applied (a clipped run with kappa_i = kappa everywhere would equal the plain run)."""
    config = AFDPSConfig(chunk_size=None, kappa_clip=0.5, final_step="move")   # the stiffest step is the last
    res = run(config=config, sigma_y=0.01)
    assert res.kappa.shape == (10,)
    assert run(config=AFDPSConfig(chunk_size=None, kappa_clip=0.5), sigma_y=0.01).kappa.shape == (9,)  # unguided end
    assert float(res.kappa.min()) < 0.5
    assert float(res.kappa.max()) == 1.0               # early steps are not stiff
    assert res.particles.isfinite().all()
    loose = run(config=AFDPSConfig(chunk_size=None, kappa_clip=1e9), sigma_y=0.01)
    plain = run(config=AFDPSConfig(chunk_size=None), sigma_y=0.01)
    assert (loose.kappa == 1.0).all()
    torch.testing.assert_close(loose.particles, plain.particles)
    torch.testing.assert_close(loose.log_weights, plain.log_weights)
    for bad in ({"kappa_clip": 0.0}, {"kappa_clip": 0.5, "variant": "ode", "potential": "noised"},
                {"kappa_clip": 0.5, "weights": "W1", "potential": "noised"}):
        with pytest.raises(ValueError, match="kappa_clip"):
            AFDPSConfig(**bad)


def test_ode_without_corrector_and_without_potential_is_deterministic():
    """variant='ode', potential='none': the Euler probability-flow ODE, so the generator only drives the final
    draw, and the particles are the ODE flow of the noise."""
    config = AFDPSConfig(variant="ode", potential="none", chunk_size=None, corrector_steps=0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 3, generator=g, dtype=torch.float64)
    res = sample_afdps(PRIOR.denoise, z, shifted_sigmas(8, 3.0), forward=forward, y=Y, sigma_y=0.3, config=config,
                       generator=torch.Generator().manual_seed(1))
    x = z.clone()
    levels = shifted_sigmas(8, 3.0).double().tolist()
    for s, s_next in itertools.pairwise(levels):
        x = x - (s - s_next) * (x - PRIOR.denoise(x, s)) / s
    torch.testing.assert_close(res.particles, x)
    assert (res.ess > 15.999).all()


# --- memory pressure: out-of-memory in a chunk halves the chunk (issue: hardening §5) -------------------------

class OOMAbove:
    """A decoder that raises ``torch.OutOfMemoryError`` for batches larger than ``limit`` (a simulated GPU)."""

    def __init__(self, limit):
        self.limit, self.batches = limit, []

    def __call__(self, u):
        self.batches.append(u.shape[0])
        if u.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"simulated: {u.shape[0]} > {self.limit}")
        return u * 1.0


def test_out_of_memory_halves_the_chunk_and_keeps_the_result(caplog):
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    common = {"forward": forward, "y": Y, "sigma_y": 0.3}
    reference = sample_afdps(PRIOR.denoise, z, shifted_sigmas(4, 3.0), decode=lambda u: u * 1.0,
                             config=AFDPSConfig(chunk_size=8), generator=torch.Generator().manual_seed(1), **common)
    decoder = OOMAbove(limit=2)
    with caplog.at_level("WARNING", logger="flowdps.samplers.afdps_potentials"):
        res = sample_afdps(PRIOR.denoise, z, shifted_sigmas(4, 3.0), decode=decoder,
                           config=AFDPSConfig(chunk_size=8), generator=torch.Generator().manual_seed(1), **common)
    torch.testing.assert_close(res.particles, reference.particles)
    torch.testing.assert_close(res.log_weights, reference.log_weights)
    retries = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert retries == ["AFDPS: out of memory with 8 particles per decoder pass; retrying with 4",
                       "AFDPS: out of memory with 4 particles per decoder pass; retrying with 2"]
    assert max(decoder.batches[decoder.batches.index(2):]) == 2   # the smaller size is kept for the run


def test_out_of_memory_with_one_particle_is_a_clear_error():
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(torch.OutOfMemoryError, match=r"single particle .* chunking cannot go below 1"):
        sample_afdps(PRIOR.denoise, z, shifted_sigmas(3, 3.0), forward=forward, y=Y, sigma_y=0.3,
                     decode=OOMAbove(limit=0), config=AFDPSConfig(chunk_size=2))


# --- non-finite values inside a run (issue: hardening §4) ----------------------------------------------------

def nan_at_call(k, rows):
    """A test hook: the prior's denoiser, but its ``k``-th call returns NaN for the particles ``rows``."""
    calls = []

    def denoise(x, sigma):
        calls.append(1)
        out = PRIOR.denoise(x, sigma)
        if len(calls) == k:
            out = out.clone()
            out[rows] = float("nan")
        return out
    return denoise


def test_a_nan_particle_is_quarantined_and_the_run_finishes():
    res = run(n=8, steps=5, denoise=nan_at_call(3, [1]), config=AFDPSConfig(chunk_size=None, resample_threshold=0.0))
    assert float(res.weights[1]) == 0.0
    assert bool(torch.isinf(res.log_weights[1]))
    assert res.particles[torch.arange(8) != 1].isfinite().all()
    assert res.best_index != 1
    assert res.image_mean.isfinite().all()


def test_all_particles_non_finite_is_a_clear_error_naming_the_step():
    with pytest.raises(NonFiniteError, match=r"AFDPS step 2 of 5 .*every particle has NaN or Inf .*all 8"):
        run(n=8, steps=5, denoise=nan_at_call(3, slice(None)), config=AFDPSConfig(chunk_size=None))
