"""The data term of FlowDPS / FlowChef, built from plain callables (no operator classes needed).

``measurement_loss(decode, forward, y)`` returns ``data_loss(z0) -> (B,)``:

    x = decode(z0)                                   # (B, 3, H, W) image, or z0 itself in pixel space
    r = y - A(x)                   (project=None, "measurement" residual ||y - A x||)
    r = P(y) - P(A(x))             (project=P: A^+ for super-resolution, A^T for deblurring, as the paper)
    loss_b = ||r_b||_2                                        norm="paper"   (un-squared, official code)
    loss_b = ||r_b||_2^2 / (2 sigma_y^2)                      norm="squared" (Gaussian log-likelihood)

The norm is taken per sample ``b``, so batch entries are independent restorations. The official code takes
one norm over the whole batch tensor; for batch 1 (its only use) the two are identical. The gradient of the
paper norm is ``-J^T P^T r / ||r||``: its length does not shrink with the residual, which is why the paper's
step size (15) is a distance in latent space rather than a scale-free rate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .checks import check_sigma_y
from .types import DataLoss, TensorMap

__all__ = ["NORMS", "ImageLoss", "check_norm", "image_loss", "measurement_loss"]

NORMS = ("paper", "squared")

ImageLoss = Callable[[Tensor], Tensor]
"""``image_loss(x) -> (B,)``: the data term of a decoded image ``x: (B, 3, H, W)`` (see :func:`image_loss`)."""


def check_norm(norm: str, sigma_y: float | None) -> None:
    """Raise ValueError unless ``norm`` is one of :data:`NORMS` and, for ``"squared"``, ``sigma_y`` is > 0."""
    _norm_scale(norm, sigma_y)


def _norm_scale(norm: str, sigma_y: float | None) -> float:
    """The factor of the squared residual: ``1 / (2 sigma_y^2)`` for ``"squared"`` (which needs ``sigma_y > 0``),
    1 for ``"paper"`` (unused there: the norm is not squared)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "paper":
        return 1.0
    return 1.0 / (2.0 * check_sigma_y(sigma_y, "norm='squared'") ** 2)


def image_loss(forward: TensorMap, y: Tensor, *, project: TensorMap | None = None, norm: str = "paper",
               sigma_y: float | None = None) -> ImageLoss:
    """The data term of an image: ``x -> (B,)``, ``||P(y) - P(A x)||`` per sample (module docstring).

    Same arguments as :func:`measurement_loss` without the decoder; ``x: (B, ...)`` is the image ``A``
    applies to. :func:`measurement_loss` is ``image_loss(...)(decode(z0))``; PSLD (``samplers/psld.py``)
    calls it on an image it decodes once for two terms.
    """
    scale = _norm_scale(norm, sigma_y)
    if y.ndim < 1:
        raise ValueError(f"measurement must have a batch dimension, got shape {tuple(y.shape)}")
    with torch.inference_mode(False), torch.no_grad():
        y = y.detach().clone()
        target = project(y).detach().clone() if project is not None else y

    def loss(x: Tensor) -> Tensor:
        batch = x.shape[0]
        ax = forward(x)
        if ax.shape[0] != batch or y.shape[0] not in (1, batch) or y.shape[1:] != ax.shape[1:]:
            raise ValueError(f"measurement {tuple(y.shape)} does not match operator output {tuple(ax.shape)} "
                             f"for a batch of {batch} (the measurement batch must be 1 or {batch})")
        predicted = project(ax) if project is not None else ax
        r = (target.to(device=predicted.device, dtype=predicted.dtype) - predicted).reshape(batch, -1)
        if norm == "paper":
            length: Tensor = torch.linalg.vector_norm(r, dim=1)
            return length
        return r.square().sum(dim=1) * scale

    return loss


def measurement_loss(decode: TensorMap | None, forward: TensorMap, y: Tensor, *,
                     project: TensorMap | None = None, norm: str = "paper",
                     sigma_y: float | None = None) -> DataLoss:
    """Per-sample data term ``z0 -> (B,)`` for a measurement ``y = A(decode(z0)) + noise``.

    Args:
        decode: latent -> image, differentiable (a private decoder copy made outside inference mode, see
            ``nodes/decoder.py``); ``None`` for the identity (pixel-space problems).
        forward: the degradation ``A`` on decoded images, e.g. ``op.forward``.
        y: measurement ``(1 or B, ...)``, same trailing shape as ``A(x)``. It is copied once (outside
            inference mode), so a measurement made inside a ComfyUI node is safe in the gradient.
        project: residual space; ``None`` compares ``y`` and ``A x`` directly, otherwise ``P(y) - P(A x)``
            with ``P = op.pinv`` (the paper's choice for super-resolution) or ``op.adjoint`` (deblurring).
            Any tensors ``forward``/``project`` hold must be ordinary (non-inference) tensors.
        norm: ``"paper"`` (plain Euclidean norm of each sample's residual, the official default) or
            ``"squared"`` (``||r||^2 / (2 sigma_y^2)``, the Gaussian negative log-likelihood).
        sigma_y: measurement noise std on the scale of ``y``; required (> 0) for ``"squared"``, ignored by
            ``"paper"`` (which has no noise model).

    Returns:
        ``data_loss(z0: (B, ...)) -> (B,)``. It raises ``ValueError`` naming the shapes when ``A(x)`` and
        ``y`` do not match or ``y``'s batch is neither 1 nor B.
    """
    loss = image_loss(forward, y, project=project, norm=norm, sigma_y=sigma_y)

    def data_loss(z0: Tensor) -> Tensor:
        return loss(decode(z0) if decode is not None else z0)

    return data_loss
