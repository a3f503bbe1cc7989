"""measurement_loss: residual spaces, norms, batching and shape validation."""

import pytest
import torch
import torch.nn.functional as F
from flowdps.samplers import data_gradient, measurement_loss


def pool(x):
    return F.avg_pool2d(x, 2)


def upsample(y):                                     # A^+ of the 2x2 average pool (A A^T = I / 4)
    return F.interpolate(y, scale_factor=2, mode="nearest")


def test_norms_and_residual_spaces(generator):
    x = torch.randn(2, 3, 6, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(2, 3, 3, 2, generator=generator, dtype=torch.float64)
    r = (y - pool(x)).flatten(1)
    paper = measurement_loss(None, pool, y)(x)
    torch.testing.assert_close(paper, r.norm(dim=1))
    torch.testing.assert_close(measurement_loss(None, pool, y, sigma_y=0.0)(x), paper)   # ignored by "paper"
    squared = measurement_loss(None, pool, y, norm="squared", sigma_y=0.5)(x)
    torch.testing.assert_close(squared, r.square().sum(1) / (2 * 0.25))
    # pinv residual ||A^+ y - A^+ A x||: nearest upsampling copies each value 4 times, so it is 2 ||y - A x||
    projected = measurement_loss(None, pool, y, project=upsample)(x)
    torch.testing.assert_close(projected, 2 * r.norm(dim=1))


def test_decoder_is_applied(generator):
    decoder = torch.nn.Conv2d(5, 3, 3, padding=1)
    z0 = torch.randn(2, 5, 4, 6, generator=generator)
    y = torch.randn(1, 3, 2, 3, generator=generator)
    with torch.no_grad():
        expected = (y - pool(decoder(z0))).flatten(1).norm(dim=1)
    torch.testing.assert_close(measurement_loss(decoder, pool, y)(z0), expected)


def test_measurement_batch_one_is_shared(generator):
    x = torch.randn(3, 2, 4, 4, generator=generator)
    y = torch.randn(1, 2, 2, 2, generator=generator)
    together = measurement_loss(None, pool, y, project=upsample)(x)
    alone = torch.cat([measurement_loss(None, pool, y, project=upsample)(x[b:b + 1]) for b in range(3)])
    torch.testing.assert_close(together, alone)


@pytest.mark.parametrize(("y_shape", "x_shape", "match"), [
    ((1, 3, 4, 4), (2, 3, 4, 4), r"measurement \(1, 3, 4, 4\) does not match operator output \(2, 3, 2, 2\)"),
    ((3, 3, 2, 2), (2, 3, 4, 4), r"measurement \(3, 3, 2, 2\).*batch must be 1 or 2"),
])
def test_shape_errors(y_shape, x_shape, match):
    loss = measurement_loss(None, pool, torch.zeros(y_shape))
    with pytest.raises(ValueError, match=match):
        loss(torch.zeros(x_shape))


def test_paper_norm_gradient_at_zero_residual_is_zero(generator):
    x = torch.randn(2, 3, 4, 4, generator=generator)
    loss = measurement_loss(None, pool, pool(x))
    g = data_gradient(x, loss)
    assert torch.equal(g, torch.zeros_like(g))


def test_measurement_is_copied(generator):
    y = torch.zeros(1, 4)
    loss = measurement_loss(None, lambda x: x, y)
    y += 1.0                                           # later changes to the caller's tensor do not leak in
    assert loss(torch.zeros(2, 4)).eq(0).all()
