"""Drop the operators' cached matrices when ComfyUI frees memory.

ComfyUI frees memory through ``comfy.model_management.unload_all_models``: on the ``/free`` route (the
"Unload models" and "Free model and node cache" buttons; ``main.py`` calls it between prompts when the route
set its flags), after an out-of-memory error, and after each prompt with ``--disable-smart-memory``. It has
no event for this, so :func:`install` wraps that one function: the wrapper calls ComfyUI's function, then
empties the byte-bounded caches of ``operators/cache.py`` (bicubic matrices, the paper blur's SVD). The
wrapper is installed once per copy of the pack when ComfyUI loads it (``FlowDPSExtension``), never when
``operators`` is imported, and :func:`uninstall` puts ComfyUI's function back.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import comfy.model_management as mm

from ..operators.cache import cached_tensor_bytes, clear_tensor_caches

logger = logging.getLogger(__name__)

_ORIGINAL = "_flowdps_original"
_CLEAR = "_flowdps_clear"


def _chain(function: Callable[..., Any] | None) -> list[Callable[..., Any]]:
    """``function`` and the functions it wraps through this module's wrappers (outermost first)."""
    chain = []
    while function is not None:
        chain.append(function)
        function = getattr(function, _ORIGINAL, None)
    return chain


def installed() -> bool:
    """Whether this copy of the pack's wrapper is in ``comfy.model_management.unload_all_models``."""
    return any(getattr(f, _CLEAR, None) is clear_tensor_caches for f in _chain(mm.unload_all_models))


def _drop_caches() -> None:
    released = clear_tensor_caches()
    if released:
        logger.info("FlowDPS: ComfyUI freed memory; dropped %d bytes (%.1f MiB) of cached operator matrices, "
                    "%d bytes cached now", released, released / 2**20, cached_tensor_bytes())


def install() -> bool:
    """Wrap ``comfy.model_management.unload_all_models`` so that it also empties the operators' caches;
    returns False (and changes nothing) when this copy's wrapper is there already."""
    if installed():
        return False
    original = mm.unload_all_models

    @functools.wraps(original)
    def unload_all_models(*args: Any, **kwargs: Any) -> Any:
        try:  # the function it wraps is read at each call, so uninstall() may unlink an inner wrapper
            return getattr(unload_all_models, _ORIGINAL)(*args, **kwargs)
        finally:
            _drop_caches()

    setattr(unload_all_models, _ORIGINAL, original)
    setattr(unload_all_models, _CLEAR, clear_tensor_caches)
    mm.unload_all_models = unload_all_models
    return True


def uninstall() -> bool:
    """Remove this copy's wrapper (wherever it sits in a chain of such wrappers); returns whether it was there."""
    chain = _chain(mm.unload_all_models)
    for i, function in enumerate(chain):
        if getattr(function, _CLEAR, None) is clear_tensor_caches:
            inner = getattr(function, _ORIGINAL)
            if i == 0:
                mm.unload_all_models = inner
            else:
                setattr(chain[i - 1], _ORIGINAL, inner)
            return True
    return False
