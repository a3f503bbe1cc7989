"""The host's interrupt check runs before and during the dense SVDs and large matrices of the operators' builders."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from flowdps.operators import (
    bicubic_matrices,
    paper_channel_scales,
    paper_gaussian_matrix,
    paper_gaussian_svd,
)
from flowdps.operators.cache import clear_tensor_caches
from flowdps.operators.interrupt import (
    check_interrupt,
    interrupt_check,
    pending_builds,
    run_interruptible,
    set_interrupt_check,
)


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


class Flag:
    """A host interrupt flag: ``check`` raises once ``set()`` was called (and clears it, like ComfyUI's)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.set_at: float | None = None

    def set(self) -> None:
        self.set_at = time.monotonic()
        self.event.set()

    def check(self) -> None:
        if self.event.is_set():
            self.event.clear()
            raise HostInterruptError("interrupted")


@pytest.fixture
def flag():
    f = Flag()
    clear_tensor_caches()
    previous = set_interrupt_check(f.check)
    yield f
    set_interrupt_check(previous)
    clear_tensor_caches()


def blocking(release: threading.Event, calls: list, value=None):
    """A stand-in for a long LAPACK call: blocks (GIL released) until ``release`` is set, at most 60 s."""

    def run(*args):
        calls.append(threading.current_thread())
        if not release.wait(60):
            raise AssertionError("never released")
        return value if value is not None else args

    return run


def test_an_interrupt_during_a_long_call_raises_within_a_poll_and_the_call_finishes_in_the_background(flag):
    release, calls = threading.Event(), []
    threading.Timer(0.3, flag.set).start()
    with pytest.raises(HostInterruptError):
        run_interruptible(blocking(release, calls), 1, key=("test", "long"))
    latency = time.monotonic() - flag.set_at
    assert latency < 1.0, f"the interrupt took {latency:.2f} s to reach the caller"
    assert calls
    assert calls[0] is not threading.current_thread()
    assert pending_builds() == 1  # still running, abandoned
    release.set()
    deadline = time.monotonic() + 10
    while pending_builds() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pending_builds() == 0


def test_a_second_request_for_the_same_key_joins_the_abandoned_run(flag):
    release, calls = threading.Event(), []
    function = blocking(release, calls, value="result")
    threading.Timer(0.2, flag.set).start()
    with pytest.raises(HostInterruptError):
        run_interruptible(function, key=("test", "join"))
    threading.Timer(0.2, release.set).start()
    assert run_interruptible(function, key=("test", "join")) == "result"
    assert len(calls) == 1
    assert run_interruptible(function, key=("test", "other")) == "result"  # another key: its own run
    assert len(calls) == 2


def test_the_functions_exception_reaches_the_caller(flag):
    def fails():
        raise torch.linalg.LinAlgError("did not converge")

    with pytest.raises(torch.linalg.LinAlgError, match="did not converge"):
        run_interruptible(fails, key=("test", "fails"))
    assert pending_builds() == 0


def test_without_a_check_the_function_runs_in_the_callers_thread():
    previous = set_interrupt_check(None)
    try:
        assert run_interruptible(lambda: threading.current_thread()) is threading.current_thread()
    finally:
        set_interrupt_check(previous)
    with pytest.raises(ValueError, match="poll_s must be > 0, got 0"):
        run_interruptible(lambda: None, poll_s=0)


@pytest.mark.parametrize(("name", "build"), [
    ("svd", lambda: paper_gaussian_svd(89, threshold=0.0)),
    ("pinv", lambda: bicubic_matrices(90, 3)),
])
def test_the_builders_dense_factorisations_are_interruptible(flag, monkeypatch, name, build):
    release, calls = threading.Event(), []
    real = getattr(torch.linalg, name)
    slow = blocking(release, calls)
    monkeypatch.setattr(torch.linalg, name, lambda matrix: (slow(), real(matrix))[1])
    threading.Timer(0.3, flag.set).start()
    try:
        with pytest.raises(HostInterruptError):
            build()
        assert time.monotonic() - flag.set_at < 1.0
        assert len(calls) == 1
        assert calls[0] is not threading.current_thread()
    finally:
        release.set()
    result = build()  # joins the abandoned factorisation, which now finishes: no second one
    assert len(calls) == 1
    if name == "svd":
        u, s, v = result
        torch.testing.assert_close(u @ torch.diag(s) @ v.T, paper_gaussian_matrix(89), atol=1e-12, rtol=0)
    else:
        matrix, pinv = result
        torch.testing.assert_close(matrix @ pinv, torch.eye(30, dtype=torch.float64), atol=1e-12, rtol=0)
