"""Shared fixtures.

The pack is imported under the package name ``flowdps`` (its root ``__init__.py`` with the repository as
package path), never as top-level ``nodes`` / ``samplers``: ComfyUI has its own ``nodes`` module and puts
``comfy/`` (with ``samplers.py``) first on ``sys.path``. The repository root is *appended* to ``sys.path``
for the development tooling (``flowdps_dev``).

ComfyUI tests (marker ``comfy``) use the tree named by ``COMFYUI_PATH`` (``make test`` sets it). Without it
they are skipped, except when ``FLOWDPS_REQUIRE_COMFY=1`` (``make test``, CI), where a missing ComfyUI is
an error: CI must never pass by skipping them.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


importlib.import_module("flowdps_dev.pack").import_pack("flowdps")

REQUIRE_COMFY = os.environ.get("FLOWDPS_REQUIRE_COMFY") == "1"


def _comfy_unavailable(reason: str) -> None:
    if REQUIRE_COMFY:
        pytest.fail(f"ComfyUI is required (FLOWDPS_REQUIRE_COMFY=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"ComfyUI unavailable: {reason}")


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI imported in this process with only our pack loaded (see flowdps_dev.comfy_env)."""
    from flowdps_dev import comfy_env

    try:
        return comfy_env.start(work_dir=tmp_path_factory.mktemp("comfy_inprocess"))
    except comfy_env.ComfyNotFoundError as e:
        _comfy_unavailable(str(e))


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """ComfyUI's real server (main.py --cpu) on a free loopback port, stopped after the session."""
    from flowdps_dev import comfy_env
    from flowdps_dev.server import ComfyServer

    try:
        comfy_env.resolve_comfy_path()
    except comfy_env.ComfyNotFoundError as e:
        _comfy_unavailable(str(e))
    server = ComfyServer(work_dir=tmp_path_factory.mktemp("comfy_server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def generator() -> torch.Generator:  # noqa: F821
    import torch

    return torch.Generator().manual_seed(0)
