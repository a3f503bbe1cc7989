"""The linear-operator abstraction: ``y = A x`` on batched images, its adjoint and pseudo-inverse.

Every operator acts on ``x: (B, C, H, W)``, a float tensor (any floating dtype, any device) holding images in
[-1, 1] (the VAE's pixel range), and returns ``y = A x`` of shape :meth:`LinearOperator.output_shape`. The
operators are exact linear maps: ``adjoint`` is the true transpose (``<A x, y> = <x, A^T y>``), not an
approximation, and ``pinv`` is the Moore-Penrose pseudo-inverse, in closed form where one exists and
otherwise by conjugate gradients on the normal equations (:meth:`LinearOperator.pinv_cg`, tolerance
:data:`CG_TOL`, at most :data:`CG_MAX_ITER` iterations). Autograd differentiates the CG pseudo-inverse
implicitly, as the linear map ``A^+`` it solves for (one more CG solve per backward pass), never through the
solver's iterations.

Operators are immutable frozen dataclasses. Their small parameter tensors (kernels, masks) are moved to the
device and dtype of the input at call time. Operators built inside ComfyUI nodes run under
``torch.inference_mode()``, so their tensors are inference tensors, which autograd refuses to save for
backward; :meth:`LinearOperator.materialize` returns a copy with plain cloned tensors for gradient use.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

CG_TOL = 1e-6
"""Default stopping rule of the CG pseudo-inverse: relative residual of the normal equations,
``||A^T (y - A x_k)|| <= CG_TOL * ||A^T y||``, per sample. This resolves roughly the components whose
singular value is above ``sqrt(CG_TOL) = 1e-3`` times the largest one (the cut of :data:`FFT_PINV_RTOL`)."""

CG_MAX_ITER = 200
"""Default iteration cap of the CG pseudo-inverse; the last iterate is returned if it is reached (for
ill-conditioned blurs this early stop acts as a regulariser)."""

Shape = tuple[int, int, int, int]

UNKNOWN_ATOL = 1e-6
"""``|A (|A^T 1|)|`` below this marks a measurement pixel that carries no information
(:meth:`LinearOperator.unknown_measurement_mask`)."""

RESIDUAL_SPACES = ("pinv", "adjoint", "measurement")
"""Where a data term compares a measurement ``y`` with ``A x``: ``P y`` against ``P A x`` with ``P = A^+``
(``"pinv"``) or ``P = A^T`` (``"adjoint"``), or ``y`` against ``A x`` itself (``"measurement"``)."""


def check_image_shape(shape: Sequence[int], name: str = "x") -> Shape:
    """Return ``shape`` as a tuple after checking it is a non-empty ``(B, C, H, W)`` image-batch shape."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"{name} must be an image batch (B, C, H, W), got shape {shape}")
    if min(shape) < 1:
        raise ValueError(f"{name} has an empty dimension: shape {shape}")
    return shape


def check_image_tensor(t: Tensor, name: str = "x") -> Shape:
    """Check that ``t`` is a floating-point ``(B, C, H, W)`` tensor; return its shape."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return check_image_shape(t.shape, name)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in: float32/float64 as given, float32 for half precisions (FFT, CG)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class ParameterError(ValueError):
    """An operator parameter breaks its rule. The message is ``field + rest`` (``"kernel size 4 is even; ..."``);
    :meth:`message` puts another name in place of the field, so that a caller that fed the parameter from an
    input of another name (a node's ``kernel_size`` widget) can say the rule with that name."""

    def __init__(self, field: str, rest: str) -> None:
        self.field, self.rest = field, rest
        super().__init__(field + rest)

    def message(self, name: str) -> str:
        """The error's text with ``name`` in place of the field."""
        return name + self.rest


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an int >= 1, or raise :class:`ParameterError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(value.__index__())  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            raise ParameterError(name, f" must be an integer, got {value!r}") from None
    if value < 1:
        raise ParameterError(name, f" must be >= 1, got {value}")
    return value


def check_odd_size(value: object, name: str) -> int:
    """Return ``value`` as an odd int >= 1 (a kernel size: a centre pixel), or raise :class:`ParameterError`."""
    size = check_positive_int(value, name)
    if size % 2 == 0:
        raise ParameterError(name, f" {size} is even; blur kernels need odd sizes (a centre pixel), e.g. {size + 1}")
    return size


def check_finite_float(value: object, name: str) -> float:
    """Return ``value`` as a finite float, or raise :class:`ParameterError` naming it."""
    try:
        value = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ParameterError(name, f" must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ParameterError(name, f" must be finite, got {value}")
    return value


def describe_size(shape: Sequence[int], like: Sequence[int] | None = None) -> str:
    """``"HxW"`` of a ``(B, C, H, W)`` shape, with its channels when they differ from ``like``'s."""
    size = f"{shape[2]}x{shape[3]}"
    if like is not None and shape[1] != like[1]:
        size += f" with {shape[1]} channel{'s' if shape[1] != 1 else ''}"
    return size


def _batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner products of two ``(B, ...)`` tensors, shaped ``(B, 1, ..., 1)`` for broadcasting."""
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.dim() - 1)))


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], rhs: Tensor, *, tol: float = CG_TOL, max_iter: int = CG_MAX_ITER,
    interrupt: Callable[[], None] | None = None,
) -> Tensor:
    """Solve ``M u = rhs`` for a symmetric positive semi-definite ``M`` by batched conjugate gradients.

    rhs: (B, ...); each sample is an independent system (own step sizes, own stopping). Starts from
    ``u = 0`` and stops a sample when ``||r|| <= tol * ||rhs||``; after ``max_iter`` iterations the current
    iterate is returned. From ``u = 0`` and for ``rhs`` in the range of ``M`` the iterates stay in that
    range, so the limit is the minimum-norm solution. ``interrupt`` is called before every iteration and may
    raise to stop the solve (ComfyUI's Cancel button, passed in by the nodes).
    """
    u = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = _batch_dot(r, r)
    stop = (tol**2) * rs
    for _ in range(max_iter):
        if interrupt is not None:
            interrupt()
        active = rs > stop
        if not bool(active.any()):
            break
        mp = matvec(p)
        pmp = _batch_dot(p, mp)
        ok = active & (pmp > 0)
        alpha = torch.where(ok, rs / torch.where(ok, pmp, torch.ones_like(pmp)), torch.zeros_like(pmp))
        u = u + alpha * p
        r = r - alpha * mp
        rs_new = _batch_dot(r, r)
        beta = torch.where(ok, rs_new / torch.where(ok, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = r + beta * p
        rs = torch.where(ok, rs_new, rs)
    else:
        logger.debug("conjugate_gradient stopped at max_iter=%d before reaching tol=%g", max_iter, tol)
    return u


def _pinv_solve(op: LinearOperator, y: Tensor, tol: float, max_iter: int,
                interrupt: Callable[[], None] | None = None) -> Tensor:
    """``A^+ y``: CG on ``A^T A x = A^T y`` from 0 (in float32 at least, returned in y's dtype)."""
    yw = y.to(work_dtype(y.dtype))
    x = conjugate_gradient(lambda v: op.adjoint(op.forward(v)), op.adjoint(yw), tol=tol, max_iter=max_iter,
                           interrupt=interrupt)
    return x.to(y.dtype)


def _pinv_transpose_solve(op: LinearOperator, v: Tensor, tol: float, max_iter: int) -> Tensor:
    """``(A^+)^T v = A (A^T A)^+ v = (A A^T)^+ A v``: CG on ``A A^T u = A v`` from 0 (float32 at least).

    The last form is the one solved: its right-hand side ``A v`` lies in the range of ``A A^T``, so the system
    is consistent and CG converges to the minimum-norm solution, stopping at ``||A v - A A^T u|| <= tol ||A v||``.
    The middle form would ask CG for ``(A^T A) w = v`` with a ``v`` that has a part in the null space of A
    (any gradient does), an inconsistent system on which CG never meets its tolerance and can diverge.
    """
    vw = v.to(work_dtype(v.dtype))
    u = conjugate_gradient(lambda w: op.forward(op.adjoint(w)), op.forward(vw), tol=tol, max_iter=max_iter)
    return u.to(v.dtype)


class _PseudoInverse(torch.autograd.Function):
    """``t -> A^+ t`` (``transpose=False``) or ``t -> (A^+)^T t`` (``transpose=True``) by CG, differentiated
    implicitly: the vector-Jacobian product of either map is the other one (the transpose of a linear map), one
    more solve, never the derivative of the iterations. No gradient reaches the operator's own tensors."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, op: LinearOperator, tol: float, max_iter: int, transpose: bool) -> Tensor:
        ctx.solver = (op, tol, max_iter, transpose)
        return (_pinv_transpose_solve if transpose else _pinv_solve)(op, t, tol, max_iter)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        op, tol, max_iter, transpose = ctx.solver
        other: Tensor = _PseudoInverse.apply(grad, op, tol, max_iter, not transpose)
        return other, None, None, None, None


class LinearOperator(abc.ABC):
    """A linear map ``y = A x`` on batched images.

    x: (B, C, H, W) float in [-1, 1] (VAE pixel space); y: (B, C', H', W') given by :meth:`output_shape`.
    Operators are immutable and device/dtype-agnostic: small parameter tensors are moved to x's
    device/dtype at call time. Calls have no side effects. Subclasses are frozen dataclasses implementing
    ``_forward``/``_adjoint`` (and ``_pinv`` where a closed form exists), and extending
    :meth:`validate_input_shape` / ``_output_shape`` when the shape rules differ from "any image".

    ``A @ B`` composes (``(A @ B).forward(x) == A.forward(B.forward(x))``).
    """

    if TYPE_CHECKING:  # every concrete operator is a dataclass (what materialize() relies on)
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    # ---- public API -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``A x``. x: (B, C, H, W) float; raises ValueError when the shape breaks the operator's rules."""
        check_image_tensor(x, "x")
        self.validate_input_shape(x.shape)
        return self._forward(x)

    def adjoint(self, y: Tensor) -> Tensor:
        """``A^T y``, the exact transpose. y: measurement of shape ``output_shape(x.shape)``."""
        check_image_tensor(y, "y")
        return self._adjoint(y)

    def pinv(self, y: Tensor) -> Tensor:
        """``A^+ y`` (Moore-Penrose): closed form where the operator has one, else :meth:`pinv_cg`."""
        check_image_tensor(y, "y")
        return self._pinv(y)

    @property
    def closed_form_pinv(self) -> bool:
        """True when :meth:`pinv` is exact and cheap (closed form), False when it runs conjugate gradients."""
        return type(self)._pinv is not LinearOperator._pinv

    @property
    def auto_residual(self) -> str:
        """The residual space (one of :data:`RESIDUAL_SPACES`) the official FlowDPS code uses for this kind of
        degradation, and so what a data term's ``"auto"`` means: ``"adjoint"`` here (Gaussian blurs,
        inpainting, colourisation, denoising); super-resolution says ``"pinv"``, convolution blurs whose
        official "adjoint" is the identity (motion, a custom kernel) say ``"measurement"``."""
        return "adjoint"

    def pinv_cg(self, y: Tensor, *, tol: float = CG_TOL, max_iter: int = CG_MAX_ITER,
                interrupt: Callable[[], None] | None = None) -> Tensor:
        """``A^+ y`` by conjugate gradients (computed in float32 at least, returned in y's dtype).

        CG on the normal equations ``A^T A x = A^T y`` from ``x = 0``: the iterates stay in the row space of
        A, so the limit is the minimum-norm least-squares solution ``A^+ y``, for every operator shape:

        * wide operators (fewer measurements than unknowns, e.g. super-resolution, blur then downsample):
          with full row rank this is the minimum-norm solution ``A^T (A A^T)^-1 y``. It is deliberately not
          computed by CG on ``A A^T u = y``: when ``A A^T`` is singular (a mask after a downsample) and y is
          not in the range of A (any noisy measurement), that iteration diverges (measured: 1e86, then NaN,
          on an 8x6 example), while the normal equations stay consistent;
        * square operators (blur): the least-squares solution of least norm.

        ``tol`` is the relative residual ``||A^T (y - A x_k)|| <= tol ||A^T y||``. For ill-conditioned
        operators (large blurs) the result after ``max_iter`` iterations is an implicitly regularised
        approximation of ``A^+ y`` (CG semi-convergence), not the exact pseudo-inverse.

        Gradients (a data term with ``residual='pinv'``) are implicit: the solve records no graph, and the
        backward pass applies the transpose of the pseudo-inverse, ``g -> (A^+)^T g = (A A^T)^+ A g``, by one more
        CG solve with the same ``tol`` and ``max_iter`` (double backward alternates the two solves). That is the
        derivative of ``A^+`` itself, at the cost of one solve, where differentiating through the iterations
        gave the derivative of the truncated solver and kept every iterate for backward (at 128 px, 656 MiB
        for a 61-pixel blur then 2x downsampling; now under 1 MiB, in about the same time). When the solves
        stop at ``max_iter`` (ill-conditioned blurs) the gradient is that of the same regularised
        approximation of ``A^+``, not exactly the derivative of the value computed. The solves save
        no tensor for backward, so they also accept an operator whose tensors were made under
        ``torch.inference_mode()`` (a data term's own ``A x`` still needs :meth:`materialize`).

        ``interrupt`` (no gradient then) is called before every CG iteration and may raise to stop the solve
        (the nodes pass ComfyUI's interrupt check).
        """
        check_image_tensor(y, "y")
        if interrupt is not None:
            return _pinv_solve(self, y, tol, max_iter, interrupt)
        x: Tensor = _PseudoInverse.apply(y, self, tol, max_iter, False)
        return x

    def validate_input_shape(self, shape: Sequence[int]) -> Shape:
        """Return the input shape as a tuple, or raise ValueError naming the offending value and the rule."""
        return check_image_shape(shape, "x")

    def output_channels(self, channels: int) -> int:
        """Channels of ``A x`` for an image of ``channels`` channels (whatever its size): the same number here;
        colour-to-grey gives 1. Raises ValueError when the operator does not accept that many channels."""
        return channels

    def unknown_measurement_mask(self, image_shape: Sequence[int]) -> Tensor:
        """Which measurement pixels carry no information, for images of ``image_shape``: ``(B, 1, h, w)`` bool in
        the measurement's size (:meth:`output_shape`), True where unknown.

        A measurement pixel is unknown when every image pixel's weight on it is zero, i.e. ``A |A^T 1| = 0``
        there in every channel (the holes of an inpainting mask, alone or inside a composition); none for
        super-resolution and blurs. Computed in float64 on the CPU.
        """
        ones = torch.ones(self.output_shape(image_shape), dtype=torch.float64)
        energy = self.forward(self.adjoint(ones).abs()).abs().amax(dim=1, keepdim=True)
        return energy < UNKNOWN_ATOL

    def output_shape(self, input_shape: Sequence[int]) -> Shape:
        """Shape of ``A x`` for x of ``input_shape`` (validated first)."""
        return self._output_shape(self.validate_input_shape(input_shape))

    def input_shape(self, output_shape: Sequence[int]) -> Shape:
        """Shape of the image x whose measurement ``A x`` has ``output_shape`` (the inverse of :meth:`output_shape`).

        Raises ValueError, naming the sizes, when no image maps to that measurement shape (for example a
        mask of another size). Used to size the restored image from a measurement.
        """
        shape = self._input_shape(check_image_shape(output_shape, "measurement"))
        produced = self.output_shape(shape)
        if tuple(produced) != tuple(output_shape):
            raise ValueError(f"no image maps to a measurement of shape {tuple(output_shape)} with this operator "
                             f"(an image of shape {shape} gives {produced})")
        return shape

    def materialize(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LinearOperator:
        """A copy whose tensors are plain (non-inference) clones, optionally moved to ``device``/``dtype``.

        The clones are made inside ``torch.inference_mode(False)``, so this may be called anywhere, also
        inside inference mode. ``dtype`` applies to floating-point tensors only; nested operators (in a
        composition) are materialised recursively.
        """
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        if not dataclasses.is_dataclass(self):
            raise TypeError(f"{type(self).__name__} must be a dataclass to be materialised")
        changes: dict[str, object] = {}
        with torch.inference_mode(False):
            for field in dataclasses.fields(self):
                value = getattr(self, field.name)
                if isinstance(value, Tensor):
                    new_dtype = dtype if dtype is not None and value.is_floating_point() else value.dtype
                    changes[field.name] = value.detach().to(
                        device=value.device if device is None else device, dtype=new_dtype, copy=True
                    )
                elif isinstance(value, LinearOperator):
                    changes[field.name] = value.materialize(device, dtype)
            return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """A short description for messages, e.g. ``"SR x2, average pool"`` (subclasses name their parameters)."""
        return type(self).__name__

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def __matmul__(self, inner: LinearOperator) -> LinearOperator:
        if not isinstance(inner, LinearOperator):
            return NotImplemented
        return Composed(outer=self, inner=inner)

    # ---- to implement -----------------------------------------------------------------------------
    @abc.abstractmethod
    def _forward(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def _adjoint(self, y: Tensor) -> Tensor: ...

    def _pinv(self, y: Tensor) -> Tensor:
        return self.pinv_cg(y)

    def _output_shape(self, shape: Shape) -> Shape:
        return shape

    def _input_shape(self, output_shape: Shape) -> Shape:
        return output_shape


@dataclasses.dataclass(frozen=True, eq=False)
class Composed(LinearOperator):
    """``outer @ inner``: ``x -> outer(inner(x))``; adjoint ``inner^T(outer^T(y))``; pinv by CG.

    Example: a camera model ``AvgPoolSR(4) @ gaussian_blur(...)`` blurs, then downsamples.

    A size that one part refuses raises ValueError naming the caller's size (the image, or the measurement
    for :meth:`input_shape`), the size in between and the part that failed, with the part's own message
    inside. ``title``, ``inner_name`` and ``outer_name`` are the words those messages use (a node passes its
    own display name and input names).
    """

    outer: LinearOperator
    inner: LinearOperator
    title: str = "composed operator"
    inner_name: str = "the inner operator"
    outer_name: str = "the outer operator"

    def __post_init__(self) -> None:
        for name in ("outer", "inner"):
            if not isinstance(getattr(self, name), LinearOperator):
                raise TypeError(f"{name} must be a LinearOperator, got {type(getattr(self, name)).__name__}")

    def describe(self) -> str:
        return f"{self.inner.describe()}, then {self.outer.describe()}"

    def _part(self, which: str) -> tuple[LinearOperator, str]:
        """The operator ``which`` ("inner" / "outer") and how messages name it."""
        operator, name = (self.inner, self.inner_name) if which == "inner" else (self.outer, self.outer_name)
        return operator, f"{name} ({operator.describe()})"

    def _through(self, shape: Shape, *, forward: bool) -> Shape:
        """``shape`` through both parts: image -> measurement (``forward``, inner first) or back (outer first).

        A part's ValueError is re-raised naming ``shape`` (the caller's size), the size in between and the part.
        """
        first, second = ("inner", "outer") if forward else ("outer", "inner")
        said = f"{self.title}: the {'image' if forward else 'measurement'} is {describe_size(shape)} (H x W)"
        refuses = "does not accept" if forward else "cannot produce"
        (first_op, first_name), (second_op, second_name) = self._part(first), self._part(second)
        try:
            middle = first_op.output_shape(shape) if forward else first_op.input_shape(shape)
        except ValueError as e:
            raise ValueError(f"{said}, which {first_name} {refuses}: {e}") from e
        try:
            return second_op.output_shape(middle) if forward else second_op.input_shape(middle)
        except ValueError as e:
            raise ValueError(f"{said}; {'after' if forward else 'before'} {first_name} it is "
                             f"{describe_size(middle, shape)}, which {second_name} {refuses}: {e}") from e

    def validate_input_shape(self, shape: Sequence[int]) -> Shape:
        shape = check_image_shape(shape, "x")
        self._through(shape, forward=True)
        return shape

    def _output_shape(self, shape: Shape) -> Shape:
        return self.outer.output_shape(self.inner.output_shape(shape))

    def _input_shape(self, output_shape: Shape) -> Shape:
        return self._through(output_shape, forward=False)

    def _forward(self, x: Tensor) -> Tensor:
        return self.outer.forward(self.inner.forward(x))

    def _adjoint(self, y: Tensor) -> Tensor:
        return self.inner.adjoint(self.outer.adjoint(y))

    def output_channels(self, channels: int) -> int:
        return self.outer.output_channels(self.inner.output_channels(channels))

    @property
    def auto_residual(self) -> str:
        """``"measurement"`` if a part asks for it, else ``"adjoint"``: the pseudo-inverse of a composition
        has no closed form (a conjugate-gradient solve forward and another backward, in every gradient step),
        so ``"pinv"`` is never chosen automatically here; it remains available when asked for."""
        parts = (self.outer.auto_residual, self.inner.auto_residual)
        return "measurement" if "measurement" in parts else "adjoint"
