"""Random-trajectory motion-blur kernels (our own implementation of the DPS/FlowDPS generator).

Written from a description of the procedure (the original ``motionblur`` code has
no licence and was not used): a camera-shake path made of many short steps whose directions wander more
as ``intensity`` grows, drawn on a supersampled canvas, smoothed, downsampled and normalised. The
distribution follows the description; the exact kernels of the paper cannot be reproduced (they came
from numpy's global RNG). All randomness comes from the given ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ParameterError, check_finite_float, check_odd_size

MOTION_KERNEL_SIZE = 61
"""FlowDPS's motion-blur kernel size (``Kernel(size=(61, 61))``)."""

MOTION_INTENSITY = 0.5
"""FlowDPS's motion-blur intensity."""

_SUPERSAMPLING = 2  # the path is drawn on a canvas twice the kernel size, then area-downsampled
_SPLAT_SPACING = 0.25  # canvas pixels between the points that rasterise the path
_CHUNK = 256  # steps drawn per batch while building the path


def _uniform(n: int, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=device, dtype=torch.float64).cpu()


def _triangular(u: Tensor, left: float, mode: float, right: float) -> Tensor:
    """Inverse CDF of the triangular distribution on [left, right] with the given mode."""
    width = right - left
    c = (mode - left) / width
    low = left + torch.sqrt(u * width * (mode - left))
    high = right - torch.sqrt((1 - u) * width * (right - mode))
    return torch.where(u < c, low, high)


def _path(size: int, intensity: float, generator: torch.Generator | None) -> Tensor:
    """Vertices (complex, canvas pixel units) of a random path centred on its centre of mass."""
    diagonal = math.sqrt(2.0) * _SUPERSAMPLING * size
    u = _uniform(2, generator)
    max_length = 0.75 * diagonal * (u[0] + u[1] * intensity**2)  # U(0, 1) + U(0, I^2)
    step_scale = (1.0 - intensity + 0.1) * diagonal
    # step lengths ~ step_scale * Beta(1, 30) (inverse CDF 1 - U^(1/30)), appended while the total is short
    chunks, total = [], torch.zeros((), dtype=torch.float64)
    while total < max_length:
        steps = step_scale * (1.0 - _uniform(_CHUNK, generator) ** (1.0 / 30.0))
        reached = ((total + steps.cumsum(0)) >= max_length).nonzero()
        if reached.numel():
            steps = steps[: int(reached[0]) + 1]
        chunks.append(steps)
        total = total + steps.sum()
    steps = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.float64)
    n = steps.numel()

    max_angle = float(_uniform(1, generator)[0]) * intensity * math.pi
    jitter = _uniform(21, generator).sort().values[1]  # Beta(2, 20): 2nd smallest of 21 uniforms
    first = (2.0 * _uniform(1, generator) - 1.0) * max_angle
    magnitudes = _triangular(_uniform(max(n - 1, 0), generator), 0.0, intensity * max_angle, max_angle + 0.1)
    flips = _uniform(max(n - 1, 0), generator) < jitter  # keep or flip the sign of the previous angle
    sign0 = 1.0 if float(first[0]) >= 0 else -1.0
    signs = sign0 * torch.where(flips, -1.0, 1.0).to(torch.float64).cumprod(0)
    angles = torch.cat([first, magnitudes * signs])[:n]

    increments = steps * torch.exp(1j * angles)
    vertices = torch.cat([torch.zeros(1, dtype=torch.complex128), increments.cumsum(0)])
    vertices = vertices - vertices.mean()
    rotation = float(_uniform(1, generator)[0]) * math.pi
    return vertices * complex(math.cos(rotation), math.sin(rotation))


def _points_along(vertices: Tensor) -> Tensor:
    """Points every ``_SPLAT_SPACING`` canvas pixels along the polyline (complex)."""
    lengths = (vertices[1:] - vertices[:-1]).abs()
    total = float(lengths.sum()) if lengths.numel() else 0.0
    if total == 0.0:
        return vertices[:1]
    arc = torch.cat([torch.zeros(1, dtype=torch.float64), lengths.cumsum(0)])
    t = torch.linspace(0.0, total, math.ceil(total / _SPLAT_SPACING) + 1, dtype=torch.float64)
    seg = (torch.searchsorted(arc, t, right=True) - 1).clamp(0, lengths.numel() - 1)
    frac = ((t - arc[seg]) / lengths[seg].clamp_min(1e-12)).clamp(0, 1)
    return vertices[seg] + frac * (vertices[seg + 1] - vertices[seg])


def _rasterise(points: Tensor, canvas: int, sigma: float) -> Tensor:
    """Bilinear splat of equal-weight points onto the canvas, then Gaussian smoothing (zero border)."""
    x, y = points.real - 0.5, points.imag - 0.5  # pixel centres at integer + 0.5
    x0, y0 = x.floor(), y.floor()
    image = torch.zeros(canvas * canvas, dtype=torch.float64)
    for dx in (0, 1):
        for dy in (0, 1):
            cx, cy = x0 + dx, y0 + dy
            w = (1 - (x - cx).abs()) * (1 - (y - cy).abs())
            inside = (cx >= 0) & (cx < canvas) & (cy >= 0) & (cy < canvas)
            index = (cy[inside] * canvas + cx[inside]).long()
            image.index_put_((index,), w[inside], accumulate=True)
    radius = math.ceil(3 * sigma)
    g = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    image = image.view(1, 1, canvas, canvas)
    image = F.conv2d(image, g.view(1, 1, -1, 1), padding=(radius, 0))
    return F.conv2d(image, g.view(1, 1, 1, -1), padding=(0, radius))[0, 0]


def motion_kernel(
    size: int = MOTION_KERNEL_SIZE,
    intensity: float = MOTION_INTENSITY,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """A random camera-shake kernel ``(size, size)``: non-negative, sums to 1, reproducible from ``generator``.

    size: odd >= 3 pixels (paper 61). intensity in [0, 1] (paper 0.5): 0 gives a (nearly) straight streak of
    random length and direction; towards 1 the path gets longer, made of shorter steps, and its direction
    wanders (up to a U-turn), giving curved, compact kernels. ``generator=None`` uses torch's global RNG.

    Procedure (on a canvas of ``2 size`` pixels, diagonal D):
      1. path length ``0.75 D (U(0,1) + U(0, I^2))``; steps of ``(1 - I + 0.1) D Beta(1, 30)`` appended while
         the total is below it;
      2. direction of each step: ``MAX = U(0, I pi)``, first ``U(-MAX, MAX)``, then magnitudes
         ``Triangular(0, I MAX, MAX + 0.1)`` keeping the previous sign, flipped with probability
         ``Beta(2, 20)`` (drawn once per kernel);
      3. vertices = cumulative sum of the steps, centred on their centre of mass, rotated by ``U(0, pi)``,
         placed at the canvas centre;
      4. drawn as a thin line (bilinear splats every 1/4 pixel), smoothed by a Gaussian of standard
         deviation ``max(1, int(0.01 D))`` widened for the line width ``int(D / 150)``, area-downsampled by
         2 and normalised. Parts of a long path that leave the canvas are cropped, as in the original; if
         nothing is left the path is re-centred on its arc-length midpoint.
    """
    size = check_odd_size(size, "motion kernel size")
    if size < 3:
        raise ParameterError("motion kernel size", f" {size} must be >= 3")
    intensity = check_finite_float(intensity, "intensity")
    if not 0.0 <= intensity <= 1.0:
        raise ValueError(f"intensity {intensity} must be in [0, 1]")

    canvas = _SUPERSAMPLING * size
    diagonal = math.sqrt(2.0) * canvas
    line_width = max(1, int(diagonal / 150))
    sigma = math.sqrt(max(1, int(0.01 * diagonal)) ** 2 + (line_width**2 - 1) / 12)
    with torch.inference_mode(False):
        vertices = _path(size, intensity, generator)
        points = _points_along(vertices)
        centre = complex(canvas / 2, canvas / 2)
        image = _rasterise(points + centre, canvas, sigma)
        if float(image.sum()) <= 0:  # the whole path left the canvas: centre its arc-length midpoint
            image = _rasterise(points - points[points.numel() // 2] + centre, canvas, sigma)
        kernel = F.avg_pool2d(image[None, None], _SUPERSAMPLING)[0, 0].clamp_min(0)
        return (kernel / kernel.sum()).to(dtype)
