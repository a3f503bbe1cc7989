"""The host's interrupt check runs before the dense SVDs and large matrices of the operators' builders."""

from __future__ import annotations

import pytest
import torch
from flowdps.operators import bicubic_matrices, paper_channel_scales, paper_gaussian_svd
from flowdps.operators.cache import clear_tensor_caches
from flowdps.operators.interrupt import check_interrupt, interrupt_check, set_interrupt_check


class HostInterruptError(Exception):
    pass


@pytest.fixture
def interrupt(monkeypatch):
    """A pending interrupt, and a record of the SVDs started (none may start)."""
    started = []

    def record(name):
        real = getattr(torch.linalg, name)

        def wrapped(*args, **kwargs):
            started.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, wrapped)

    record("svd")
    record("pinv")

    def pending() -> None:
        raise HostInterruptError("interrupted")

    clear_tensor_caches()
    previous = set_interrupt_check(pending)
    yield started
    set_interrupt_check(previous)
    clear_tensor_caches()


@pytest.mark.parametrize("build", [
    lambda: bicubic_matrices(96, 2),
    lambda: paper_gaussian_svd(97),
    lambda: paper_channel_scales(33, 35, 3),
])
def test_a_pending_interrupt_raises_before_any_svd(interrupt, build):
    with pytest.raises(HostInterruptError):
        build()
    assert interrupt == []


def test_the_check_runs_between_the_matrix_and_its_svd(monkeypatch):
    calls = []

    def second_call_interrupts() -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise HostInterruptError("interrupted after the matrix")

    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: pytest.fail("the SVD started"))
    clear_tensor_caches()
    previous = set_interrupt_check(second_call_interrupts)
    try:
        with pytest.raises(HostInterruptError, match="after the matrix"):
            paper_gaussian_svd(101)
    finally:
        set_interrupt_check(previous)
    assert calls == [0, 1]


def test_without_a_check_nothing_is_raised_and_the_builders_work():
    previous = set_interrupt_check(None)
    try:
        assert interrupt_check() is None
        check_interrupt()
        clear_tensor_caches()
        matrix, pinv = bicubic_matrices(16, 2)
        torch.testing.assert_close(matrix @ pinv, torch.eye(8, dtype=torch.float64))
    finally:
        set_interrupt_check(previous)


def test_a_check_must_be_callable():
    with pytest.raises(TypeError, match="check must be callable or None, got int"):
        set_interrupt_check(3)  # type: ignore[arg-type]
