"""Box and random inpainting operators built from their parameters: nothing of the image's size exists until
the operator is first used, sizes are checked before that, and the results equal the eagerly built mask's."""

from __future__ import annotations

import time

import pytest
import torch
from flowdps.operators import Inpainting, box_mask, lazy_box_mask, lazy_random_mask, random_mask
from flowdps.operators import inpainting as inpainting_module

HUGE = 16384  # the nodes' widget maximum: an eager float32 mask is 1 GiB


def _tensor_bytes(obj: object) -> int:
    return sum(v.numel() * v.element_size() for v in vars(obj).values() if isinstance(v, torch.Tensor))


@pytest.fixture
def no_mask_builds(monkeypatch):
    """Fail the test if a full-size mask is built."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a mask was built with {args}")

    monkeypatch.setattr(inpainting_module, "box_mask", refuse)
    monkeypatch.setattr(inpainting_module, "random_mask", refuse)


@pytest.mark.parametrize("recipe", [
    lambda: lazy_box_mask(HUGE, HUGE, 100, 200, 300, 400),
    lambda: lazy_random_mask(HUGE, HUGE, 0.7, seed=3),
])
def test_constructing_a_huge_operator_is_instant_and_allocates_nothing(recipe, no_mask_builds):
    start = time.perf_counter()
    op = Inpainting.lazy(recipe())
    elapsed = time.perf_counter() - start
    assert elapsed < 0.1, f"constructing took {elapsed:.3f} s"
    assert not op.mask_built
    assert _tensor_bytes(op) == 0
    assert op.mask_size == (1, HUGE, HUGE)
    assert op.describe() == f"inpainting, mask {HUGE}x{HUGE}"
    assert op.output_shape((1, 3, HUGE, HUGE)) == (1, 3, HUGE, HUGE)


@pytest.mark.parametrize("recipe", [
    lambda: lazy_box_mask(HUGE, HUGE, 0, 0, 8, 8),
    lambda: lazy_random_mask(HUGE, HUGE, 0.5, seed=0),
])
def test_a_size_error_names_the_sizes_before_any_mask_is_built(recipe, no_mask_builds):
    op = Inpainting.lazy(recipe())
    with pytest.raises(ValueError, match=f"mask {HUGE}x{HUGE} does not match the image 8x12"):
        op.forward(torch.zeros(1, 3, 8, 12))
    with pytest.raises(ValueError, match=f"mask {HUGE}x{HUGE} does not match the image 8x12"):
        op.validate_input_shape((1, 3, 8, 12))
    assert not op.mask_built


def test_parameters_are_checked_when_the_recipe_is_made(no_mask_builds):
    with pytest.raises(ValueError, match="does not fit in the image 16x16"):
        lazy_box_mask(16, 16, 10, 0, 8, 8)
    with pytest.raises(ValueError, match=r"missing_ratio 1\.5 must be in"):
        lazy_random_mask(16, 16, 1.5, seed=0)
    with pytest.raises(TypeError, match="recipe must be a LazyMask"):
        Inpainting.lazy(torch.ones(1, 1, 4, 4))  # type: ignore[arg-type]


@pytest.mark.parametrize(("lazy", "eager"), [
    (lambda: lazy_box_mask(12, 10, 2, 3, 5, 4), lambda: box_mask(12, 10, 2, 3, 5, 4)),
    (lambda: lazy_random_mask(12, 10, 0.6, seed=5), lambda: random_mask(12, 10, 0.6,
                                                                        torch.Generator().manual_seed(5))),
    (lambda: lazy_random_mask(12, 10, 0.3, seed=9, batch=2),
     lambda: random_mask(12, 10, 0.3, torch.Generator().manual_seed(9), batch=2)),
])
def test_results_equal_the_eager_operators_bit_for_bit(lazy, eager):
    lazy_op, eager_op = Inpainting.lazy(lazy()), Inpainting(eager())
    x = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    assert not lazy_op.mask_built
    assert torch.equal(lazy_op.forward(x), eager_op.forward(x))
    assert lazy_op.mask_built
    assert torch.equal(lazy_op.mask, eager_op.mask)
    assert torch.equal(lazy_op.adjoint(x), eager_op.adjoint(x))
    assert torch.equal(lazy_op.pinv(x), eager_op.pinv(x))
    moved = lazy_op.materialize(dtype=torch.float64)
    assert torch.equal(moved.forward(x.double()), eager_op.forward(x.double()))


def test_the_mask_is_built_once_per_operator(monkeypatch):
    calls = []
    real = inpainting_module.box_mask

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(inpainting_module, "box_mask", counting)
    op = Inpainting.lazy(lazy_box_mask(6, 6, 1, 1, 2, 2))
    for _ in range(3):
        op.forward(torch.ones(1, 1, 6, 6))
    assert len(calls) == 1
