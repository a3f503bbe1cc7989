"""The host's interrupt check, consulted before and during expensive one-off builds (dense SVDs, large matrices).

The builders (:func:`~.sr.bicubic_matrices`, :func:`~.paper.paper_gaussian_svd`) call :func:`check_interrupt`
before each dense SVD or pseudo-inverse, so a pending interrupt raises the host's exception instead of starting
seconds or minutes of work. A LAPACK call cannot stop half-way, so the factorisation itself runs through
:func:`run_interruptible`: in a worker thread, while the caller polls the check every :data:`POLL_S` seconds
and raises as soon as an interrupt arrives. The abandoned factorisation finishes in the background (no thread
can be stopped from outside); a second request for the same result while it runs waits for that one instead
of starting another, so interrupting and queueing again costs no second SVD.

This layer knows no host: without a check installed, :func:`check_interrupt` does nothing and
:func:`run_interruptible` calls the function in the caller's thread; the ComfyUI nodes install ComfyUI's
(``comfy.model_management.throw_exception_if_processing_interrupted``) when ComfyUI loads the pack.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, TypeVar, cast

T = TypeVar("T")

POLL_S = 0.1
"""Seconds between two interrupt checks while :func:`run_interruptible` waits for its worker thread."""

InterruptCheck = Callable[[], None]
"""Returns when no interrupt is pending, raises the host's exception otherwise."""

_check: InterruptCheck | None = None


def set_interrupt_check(check: InterruptCheck | None) -> InterruptCheck | None:
    """Install ``check`` (``None``: none) for :func:`check_interrupt`; returns the one it replaces."""
    global _check
    if check is not None and not callable(check):
        raise TypeError(f"check must be callable or None, got {type(check).__name__}")
    previous, _check = _check, check
    return previous


def interrupt_check() -> InterruptCheck | None:
    """The installed check (``None`` when there is none)."""
    return _check


def check_interrupt() -> None:
    """Raise the host's exception if an interrupt is pending (nothing when no check is installed)."""
    if _check is not None:
        _check()


_pending: dict[Hashable, Future[Any]] = {}
_pending_lock = threading.Lock()


def _work(future: Future[T], function: Callable[..., T], args: tuple[Any, ...], key: Hashable | None) -> None:
    error: BaseException | None = None
    try:
        result = function(*args)
    except BaseException as raised:  # handed to the caller, which re-raises it
        error = raised
    if key is not None:  # no longer pending once the caller can see the outcome
        with _pending_lock:
            if _pending.get(key) is future:
                del _pending[key]
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def pending_builds() -> int:
    """How many :func:`run_interruptible` calls with a key are still running (abandoned ones included)."""
    with _pending_lock:
        return len(_pending)


def run_interruptible(function: Callable[..., T], *args: Any, key: Hashable | None = None,
                      poll_s: float = POLL_S) -> T:
    """``function(*args)``, returning early with the host's exception when an interrupt arrives meanwhile.

    With a check installed, ``function`` runs in a daemon thread (torch's linear algebra releases the GIL)
    and the caller runs :func:`check_interrupt` every ``poll_s`` seconds until it is done; an exception of
    ``function`` is raised in the caller. ``key`` (hashable, e.g. the builder's name and arguments) joins a
    run of the same key that is still going, including one an interrupt abandoned, instead of starting a
    second. Without a check, ``function(*args)`` runs in the caller's thread. ``function`` runs without the
    caller's thread-local torch state: it must set its own grad / inference mode where that matters.
    """
    if not poll_s > 0:
        raise ValueError(f"poll_s must be > 0, got {poll_s!r}")
    if _check is None:
        return function(*args)
    with _pending_lock:
        future = _pending.get(key) if key is not None else None
        if future is None:
            future = Future()
            future.set_running_or_notify_cancel()
            if key is not None:
                _pending[key] = future
            name = f"flowdps-build-{getattr(function, '__name__', 'function')}"
            threading.Thread(target=_work, args=(future, function, args, key), name=name, daemon=True).start()
    while True:
        try:
            return cast(T, future.result(timeout=poll_s))
        except TimeoutError:
            check_interrupt()
