"""Memory modes of the differentiable decoder: how much of the decoder's forward pass a gradient keeps.

A data-term gradient runs the VAE decoder forward and back through it. Plain autograd ("full") keeps every
activation of the forward pass until the backward pass: for ComfyUI's KL decoder of SD3 / SD3.5 / Flux in
float32 that is about 30 KB per output pixel and image, linear in pixels (about 30 GiB at 1024 px). Two modes
compute the same gradient with less:

* ``"checkpoint"``: activation checkpointing of the decoder's blocks (``torch.utils.checkpoint``). Only the
  tensors between blocks are kept; each block's inner activations are recomputed during the backward pass.
  Still linear in pixels, with a smaller constant, and one extra forward pass of compute. The mid block's
  attention runs without its N x N weight matrix (``decoder_tiles.exact_attention``).
* ``"tiled"``: the exact band-by-band vector-Jacobian product of :mod:`.decoder_tiles` (GroupNorm statistics
  synchronised across bands), which holds a few full-size feature maps and one band's graph.

Each of the three layouts also runs on a bfloat16 copy of the decoder (``"full 16-bit"``, ``"checkpoint 16-bit"``,
``"tiled 16-bit"``, :func:`split_mode`): about half the memory for full and checkpoint, 0.7-0.9x for tiled, and
a gradient within a few percent of the float32 one (measured on the SD3 VAE architecture: cosine 0.9989-0.9995,
relative L2 0.032-0.049; GroupNorm statistics, the attention scores and the tiled mode's gradient maps
accumulate in float32). bfloat16 only: float16 overflows in SD-family VAEs.

``"auto"`` picks the first of full, checkpoint, tiled whose estimate (:func:`activation_bytes`, plus the decoder
copy's weights) fits the memory ComfyUI reports free; only when none does and the device computes bfloat16
natively (``allow_16bit``), the first of the 16-bit modes that fits; the smallest mode when none does (the
bridge refuses the run if even that does not fit). Decoders other than the KL one (TAESD) only have the full
layout.

This module does not import ComfyUI: the bridge passes the free memory and ComfyUI's interrupt check in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .decoder_tiles import Interrupt, TiledDecoder, attention_block, decoder_units, supports_tiling

LAYOUTS = ("full", "checkpoint", "tiled")
"""How much of the decoder's forward pass a gradient keeps (the float32 modes' names)."""
HALF_SUFFIX = " 16-bit"
HALF_DTYPE = torch.bfloat16
"""The 16-bit modes' dtype: bfloat16 (float16 overflows in SD-family VAEs)."""
HALF_MODES = tuple(layout + HALF_SUFFIX for layout in LAYOUTS)
MEMORY_MODES = ("auto", *LAYOUTS, *HALF_MODES)
"""The ``memory`` widget's values; new ones are appended (saved workflows keep their values)."""
DEFAULT_MEMORY = "auto"
BOUNDED_MODES = ("checkpoint", "tiled")
"""Layouts that need ComfyUI's KL decoder (:func:`decoder_tiles.supports_tiling`)."""

ACTIVATION_FACTOR = {"full": 10.5, "checkpoint": 5.5, "tiled": 1.75}
"""Peak activation bytes of one decoder gradient per byte of :func:`boundary_bytes` (the decoder's tensors
between blocks), from the peak extra RSS measured on the SD3 VAE architecture in float32 on CPU
(benchmarks/decoder_memory.py): full 10.1x at 128 px and 8.9x at 256 px, checkpoint 5.3x and 3.8x (3.2x at
1024 px); tiled keeps the boundary tensors and, for the block being differentiated, its gradient, conv1's
output and gradient map, behind an upsampling the upsampled input and its gradient map: measured
``1.52 x boundary + 490 MiB`` at 512-1024 px (1598 and 4922 MiB), so 1.75x plus one band's graph (added
separately) is 16-28 % above what was measured and stays above the fit at larger sizes."""

HALF_ACTIVATION_FACTOR = {"full": 10.5, "checkpoint": 5.5, "tiled": 3.25}
"""The same for the 16-bit modes, per byte of the bfloat16 boundary tensors. Full and checkpoint keep their
float32 factors (measured peak extra RSS on CPU: full 16-bit 0.48-0.58x of full, checkpoint 16-bit 0.52-0.63x of
checkpoint at 128-256 px, within these estimates). Tiled holds its gradient maps in float32 and its band's graph
at the float32 rate (GroupNorm runs in float32 inside a band, :func:`decoder_tiles.group_norm`): measured 956,
1713 and 4206 MiB at 256, 512 and 1024 px (``2.28 x boundary + 883 MiB``; 0.85-1.4x the float32 tiled mode on
this CPU, not half), so 3.25x plus the band is 11-31 % above what was measured."""

TILED_BAND_PIXELS = 1 << 16
"""Pixels per band of the tiled mode at the resolution of each unit (its graph: a few KB per pixel)."""

TILED_BAND_BYTES_PER_PIXEL = 12 * 1024
"""Bytes per band pixel of one band's graph in the tiled mode (float32, the SD3 VAE's 128 channels at the
output level; measured about 14 KB per pixel at 256 px with the whole output level in one band, less with
more bands), added to the tiled estimate for ``min(band, image)`` pixels."""

TILED_LEAN_MAPS = 1.75
"""Full-size float32 gradient maps (of the output level's channels) that the tiled mode's backward pass holds at
its peak when it keeps only part of the decoder's tensors (:func:`tiled_budget`; lean ResNet blocks): the
gradient of the unit's output, and behind the last upsampling also its input's (half a map), plus a quarter map
of margin."""

TILED_LEAN_BAND_FACTOR = 1.4
"""A lean band's graph against :data:`TILED_BAND_BYTES_PER_PIXEL` (its second pass also redoes conv2's VJP, with
a wider halo, and the rows it did not keep are recomputed inside the band). The same lean run at 512 px with 1.2
GiB free peaked at 1219 MiB in one benchmark run and 1330 MiB in another (CPU peaks vary by about 10 % between
identical runs: the allocator's temporaries); with 1.4 the estimate of those kept tensors is 1451 MiB, and that
of the 2048 px run with 10 GiB free (measured 9456 MiB) 10163 MiB (benchmarks/README.md)."""

FULL_FALLBACK_FACTOR = 4.0
"""For decoders without a structural estimate (TAESD): the gradient's activations as a multiple of ComfyUI's
own estimate of the decode's memory (``VAE.memory_used_decode``)."""


def check_memory_mode(memory: str) -> str:
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    return memory


def split_mode(mode: str) -> tuple[str, torch.dtype]:
    """``(layout, dtype)`` of a memory mode other than "auto": ``"tiled 16-bit"`` -> ``("tiled", torch.bfloat16)``,
    ``"tiled"`` -> ``("tiled", torch.float32)``. Raises ValueError for anything else."""
    if mode in LAYOUTS:
        return mode, torch.float32
    if mode in HALF_MODES:
        return mode[:-len(HALF_SUFFIX)], HALF_DTYPE
    raise ValueError(f"memory mode must be one of {LAYOUTS + HALF_MODES}, got {mode!r}")


def element_size(mode: str) -> int:
    """Bytes per value of the decoder copy and its activations in ``mode`` (4, or 2 for a 16-bit mode)."""
    return split_mode(mode)[1].itemsize


def copy_bytes(float32_bytes: int, mode: str) -> int:
    """Bytes of the decoder copy's weights in ``mode`` from those of the float32 copy (half for 16-bit)."""
    return float32_bytes * element_size(mode) // 4


def check_16bit_allowed(mode: str, working_dtypes: Any) -> None:
    """Refuse a 16-bit mode for a VAE whose ``working_dtypes`` (``comfy.sd.VAE`` attribute: the dtypes ComfyUI
    runs it in) do not include bfloat16 (ValueError naming the VAE's dtypes and the fix). ``None``: not known,
    allowed."""
    if mode not in HALF_MODES or working_dtypes is None or HALF_DTYPE in working_dtypes:
        return
    names = ", ".join(str(d).removeprefix("torch.") for d in working_dtypes)
    raise ValueError(f"memory {mode!r} runs the decoder in bfloat16, but ComfyUI runs this VAE only in {names}: "
                     f"use memory {split_mode(mode)[0]!r} (float32) or 'auto'")


def kl_decoder(first_stage_model: torch.nn.Module) -> torch.nn.Module | None:
    """The KL ``Decoder`` inside a (private copy of) ``vae.first_stage_model`` when the bounded modes can run it,
    else ``None``."""
    decoder = getattr(first_stage_model, "decoder", None)
    if not isinstance(decoder, torch.nn.Module) or supports_tiling(decoder) is not None:
        return None
    if getattr(first_stage_model, "bn", None) is not None:   # Flux 2's batch-normalised, patchified latents
        return None
    return decoder


def boundary_bytes(decoder: torch.nn.Module, latent_shape: tuple[int, ...], element_size: int = 4) -> int:
    """Bytes of the decoder's tensors between its blocks (every unit output but the image) for a latent of
    ``latent_shape`` (B, C, h, w): the unit of the estimates."""
    b, _, h, w = latent_shape
    units = decoder_units(decoder)
    return sum(b * u.target.channels * h * u.target.scale * w * u.target.scale * element_size for u in units[:-1])


def activation_bytes(decoder: torch.nn.Module, mode: str, latent_shape: tuple[int, ...],
                     element_size: int | None = None) -> int:
    """Estimated peak bytes (beyond the weights) of one decoder gradient in ``mode`` (a layout or a 16-bit mode)
    for a latent of ``latent_shape`` (B, C, h, w); ``element_size``: bytes per value of the boundary tensors
    (default: the mode's, 2 for a 16-bit mode). Full and checkpoint halve in 16 bits, tiled does not quite
    (:data:`HALF_ACTIVATION_FACTOR`). The tiled estimate keeps every tensor (:func:`tiled_budget`: less)."""
    layout, dtype = split_mode(mode)
    size = dtype.itemsize if element_size is None else element_size
    base = boundary_bytes(decoder, latent_shape, size)
    estimate = (ACTIVATION_FACTOR if size >= 4 else HALF_ACTIVATION_FACTOR)[layout] * base
    if layout == "tiled":
        estimate += _band_bytes(decoder, latent_shape)
    return int(estimate)


def _band_bytes(decoder: torch.nn.Module, latent_shape: tuple[int, ...]) -> int:
    """One band's graph in the tiled layout (float32 whatever the copy's dtype: GroupNorm runs in float32)."""
    b, _, h, w = latent_shape
    scale = decoder_units(decoder)[-1].source.scale
    band = min(TILED_BAND_PIXELS, h * w * scale * scale)
    return int(band * TILED_BAND_BYTES_PER_PIXEL * b)


def tiled_budget(decoder: torch.nn.Module, latent_shape: tuple[int, ...], free_bytes: int | None,
                 mode: str = "tiled") -> tuple[int | None, int]:
    """``(keep_budget, estimate)`` of a tiled mode ("tiled" or "tiled 16-bit") for ``free_bytes`` of activation
    memory.

    Everything the backward pass needs is kept when that fits (or ``free_bytes`` is unknown): ``(None,
    activation_bytes(..., mode))``. Otherwise ``keep_budget`` is the bytes of the decoder's tensors between
    units to keep, lowest resolution first as :class:`TiledDecoder` keeps them (latent-resolution ones always),
    the rest recomputed band by band (slower); the estimate is what is kept plus :data:`TILED_LEAN_MAPS`
    float32 gradient maps and one band's graph. When even that is over ``free_bytes`` the estimate says so (the
    caller refuses the run). A small image, whose lean plan would not need less than keeping everything (its
    band's graph is then most of the estimate), always keeps everything.
    """
    keep_all = activation_bytes(decoder, mode, latent_shape)
    if free_bytes is None or keep_all <= free_bytes:
        return None, keep_all
    budget, estimate = _lean_plan(decoder, latent_shape, free_bytes, mode)
    return (None, keep_all) if estimate >= keep_all else (budget, estimate)


def _lean_plan(decoder: torch.nn.Module, latent_shape: tuple[int, ...], free_bytes: int, mode: str
               ) -> tuple[int, int]:
    """``(keep_budget, estimate)`` of the tiled mode keeping fewer tensors (:func:`tiled_budget`)."""
    size = element_size(mode)
    b, _, h, w = latent_shape
    units = decoder_units(decoder)
    top = units[-1].source
    fixed = int(TILED_LEAN_MAPS * b * top.channels * h * top.scale * w * top.scale * 4)
    fixed += int(TILED_LEAN_BAND_FACTOR * _band_bytes(decoder, latent_shape))
    budget = max(int(free_bytes) - fixed, 0)
    kept = 0
    for unit in units[:-1]:
        nbytes = b * unit.target.channels * h * unit.target.scale * w * unit.target.scale * size
        if unit.target.scale == 1 or kept + nbytes <= budget:
            kept += nbytes
    return budget, fixed + kept


class MemoryPlan(NamedTuple):
    mode: str
    """The mode the run uses (a layout or a 16-bit mode, never "auto")."""
    estimate: int
    """Its estimated activation bytes for one gradient."""
    estimates: dict[str, int]
    """The activation estimate of every mode considered (the 16-bit ones only when allowed or requested)."""
    keep_budget: int | None = None
    """The tiled modes' bytes of kept tensors (:func:`tiled_budget`; ``None``: all of them)."""


def plan_memory(requested: str, first_stage_model: torch.nn.Module, latent_shape: tuple[int, ...],
                free_bytes: int | None, *, fallback_bytes: int = 0, weight_bytes: int = 0,
                allow_16bit: bool = False) -> MemoryPlan:
    """The mode for ``requested`` ("auto" or a mode) and the decoder copy ``first_stage_model``.

    latent_shape: (B, C, h, w) of what one decoder call gets (AFDPS: one chunk of particles).
    free_bytes: the memory free for the decoder copy and its activations (``None``: unknown, "auto" then picks
        "full").
    fallback_bytes: the full layout's float32 estimate for a decoder the bounded modes cannot run (ComfyUI's).
    weight_bytes: the float32 decoder copy's weights (:func:`copy_bytes` gives a mode's); 0 when ``free_bytes``
        is already net of them.
    allow_16bit: whether "auto" may fall back to the 16-bit modes (the device computes bfloat16 natively and the
        VAE runs in it); "auto" tries them only when no float32 mode fits.
    Raises ValueError for an unknown mode or a bounded mode on a decoder that has none.
    """
    check_memory_mode(requested)
    decoder = kl_decoder(first_stage_model)
    if decoder is None:
        if requested != "auto" and split_mode(requested)[0] in BOUNDED_MODES:
            inner = getattr(first_stage_model, "decoder", first_stage_model)
            reason = supports_tiling(inner) if isinstance(inner, torch.nn.Module) else None
            fix = "'full 16-bit'" if requested in HALF_MODES else "'full'"
            raise ValueError(f"memory {requested!r} needs ComfyUI's KL VAE decoder (SD3, SD3.5, Flux, SDXL), but "
                             f"this VAE's decoder is {type(inner).__name__}"
                             f"{f' ({reason})' if reason else ''}: use memory {fix} or 'auto'")
        mode = "full" if requested == "auto" else requested
        estimate = fallback_bytes * element_size(mode) // 4
        return MemoryPlan(mode, estimate, {mode: estimate})
    considered = LAYOUTS + (HALF_MODES if allow_16bit or requested in HALF_MODES else ())
    estimates = {m: activation_bytes(decoder, m, latent_shape) for m in considered}
    budgets: dict[str, int | None] = {}
    if free_bytes is not None:          # the tiled modes keep what fits next to their copy's weights
        for m in considered:
            if split_mode(m)[0] == "tiled":
                budgets[m], estimates[m] = tiled_budget(decoder, latent_shape,
                                                        free_bytes - copy_bytes(weight_bytes, m), m)
    if requested != "auto":
        mode = requested
    elif free_bytes is None:
        mode = "full"
    else:
        mode = next((m for m in considered if estimates[m] + copy_bytes(weight_bytes, m) <= free_bytes),
                    considered[-1])
    return MemoryPlan(mode, estimates[mode], estimates, budgets.get(mode))


# --- the decode functions -------------------------------------------------------------------------------------


def _no_interrupt() -> None:
    return None


def checkpointed_decode(decoder: torch.nn.Module, z: Tensor, interrupt: Interrupt = _no_interrupt) -> Tensor:
    """ComfyUI's KL ``Decoder.forward`` with every block under activation checkpointing (non-reentrant) and the
    mid-block attention without its N x N matrix; the same function of ``z`` (B, C, h, w)."""
    if not (torch.is_grad_enabled() and z.requires_grad):
        return _forward(decoder, z, interrupt, lambda f, h: f(h))
    return _forward(decoder, z, interrupt, lambda f, h: checkpoint(f, h, use_reentrant=False))


def _forward(decoder: torch.nn.Module, z: Tensor, interrupt: Interrupt,
             run: Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]) -> Tensor:
    def step(module: torch.nn.Module, *args: Any) -> Callable[[Tensor], Tensor]:
        def f(h: Tensor) -> Tensor:
            interrupt()
            return module(h, *args)
        return f

    def attention(h: Tensor) -> Tensor:
        return attention_block(decoder.mid.attn_1, h, interrupt)

    def head(h: Tensor) -> Tensor:
        interrupt()
        return decoder.conv_out(torch.nn.functional.silu(decoder.norm_out(h)))

    h = decoder.conv_in(z)
    h = run(step(decoder.mid.block_1, None), h)
    h = run(attention, h)
    h = run(step(decoder.mid.block_2, None), h)
    for level in reversed(range(decoder.num_resolutions)):
        for block in decoder.up[level].block:
            h = run(step(block, None), h)
        if level != 0:
            h = run(step(decoder.up[level].upsample), h)
    out: Tensor = run(head, h)
    return out


def decode_function(first_stage_model: torch.nn.Module, mode: str, interrupt: Interrupt = _no_interrupt,
                    keep_budget: int | None = None) -> Callable[[Tensor], Tensor]:
    """``first_stage_model.decode`` (VAE-space latent -> image in about [-1, 1]) computed in ``mode``'s layout
    (the copy's dtype is the caller's: a 16-bit mode needs a bfloat16 copy and input; ``keep_budget``: the tiled
    layout's, :func:`tiled_budget`)."""
    mode = split_mode(mode)[0]
    if mode == "full":
        return first_stage_model.decode  # type: ignore[no-any-return]
    decoder = kl_decoder(first_stage_model)
    if decoder is None:
        raise ValueError(f"memory {mode!r} needs ComfyUI's KL VAE decoder")
    pre = getattr(first_stage_model, "post_quant_conv", None)
    pre = pre if isinstance(pre, torch.nn.Module) else torch.nn.Identity()
    if mode == "checkpoint":
        return lambda z: checkpointed_decode(decoder, pre(z), interrupt)
    from .decoder_tiles import tiled_decode

    engine = TiledDecoder(decoder, band_pixels=TILED_BAND_PIXELS, keep_budget=keep_budget, interrupt=interrupt)
    return lambda z: tiled_decode(engine, pre(z))
