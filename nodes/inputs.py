"""What reaches a node's inputs, checked up front, with messages that name the input the user sees.

Two gaps of ComfyUI that these close:

* its validation converts and range-checks widget values (numbers, combos) but passes on a literal value sent
  through the API where a link belongs (an IMAGE, a MASK, an operator...): :func:`check_links` refuses it by
  the input's name and socket type, before any work;
* a sampler config or an operator names its own fields (``eta_v``, ``kernel size``), not the node inputs that
  fed them (``eta``, ``kernel_size``): :func:`inputs_named` re-raises a :class:`~..samplers.ConfigError` or an
  :class:`~..operators.ParameterError` with the input's name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from comfy_api.latest import io

from ..operators import ParameterError
from ..samplers import ConfigError, Schedule
from .common import OPERATOR_TYPE

LITERALS = (str, int, float, bool, dict, type(None))
"""What an API prompt can hold where a link belongs (a list of two is a link; other lists are refused by
ComfyUI, and ``{"__value__": ...}`` is unwrapped to its content, which may be a list)."""

TENSOR_LINKS = {
    "IMAGE": "an IMAGE (a link from Load Image or another image node)",
    "MASK": "a MASK (a link from a mask output, e.g. Load Image's, or another mask node)",
}
"""Socket types whose values are always tensors in ComfyUI: anything else is refused."""

OTHER_LINKS = {
    OPERATOR_TYPE: "an operator (a link from one of the FlowDPS operator nodes)",
    "MODEL": "a MODEL (a link from Load Diffusion Model or a checkpoint loader)",
    "VAE": "a VAE (a link from Load VAE or a checkpoint loader)",
    "CONDITIONING": "a CONDITIONING (a link from CLIP Text Encode or another conditioning node)",
}
"""Socket types whose values other nodes may make in their own way (any object with an operator's methods is
an operator): only what an API prompt can hold (:data:`LITERALS`; a list, except for CONDITIONING, which is
one) is refused."""

MAX_TEXT_SHOWN = 40


def describe_value(value: object) -> str:
    """How a value that is not a link reads in a message: ``the text 'abc'``, ``the number 3``, ``a list``."""
    if isinstance(value, str):
        shown = value if len(value) <= MAX_TEXT_SHOWN else value[: MAX_TEXT_SHOWN - 3] + "..."
        return f"the text {shown!r}"
    if isinstance(value, bool) or value is None:
        return f"the value {value}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    return f"a {type(value).__name__}"


def check_link(value: object, name: str, io_type: str) -> None:
    """Raise ValueError naming input ``name`` when ``value`` cannot be a value of socket type ``io_type``."""
    if io_type in TENSOR_LINKS:
        what, wrong = TENSOR_LINKS[io_type], not isinstance(value, torch.Tensor)
    elif io_type in OTHER_LINKS:
        what = OTHER_LINKS[io_type]
        wrong = isinstance(value, LITERALS) or (isinstance(value, list) and io_type != "CONDITIONING")
    else:
        return
    if wrong:
        raise ValueError(f"{name} must be {what}, got {describe_value(value)}")


def check_links(node: type[io.ComfyNode], **values: object) -> None:
    """Check every linked input of ``node`` given in ``values`` against its socket type (schema order); an
    optional input may be ``None`` (not connected)."""
    for spec in node.define_schema().inputs:
        if spec.id not in values or (values[spec.id] is None and spec.optional):
            continue
        check_link(values[spec.id], spec.id, spec.io_type)


@contextmanager
def inputs_named(inputs: Mapping[str, str]) -> Iterator[None]:
    """Re-raise a :class:`ConfigError` or :class:`ParameterError` about a field in ``inputs`` (field -> node
    input) with the input's name; other errors pass unchanged."""
    try:
        yield
    except (ConfigError, ParameterError) as e:
        if e.field not in inputs:
            raise
        raise ValueError(e.message(inputs[e.field])) from e


STEP_INPUTS = {"start": "step_size", "end": "step_size_end"}  # Schedule field -> node input


def step_schedule(start: float, end: float) -> float | Schedule:
    """The step_size / step_size_end inputs as a constant or a linear ramp (-1: constant; errors name them)."""
    with inputs_named(STEP_INPUTS):
        return start if end < 0 or end == start else Schedule(start=start, end=end)
