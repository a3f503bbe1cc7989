"""ComfyUI's interrupt stops the operators' dense SVDs before they start (through the real executor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flowdps_dev.graphs import GraphBuilder

pytestmark = pytest.mark.comfy

PHOTO = "flowdps_operator_interrupt_photo.png"  # an odd size no other test caches the matrices of


@pytest.fixture
def svds(monkeypatch):
    """Records every dense SVD / pseudo-inverse started; clears the pack's caches so that none is a cache hit."""
    started = []
    for name in ("svd", "pinv"):
        real = getattr(torch.linalg, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            started.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, wrapped)
    return started


def paper_blur_graph(comfy, seed: int, height: int, width: int, prefix: str) -> dict:
    """LoadImage (a random ``height x width`` photo) -> paper-compatible Gaussian blur -> simulated measurement
    -> SaveImage; a fresh photo size keeps the blur's matrices out of every cache."""
    g = torch.Generator().manual_seed(seed)
    photo = (torch.rand(height, width, 3, generator=g).numpy() * 255).astype(np.uint8)
    Image.fromarray(photo).save(comfy.input_dir / PHOTO)
    graph = GraphBuilder()
    image = graph.add("LoadImage", "load", image=PHOTO).out()
    op = graph.add("FlowDPSOperatorPaperGaussianBlur", "op", kernel_size=61, sigma=3.0).out()
    sim = graph.add("FlowDPSSimulateMeasurement", "sim", image=image, operator=op, sigma_y=0.0, seed=0)
    graph.add("SaveImage", "save", images=sim.out(0), filename_prefix=prefix)
    return graph.build()


def test_an_interrupt_during_the_paper_blur_stops_it_before_its_svd(comfy, svds, monkeypatch):
    import comfy.model_management as mm

    paper = comfy.pack_module("operators.paper")
    comfy.pack_module("operators.cache").clear_tensor_caches()
    real_matrix = paper.paper_gaussian_matrix

    def interrupted_while_building(*args, **kwargs):  # /interrupt arrives while the matrix is built
        mm.interrupt_current_processing(True)
        return real_matrix(*args, **kwargs)

    monkeypatch.setattr(paper, "paper_gaussian_matrix", interrupted_while_building)
    graph = paper_blur_graph(comfy, 0, 43, 39, "interrupted_paper_blur")
    try:
        result = comfy.run(graph, fresh=True)
    finally:
        mm.interrupt_current_processing(False)
    assert not result.success
    assert result.error.exception_type.endswith("InterruptProcessingException"), str(result.error)
    assert svds == []


def test_a_pending_interrupt_stops_a_large_bicubic_matrix_before_its_pseudo_inverse(comfy, svds):
    import comfy.model_management as mm

    sr = comfy.pack_module("operators.sr")
    comfy.pack_module("operators.cache").clear_tensor_caches()
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sr.bicubic_matrices(4096, 1)
    finally:
        mm.interrupt_current_processing(False)
    assert svds == []


def test_an_interrupt_during_the_paper_blurs_svd_ends_the_run_within_a_second(comfy, monkeypatch):
    """/interrupt arrives while the dense SVD runs (a LAPACK call cannot stop): the prompt still ends within
    about a second, and the abandoned SVD, finished in the background, serves the next run."""
    import threading
    import time

    import comfy.model_management as mm

    comfy.pack_module("operators.cache").clear_tensor_caches()
    release, started, interrupted_at = threading.Event(), [], []
    real_svd = torch.linalg.svd

    def slow_svd(matrix, *args, **kwargs):  # a long factorisation, interrupted 0.3 s after it starts
        started.append(threading.current_thread().name)

        def interrupt():
            interrupted_at.append(time.monotonic())
            mm.interrupt_current_processing(True)

        threading.Timer(0.3, interrupt).start()
        if not release.wait(60):
            raise AssertionError("never released")
        return real_svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", slow_svd)
    graph = paper_blur_graph(comfy, 1, 47, 41, "interrupted_paper_svd")
    try:
        result = comfy.run(graph, fresh=True)
        ended = time.monotonic()
    finally:
        mm.interrupt_current_processing(False)
        release.set()
    assert not result.success
    assert result.error.exception_type.endswith("InterruptProcessingException"), str(result.error)
    assert len(started) == 1
    assert started[0].startswith("flowdps-build-")
    assert ended - interrupted_at[0] < 1.0, f"the run ended {ended - interrupted_at[0]:.2f} s after /interrupt"
    monkeypatch.setattr(torch.linalg, "svd", real_svd)
    assert comfy.run(graph, fresh=True).success
