"""Fixtures of the pure sampler tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def single_thread():
    """One intra-op thread for tests on tiny tensors: on a busy 2-core machine extra threads only add wake-up
    latency (two threads made each AFDPS step ~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
