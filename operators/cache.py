"""Module-level caches of derived matrices (bicubic downsampling, the paper blur's SVD), bounded in bytes.

An entry-count bound (``functools.lru_cache(maxsize=...)``) says nothing about memory: a few large image sizes
kept gigabytes alive. :func:`tensor_cache` keeps the least recently used results whose tensors together fit
``max_bytes`` and never keeps a result larger than that; :func:`clear_tensor_caches` empties every such cache.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar, cast

from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])

_CACHES: list[TensorCache] = []


def tensor_bytes(value: object) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or a tuple / list of them; anything else counts 0)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple | list):
        return sum(tensor_bytes(v) for v in value)
    return 0


class TensorCache:
    """A least-recently-used cache of a function's tensor results, at most ``max_bytes`` in total."""

    def __init__(self, function: Callable[..., Any], max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.function = function
        self.max_bytes = int(max_bytes)
        self.entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = (args, tuple(sorted(kwargs.items())))
        with self.lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
                return hit[0]
        value = self.function(*args, **kwargs)
        size = tensor_bytes(value)
        if size > self.max_bytes:
            return value
        with self.lock:
            if key not in self.entries:
                self.entries[key] = (value, size)
                self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self.entries.popitem(last=False)
                self.bytes -= dropped
        return value

    def cache_clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.bytes = 0


def tensor_cache(max_bytes: int) -> Callable[[F], F]:
    """Decorator: cache the function's tensor results in a :class:`TensorCache` of ``max_bytes``; the wrapper
    has ``cache_clear()`` and ``cache`` (the :class:`TensorCache`)."""

    def wrap(function: F) -> F:
        cache = TensorCache(function, max_bytes)
        _CACHES.append(cache)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return cache(*args, **kwargs)

        wrapper.cache_clear = cache.cache_clear  # type: ignore[attr-defined]
        wrapper.cache = cache  # type: ignore[attr-defined]
        return cast(F, wrapper)

    return wrap


def cached_tensor_bytes() -> int:
    """Bytes held by all :func:`tensor_cache` caches together."""
    return sum(cache.bytes for cache in _CACHES)


def clear_tensor_caches() -> int:
    """Empty every :func:`tensor_cache`; returns the bytes released from the caches."""
    released = 0
    for cache in _CACHES:
        released += cache.bytes
        cache.cache_clear()
    return released
