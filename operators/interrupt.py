"""The host's interrupt check, consulted before expensive one-off builds (dense SVDs, large matrices).

A dense SVD or pseudo-inverse cannot stop half-way, so the builders (:func:`~.sr.bicubic_matrices`,
:func:`~.paper.paper_gaussian_svd`) call :func:`check_interrupt` just before each one: a pending interrupt
then raises the host's exception instead of starting seconds or minutes of work. This layer knows no host:
without a check installed, :func:`check_interrupt` does nothing; the ComfyUI nodes install ComfyUI's
(``comfy.model_management.throw_exception_if_processing_interrupted``) when ComfyUI loads the pack.
"""

from __future__ import annotations

from collections.abc import Callable

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
