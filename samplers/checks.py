"""One check per rule for the samplers' settings (config fields and the arguments of the sampling functions).

Each check raises :class:`~.types.ConfigError` (a ``ValueError``) naming the field, its rule and the value,
``"<name> <rule>, got <value>"``, and returns the value narrowed to its type (so a caller's type checker knows
what passed). Numbers must be real numbers: a ``bool`` or a string is refused, not converted. The rule of a
measurement's noise level is :func:`check_sigma_y`.
"""

from __future__ import annotations

import math

from .types import ConfigError

__all__ = [
    "check_choice",
    "check_fraction",
    "check_integer",
    "check_non_negative",
    "check_optional_integer",
    "check_optional_positive",
    "check_positive",
    "check_sigma_y",
]


def _real(value: object) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value``, one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(name, f"must be one of {choices}", value)
    return value


def check_non_negative(name: str, value: object) -> float:
    """``value``, a finite number >= 0."""
    number = _real(value)
    if number is None or not (math.isfinite(number) and number >= 0):
        raise ConfigError(name, "must be finite and >= 0", value)
    return number


def check_positive(name: str, value: object) -> float:
    """``value``, a finite number > 0."""
    number = _real(value)
    if number is None or not (math.isfinite(number) and number > 0):
        raise ConfigError(name, "must be > 0", value)
    return number


def check_optional_positive(name: str, value: object) -> float | None:
    """``value``: ``None`` or a finite number > 0."""
    number = _real(value)
    if value is not None and (number is None or not (math.isfinite(number) and number > 0)):
        raise ConfigError(name, "must be None or > 0", value)
    return number


def check_fraction(name: str, value: object) -> float:
    """``value``, a number in [0, 1]."""
    number = _real(value)
    if number is None or not 0.0 <= number <= 1.0:
        raise ConfigError(name, "must lie in [0, 1]", value)
    return number


def check_integer(name: str, value: object, *, minimum: int) -> int:
    """``value``, an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}", value)
    return value


def check_optional_integer(name: str, value: object, *, minimum: int) -> int | None:
    """``value``: ``None`` or an integer >= ``minimum``."""
    return None if value is None else check_integer(name, value, minimum=minimum)


def check_sigma_y(sigma_y: object, needed_by: str) -> float:
    """The measurement noise std ``sigma_y``, a finite number > 0, which ``needed_by`` (the words of what
    needs it, e.g. ``"norm='squared'"``) divides by."""
    number = _real(sigma_y)
    if number is None or not (math.isfinite(number) and number > 0):
        raise ValueError(f"{needed_by} needs sigma_y > 0, got sigma_y={sigma_y!r}")
    return number
