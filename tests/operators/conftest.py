"""The shared operator catalogue: every operator the pack offers, at test sizes.

``CATALOGUE`` maps a name to a :class:`Case` (a factory plus the input shapes valid for it). Tests ask for
the argument ``case`` (one per catalogue entry), ``closed_case`` / ``pinv_case`` (the entries with a
closed-form pinv / with any pinv comparable to the dense one) or ``case_shape`` (one per entry and shape);
the ``pytest_generate_tests`` hook below parametrises them, so every new entry is covered by every test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from flowdps.operators import (
    AvgPoolSR,
    BicubicSR,
    Blur,
    Grayscale,
    Identity,
    Inpainting,
    LinearOperator,
    PaperGaussianBlur,
    box_mask,
    gaussian_blur,
    motion_blur,
    random_mask,
)
from flowdps.operators.basic import BT601_WEIGHTS


class Case(NamedTuple):
    factory: Callable[[], LinearOperator]
    shapes: tuple[tuple[int, int, int, int], ...]  # valid input shapes: odd, non-square, batch > 1
    dense_shape: tuple[int, int, int, int]  # tiny input shape for the dense-matrix oracle
    closed_form_pinv: bool  # pinv is exact (compared with torch.linalg.pinv)
    well_conditioned: bool = True  # CG pinv converges to the true pinv within the CG tolerance


def _asymmetric_kernel(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.rand(height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1


def _gauss(boundary: str) -> Callable[[], LinearOperator]:
    return lambda: gaussian_blur(5, 1.0, boundary)


CATALOGUE: dict[str, Case] = {
    "identity": Case(Identity, ((2, 3, 5, 7), (1, 1, 8, 8)), (1, 2, 3, 4), True),
    "grey_mean": Case(Grayscale, ((2, 3, 5, 7), (1, 3, 8, 6)), (1, 3, 3, 4), True),
    "grey_bt601": Case(lambda: Grayscale(BT601_WEIGHTS), ((2, 3, 5, 7),), (1, 3, 3, 4), True),
    "avgpool_x2": Case(lambda: AvgPoolSR(2), ((2, 3, 8, 6), (1, 1, 4, 10)), (1, 1, 6, 8), True),
    "avgpool_x3": Case(lambda: AvgPoolSR(3), ((2, 3, 9, 15), (1, 2, 3, 6)), (1, 2, 6, 9), True),
    "bicubic_x2": Case(lambda: BicubicSR(2), ((2, 3, 8, 6), (1, 1, 12, 4)), (1, 1, 8, 6), True),
    "bicubic_x3": Case(lambda: BicubicSR(3), ((2, 3, 9, 15), (1, 1, 3, 6)), (1, 1, 9, 6), True),
    "gauss_reflect": Case(_gauss("reflect"), ((2, 3, 7, 9), (1, 1, 5, 12)), (1, 1, 6, 7), False, False),
    "gauss_circular": Case(_gauss("circular"), ((2, 3, 7, 9), (1, 1, 5, 12)), (1, 1, 6, 7), True),
    "gauss_zero": Case(_gauss("zero"), ((2, 3, 7, 9), (1, 1, 5, 12)), (1, 1, 6, 7), False, False),
    "gauss_narrow_reflect": Case(
        lambda: gaussian_blur(3, 0.5, "reflect"), ((2, 2, 5, 7),), (1, 1, 5, 6), False
    ),
    "kernel_asym_reflect": Case(
        lambda: Blur(_asymmetric_kernel(3, 5, 1), "reflect"),
        ((2, 3, 7, 9), (1, 1, 3, 5)),
        (1, 1, 5, 6),
        False,
        False,
    ),
    "kernel_asym_circular": Case(
        lambda: Blur(_asymmetric_kernel(5, 3, 2), "circular"),
        ((2, 3, 7, 9), (1, 1, 5, 3)),
        (1, 1, 6, 5),
        True,
    ),
    "kernel_asym_zero": Case(
        lambda: Blur(_asymmetric_kernel(3, 3, 3), "zero"),
        ((2, 3, 7, 9), (1, 1, 3, 4)),
        (1, 1, 5, 6),
        False,
        False,
    ),
    "motion_reflect": Case(
        lambda: motion_blur(7, 0.5, torch.Generator().manual_seed(0)),
        ((2, 3, 9, 11),),
        (1, 1, 7, 8),
        False,
        False,
    ),
    "paper_gauss": Case(PaperGaussianBlur, ((2, 3, 7, 9), (1, 1, 12, 5)), (1, 3, 6, 7), True),
    "paper_gauss_k7": Case(lambda: PaperGaussianBlur(7, 1.0), ((2, 3, 7, 9), (1, 4, 6, 6)), (1, 3, 6, 7), True),
    "paper_gauss_grey": Case(lambda: PaperGaussianBlur(7, 1.0), ((2, 1, 8, 5),), (1, 1, 6, 7), True),
    "inpaint_box": Case(
        lambda: Inpainting(box_mask(7, 9, 2, 3, 3, 4)), ((2, 3, 7, 9), (1, 1, 7, 9)), (1, 2, 7, 9), True
    ),
    "inpaint_random_batch": Case(
        lambda: Inpainting(random_mask(6, 5, 0.4, torch.Generator().manual_seed(0), batch=2)),
        ((2, 3, 6, 5), (2, 1, 6, 5)),
        (2, 1, 6, 5),
        True,
    ),
    "blur_then_avgpool": Case(
        lambda: AvgPoolSR(2) @ gaussian_blur(3, 0.7, "reflect"),
        ((2, 3, 8, 6), (1, 1, 6, 10)),
        (1, 1, 6, 8),
        False,
    ),
    "grey_then_bicubic": Case(lambda: BicubicSR(2) @ Grayscale(), ((2, 3, 8, 6),), (1, 3, 4, 6), False),
    "mask_pool_blur": Case(
        lambda: Inpainting(box_mask(4, 3, 1, 1, 2, 1)) @ AvgPoolSR(2) @ gaussian_blur(3, 1.0, "circular"),
        ((2, 3, 8, 6),),
        (1, 1, 8, 6),
        False,  # singular (masked rows) but its non-zero singular values are well conditioned
    ),
}


@pytest.fixture(autouse=True)
def _single_thread():
    """Run operator tests on one intra-op thread (restored afterwards).

    The tensors here are tiny, so threads only add wake-up latency, and on a busy 2-core machine every
    multi-threaded FFT then waits a scheduler tick (measured: 8 ms instead of 0.02 ms per FFT; the suite
    took 80 s instead of 6 s while another test process was running).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# subsets of the catalogue, by argument name: every entry, closed-form pinvs, pinvs with a dense oracle
SUBSETS: dict[str, Callable[[Case], bool]] = {
    "case": lambda case: True,
    "closed_case": lambda case: case.closed_form_pinv,
    "pinv_case": lambda case: case.closed_form_pinv or case.well_conditioned,
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for argname, keep in SUBSETS.items():
        if argname in metafunc.fixturenames:
            names = [name for name, case in CATALOGUE.items() if keep(case)]
            metafunc.parametrize(argname, [CATALOGUE[name] for name in names], ids=names)
    if "case_shape" in metafunc.fixturenames:
        params = [(case, shape) for case in CATALOGUE.values() for shape in case.shapes]
        ids = [
            f"{name}-{'x'.join(map(str, shape))}" for name, case in CATALOGUE.items() for shape in case.shapes
        ]
        metafunc.parametrize("case_shape", params, ids=ids)
