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
    server = ComfyServer(work_dir=tmp_path_factory.mktemp("comfy_server"), test_nodes=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def write_photo(comfy):
    """``write_photo(name, side, seed, flip_y=False) -> name``: a synthetic test photo
    (``flowdps_dev.workflow_fixtures.write_test_photo``) written into ComfyUI's input folder, where LoadImage
    reads ``name``."""
    from flowdps_dev.workflow_fixtures import write_test_photo

    def write(name: str, side: int, seed: int, *, flip_y: bool = False) -> str:
        write_test_photo(comfy.input_dir / name, side, seed, flip_y=flip_y)
        return name

    return write


@pytest.fixture(scope="module")
def photo(request, write_photo) -> str:
    """The test module's photo, written once: the file ``PHOTO``, ``SIZE`` x ``SIZE`` pixels, from seed
    ``PHOTO_SEED`` (flipped vertically when ``PHOTO_FLIP_Y``), all constants of the test module."""
    module = request.module
    return write_photo(module.PHOTO, module.SIZE, module.PHOTO_SEED, flip_y=getattr(module, "PHOTO_FLIP_Y", False))


@pytest.fixture
def generator() -> torch.Generator:  # noqa: F821
    import torch

    return torch.Generator().manual_seed(0)


class ProgressProbe:
    """A ComfyUI progress hook (what the server installs) that records steps and can interrupt at one."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.values: list[tuple[int, int]] = []
        self.previews = 0
        self.interrupt_at = interrupt_at

    def __call__(self, value, total, preview, prompt_id=None, node_id=None):
        import comfy.model_management as mm

        self.values.append((value, total))
        self.previews += preview is not None
        if self.interrupt_at is not None and value >= self.interrupt_at:
            mm.interrupt_current_processing(True)


@pytest.fixture
def progress(comfy):
    """``progress(interrupt_at=None)`` installs a fresh :class:`ProgressProbe` as ComfyUI's global progress hook,
    with Latent2RGB previews on; both are restored afterwards."""
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    method = args.preview_method
    args.preview_method = LatentPreviewMethod.Latent2RGB

    def install(interrupt_at: int | None = None) -> ProgressProbe:
        probe = ProgressProbe(interrupt_at)
        comfy.utils.set_progress_bar_global_hook(probe)
        return probe

    yield install
    comfy.utils.set_progress_bar_global_hook(None)
    args.preview_method = method


@pytest.fixture(scope="session")
def tiny_families(comfy):
    """The other families' tiny models (SD3.5, Flux, SD1.5) and the test-only loader their graphs use."""
    from flowdps_dev import graphs, tiny_models

    models = comfy.models_dir
    missing = [p.unet for p in graphs.TINY_PRIORS.values()
               if models is None or not (models / "diffusion_models" / p.unet).is_file()]
    if missing:
        pytest.fail(f"tiny models {missing} are missing from {models}: run `make setup` (or "
                    f"`python -m flowdps_dev.tiny_models --out <models> --only-missing`)", pytrace=False)
    tiny_models.register_dev_nodes()
    return graphs.TINY_PRIORS
