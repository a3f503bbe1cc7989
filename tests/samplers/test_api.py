"""The public API: exports, and the usage example of the package docstring runs as written."""

import textwrap

import flowdps.samplers as samplers
import torch


def test_exports_exist():
    assert all(hasattr(samplers, name) for name in samplers.__all__)
    assert {"sample_flow_posterior", "FlowDPSConfig", "FlowChefConfig", "measurement_loss", "Schedule"} <= set(
        samplers.__all__)


def test_docstring_example_runs():
    lines = samplers.__doc__.split("::\n", 1)[1].splitlines()
    end = next(i for i, line in enumerate(lines) if line and not line.startswith(" "))
    namespace = {}
    exec(textwrap.dedent("\n".join(lines[:end])), namespace)
    x, y, forward = namespace["x"], namespace["y"], namespace["forward"]
    assert x.shape == (4, 3, 8, 8)
    assert x.isfinite().all()
    residual = torch.linalg.vector_norm((forward(x) - y).flatten(1), dim=1)
    assert (residual < 0.5 * torch.linalg.vector_norm(y)).all()
