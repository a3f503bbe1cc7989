"""SMC helpers (samplers/smc.py): normalisation, ESS, resampling, quarantine, evidence bookkeeping.

Statistical tests use fixed seeds and tolerances derived from the variance of the quantity tested (4 standard
errors), so they are deterministic and would fail for a biased scheme.
"""

import math

import pytest
import torch
from flowdps.samplers.smc import (
    effective_sample_size,
    multinomial_resample,
    normalize_log_weights,
    quarantine,
    resample,
    reweight,
    systematic_resample,
    uniform_log_weights,
    weights_from_log,
)

SCHEMES = {"systematic": systematic_resample, "multinomial": multinomial_resample}


pytestmark = pytest.mark.usefixtures("single_thread")


def random_log_weights(n, seed, scale=2.0):
    return scale * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_normalize_float64_logsumexp_zero_and_shift_invariant():
    logw = random_log_weights(50, 0).float()
    out = normalize_log_weights(logw)
    assert out.dtype == torch.float64
    assert abs(float(torch.logsumexp(out, 0))) < 1e-12
    for shift in (-1e4, 3.0, 1e6):                       # max-shifted: no overflow for huge constants
        torch.testing.assert_close(normalize_log_weights(logw.double() + shift), out, atol=1e-9, rtol=0)


def test_normalize_quarantines_non_finite_and_rejects_all_dead():
    out = normalize_log_weights(torch.tensor([0.0, math.nan, math.inf, -math.inf, 0.0]))
    assert out[1:4].tolist() == [-math.inf] * 3
    torch.testing.assert_close(out.exp(), torch.tensor([0.5, 0, 0, 0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        normalize_log_weights(torch.tensor([math.nan, -math.inf]))
    with pytest.raises(ValueError, match="1-D"):
        normalize_log_weights(torch.zeros(2, 2))


def test_ess_bounds():
    n = 8
    assert effective_sample_size(torch.zeros(n)) == pytest.approx(n)
    assert effective_sample_size(uniform_log_weights(n)) == pytest.approx(n)
    one_hot = torch.full((n,), -math.inf)
    one_hot[3] = 0.0
    assert effective_sample_size(one_hot) == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([0.0, -1e4, -1e4])) == pytest.approx(1.0)
    for seed in range(20):
        logw = random_log_weights(n, seed, scale=3.0)
        ess = effective_sample_size(logw)
        assert 1.0 <= ess <= n
        assert effective_sample_size(logw + 123.4) == pytest.approx(ess, rel=1e-12)
    # quarantined particles count as weight 0: two equal live particles
    assert effective_sample_size(torch.tensor([0.0, math.nan, 0.0, math.inf])) == pytest.approx(2.0)


def test_uniform_and_weights_from_log():
    logw = uniform_log_weights(5)
    assert logw.dtype == torch.float64
    torch.testing.assert_close(weights_from_log(logw), torch.full((5,), 0.2, dtype=torch.float64))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resampling_reproducible_with_a_seed(scheme):
    logw = random_log_weights(100, 1)
    a = SCHEMES[scheme](logw, torch.Generator().manual_seed(7))
    b = SCHEMES[scheme](logw, torch.Generator().manual_seed(7))
    c = SCHEMES[scheme](logw, torch.Generator().manual_seed(8))
    assert a.dtype == torch.int64
    assert a.shape == (100,)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(resample(logw, torch.Generator().manual_seed(7), scheme), a)
    with pytest.raises(ValueError, match="scheme"):
        resample(logw, torch.Generator(), "stratified")


def test_systematic_counts_are_floor_or_ceil():
    """Systematic resampling picks particle i floor(n w_i) or ceil(n w_i) times, and [.5, .25, .125, .125]
    gives [0, 0, 1, 2] or [0, 0, 1, 3]."""
    g = torch.Generator().manual_seed(0)
    for seed in range(20):
        logw = random_log_weights(30, seed)
        counts = torch.bincount(systematic_resample(logw, g), minlength=30).double()
        expected = 30 * weights_from_log(logw)
        assert ((counts >= expected.floor() - 1e-9) & (counts <= expected.ceil() + 1e-9)).all()
    w = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    seen = {tuple(systematic_resample(w, g).tolist()) for _ in range(50)}
    assert seen == {(0, 0, 1, 2), (0, 0, 1, 3)}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resampling_preserves_weighted_expectations(scheme):
    """E[count_i] = n w_i and E[mean f(resampled)] = sum w_i f_i, to within 4 standard errors.

    R = 4000 resampling rounds of P = 40 particles; each count's standard error is its sample standard
    deviation over the rounds / sqrt(R) (for multinomial also checked against the exact
    sqrt(n w (1 - w) / R)); the same for the resampled average of f.
    """
    n, rounds = 40, 4000
    logw = random_log_weights(n, 3, scale=1.5)
    w = weights_from_log(logw)
    f = torch.linspace(-2.0, 3.0, n, dtype=torch.float64) ** 2
    g = torch.Generator().manual_seed(11)
    idx = torch.stack([SCHEMES[scheme](logw, g) for _ in range(rounds)])           # (R, n)
    counts = torch.nn.functional.one_hot(idx, n).sum(1).double()                    # (R, n)
    se = counts.std(0) / math.sqrt(rounds)
    if scheme == "multinomial":
        torch.testing.assert_close(se, (n * w * (1 - w) / rounds).sqrt(), rtol=0.1, atol=1e-3)
    assert ((counts.mean(0) - n * w).abs() <= 4 * se + 1e-9).all()
    averages = f[idx].mean(1)                                                        # (R,)
    target = float(w @ f)
    assert abs(float(averages.mean()) - target) <= 4 * float(averages.std()) / math.sqrt(rounds)
    if scheme == "systematic":            # lower variance than multinomial: Var_w(f) / n
        assert float(averages.var()) < float(w @ (f - target) ** 2) / n


@pytest.mark.parametrize("scheme", SCHEMES)
def test_non_finite_particles_never_selected(scheme):
    n = 16
    bad = [0, 5, n - 1]                                  # first and last index too (edges of the cdf)
    logw = torch.zeros(n, dtype=torch.float64)
    logw[0], logw[5] = math.nan, math.inf
    particles = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    particles[n - 1, 1] = math.nan
    logw, clean = quarantine(logw, particles)
    assert logw[bad].tolist() == [-math.inf] * 3
    assert clean.isfinite().all()
    assert (clean[bad] == 0).all()
    torch.testing.assert_close(clean[1:5], particles[1:5])
    g = torch.Generator().manual_seed(1)
    for _ in range(500):
        idx = SCHEMES[scheme](logw, g)
        assert not set(idx.tolist()) & set(bad)
    # a single surviving particle takes every slot
    only = torch.full((n,), -math.inf, dtype=torch.float64)
    only[n - 2] = 0.0
    assert (SCHEMES[scheme](only, g) == n - 2).all()


def test_quarantine_leaves_finite_input_alone_and_checks_shapes():
    logw = torch.zeros(3)
    x = torch.ones(3, 2)
    new_logw, new_x = quarantine(logw, x)
    assert new_x is x
    assert new_logw.dtype == torch.float64
    with pytest.raises(ValueError, match="particles"):
        quarantine(torch.zeros(2), x)


def test_reweight_evidence_bookkeeping():
    """Sum of evidence increments = log of the average product of incremental weights (no resampling),
    and after resampling the increments still estimate the same normaliser (exact in expectation)."""
    n = 64
    a, b = random_log_weights(n, 4), random_log_weights(n, 5)
    logw, z1 = reweight(uniform_log_weights(n), a)
    logw, z2 = reweight(logw, b)
    assert abs(float(torch.logsumexp(logw, 0))) < 1e-12
    assert z1 + z2 == pytest.approx(float(torch.logsumexp(a + b, 0)) - math.log(n), abs=1e-12)
    torch.testing.assert_close(logw, normalize_log_weights(a + b))
    # constant increments change the evidence by the constant, not the weights
    logw2, z3 = reweight(logw, torch.full((n,), -2.5))
    assert z3 == pytest.approx(-2.5, abs=1e-12)
    torch.testing.assert_close(logw2, logw)
    # non-finite increments quarantine; all dead raises
    logw3, _ = reweight(logw, torch.tensor([math.nan] + [0.0] * (n - 1)))
    assert logw3[0] == -math.inf
    with pytest.raises(ValueError, match="non-finite"):
        reweight(logw, torch.full((n,), math.nan))


def test_evidence_is_unbiased_through_resampling():
    """Importance sampling of Z = E_{N(0,1)}[exp(-x^2/2)] = 1/sqrt(2) in two factors with a resampling in
    between: the average of exp(log Z_hat) over 2000 runs matches Z within 4 standard errors."""
    g = torch.Generator().manual_seed(2)
    runs, n = 2000, 32
    estimates = []
    for _ in range(runs):
        x = torch.randn(n, generator=g, dtype=torch.float64)
        logw, log_z = reweight(uniform_log_weights(n), -x**2 / 4)
        idx = systematic_resample(logw, g)
        x, logw = x[idx], uniform_log_weights(n)
        _, d = reweight(logw, -x**2 / 4)
        estimates.append(math.exp(log_z + d))
    est = torch.tensor(estimates, dtype=torch.float64)
    assert abs(float(est.mean()) - 1 / math.sqrt(2)) <= 4 * float(est.std()) / math.sqrt(runs)
