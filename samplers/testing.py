"""Exact test problems: a Gaussian-mixture prior with its closed-form rectified-flow denoiser and posterior.

For ``p0 = sum_k pi_k N(m_k, S_k)`` and ``z_s = (1 - s) z0 + s eps``:

    p_s = sum_k pi_k N((1 - s) m_k, C_k(s)),      C_k(s) = (1 - s)^2 S_k + s^2 I
    E[z0 | z_s = x] = sum_k w_k(x, s) (m_k + (1 - s) S_k C_k^{-1} (x - (1 - s) m_k)),  w_k ∝ pi_k N(x; ...)

and for ``y = A z0 + n``, ``n ~ N(0, sigma_y^2 I)`` the posterior is again a mixture:
``Sigma_k' = (S_k^{-1} + A^T A / sigma_y^2)^{-1}``, ``m_k' = Sigma_k' (S_k^{-1} m_k + A^T y / sigma_y^2)``,
``pi_k' ∝ pi_k N(y; A m_k, A S_k A^T + sigma_y^2 I)``. A single Gaussian is the case K = 1.

Used by the sampler tests (and usable by researchers); everything is computed in float64. The named problems
the tests share (d = 2 and d = 8) are read from ``tests/data/gmm_instances.json`` by :func:`gmm_instance`.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GMM_INSTANCES",
    "GMMInstance",
    "GaussianMixture",
    "gaussian_log_prob",
    "gmm_instance",
    "log_marginal_likelihood",
    "moment_errors",
    "shifted_sigmas",
    "sliced_wasserstein",
    "weighted_moment_errors",
]


def _f64(x: object) -> Tensor:
    """``x`` (a tensor, nested lists of numbers or a numpy array) as a float64 tensor."""
    return x.detach().to(torch.float64) if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)


def gaussian_log_prob(x: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    """``log N(x; mean, cov)`` for x: (N, d), mean: (K, d), cov: (K, d, d) -> (N, K)."""
    chol = torch.linalg.cholesky(cov)                                   # (K, d, d)
    precision = torch.cholesky_inverse(chol)
    delta = x[:, None, :] - mean[None]                                  # (N, K, d)
    quad = torch.einsum("nki,kij,nkj->nk", delta, precision, delta)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
    return -0.5 * (quad + logdet + x.shape[1] * math.log(2 * math.pi))


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """``sum_k weights[k] N(means[k], covs[k])`` in ``d`` dimensions (float64 tensors)."""

    weights: Tensor
    """(K,) mixture weights, summing to 1."""
    means: Tensor
    """(K, d) component means."""
    covs: Tensor
    """(K, d, d) component covariances (symmetric positive definite)."""

    @classmethod
    def from_lists(cls, weights: object, means: object, covs: object) -> GaussianMixture:
        """Build from nested lists / arrays (weights are normalised)."""
        w = _f64(weights)
        return cls(w / w.sum(), _f64(means), _f64(covs))

    @classmethod
    def gaussian(cls, mean: object, cov: object) -> GaussianMixture:
        """A single Gaussian ``N(mean, cov)``; mean: (d,), cov: (d, d)."""
        return cls(torch.ones(1, dtype=torch.float64), _f64(mean)[None], _f64(cov)[None])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        """(d,) mixture mean."""
        return self.weights @ self.means

    def cov(self) -> Tensor:
        """(d, d) mixture covariance ``sum_k pi_k (S_k + m_k m_k^T) - mu mu^T``."""
        mu = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None])
        return second - torch.outer(mu, mu)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """(n, d) exact draws."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        xi = torch.randn(n, self.dim, 1, generator=generator, dtype=torch.float64)
        draws: Tensor = self.means[k] + (torch.linalg.cholesky(self.covs)[k] @ xi).squeeze(-1)
        return draws

    def responsibilities(self, x: Tensor) -> Tensor:
        """(N, K) posterior component probabilities of points x: (N, d) under this mixture."""
        return torch.softmax(torch.log(self.weights) + gaussian_log_prob(x, self.means, self.covs), dim=1)

    def denoise(self, z: Tensor, sigma: Tensor | float) -> Tensor:
        """Exact ``E[z0 | z_s = z]``; z: (B, d, ...) flattening to (B, d); sigma: float or (B,) with one
        shared value (a sampler's step). Returns z's shape and dtype."""
        s = float(sigma.flatten()[0]) if isinstance(sigma, Tensor) else float(sigma)
        if isinstance(sigma, Tensor) and not bool((sigma == sigma.flatten()[0]).all()):
            raise ValueError("GaussianMixture.denoise needs one sigma for the whole batch")
        x = z.reshape(z.shape[0], -1).to(torch.float64)
        a = 1.0 - s
        eye = torch.eye(self.dim, dtype=torch.float64)
        c = a * a * self.covs + s * s * eye                                # (K, d, d)
        w = torch.softmax(torch.log(self.weights) + gaussian_log_prob(x, a * self.means, c), dim=1)
        delta = x[:, None, :] - a * self.means[None]                      # (N, K, d)
        gain = a * self.covs @ torch.linalg.inv(c)                         # (K, d, d)
        cond = self.means[None] + torch.einsum("kij,nkj->nki", gain, delta)
        return (w[..., None] * cond).sum(1).reshape(z.shape).to(z.dtype)

    def posterior(self, matrix: Tensor, y: Tensor, sigma_y: float) -> GaussianMixture:
        """Exact posterior mixture for ``y = A z0 + N(0, sigma_y^2 I)``; A = matrix: (m, d), y: (m,)."""
        a = _f64(matrix)
        y = _f64(y).reshape(-1)
        prec = torch.linalg.inv(self.covs)
        covs = torch.linalg.inv(prec + a.T @ a / sigma_y**2)
        rhs = (prec @ self.means.unsqueeze(-1)).squeeze(-1) + a.T @ y / sigma_y**2
        means = (covs @ rhs.unsqueeze(-1)).squeeze(-1)
        pred_cov = a @ self.covs @ a.T + sigma_y**2 * torch.eye(a.shape[0], dtype=torch.float64)
        logw = torch.log(self.weights) + gaussian_log_prob(y[None], self.means @ a.T, pred_cov)[0]
        return GaussianMixture(torch.softmax(logw, dim=0), means, covs)


def shifted_sigmas(n_steps: int, shift: float = 4.0, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """A shifted flow grid: ``t`` uniform from 1 to 0, ``s = shift t / (1 + (shift - 1) t)``.

    Returns (n_steps + 1,) ``dtype`` (default float64, exact for float64 runs; the samplers read the levels as
    Python floats, so float32 runs can use it too) from 1 down to 0; shift > 1 makes it dense near s = 1.
    It ends with a step from ``s = shift / (n_steps + shift - 1)`` straight to 0, unlike the official FlowDPS
    grid, which stops ``t`` at about 0.003 first (``flowdps_sigmas``).
    """
    t = torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).to(dtype)


def moment_errors(samples: Tensor, mean: Tensor, cov: Tensor) -> tuple[float, float]:
    """(||mean_hat - mean||_2, ||cov_hat - cov||_F / ||cov||_F) of samples (N, d) against exact moments."""
    x = samples.reshape(samples.shape[0], -1).to(torch.float64)
    return (float(torch.linalg.vector_norm(x.mean(0) - mean)),
            float(torch.linalg.matrix_norm(torch.cov(x.T) - cov) / torch.linalg.matrix_norm(cov)))


def weighted_moment_errors(samples: Tensor, weights: Tensor, mean: Tensor, cov: Tensor) -> tuple[float, float]:
    """Like :func:`moment_errors` for a weighted ensemble: samples (N, d), weights (N,) summing to 1.

    Uses the weighted mean and the weighted (biased, ``sum w (x - m)(x - m)^T``) covariance; zero-weight
    samples are ignored (they may hold any finite value)."""
    x = samples.reshape(samples.shape[0], -1).to(torch.float64)
    w = weights.to(torch.float64).reshape(-1)
    m = w @ x
    delta = x - m
    c = (w[:, None] * delta).T @ delta
    return (float(torch.linalg.vector_norm(m - mean)),
            float(torch.linalg.matrix_norm(c - cov) / torch.linalg.matrix_norm(cov)))


def sliced_wasserstein(a: Tensor, b: Tensor, *, n_projections: int = 256,
                       generator: torch.Generator) -> float:
    """Sliced 2-Wasserstein distance ``sqrt(mean_theta W2^2(theta.a, theta.b))`` between two equally sized
    sample sets a, b: (N, d), over ``n_projections`` random unit directions (sorted 1-D couplings)."""
    a = a.reshape(a.shape[0], -1).to(torch.float64)
    b = b.reshape(b.shape[0], -1).to(torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equally sized sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    theta = torch.randn(a.shape[1], n_projections, generator=generator, dtype=torch.float64)
    theta = theta / torch.linalg.vector_norm(theta, dim=0, keepdim=True)
    pa, _ = torch.sort(a @ theta, dim=0)
    pb, _ = torch.sort(b @ theta, dim=0)
    return float((pa - pb).square().mean().sqrt())


def log_marginal_likelihood(prior: GaussianMixture, matrix: Tensor, y: Tensor, sigma_y: float) -> float:
    """Exact ``log p(y) = log sum_k pi_k N(y; A m_k, A S_k A^T + sigma_y^2 I)`` for ``y = A z0 + noise``."""
    a = _f64(matrix)
    y = _f64(y).reshape(-1)
    pred_cov = a @ prior.covs @ a.T + sigma_y**2 * torch.eye(a.shape[0], dtype=torch.float64)
    logp = torch.log(prior.weights) + gaussian_log_prob(y[None], prior.means @ a.T, pred_cov)[0]
    return float(torch.logsumexp(logp, dim=0))


GMM_INSTANCES = Path(__file__).resolve().parents[1] / "tests" / "data" / "gmm_instances.json"
"""The data file of the named test problems (part of the repository, so a fresh clone has it)."""


class GMMInstance(NamedTuple):
    """An exact test problem: ``y = A z0 + N(0, sigma_y^2 I)`` with ``z0`` drawn from a Gaussian mixture."""

    prior: GaussianMixture
    """The prior of ``z0``, in ``d`` dimensions."""
    matrix: Tensor
    """(m, d) float64 ``A``."""
    y: Tensor
    """(1, m) float64 measurement."""
    sigma_y: float
    """Noise standard deviation."""


@functools.cache
def gmm_instance(name: str, path: Path = GMM_INSTANCES) -> GMMInstance:
    """The named problem (``"d2"``: 3 components in 2-D, ``A = [0, 1]``; ``"d8"``: 4 components in 8-D, A 3x8)
    from ``path``. Unpacks as ``prior, matrix, y, sigma_y``; loaded once per name (the tensors are shared, so
    do not modify them)."""
    problems = json.loads(Path(path).read_text())
    if name not in problems or name == "about":
        known = sorted(key for key in problems if key != "about")
        raise KeyError(f"no test problem {name!r} in {path}; known: {known}")
    p = problems[name]
    prior = GaussianMixture.from_lists(p["prior_pis"], p["prior_means"], p["prior_covs"])
    return GMMInstance(prior, _f64(p["A"]), _f64(p["y"]).reshape(1, -1), float(p["sigma_y"]))
