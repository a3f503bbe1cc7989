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


def test_an_interrupt_during_the_paper_blur_stops_it_before_its_svd(comfy, svds, monkeypatch):
    import comfy.model_management as mm

    paper = comfy.pack_module("operators.paper")
    comfy.pack_module("operators.cache").clear_tensor_caches()
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(43, 39, 3, generator=g).numpy() * 255).astype(np.uint8)).save(comfy.input_dir / PHOTO)
    real_matrix = paper.paper_gaussian_matrix

    def interrupted_while_building(*args, **kwargs):  # /interrupt arrives while the matrix is built
        mm.interrupt_current_processing(True)
        return real_matrix(*args, **kwargs)

    monkeypatch.setattr(paper, "paper_gaussian_matrix", interrupted_while_building)
    graph = GraphBuilder()
    image = graph.add("LoadImage", "load", image=PHOTO).out()
    op = graph.add("FlowDPSOperatorPaperGaussianBlur", "op", kernel_size=61, sigma=3.0).out()
    sim = graph.add("FlowDPSSimulateMeasurement", "sim", image=image, operator=op, sigma_y=0.0, seed=0)
    graph.add("SaveImage", "save", images=sim.out(0), filename_prefix="interrupted_paper_blur")
    try:
        result = comfy.run(graph.build(), fresh=True)
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
