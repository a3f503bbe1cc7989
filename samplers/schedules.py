"""Per-step schedules for sampler constants (data-consistency step size, blend weight, noise mixing).

The papers use constants. Later work (TriPS, arXiv 2605.26470) found that a data-consistency step that
decreases over the steps and a fresh-noise weight that decreases work better, so every such constant of a
sampler config accepts either a plain ``float`` (constant) or a :class:`Schedule` (linear ramp).

CFG schedules are not ours: the guidance scale belongs to ComfyUI's GUIDER (e.g. a CFG-schedule guider
node), which is applied inside the denoiser callable the sampler receives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .types import ConfigError

__all__ = ["Schedule", "resolve"]


@dataclass(frozen=True)
class Schedule:
    """A value per sampling step: constant ``start``, or a linear ramp from ``start`` to ``end``.

    ``at(i, n_steps)`` is ``start`` at the first step ``i = 0`` and ``end`` at the last step
    ``i = n_steps - 1``, linear in ``i`` in between (``end=None`` means constant). With one step it is
    ``start``. Example: ``Schedule(30.0, 5.0)`` decreases the step size from 30 to 5.
    """

    start: float
    """Value at the first step."""
    end: float | None = None
    """Value at the last step; ``None`` for a constant schedule."""

    def __post_init__(self) -> None:
        for name, value in (("start", self.start), ("end", self.end)):
            if value is not None and not math.isfinite(value):
                raise ConfigError(name, "must be finite", value, owner="Schedule")

    def at(self, i: int, n_steps: int) -> float:
        """Value at step ``i`` of ``n_steps`` (``0 <= i < n_steps``)."""
        if not 0 <= i < n_steps:
            raise ValueError(f"step {i} is outside 0..{n_steps - 1}")
        if self.end is None or n_steps == 1:
            return float(self.start)
        return float(self.start + (self.end - self.start) * i / (n_steps - 1))

    @property
    def bounds(self) -> tuple[float, float]:
        """(min, max) over the steps (a linear ramp takes its extremes at the ends)."""
        end = self.start if self.end is None else self.end
        return (min(self.start, end), max(self.start, end))


def resolve(value: float | Schedule, i: int, n_steps: int) -> float:
    """A constant or a :class:`Schedule` evaluated at step ``i`` of ``n_steps``."""
    return value.at(i, n_steps) if isinstance(value, Schedule) else float(value)


def _bounds(value: float | Schedule) -> tuple[float, float]:
    return value.bounds if isinstance(value, Schedule) else (float(value), float(value))


def check_range(name: str, value: float | Schedule, low: float, high: float = math.inf) -> None:
    """Raise :class:`ConfigError` naming ``name`` and ``value`` unless every step's value lies in [low, high]."""
    lo, hi = _bounds(value)
    if not (math.isfinite(lo) and math.isfinite(hi) and low <= lo and hi <= high):
        interval = f"[{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ConfigError(name, f"must be {interval} at every step", value)
