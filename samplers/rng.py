"""Where the samplers' randomness comes from when the caller gives no ``torch.Generator``.

Every sampler takes ``generator=``; with one, a run is a pure function of its inputs and the generator's
state. With ``generator=None`` a run behaves like ``torch.randn``: it takes one 63-bit seed from torch's
global random number generator (so ``torch.manual_seed(s)`` beforehand reproduces it, and two calls in a
row give two different draws) and uses a private generator seeded with it on ``z``'s device. The global
generator is advanced by that one draw and by nothing else.
"""

from __future__ import annotations

import torch

__all__ = ["generator_or_default", "seed_from_global_rng"]


def seed_from_global_rng() -> int:
    """One seed in ``[0, 2^63 - 1)`` drawn from torch's global (CPU) generator."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def generator_or_default(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """``generator`` itself, or a new generator on ``device`` seeded by :func:`seed_from_global_rng`."""
    if generator is not None:
        return generator
    return torch.Generator(device=device).manual_seed(seed_from_global_rng())
