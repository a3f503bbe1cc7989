"""What one FlowDPS data-consistency gradient costs in each residual space of a composed operator.

Run: ``.venv/bin/python benchmarks/residual_gradient_cost.py [--size 128] [--repeats 5]``; writes
``benchmarks/results/residual_gradient_cost.md``. Numbers, not assertions.

The operator is the "realistic camera" of the Compose node: a Gaussian blur (61 px, sigma 3, reflect boundary),
then SR x2 by average pooling. Its pseudo-inverse has no closed form, so the residual 'pinv' runs conjugate
gradients (``LinearOperator.pinv_cg``, up to ``CG_MAX_ITER`` iterations) inside the loss, and autograd goes back
through every iteration; 'auto' is the adjoint for a composition (``Composed.auto_residual``). Pixel space (the
decoder is the identity), so the numbers are the operator's share of a gradient, which a VAE decoder adds to.
One gradient = ``samplers.data_gradient`` of ``measurement_loss`` (the paper norm) at a random image, the call
FlowDPS makes K = 3 times per step; the median of ``--repeats`` timed calls after one warm-up call is reported.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import UTC, datetime

import torch
from operator_accuracy import write_result  # the benchmark next to this one


def import_pack():
    from operator_accuracy import import_pack as _operators

    _operators()
    import flowdps.operators as ops
    import flowdps.samplers as samplers

    return ops, samplers


def time_gradient(samplers, op, residual: str, x: torch.Tensor, y: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of one data-consistency gradient, and the gradient's norm (to see it is not zero)."""
    project = {"adjoint": op.adjoint, "pinv": op.pinv, "measurement": None}[residual]
    loss = samplers.measurement_loss(None, op.forward, y, project=project)
    grad = samplers.data_gradient(x, loss)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        grad = samplers.data_gradient(x, loss)
        times.append(time.perf_counter() - start)
    return statistics.median(times), float(torch.linalg.vector_norm(grad))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ops, samplers = import_pack()
    op = ops.Composed(outer=ops.AvgPoolSR(2), inner=ops.gaussian_blur(61, 3.0, "reflect"))
    g = torch.Generator().manual_seed(0)
    x_true = torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1
    y = op.forward(x_true) + 0.03 * torch.randn(op.output_shape(x_true.shape), generator=g)
    x = torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1
    lines = [
        "# One FlowDPS data-consistency gradient: Gaussian blur 61/3 (reflect), then SR x2 (average pool)",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {args.size} px RGB, pixel space (no decoder), "
        f"median of {args.repeats} after a warm-up. auto = {op.auto_residual}.",
        "",
        "| residual | seconds per gradient | gradient norm |",
        "| --- | --- | --- |",
    ]
    results = {}
    for residual in ("adjoint", "measurement", "pinv"):
        seconds, norm = time_gradient(samplers, op, residual, x, y, args.repeats)
        results[residual] = seconds
        label = f"{residual} (= auto)" if residual == op.auto_residual else residual
        lines.append(f"| {label} | {seconds:.4f} | {norm:.4g} |")
    lines += ["", f"pinv / adjoint: {results['pinv'] / results['adjoint']:.0f}x"]
    write_result("residual_gradient_cost", lines)


if __name__ == "__main__":
    main()
