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

import torch
from torch import Tensor

from .checks import check_integer, check_positive
from .types import ConfigError

__all__ = ["FLOWDPS_SHIFT", "FLOWDPS_T_END", "Schedule", "flowdps_sigmas", "flowdps_times", "resolve"]

FLOWDPS_SHIFT = 4.0
"""The official FlowDPS shift (SD3's own scheduler default is 3)."""

FLOWDPS_T_END = 3.0 * 0.001 / (1.0 + 2.0 * 0.001)
"""Last un-shifted time of the official grid (about 0.002994): the SD3 flow-matching scheduler spaces its
timesteps linearly from 1000 down to its smallest training level, the first of 1000 levels, 1/1000, shifted by
the checkpoint's configured shift 3 (``3 t / (1 + 2 t)``). The FlowDPS shift of 4 is applied afterwards, to
the whole grid."""


def flowdps_times(n_steps: int) -> Tensor:
    """The official grid's ``n_steps`` un-shifted times ``t``: linear from 1 to :data:`FLOWDPS_T_END` (float64)."""
    check_integer("steps", n_steps, minimum=1)
    return torch.linspace(1.0, FLOWDPS_T_END, n_steps, dtype=torch.float64)


def flowdps_sigmas(n_steps: int, shift: float = FLOWDPS_SHIFT, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """The official FlowDPS noise levels for ``n_steps`` model calls: ``(n_steps + 1,)`` from 1 down to 0.

    ``s = shift t / (1 + (shift - 1) t)`` on :func:`flowdps_times`, then a final 0. At 28 steps and shift 4 the
    last non-zero level is 0.01187 (ComfyUI's ``simple`` scheduler stops at 0.130, ``normal`` at 0.00399).
    """
    check_positive("shift", shift)
    t = flowdps_times(n_steps)
    s = shift * t / (1.0 + (shift - 1.0) * t)
    return torch.cat([s, s.new_zeros(1)]).to(dtype)


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
