"""Inpainting masks: the keep rule (1 = known), helpers, batching and the projection property."""

from __future__ import annotations

import pytest
import torch
from flowdps.operators import Inpainting, box_mask, fit_mask, random_mask


def test_keep_rule_zeroes_missing_pixels():
    mask = box_mask(4, 5, 1, 2, 2, 3)
    assert mask.shape == (1, 1, 4, 5)
    assert float(mask.sum()) == 20 - 6
    assert float(mask[0, 0, 1:3, 2:5].sum()) == 0
    x = torch.rand(2, 3, 4, 5) + 1
    y = Inpainting(mask).forward(x)
    assert y.shape == x.shape
    assert torch.equal(y[..., 1:3, 2:5], torch.zeros(2, 3, 2, 3))
    assert torch.equal(y[..., 0, :], x[..., 0, :])


def test_soft_masks_are_binarised_at_one_half():
    op = Inpainting(torch.tensor([[0.2, 0.5, 0.7]]))
    assert op.mask.tolist() == [[[[0.0, 1.0, 1.0]]]]


def test_random_mask_ratio_and_seed():
    a = random_mask(10, 12, 0.3, torch.Generator().manual_seed(0), batch=3)
    b = random_mask(10, 12, 0.3, torch.Generator().manual_seed(0), batch=3)
    c = random_mask(10, 12, 0.3, torch.Generator().manual_seed(1), batch=3)
    assert a.shape == (3, 1, 10, 12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a == 0).flatten(1).sum(1).tolist() == [36, 36, 36]
    assert not torch.equal(a[0], a[1])


def test_per_sample_masks_and_broadcast():
    masks = random_mask(5, 6, 0.5, torch.Generator().manual_seed(2), batch=2)
    op = Inpainting(masks)
    x = torch.ones(2, 3, 5, 6)
    y = op.forward(x)
    assert torch.equal(y[0], masks[0].expand(3, 5, 6))
    assert torch.equal(y[1], masks[1].expand(3, 5, 6))
    with pytest.raises(ValueError, match="mask batch 2 does not match the image batch 3"):
        op.forward(torch.ones(3, 3, 5, 6))


def test_fit_mask_validates_or_resizes():
    mask = torch.ones(1, 8, 8)
    mask[:, :4] = 0
    assert fit_mask(mask, 8, 8).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="mask 8x8 does not match the image 4x6"):
        fit_mask(mask, 4, 6)
    resized = fit_mask(mask, 4, 6, resize=True)
    assert resized.shape == (1, 1, 4, 6)
    assert Inpainting(resized).mask[0, 0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
