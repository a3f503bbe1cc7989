"""One PSLD step against the published update, computed by hand on linear models.

The "transformer" is linear, ``z0 = a(s) M z + b``, so its Jacobian ``a(s) M`` is known; the decoder ``D``,
the encoder ``E``, the operator ``A`` and ``P`` are matrices. With ``x = D z0``, ``r = A x - y`` and
``q = z0 - E (P y + x - P A x)``:

    grad_z = a M^T ( w_m D^T A^T r / ||r||  +  w_g (I - E D + E P A D)^T q / ||q|| )
    z' = z0 + s' (z1 - z0) - eta grad_z,        z1 = (z - (1 - s) z0) / s
"""

import pytest
import torch
from flowdps.samplers import (
    FlowChefConfig,
    PSLDConfig,
    PSLDTerms,
    Schedule,
    measurement_loss,
    psld_data_term,
    sample_flow_posterior,
)

D_LATENT, D_IMAGE, D_MEAS = 4, 6, 3


def matmul(m):
    """``x -> x @ m.T`` on (B, n) rows: the matrix ``m`` applied to every sample."""
    return lambda x: x @ m.T


def linear_problem(generator, batch=2):
    f64 = {"generator": generator, "dtype": torch.float64}
    return {
        "M": torch.randn(D_LATENT, D_LATENT, **f64),
        "b": torch.randn(D_LATENT, **f64),
        "D": torch.randn(D_IMAGE, D_LATENT, **f64),
        "E": torch.randn(D_LATENT, D_IMAGE, **f64),
        "A": torch.randn(D_MEAS, D_IMAGE, **f64),
        "y": torch.randn(batch, D_MEAS, **f64),
        "z": torch.randn(batch, D_LATENT, **f64),
    }


def sig(*levels):
    return torch.tensor(levels, dtype=torch.float64)


def alpha(sigma):
    return 1.0 - 0.5 * sigma


def linear_denoiser(m, b):
    return lambda z, sigma: alpha(sigma).reshape(-1, 1) * (z @ m.T) + b


def expected_step(p, proj, s, s_next, eta, w_m=1.0, w_g=0.1):
    M, b, D, E, A, y, z = (p[k] for k in "MbDEAyz")
    P = proj
    a = alpha(torch.tensor(s, dtype=torch.float64))
    z0 = a * z @ M.T + b
    x = z0 @ D.T
    r = x @ A.T - y
    q = z0 - (y @ P.T + x - x @ A.T @ P.T) @ E.T
    eye = torch.eye(D_LATENT, dtype=torch.float64)
    dm = (r / r.norm(dim=1, keepdim=True)) @ A @ D                     # rows of D^T A^T r/||r||
    dg = (q / q.norm(dim=1, keepdim=True)) @ (eye - E @ D + E @ P @ A @ D)
    grad = a * (w_m * dm + w_g * dg) @ M
    z1 = (z - (1 - s) * z0) / s
    return z0 + s_next * (z1 - z0) - eta * grad


@pytest.mark.parametrize("projection", ["adjoint", "pinv"])
def test_one_step_equals_the_published_update(generator, projection):
    p = linear_problem(generator)
    P = p["A"].T if projection == "adjoint" else torch.linalg.pinv(p["A"])
    term = psld_data_term(matmul(p["D"]), matmul(p["E"]), matmul(p["A"]), p["y"], project=matmul(P))
    s, s_next, eta = 0.8, 0.55, 0.3
    out = sample_flow_posterior(linear_denoiser(p["M"], p["b"]), p["z"], sig(s, s_next), term,
                                PSLDConfig(step_size=eta))
    torch.testing.assert_close(out, expected_step(p, P, s, s_next, eta))


def test_weights_are_the_config_fields(generator):
    p = linear_problem(generator)
    P = p["A"].T
    term = psld_data_term(matmul(p["D"]), matmul(p["E"]), matmul(p["A"]), p["y"], project=matmul(P))
    config = PSLDConfig(step_size=0.2, measurement_weight=0.7, gluing_weight=2.5)
    out = sample_flow_posterior(linear_denoiser(p["M"], p["b"]), p["z"], sig(0.6, 0.3), term, config)
    torch.testing.assert_close(out, expected_step(p, P, 0.6, 0.3, 0.2, w_m=0.7, w_g=2.5))
    assert PSLDConfig() == PSLDConfig(step_size=15.0, measurement_weight=1.0, gluing_weight=0.1)


def test_one_step_literal_numbers():
    # z = 1, s = 0.5: z0 = 0.5 z = 0.5; D = 2: x = 1; A = P = 1, y = 3: r = -2; E = 0.25: q = 0.5 - 0.75 = -0.25.
    # d/dz0 = 1.0 * (-1) * 2 + 0.1 * (-1) * (1 - 0.25 * (2 - 2)) = -2.1; grad_z = 0.5 * -2.1 = -1.05.
    # z1 = (1 - 0.5 * 0.5) / 0.5 = 1.5; z' = 0.5 + 0.25 * (1.5 - 0.5) + 0.1 * 1.05 = 0.855.
    one = torch.ones(1, 1, dtype=torch.float64)
    term = psld_data_term(lambda z: 2 * z, lambda x: 0.25 * x, lambda x: x, 3 * one, project=lambda v: v)
    out = sample_flow_posterior(lambda z, s: 0.5 * z, one, sig(0.5, 0.25), term,
                                PSLDConfig(step_size=0.1))
    torch.testing.assert_close(out, 0.855 * one)
    # last step (s' = 0): z' = z0 - eta * grad = 0.5 + 0.105
    out = sample_flow_posterior(lambda z, s: 0.5 * z, one, sig(0.5, 0.0), term,
                                PSLDConfig(step_size=0.1))
    torch.testing.assert_close(out, 0.605 * one)


def test_batch_entries_get_their_own_gradient(generator):
    p = linear_problem(generator, batch=3)
    P = p["A"].T
    denoise = linear_denoiser(p["M"], p["b"])
    together = sample_flow_posterior(
        denoise, p["z"], sig(0.9, 0.4),
        psld_data_term(matmul(p["D"]), matmul(p["E"]), matmul(p["A"]), p["y"], project=matmul(P)),
        PSLDConfig(step_size=0.5))
    for k in range(3):
        alone = sample_flow_posterior(
            denoise, p["z"][k:k + 1], sig(0.9, 0.4),
            psld_data_term(matmul(p["D"]), matmul(p["E"]), matmul(p["A"]), p["y"][k:k + 1], project=matmul(P)),
            PSLDConfig(step_size=0.5))
        torch.testing.assert_close(together[k:k + 1], alone)


def test_step_zero_is_euler_without_gradient(generator):
    """Step 0: the plain deterministic (Euler) step; the denoiser runs without autograd."""
    p = linear_problem(generator)
    grad_modes = []

    def denoise(z, sigma):
        grad_modes.append((torch.is_grad_enabled(), z.requires_grad))
        return linear_denoiser(p["M"], p["b"])(z, sigma)

    sigmas = torch.tensor([1.0, 0.7, 0.3, 0.0], dtype=torch.float64)
    term = psld_data_term(matmul(p["D"]), matmul(p["E"]), matmul(p["A"]), p["y"], project=matmul(p["A"].T))
    out = sample_flow_posterior(denoise, p["z"], sigmas, term, PSLDConfig(step_size=0.0))
    euler = sample_flow_posterior(linear_denoiser(p["M"], p["b"]), p["z"], sigmas, lambda u: torch.zeros(2),
                                  FlowChefConfig(step_size=0.0))
    torch.testing.assert_close(out, euler)
    assert grad_modes == [(False, False)] * 3
    # a schedule that reaches 0 differentiates the denoiser only where the step is nonzero
    grad_modes.clear()
    sample_flow_posterior(denoise, p["z"], sigmas, term, PSLDConfig(step_size=Schedule(1.0, 0.0)))
    assert grad_modes == [(True, True), (True, True), (False, False)]


def test_under_inference_mode_the_loop_differentiates_ordinary_weights(generator):
    """ComfyUI runs nodes under inference mode: the loop leaves it for the gradient. Weights made inside
    inference mode cannot be differentiated, which is why the nodes copy the diffusion model and the VAE."""
    p = linear_problem(generator)
    P = p["A"].T
    expected = expected_step(p, P, 0.8, 0.5, 0.3)
    with torch.inference_mode():
        term = psld_data_term(matmul(p["D"]), matmul(p["E"]), matmul(p["A"]), p["y"], project=matmul(P))
        out = sample_flow_posterior(linear_denoiser(p["M"], p["b"]), p["z"], sig(0.8, 0.5), term,
                                    PSLDConfig(step_size=0.3))
        torch.testing.assert_close(out, expected)
        inference_m = p["M"].clone()                                   # an inference tensor, like loaded weights
        assert inference_m.is_inference()
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            sample_flow_posterior(linear_denoiser(inference_m, p["b"]), p["z"], sig(0.8, 0.5), term,
                                  PSLDConfig(step_size=0.3))


def test_half_precision_latent_gets_a_float32_gradient(generator):
    p = linear_problem(generator)
    seen = []
    f32 = {k: v.float() for k, v in p.items()}

    def denoise(z, sigma):
        seen.append(z.dtype)
        return linear_denoiser(f32["M"], f32["b"])(z, sigma)

    term = psld_data_term(matmul(f32["D"]), matmul(f32["E"]), matmul(f32["A"]), f32["y"], project=matmul(f32["A"].T))
    out = sample_flow_posterior(denoise, p["z"].to(torch.bfloat16), sig(0.8, 0.5), term,
                                PSLDConfig(step_size=0.3))
    assert out.dtype == torch.bfloat16
    assert seen == [torch.float32]
    torch.testing.assert_close(out.double(), expected_step(p, p["A"].T, 0.8, 0.5, 0.3), atol=0.05, rtol=0.02)


def test_plain_loss_needs_zero_gluing_weight(generator):
    p = linear_problem(generator)
    denoise = linear_denoiser(p["M"], p["b"])
    plain = measurement_loss(matmul(p["D"]), matmul(p["A"]), p["y"])
    with pytest.raises(ValueError, match=r"gluing_weight=0.1 needs a data term that returns PSLDTerms"):
        sample_flow_posterior(denoise, p["z"], sig(0.8, 0.5), plain, PSLDConfig(step_size=0.3))
    out = sample_flow_posterior(denoise, p["z"], sig(0.8, 0.5), plain,
                                PSLDConfig(step_size=0.3, gluing_weight=0.0))
    torch.testing.assert_close(out, expected_step(p, p["A"].T, 0.8, 0.5, 0.3, w_g=0.0))


def test_terms_and_errors(generator):
    p = linear_problem(generator)
    term = psld_data_term(matmul(p["D"]), matmul(p["E"]), matmul(p["A"]), p["y"], project=matmul(p["A"].T))
    terms = term(p["z"])
    assert isinstance(terms, PSLDTerms)
    assert terms.measurement.shape == terms.gluing.shape == (2,)
    torch.testing.assert_close(terms.measurement, (p["z"] @ p["D"].T @ p["A"].T - p["y"]).norm(dim=1))
    bad_encoder = psld_data_term(matmul(p["D"]), lambda x: x[:, :3], matmul(p["A"]), p["y"],
                                 project=matmul(p["A"].T))
    with pytest.raises(ValueError, match=r"encoder maps the image \(2, 6\) to \(2, 3\), not to the latent shape "
                                         r"\(2, 4\)"):
        bad_encoder(p["z"])
    with pytest.raises(ValueError, match="z0 = denoise\\(z\\) carry its graph"):  # a denoiser that detaches
        sample_flow_posterior(lambda z, s: z.detach(), p["z"], sig(0.8, 0.5), term,
                              PSLDConfig(step_size=0.3))


@pytest.mark.parametrize(("field", "value"), [("step_size", -1.0), ("measurement_weight", float("nan")),
                                              ("gluing_weight", -0.1), ("gluing_weight", "0.1")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        PSLDConfig(**{field: value})
