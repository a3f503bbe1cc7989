"""FlowDPS / FlowChef on exact problems: Gaussian and Gaussian-mixture priors with closed-form denoisers.

Prior tests (data term off): the published renoising ``n = sqrt(s') z1 + sqrt(1 - s') xi`` refreshes a fixed
fraction of the noise at every step, however small the step, so it is *not* exact in the many-step limit:
for a Gaussian prior the output is Gaussian with moments given by an exact affine recursion (below), and its
covariance error first shrinks with the number of steps (5 -> 160) and then grows again, with a bias of about
31% (relative Frobenius) at best for the Gaussian below and about 7% for the d = 2 mixture; the samples are
under-dispersed. The same loop with deterministic renoising (``noise_mixing=0``, DDIM) converges to the prior,
which shows the bias is the rule's, not the loop's or the denoiser's.

Posterior tests (data term on): ``y = A x + N(0, sigma_y^2)``, squared norm ``||y - A x||^2 / (2 sigma_y^2)``
and step ``sigma_y^2 / ||A||_2^2`` (for this quadratic loss and a single-singular-value A, one gradient step
lands exactly on ``A u = y``; the stable range is < 2x that). 28 steps on the paper's shift-4 grid.

Sample sets are 20000 draws from fixed generators; Monte-Carlo errors of the moments are ~0.01 (d = 2), so the
asserted bounds are the measured values plus a margin of 20-30%.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from flowdps.samplers import FlowChefConfig, FlowDPSConfig, measurement_loss, sample_flow_posterior
from flowdps.samplers.testing import GaussianMixture, gmm_instance, moment_errors, shifted_sigmas

N = 20000

# the shared test problem "d2" (samplers.testing.gmm_instance): prior, operator and measurement; the exact
# posterior is recomputed from them and checked against the published 4-decimal values.
D2, A, Y, SIGMA_Y = gmm_instance("d2")
D2_POST = {"pis": [0.6347, 0.3648, 0.0005], "mean": [-0.4738, 0.5102],
           "cov": [[3.5588, 0.0388], [0.0388, 0.0536]]}
GAUSS = GaussianMixture.gaussian([1.0, -0.5], [[0.5, 0.2], [0.2, 0.3]])
STEP = SIGMA_Y**2 / 1.0                                     # sigma_y^2 / ||A||_2^2 = 0.0625


def zero_loss(z0):
    return torch.zeros(z0.shape[0], dtype=z0.dtype)


def forward(x):
    return x @ A.T


def residual(x):
    """Mean ||A x - y|| over the samples."""
    return float(torch.linalg.vector_norm(forward(x) - Y, dim=1).mean())


def run(prior, n_steps, config, loss=zero_loss, shift=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, 2, generator=g, dtype=torch.float64)
    return sample_flow_posterior(prior.denoise, z, shifted_sigmas(n_steps, shift), loss, config, generator=g)


def recursion(mean, cov, sigmas, noise_weight):
    """Exact output moments of FlowDPS without data term for the prior N(mean, cov), from the published step.

    x0_hat = K z + k with K = (1-s) S C^-1, C = (1-s)^2 S + s^2 I; eps_hat = (z - (1-s) x0_hat) / s;
    z' = (1-s') x0_hat + s' (sqrt(1-c^2) eps_hat + c xi) is affine in (z, xi), so moments propagate exactly.
    """
    eye = torch.eye(len(mean), dtype=torch.float64)
    mu, sigma = torch.zeros_like(mean), eye.clone()
    levels = sigmas.double().tolist()
    for s, s_next in itertools.pairwise(levels):
        a = 1 - s
        gain = a * cov @ torch.linalg.inv(a * a * cov + s * s * eye)
        offset = mean - gain @ (a * mean)
        c = noise_weight(s_next)
        keep = math.sqrt(1 - c * c) if s_next > 0 else 0.0
        m = (1 - s_next) * gain + s_next * keep * (eye - a * gain) / s
        b = (1 - s_next) * offset - s_next * keep * a * offset / s
        mu, sigma = m @ mu + b, m @ sigma @ m.T + (s_next * c) ** 2 * eye
    return mu, sigma


def rel_cov_error(c, target):
    return float(torch.linalg.matrix_norm(c - target) / torch.linalg.matrix_norm(target))


def paper_c(s_next):
    return math.sqrt(1 - s_next)


def test_closed_forms_match_published_values():
    post = D2.posterior(A, Y, SIGMA_Y)
    torch.testing.assert_close(post.weights, torch.tensor(D2_POST["pis"], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(post.mean(), torch.tensor(D2_POST["mean"], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(post.cov(), torch.tensor(D2_POST["cov"], dtype=torch.float64), atol=1e-4, rtol=0)
    # spot values of x0_hat(x, s)
    for s, x, x0 in [(0.9, (0.3, -0.2), (-0.275110, 0.469513)), (0.5, (1.0, 1.0), (1.413046, 1.334636)),
                     (0.1, (-1.5, 0.4), (-1.672868, 0.428863))]:
        out = D2.denoise(torch.tensor([x], dtype=torch.float64), torch.tensor([s], dtype=torch.float64))
        torch.testing.assert_close(out, torch.tensor([x0], dtype=torch.float64), atol=1e-6, rtol=0)


def test_prior_moment_recursion_is_biased_in_the_limit():
    """No sampling: the published rule's covariance error bottoms out near 31%, DDIM's vanishes like 1/n."""
    mean, cov = GAUSS.means[0], GAUSS.covs[0]
    paper = {n: rel_cov_error(recursion(mean, cov, shifted_sigmas(n, 3.0), paper_c)[1], cov)
             for n in (5, 10, 20, 40, 160, 640, 2560)}
    ddim = {n: rel_cov_error(recursion(mean, cov, shifted_sigmas(n, 3.0), lambda s: 0.0)[1], cov)
            for n in (40, 160, 640, 2560)}
    # measured: paper 0.640 0.475 0.380 0.331 0.310 0.329 0.357; ddim 0.105 0.027 0.0069 0.0017
    assert paper[5] > paper[10] > paper[20] > paper[40] > paper[160]
    assert 0.29 < paper[160] < 0.33
    assert paper[2560] > paper[640] > paper[160]                   # more steps make it worse again
    assert ddim[40] > ddim[160] > ddim[640] > ddim[2560]
    assert ddim[2560] < 0.003


def test_prior_moments_gaussian():
    """Sampler vs the exact recursion, and vs the prior: the error shrinks from 5 to 40 steps."""
    mean, cov = GAUSS.means[0], GAUSS.covs[0]
    errors = []
    for n in (5, 10, 20, 40):
        x = run(GAUSS, n, FlowDPSConfig(), shift=3.0)
        mean_err, cov_err = moment_errors(x, mean, cov)
        _, exact_cov = recursion(mean, cov, shifted_sigmas(n, 3.0), paper_c)
        assert rel_cov_error(torch.cov(x.T), exact_cov) < 0.03            # the sampler follows the published step
        assert mean_err < 0.03                                             # the mean is exact (MC error ~0.006)
        assert torch.linalg.eigvalsh(cov - torch.cov(x.T)).min() > 0      # under-dispersed
        errors.append(cov_err)
    # measured: 0.638 0.474 0.370 0.334
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.36


@pytest.mark.slow
def test_prior_moments_gaussian_mixture():
    mean, cov = D2.mean(), D2.cov()
    errors = [moment_errors(run(D2, n, FlowDPSConfig(), shift=3.0), mean, cov)[1] for n in (5, 10, 20, 40)]
    # measured: 0.336 0.204 0.131 0.088; at 160 steps 0.066 and at 640 0.069 (the bias of the rule)
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.11
    x = run(D2, 160, FlowDPSConfig(), shift=3.0)
    assert 0.04 < moment_errors(x, mean, cov)[1] < 0.09
    assert (torch.cov(x.T).diagonal() < cov.diagonal()).all()              # under-dispersed (3.30, 1.14 vs 3.43, 1.34)
    ddim = run(D2, 160, FlowDPSConfig(noise_mixing=0.0), shift=3.0)
    assert moment_errors(ddim, mean, cov)[1] < 0.025                       # measured 0.011 (MC level)


def test_posterior_gaussian():
    post = GAUSS.posterior(A, Y, SIGMA_Y)
    exact = post.sample(N, torch.Generator().manual_seed(1))
    prior = GAUSS.sample(N, torch.Generator().manual_seed(2))
    res_exact, res_prior = residual(exact), residual(prior)               # 0.240, 1.107
    loss = measurement_loss(None, forward, Y, norm="squared", sigma_y=SIGMA_Y)

    x = run(GAUSS, 28, FlowDPSConfig(step_size=STEP), loss)
    mean_err, cov_err = moment_errors(x, post.mean(), post.cov())
    # measured: residual 0.323, mean error 0.297, covariance error 0.272
    assert res_exact < residual(x) < 0.35 * res_prior
    assert mean_err < 0.36
    assert cov_err < 0.33
    # direction: the mean moves ~77% of the way from the prior mean to the posterior mean (towards the prior),
    # and the covariance is smaller than the posterior's (trace 0.333 vs 0.441)
    shift = post.mean() - GAUSS.mean()
    fraction = float((x.mean(0) - GAUSS.mean()) @ shift / (shift @ shift))
    assert 0.65 < fraction < 0.9
    assert torch.cov(x.T).trace() < 0.85 * post.cov().trace()

    x = run(GAUSS, 28, FlowChefConfig(step_size=STEP), loss)
    # FlowChef lands exactly on A x = y (it fits the noise: zero variance along A); errors 0.392 / 0.293
    assert residual(x) < 1e-9
    mean_err, cov_err = moment_errors(x, post.mean(), post.cov())
    assert mean_err < 0.47
    assert cov_err < 0.36


def test_posterior_gaussian_mixture():
    post = D2.posterior(A, Y, SIGMA_Y)
    exact = post.sample(N, torch.Generator().manual_seed(1))
    prior = D2.sample(N, torch.Generator().manual_seed(2))
    res_exact, res_prior = residual(exact), residual(prior)               # 0.198, 0.935
    loss = measurement_loss(None, forward, Y, norm="squared", sigma_y=SIGMA_Y)

    x = run(D2, 28, FlowDPSConfig(step_size=STEP), loss)
    mean_err, cov_err = moment_errors(x, post.mean(), post.cov())
    modes = post.responsibilities(x).mean(0)
    # measured: residual 0.246, mean error 0.044, covariance error 0.109, modes (0.618, 0.361, 0.021)
    assert res_exact < residual(x) < 0.33 * res_prior
    assert mean_err < 0.06
    assert cov_err < 0.14
    torch.testing.assert_close(modes[:2], post.weights[:2], atol=0.03, rtol=0)
    assert modes[2] < 0.04                                                  # leftover prior mass in mode 3
    assert torch.cov(x.T)[0, 0] < post.cov()[0, 0]                         # under-dispersed (3.17 vs 3.56)

    x = run(D2, 28, FlowChefConfig(step_size=STEP), loss)
    mean_err, cov_err = moment_errors(x, post.mean(), post.cov())
    # measured: residual 0 (on A x = y), mean error 0.126, covariance error 0.130, modes (0.623, 0.377, 0)
    assert residual(x) < 1e-9
    assert mean_err < 0.16
    assert cov_err < 0.17
    torch.testing.assert_close(post.responsibilities(x).mean(0)[:2], post.weights[:2], atol=0.03, rtol=0)


@pytest.mark.parametrize(("config", "bound"), [(FlowDPSConfig(), 0.02), (FlowChefConfig(), 0.1)],
                         ids=["flowdps", "flowchef"])
def test_paper_defaults_on_an_image_shaped_problem(config, bound):
    """Paper defaults (un-squared A^+ residual, step 15) on SR x4 of 3 x 32 x 32 images, N(0, I) prior.

    The paper norm's step is a distance, so the defaults need image-sized problems: on the d = 2 problems above
    step 15 overshoots (FlowDPS residual 0.72 vs prior 1.1; FlowChef diverges to ~10). Here both fit ``y``
    more closely than the exact posterior does (measured FlowDPS 0.006-0.032, FlowChef 0.06-0.34, exact
    posterior ~0.41, prior ~5): the un-squared norm knows nothing of sigma_y, so it fits the noise.
    """
    g = torch.Generator().manual_seed(0)
    prior = GaussianMixture.gaussian(torch.zeros(1), torch.eye(1))       # N(0, 1) per pixel

    def denoise(z, sigma):
        return prior.denoise(z.reshape(-1, 1), sigma.repeat_interleave(z[0].numel())).reshape(z.shape)

    def pool(x):
        return F.avg_pool2d(x, 4)

    def pinv(y):
        return F.interpolate(y, scale_factor=4, mode="nearest")

    x_true = torch.randn(1, 3, 32, 32, generator=g)
    y = pool(x_true) + 0.03 * torch.randn(1, 3, 8, 8, generator=g)
    loss = measurement_loss(None, pool, y, project=pinv)
    z = torch.randn(4, 3, 32, 32, generator=g)
    x = sample_flow_posterior(denoise, z, shifted_sigmas(28, 4.0), loss, config, generator=g)
    res = torch.linalg.vector_norm((pool(x) - y).flatten(1), dim=1)
    res_prior = torch.linalg.vector_norm((pool(torch.randn(4, 3, 32, 32, generator=g)) - y).flatten(1), dim=1)
    # exact posterior of the block means b = A x: prior variance 1/16, so E[b | y] = y / (1 + 16 sigma_y^2) and
    # Var[b | y] = 1 / (16 + 1 / sigma_y^2): expected squared residual ||E[b|y] - y||^2 + 192 Var[b | y]
    shrink = 16 * 0.03**2 / (1 + 16 * 0.03**2)
    res_posterior = math.sqrt(float((shrink * y).square().sum()) + y.numel() / (16 + 0.03**-2))
    assert x.isfinite().all()
    assert 0.5 < float(x.std()) < 1.2
    assert (res < bound * res_prior).all()
    assert (res < res_posterior).all()
