"""The exact image-scale Gaussian problems (samplers/gaussian_problems.py) against dense linear algebra.

Oracles are built independently of the module: the prior covariance as a dense circulant matrix from the
inverse FFT of its spectrum (index arithmetic, no module code), ``A`` and ``D`` column by column with
``operators.testing.dense_matrix``, and the posterior by ``torch.linalg`` on the precision
``C^{-1} + D^T A^T A D / sigma_y^2``. Sizes 3x8x8, 1x12x10 (odd/even, non-square) and a 4x4x4 latent decoded to
3x8x8. Each test compares numbers, so a wrong formula (a missing ``(1 - s)``, a transposed colour basis, a
perturb-and-MAP draw without its noise term, a preconditioner that is not symmetric positive definite) fails it.
"""

from __future__ import annotations

import math

import pytest
import torch
from flowdps import operators as ops
from flowdps.operators.testing import dense_matrix
from flowdps.samplers.gaussian_problems import (
    DENSE_MAX,
    GaussianImagePrior,
    LinearGaussianProblem,
    PatchDecoder,
    fourier_normal_diagonal,
    pcg,
)
from flowdps.samplers.testing import GaussianMixture

pytestmark = pytest.mark.usefixtures("single_thread")

SIGMA_Y = 0.05
COLOUR = torch.tensor([[0.30, 0.20, 0.05], [0.20, 0.25, 0.10], [0.05, 0.10, 0.20]], dtype=torch.float64)


def dense_prior_covariance(prior: GaussianImagePrior) -> torch.Tensor:
    """Dense (d, d) covariance from the spectrum: a circulant kernel per eigen-channel, mixed by the colour basis."""
    c, h, w = prior.shape
    kernels = torch.fft.ifft2(prior.spectrum.to(torch.complex128)).real              # (C, H, W), r_e(delta)
    i = torch.arange(h)
    j = torch.arange(w)
    di = (i[:, None, None, None] - i[None, None, :, None]) % h                       # (H, 1, H, 1)
    dj = (j[None, :, None, None] - j[None, None, None, :]) % w                       # (1, W, 1, W)
    spatial = kernels[:, di, dj]                                                     # (C, H, W, H, W)
    q = prior.colour
    cov = torch.einsum("ae,be,eijkl->aijbkl", q, q, spatial)
    return cov.reshape(c * h * w, c * h * w)


def power_prior(shape, mean_seed=3):
    g = torch.Generator().manual_seed(mean_seed)
    mean = 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)
    colour = COLOUR if shape[0] == 3 else None
    return GaussianImagePrior.power_law(shape, std=0.5, f0=0.08, exponent=1.2, colour_cov=colour, mean=mean)


def white_prior(shape):
    colour = COLOUR if shape[0] == 3 else None
    return GaussianImagePrior.white(shape, std=0.6, mean=0.1, colour_cov=colour)


def dense_posterior(problem: LinearGaussianProblem, y: torch.Tensor):
    """(mean of the code (d,), image mean (n,), image covariance diagonal (n,)) by dense linear algebra."""
    cov = dense_prior_covariance(problem.prior)
    a = dense_matrix(problem.operator, (1, *problem.image_shape))
    if problem.decoder is not None:
        a = a @ dense_matrix(problem.decoder.forward, (1, *problem.code_shape))
        d = dense_matrix(problem.decoder.forward, (1, *problem.code_shape))
    else:
        d = torch.eye(cov.shape[0], dtype=torch.float64)
    m = problem.prior.mean.reshape(-1)
    precision = torch.linalg.inv(cov) + a.T @ a / problem.sigma_y**2
    sigma = torch.linalg.inv(precision)
    mu = sigma @ (torch.linalg.solve(cov, m) + a.T @ y.reshape(-1) / problem.sigma_y**2)
    return mu, d @ mu, torch.diagonal(d @ sigma @ d.T)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def operator_table(height: int, width: int) -> dict:
    g = torch.Generator().manual_seed(5)
    return {
        "sr-avg2": ops.AvgPoolSR(2),
        "sr-bicubic2": ops.BicubicSR(2),
        "blur-circular": ops.gaussian_blur(5, 1.0, "circular"),
        "blur-reflect": ops.gaussian_blur(5, 1.0, "reflect"),
        "motion": ops.motion_blur(5, 0.5, g),
        "box": ops.Inpainting(ops.box_mask(height, width, 2, 3, 4, 4)),
        "random": ops.Inpainting(ops.random_mask(height, width, 0.6, g)),
        "blur-then-sr": ops.AvgPoolSR(2) @ ops.gaussian_blur(3, 0.8),
        "identity": ops.Identity(),
    }


# ------------------------------------------------------------------------------------------------ prior


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 12, 10), (3, 5, 7)])
def test_prior_covariance_matches_the_dense_circulant(shape):
    prior = power_prior(shape)
    dense = dense_prior_covariance(prior)
    assert rel(prior.dense_covariance(), dense) < 1e-12
    assert torch.allclose(dense, dense.T, atol=1e-14)
    assert float(torch.linalg.eigvalsh(dense).min()) > 0
    # marginal (per-pixel) covariance is the colour covariance (or std^2), at every pixel
    c = shape[0]
    pixel = dense.view(c, shape[1] * shape[2], c, shape[1] * shape[2])
    expected = COLOUR if c == 3 else torch.full((1, 1), 0.25, dtype=torch.float64)
    for p in (0, 7, shape[1] * shape[2] - 1):
        assert torch.allclose(pixel[:, p, :, p], expected, atol=1e-12)
    assert torch.allclose(prior.pixel_variance(), torch.diagonal(expected), atol=1e-12)
    # power law: correlation decays with distance, neighbours positively correlated
    assert 0 < float(pixel[0, 0, 0, 1]) < float(pixel[0, 0, 0, 0])


def test_white_prior_is_independent_pixels():
    prior = white_prior((3, 4, 6))
    dense = prior.dense_covariance()
    assert prior.is_white
    assert not power_prior((3, 4, 6)).is_white
    assert torch.allclose(dense, torch.kron(COLOUR, torch.eye(24, dtype=torch.float64)), atol=1e-12)


def test_prior_samples_have_the_prior_moments():
    prior = power_prior((1, 4, 5))
    x = prior.sample(40000, torch.Generator().manual_seed(0)).reshape(40000, -1)
    cov = dense_prior_covariance(prior)
    assert float((x.mean(0) - prior.mean.reshape(-1)).abs().max()) < 4 * math.sqrt(0.25 / 40000) * 1.5
    # relative Frobenius error of a 20x20 sample covariance from N draws is about sqrt(2 / N) * (a few)
    assert rel(torch.cov(x.T), cov) < 0.03


def test_prior_checks_its_inputs():
    good = power_prior((1, 6, 6))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianImagePrior(0.0, torch.eye(1), good.spectrum + torch.rand(1, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="> 0"):
        GaussianImagePrior(0.0, torch.eye(1), torch.zeros(1, 6, 6))
    with pytest.raises(ValueError, match="orthogonal"):
        GaussianImagePrior(0.0, 2 * torch.eye(1), good.spectrum)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianImagePrior.white((2, 4, 4), colour_cov=torch.tensor([[1.0, 2.0], [2.0, 1.0]]))


# ------------------------------------------------------------------------------------------------ denoiser


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 12, 10), (4, 4, 4)])
def test_denoiser_is_the_gaussian_conditional_mean(shape):
    """``E[z0 | z_s]`` against the dense formula and against samplers.testing.GaussianMixture's implementation."""
    prior = power_prior(shape)
    cov = dense_prior_covariance(prior)
    m = prior.mean.reshape(-1)
    mixture = GaussianMixture.gaussian(m, cov)
    z = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    for s in (0.0, 0.1, 0.5, 0.93, 1.0):
        a = 1.0 - s
        dense = m + ((a * cov @ torch.linalg.inv(a * a * cov + s * s * eye)) @ (z.reshape(3, -1) - a * m).T).T
        ours = prior.denoise(z, s)
        assert rel(ours.reshape(3, -1), dense) < 1e-11, s
        assert rel(ours, mixture.denoise(z, s)) < 1e-9, s
    # one level per sample, and the dtype of z
    sigma = torch.tensor([0.2, 0.6, 0.9])
    per_sample = prior.denoise(z, sigma)
    for b in range(3):
        assert rel(per_sample[b], prior.denoise(z[b:b + 1], float(sigma[b]))[0]) < 1e-12
    assert prior.denoise(z.float(), sigma).dtype == torch.float32


def test_white_denoiser_is_the_scalar_gain():
    """Issue 17's white prior N(0, I): ``x0_hat = (1 - s) z / ((1 - s)^2 + s^2)``."""
    prior = GaussianImagePrior.white((3, 6, 6))
    z = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for s in (0.0, 0.3, 0.8, 1.0):
        assert torch.allclose(prior.denoise(z, s), (1 - s) * z / ((1 - s) ** 2 + s**2), atol=1e-14)


def test_denoiser_is_differentiable():
    """PSLD back-propagates through the denoiser: the gradient is the transposed gain (symmetric here)."""
    prior = power_prior((1, 6, 6))
    z = torch.randn(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    (grad,) = torch.autograd.grad((prior.denoise(z, 0.4) * v).sum(), z)
    gain = prior.denoise(v, 0.4) - prior.denoise(torch.zeros_like(v), 0.4)      # the linear part applied to v
    assert rel(grad, gain) < 1e-12


# ------------------------------------------------------------------------------------------------ decoder


def test_patch_decoder_is_an_isometry_up_to_gain():
    decoder = PatchDecoder(latent_channels=4, factor=2)
    d = dense_matrix(decoder.forward, (1, 4, 3, 5))                                # (3*6*10, 4*3*5)
    assert d.shape == (180, 60)
    assert torch.allclose(d.T @ d, decoder.gain**2 * torch.eye(60, dtype=torch.float64), atol=1e-12)
    x = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    assert torch.allclose(decoder.adjoint(x).reshape(2, -1), x.reshape(2, -1) @ d, atol=1e-12)
    z = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    assert torch.allclose(decoder.pinv(decoder.forward(z)), z, atol=1e-12)
    # every latent channel reaches every colour (the orthogonal mix is not a permutation)
    reach = decoder.weight.abs().sum((-2, -1))                                     # (Cz, C)
    assert bool((reach > 1e-3).all())
    default = PatchDecoder()
    assert default.image_shape((16, 4, 5)) == (3, 32, 40)
    with pytest.raises(ValueError, match="latent channels"):
        default.image_shape((4, 4, 5))


# ------------------------------------------------------------------------------------------------ posterior


CASES = [(shape, prior_kind, op_name) for shape in [(3, 8, 8)] for prior_kind in ("power", "white")
         for op_name in operator_table(8, 8)] + [((1, 12, 10), "power", name) for name in
                                                 ("sr-avg2", "sr-bicubic2", "blur-reflect", "box", "random")]


@pytest.mark.parametrize(("shape", "prior_kind", "op_name"), CASES)
def test_posterior_mean_and_std_against_dense(shape, prior_kind, op_name):
    prior = power_prior(shape) if prior_kind == "power" else white_prior(shape)
    op = operator_table(shape[1], shape[2])[op_name]
    problem = LinearGaussianProblem(prior, op, SIGMA_Y)
    obs = problem.simulate(torch.Generator().manual_seed(2))
    _, mean, var = dense_posterior(problem, obs.y)
    methods = ["cg", "dense"] + (["closed"] if problem.closed_form else [])
    for method in methods:
        got = problem.posterior_mean(obs.y, method=method)
        assert rel(problem.image(got).reshape(-1), mean) < (1e-8 if method == "cg" else 1e-11), method
    for method in ("dense", "closed") if problem.closed_form else ("dense",):
        std = problem.posterior_std(method=method)
        assert std.n_draws == 0
        assert std.rel_se == 0.0
        assert rel(std.std.reshape(-1), var.sqrt()) < 1e-10, method
    expected = {("white", "box"): "pixel", ("white", "random"): "pixel", ("white", "sr-avg2"): "block"}
    fourier = op_name in ("blur-circular", "identity")
    assert problem.closed_form == ("fourier" if fourier else expected.get((prior_kind, op_name)))


@pytest.mark.parametrize("op_name", ["sr-avg2", "box", "blur-reflect", "random", "blur-then-sr"])
def test_decoder_path_against_dense(op_name):
    prior = power_prior((4, 4, 4))
    decoder = PatchDecoder(latent_channels=4, factor=2)
    problem = LinearGaussianProblem(prior, operator_table(8, 8)[op_name], SIGMA_Y, decoder)
    assert problem.closed_form is None
    assert problem.image_shape == (3, 8, 8)
    obs = problem.simulate(torch.Generator().manual_seed(4))
    assert torch.allclose(obs.x, decoder.forward(obs.z))
    mu, mean, var = dense_posterior(problem, obs.y)
    for method in ("cg", "dense"):
        code = problem.posterior_mean(obs.y, method=method)
        assert rel(code.reshape(-1), mu) < (1e-8 if method == "cg" else 1e-11), method
        assert rel(problem.image(code).reshape(-1), mean) < 1e-8
    assert rel(problem.posterior_std(method="dense").std.reshape(-1), var.sqrt()) < 1e-10


def test_perturb_and_map_std_within_its_monte_carlo_error():
    """K draws around the exact mean: each pixel's variance estimate is chi^2_K / K times the truth, so the std's
    relative error has sd 1 / sqrt(2K) (the stated rel_se); the measured spread across pixels must match it."""
    prior = power_prior((1, 12, 10))
    op = ops.Inpainting(ops.box_mask(12, 10, 3, 2, 5, 6))
    problem = LinearGaussianProblem(prior, op, SIGMA_Y)
    _, _, var = dense_posterior(problem, problem.simulate(torch.Generator().manual_seed(0)).y)
    k = 400
    std = problem.posterior_std(method="cg", n_draws=k, generator=torch.Generator().manual_seed(9))
    assert std.method == "cg"
    assert std.n_draws == k
    assert std.draws.shape == (k, 1, 12, 10)
    assert std.rel_se == pytest.approx(1 / math.sqrt(2 * k))
    ratio = std.std.reshape(-1) / var.sqrt()
    assert float((ratio - 1).abs().max()) < 4.5 * std.rel_se            # 120 pixels, 4.5 sd: a fixed draw
    assert abs(float(ratio.mean()) - 1) < 3 * std.rel_se / math.sqrt(120) * 3   # correlated pixels: x3
    assert 0.7 < float(ratio.std()) / std.rel_se < 1.3
    # the draws are posterior deviations: their covariance is the posterior's (dense), not the prior's
    cov = torch.cov(problem.image(std.draws).reshape(k, -1).T, correction=0)
    assert float((cov.diagonal() / var - 1).abs().max()) < 4.5 * math.sqrt(2 / k)


@pytest.mark.parametrize(("prior_kind", "op_name"), [("power", "blur-circular"), ("white", "identity"),
                                                     ("white", "box"), ("white", "random"), ("white", "sr-avg4")])
def test_closed_forms_agree_with_cg(prior_kind, op_name):
    """At 3x32x32 (beyond the dense oracle): the closed forms against CG (mean) and perturb-and-MAP (std)."""
    shape = (3, 32, 32)
    prior = power_prior(shape) if prior_kind == "power" else white_prior(shape)
    table = operator_table(32, 32) | {"sr-avg4": ops.AvgPoolSR(4),
                                      "box": ops.Inpainting(ops.box_mask(32, 32, 8, 8, 16, 16))}
    problem = LinearGaussianProblem(prior, table[op_name], SIGMA_Y)
    assert problem.closed_form is not None
    y = problem.simulate(torch.Generator().manual_seed(1)).y
    closed = problem.posterior_mean(y, method="closed")
    assert rel(problem.posterior_mean(y, method="cg"), closed) < 1e-9
    exact = problem.posterior_std(method="closed").std
    mc = problem.posterior_std(method="cg", n_draws=64, generator=torch.Generator().manual_seed(3))
    ratio = (mc.std / exact).reshape(-1)
    assert abs(float(ratio.square().mean().sqrt()) - 1) < 0.02      # 3072 pixels: region RMS to ~1 %
    assert float((ratio - 1).abs().max()) < 5 * mc.rel_se


def test_posterior_is_exact_for_the_residual_identity():
    """docs: E||A x - y||^2 = sigma_y^2 m for the truth and for a posterior sample, sigma_y^4 tr(S^-1) for the
    mean (S = A C A^T + sigma_y^2 I), checked by dense algebra; and expected_residual says sigma_y sqrt(m)."""
    prior = power_prior((3, 8, 8))
    op = ops.AvgPoolSR(2) @ ops.gaussian_blur(3, 0.8)
    problem = LinearGaussianProblem(prior, op, SIGMA_Y)
    a = dense_matrix(op, (1, 3, 8, 8))
    cov = dense_prior_covariance(prior)
    m = a.shape[0]
    s = a @ cov @ a.T + SIGMA_Y**2 * torch.eye(m, dtype=torch.float64)
    sigma = torch.linalg.inv(torch.linalg.inv(cov) + a.T @ a / SIGMA_Y**2)
    mean_term = SIGMA_Y**4 * torch.trace(torch.linalg.inv(s))
    assert float(mean_term + torch.trace(a @ sigma @ a.T)) == pytest.approx(SIGMA_Y**2 * m, rel=1e-10)
    assert problem.measurement_size == m
    assert problem.expected_residual() == pytest.approx(SIGMA_Y * math.sqrt(m))
    # inpainting: the missing pixels are not measured (A x is 0 there), so they are not counted
    box = LinearGaussianProblem(prior, ops.Inpainting(ops.box_mask(8, 8, 2, 2, 4, 4)), SIGMA_Y)
    assert box.measurement_size == 3 * (64 - 16)


def test_measurement_draws_the_stated_noise():
    prior = GaussianImagePrior.white((3, 64, 64), std=0.5)
    problem = LinearGaussianProblem(prior, ops.AvgPoolSR(2), 0.1)
    obs = problem.simulate(torch.Generator().manual_seed(0))
    noise = obs.y - problem.observe(obs.z)
    assert obs.y.shape == (1, 3, 32, 32)
    assert obs.y.dtype == torch.float64
    assert float(noise.std()) == pytest.approx(0.1, rel=0.05)
    again = problem.simulate(torch.Generator().manual_seed(0))
    assert torch.equal(again.y, obs.y)
    assert torch.equal(again.z, obs.z)


# ------------------------------------------------------------------------------------------------ solver


def test_fourier_normal_diagonal_is_exact_where_stated():
    """diag(F A^T A F^*) from the dense matrices and the unitary 2-D DFT, for the operators it is exact for."""
    h, w = 8, 12
    fh = torch.fft.fft(torch.eye(h, dtype=torch.complex128), norm="ortho")
    fw = torch.fft.fft(torch.eye(w, dtype=torch.complex128), norm="ortho")
    dft = torch.kron(fh, fw)                                                        # row-major (kh, kw)
    g = torch.Generator().manual_seed(0)
    cases = {"avg": ops.AvgPoolSR(2), "bicubic": ops.BicubicSR(2), "circular": ops.gaussian_blur(5, 1.2, "circular"),
             "motion-circular": ops.Blur(ops.motion_kernel(5, 0.5, g), "circular"),
             "mask": ops.Inpainting(ops.random_mask(h, w, 0.4, g)), "identity": ops.Identity()}
    for name, op in cases.items():
        a = dense_matrix(op, (1, 1, h, w)).to(torch.complex128)
        exact = torch.diagonal(dft @ a.T @ a @ dft.conj().T).real.reshape(h, w)
        beta = torch.as_tensor(fourier_normal_diagonal(op, (1, h, w)), dtype=torch.float64).expand(h, w)
        assert rel(beta, exact) < 1e-12, name
    assert fourier_normal_diagonal(ops.Grayscale(), (3, h, w)) is None


def test_pcg_solves_batched_spd_systems():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    h = q @ torch.diag(torch.logspace(0, 4, 30, dtype=torch.float64)) @ q.T
    rhs = torch.randn(3, 30, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(h, rhs.T).T
    jacobi = 1 / torch.diagonal(h)
    for pre in (None, lambda r: r * jacobi):
        u, info = pcg(lambda v: v @ h, rhs, pre, tol=1e-12, max_iter=500)
        assert info.converged
        assert info.rel_residual <= 1e-12
        assert rel(u, exact) < 1e-8
    u, info = pcg(lambda v: v @ h, rhs, tol=1e-12, max_iter=3)
    assert not info.converged
    assert info.iterations == 3


def test_preconditioner_is_exact_where_the_problem_is():
    """One CG iteration where the preconditioner is the exact inverse: a circular blur in pixel space, SR x4 on
    the 8x patch decoder (shift-invariant on the latent grid), box inpainting of the white prior."""
    y_gen = torch.Generator().manual_seed(0)
    circ = LinearGaussianProblem(power_prior((3, 16, 16)), ops.gaussian_blur(5, 1.0, "circular"), SIGMA_Y)
    latent = LinearGaussianProblem(GaussianImagePrior.power_law((16, 4, 4), std=1.0, f0=0.08), ops.AvgPoolSR(4),
                                   SIGMA_Y, PatchDecoder())
    box = LinearGaussianProblem(white_prior((3, 16, 16)), ops.Inpainting(ops.box_mask(16, 16, 4, 4, 8, 8)), SIGMA_Y)
    for problem in (circ, latent, box):
        _, info = problem.posterior_mean_info(problem.simulate(y_gen).y, method="cg")
        assert info.iterations <= 2
        assert info.converged
    # and it is symmetric positive definite (CG's requirement) for a split (box) preconditioner
    power_box = LinearGaussianProblem(power_prior((1, 12, 10)), ops.Inpainting(ops.box_mask(12, 10, 3, 2, 5, 6)),
                                      SIGMA_Y)
    b = dense_matrix(lambda v: power_box.preconditioner(v), (1, 1, 12, 10))
    assert torch.allclose(b, b.T, atol=1e-12)
    assert float(torch.linalg.eigvalsh(b).min()) > 0


def test_methods_are_checked():
    problem = LinearGaussianProblem(power_prior((3, 8, 8)), ops.gaussian_blur(5, 1.0, "reflect"), SIGMA_Y)
    y = problem.simulate(torch.Generator().manual_seed(0)).y
    with pytest.raises(ValueError, match="no closed form"):
        problem.posterior_mean(y, method="closed")
    with pytest.raises(ValueError, match="method must be"):
        problem.posterior_std(method="svd")
    big = LinearGaussianProblem(GaussianImagePrior.white((3, 64, 64)), ops.Identity(), SIGMA_Y)
    assert big.prior.dim > DENSE_MAX
    with pytest.raises(ValueError, match="DENSE_MAX"):
        big.posterior_std(method="dense")
    with pytest.raises(ValueError, match="sigma_y"):
        LinearGaussianProblem(power_prior((3, 8, 8)), ops.Identity(), 0.0)
