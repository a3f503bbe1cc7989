"""An exact, memory-bounded vector-Jacobian product through ComfyUI's KL VAE decoder (SD3, SD3.5, Flux, SDXL).

The gradient of a data term through the decoder, ``J_D^T dL/dx``, normally keeps every activation of the
decoder for the backward pass: about 30 KB per output pixel in float32 for the SD3 VAE (25 GiB at 1024 px).
:class:`TiledDecoder` computes the same gradient (to float rounding) while holding only a few full-size
feature maps, by working in horizontal bands (full-width strips of latent rows) and synchronising the bands at
every GroupNorm:

* **Why not independent tiles.** A convolution only sees its neighbours, but GroupNorm normalises with the
  mean and variance of a whole channel group over the whole image, and the mid-block attention mixes every
  position. Tiles with frozen statistics give the right image but the wrong gradient: freezing the statistics
  drops the terms ``mean(a)`` and ``mean(a x_hat)`` of GroupNorm's backward pass, which measured a gradient
  cosine of 0.89 against the exact one for a super-resolution residual on the SD3 VAE at 128-256 px (0.50
  for a uniform upstream gradient); one correction pass with the statistics' own gradient made it worse
  (0.22), because the statistics of successive layers are strongly coupled.
* **The forward pass** (no autograd) runs unit by unit (``conv_in``, each ResNet block, the attention block,
  the output head), each unit band by band over the full-size tensors it reads and writes. The statistics of
  every GroupNorm are accumulated over the bands (float64, Chan's pairwise update) before the unit that
  normalises with them starts. The result is the decoded image, equal to the module's own forward pass.
* **The backward pass** walks the units in reverse. Within a band, autograd differentiates the unit's few
  layers with the GroupNorm statistics as leaf tensors: that gives the band's share of the input gradient
  (scattered into a full-size map, overlapping halos added) and of ``dL/d(mean, rstd)``. Once every band has
  been seen, the statistics' own gradient ``dmean/dt^T l_mean + drstd/dt^T l_rstd`` (a per-pixel field:
  ``l_mean / N - l_rstd rstd^3 (t - mean) / N``) is added to the gradient of the normalised tensor ``t``
  before the unit that produced ``t`` is differentiated. This is GroupNorm's exact backward pass, split at
  the only place where it needs the whole image. ResNet blocks take two band passes (one per GroupNorm); a
  block that begins a level also differentiates the 2x upsampling in front of it and needs a third pass for
  the statistics of the upsampled tensor.
* **Convolutions without their forward pass.** When everything is kept, a ResNet block's convolutions are
  not differentiated through autograd: the input gradient of a stride-1 convolution is one transposed
  convolution of its output gradient (:func:`conv_input_vjp`), which needs neither the input nor a forward
  pass; autograd only differentiates the element-wise GroupNorm and SiLU between them. The block's first pass
  recomputes ``conv1``'s output (norm2's backward needs it) and holds it full-size until its statistics'
  gradient is folded into ``conv1``'s gradient map; behind an upsampling it also holds the upsampled input and
  its gradient map, so the upsampling's convolution runs once forward and once transposed.
* **The attention block** runs at the latent resolution on the whole tensor with plain autograd (its own
  GroupNorm therefore exact), through :func:`exact_attention`, which keeps O(N x chunk) memory instead of
  the N x N attention matrix.

**Halo.** A band's output rows are computed from input rows extended by the unit's receptive radius: 1 row
for ``conv_in``, the output head and the first half of a ResNet block (one 3x3 convolution), 2 rows for a
whole ResNet block (two 3x3 convolutions; the shortcut is 1x1), and for a block fed by the 2x upsampling 2
rows of the lower-resolution input (the upsampling's 3x3 convolution on nearest-neighbour doubled rows, then
the block's two convolutions: ``ceil((2 + 1) / 2)``). The halo is per unit, not per decoder: the whole SD3
decoder would need ``11.25 + 0.5 + 3 + 0.25 + 1.5 + 0.125 + 0.75 + 0.125 = 17.5`` latent rows of context,
which is why bands are synchronised at every unit instead of being run through the whole decoder.

**Memory.** Full-size tensors held: the unit outputs that the backward pass needs (the residual stream at
every block boundary), a ResNet block's gradient maps and one band's graph. Two regimes:

* *Keep everything* (``keep_budget=None``): about 3 KB per output pixel of kept tensors for the SD3 VAE in
  float32 plus, during one block's backward pass, its gradient, ``conv1``'s output and gradient map, and
  behind an upsampling the upsampled input and its gradient map (512 px: 1.6 GiB in all). The forward pass
  also holds a block's upsampled input and its first convolution's output as temporaries, so that every layer
  runs once (they stay below the backward pass's peak).
* *A keep budget*: unit outputs are kept lowest resolution first while they fit ``keep_budget``; the others
  are never materialised (the forward pass only gathers their GroupNorm statistics) and are recomputed band by
  band from the nearest kept tensor when a backward pass reads them. ResNet blocks are then *lean*: none of
  their inner tensors is held full-size; autograd differentiates them inside each band, and the second pass
  redoes the first pass's ``conv2`` VJP on its band (two more rows of halo). A unit's own output is released
  before its backward pass (only later units read it). At its peak the backward pass then holds the kept
  tensors, 1.5 gradient maps of the output level and one band's graph (about 2.1-2.4 KB per output pixel for
  the SD3 VAE: 2048 px within 12 GB; ``decoder_memory.tiled_budget`` plans it).

**Cost.** Keeping everything, the forward pass runs every layer once (held temporaries) and the backward pass
``conv1`` forward once more and every convolution's VJP once (a transposed convolution, as fast as the forward
one); plain autograd runs each convolution forward and backward once. Counted in convolutions that is about
1.3x plain autograd; measured 1.3-1.45x single-threaded at 128-256 px and 1.56-1.62x on 2 CPU cores at
256-512 px (benchmarks/README.md), the rest being the band-wise GroupNorm statistics and element-wise passes.
Lean blocks differentiate through autograd inside each band (``conv1`` twice and ``conv2`` once more forward,
the upsampling three more times), and kept-budget runs add the recomputation of the tensors they did not keep:
several times slower.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

ATTENTION_CHUNK = 1024
"""Query rows per chunk of :func:`exact_attention` (memory: chunk x N attention weights at a time)."""

Interrupt = Callable[[], None]


def _no_interrupt() -> None:
    return None


# --- attention without the N x N matrix -------------------------------------------------------------------


class _ChunkedAttention(torch.autograd.Function):
    """Single-head softmax attention over query chunks; the backward pass recomputes each chunk's weights from
    the saved log-sum-exp (flash-attention style), so memory is O(N x chunk) instead of N x N.

    On 2 CPU cores at N = 16384 tokens of 512 channels (the SD3 VAE's mid block at 1024 px) this took 12 s
    forward and 27 s backward, against 13 s and 125 s for torch's CPU flash kernel and 3 GiB for the
    materialised matrix."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, chunk: int, interrupt: Interrupt) -> Tensor:
        scale = q.shape[-1] ** -0.5
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        kt = k.transpose(-1, -2)
        for i in range(0, q.shape[-2], chunk):
            interrupt()
            s = (q[..., i:i + chunk, :] @ kt).float() * scale
            m = torch.logsumexp(s, -1, keepdim=True)
            lse[..., i:i + chunk] = m[..., 0]
            out[..., i:i + chunk, :] = (torch.exp(s - m).to(v.dtype) @ v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.chunk, ctx.interrupt = chunk, interrupt
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        q, k, v, out, lse = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k, dtype=torch.float32)
        dv = torch.zeros_like(v, dtype=torch.float32)
        delta = (grad.float() * out.float()).sum(-1, keepdim=True)
        kt = k.transpose(-1, -2)
        for i in range(0, q.shape[-2], ctx.chunk):
            ctx.interrupt()
            rows = slice(i, i + ctx.chunk)
            p = torch.exp((q[..., rows, :] @ kt).float() * scale - lse[..., rows, None])
            g = grad[..., rows, :].float()
            dv += p.transpose(-1, -2) @ g
            ds = p * (g @ v.float().transpose(-1, -2) - delta[..., rows, :])
            dq[..., rows, :] = ((ds @ k.float()) * scale).to(dq.dtype)
            dk += (ds.transpose(-1, -2) @ q[..., rows, :].float()) * scale
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


def exact_attention(q: Tensor, k: Tensor, v: Tensor, *, interrupt: Interrupt = _no_interrupt,
                    chunk: int = ATTENTION_CHUNK) -> Tensor:
    """The VAE mid block's single-head attention, ``softmax(q^T k / sqrt(C)) v`` over the H x W positions, with
    ComfyUI's calling convention: q, k, v: (B, C, H, W) -> (B, C, H, W).

    The same function as ComfyUI's ``normal_attention`` / ``pytorch_attention``; on CUDA torch's
    memory-efficient SDPA kernel, elsewhere :class:`_ChunkedAttention` (ComfyUI's CPU default materialises the
    N x N weights, and autograd keeps them: 1 GiB at 1024 px, 16 GiB at 2048 px).
    """
    b, c, h, w = q.shape
    q2, k2, v2 = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (q, k, v))
    if q.device.type == "cuda":
        out = F.scaled_dot_product_attention(q2.contiguous(), k2.contiguous(), v2.contiguous())
    else:
        out = _ChunkedAttention.apply(q2.contiguous(), k2.contiguous(), v2.contiguous(), chunk, interrupt)
    return out.transpose(-1, -2).reshape(b, c, h, w)


def attention_block(block: torch.nn.Module, x: Tensor, interrupt: Interrupt = _no_interrupt) -> Tensor:
    """ComfyUI's ``AttnBlock`` forward (``x + proj_out(attention(q, k, v))`` of the normalised input) with
    :func:`exact_attention`."""
    h = block.norm(x)
    out = exact_attention(block.q(h), block.k(h), block.v(h), interrupt=interrupt)
    return x + block.proj_out(out)


# --- GroupNorm with given statistics ----------------------------------------------------------------------


@dataclass
class GroupStats:
    """Per-(batch item, group) statistics of one GroupNorm, accumulated band by band (Chan's pairwise update in
    float64), then frozen as ``mean`` and ``rstd = 1 / sqrt(var + eps)``."""

    groups: int
    eps: float
    count: int = 0
    mean64: Tensor | None = None
    m2: Tensor | None = None
    mean: Tensor | None = None
    rstd: Tensor | None = None

    def add(self, t: Tensor) -> None:
        """Add the values of a band ``t: (B, C, rows, W)`` (C divisible by ``groups``): the band's own mean and
        squared deviations in float32 (torch's Welford reduction), combined with the earlier bands in float64."""
        v = t.detach().reshape(t.shape[0], self.groups, -1)
        n = v.shape[-1]
        var32, mean32 = torch.var_mean(v.float(), dim=-1, correction=0)
        mean, m2 = mean32.double(), var32.double() * n
        if self.mean64 is None or self.m2 is None:
            self.count, self.mean64, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean64
        self.mean64 = self.mean64 + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def freeze(self) -> GroupStats:
        if self.mean64 is None or self.m2 is None:
            raise RuntimeError("GroupNorm statistics used before any band was added")
        var = self.m2 / self.count
        self.mean = self.mean64.float()
        self.rstd = torch.rsqrt(var + self.eps).float()
        return self

    @property
    def per_group(self) -> int:
        return self.count


def _per_channel(v: Tensor, channels: int) -> Tensor:
    """A per-(batch, group) value (B, G) repeated over each group's channels: (B, C, 1, 1)."""
    return v.repeat_interleave(channels // v.shape[1], dim=1)[..., None, None]


def group_norm(x: Tensor, norm: torch.nn.GroupNorm, mean: Tensor, rstd: Tensor) -> Tensor:
    """``norm(x)`` with the given per-(batch, group) ``mean`` and ``rstd`` (B, G), computed in float32 (a 16-bit
    ``x`` is upcast and the result cast back) as one per-channel affine map ``x * scale + shift`` (one pass over
    ``x``; differentiable in ``x``, ``mean`` and ``rstd``). Its rounding differs from ``(x - mean) * rstd``
    by about ``eps_f32 * |mean| * rstd`` relative, within the float32 bounds the tests measure."""
    c = x.shape[1]
    scale = norm.weight.float()[None, :, None, None] * _per_channel(rstd, c)
    shift = norm.bias.float()[None, :, None, None] - _per_channel(mean, c) * scale
    return torch.addcmul(shift, x.float(), scale).to(x.dtype)


def stats_gradient(t: Tensor, stats: GroupStats, l_mean: Tensor, l_rstd: Tensor) -> Tensor:
    """``dmean/dt^T l_mean + drstd/dt^T l_rstd`` for a band ``t: (B, C, rows, W)`` of the normalised tensor:
    ``l_mean / N - l_rstd rstd^3 (t - mean) / N`` per group (N values per group), float32, computed as the
    per-channel affine map ``t * a + b`` in one pass."""
    assert stats.mean is not None
    assert stats.rstd is not None
    c, n = t.shape[1], float(stats.count)
    slope = -l_rstd * stats.rstd ** 3 / n
    a = _per_channel(slope, c)
    b = _per_channel(l_mean / n - slope * stats.mean, c)
    return torch.addcmul(b, t.float(), a)


# --- the units ------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Tensor2D:
    """A full-size tensor of the decoder (structure only): ``scale`` rows per latent row (1, 2, 4, 8), its
    channels, the unit that produces it and the GroupNorm that normalises it in a band unit (``None``: none, or
    one that sees the whole tensor)."""

    name: str
    scale: int
    channels: int
    producer: Unit | None = None
    norm: torch.nn.GroupNorm | None = None


@dataclass(eq=False)
class Unit:
    """One step of the decoder: reads ``source``, writes ``target``; ``ratio`` = target rows per source row."""

    name: str
    source: Tensor2D
    target: Tensor2D

    @property
    def ratio(self) -> int:
        return self.target.scale // self.source.scale


@dataclass(eq=False)
class ConvIn(Unit):
    conv: torch.nn.Module = field(default=None)  # type: ignore[assignment]


@dataclass(eq=False)
class Block(Unit):
    """A ResNet block, with the 2x upsampling in front of it when ``upsample`` is set (its input is then the
    lower-resolution ``source``; the upsampled tensor is recomputed inside every band, never kept)."""

    block: torch.nn.Module = field(default=None)  # type: ignore[assignment]
    upsample: torch.nn.Module | None = None


@dataclass(eq=False)
class Attention(Unit):
    block: torch.nn.Module = field(default=None)  # type: ignore[assignment]


@dataclass(eq=False)
class Head(Unit):
    """``conv_out(silu(norm_out(x)))``: the image."""

    norm: torch.nn.GroupNorm = field(default=None)  # type: ignore[assignment]
    conv: torch.nn.Module = field(default=None)  # type: ignore[assignment]


def supports_tiling(decoder: torch.nn.Module) -> str | None:
    """``None`` when :class:`TiledDecoder` can run ``decoder`` (ComfyUI's 2-D KL ``Decoder`` with attention only
    in its mid block, no time embedding, plain output), else why not."""
    needed = ("conv_in", "mid", "up", "norm_out", "conv_out", "num_resolutions", "num_res_blocks")
    if not all(hasattr(decoder, n) for n in needed):
        return f"{type(decoder).__name__} is not ComfyUI's KL VAE decoder"
    if getattr(decoder, "give_pre_end", False) or getattr(decoder, "tanh_out", False):
        return "the decoder has a non-standard output (give_pre_end / tanh_out)"
    if not isinstance(decoder.conv_in, torch.nn.Conv2d):
        return "the decoder is not 2-D (a video VAE)"
    for level in decoder.up:
        if len(level.attn) > 0:
            return "the decoder has attention outside its mid block"
        for block in level.block:
            if getattr(block, "temb_proj", None) is not None or getattr(block, "use_conv_shortcut", False):
                return "the decoder's ResNet blocks use a time embedding or a 3x3 shortcut"
    return None


def decoder_units(decoder: torch.nn.Module) -> list[Unit]:
    """The units of ComfyUI's KL ``Decoder`` in forward order (see :func:`supports_tiling`)."""
    z = Tensor2D("z", 1, decoder.conv_in.in_channels)
    units: list[Unit] = [ConvIn("conv_in", z, Tensor2D("conv_in", 1, decoder.conv_in.out_channels),
                                conv=decoder.conv_in)]

    def add_block(name: str, block: torch.nn.Module, upsample: torch.nn.Module | None) -> None:
        source = units[-1].target
        target = Tensor2D(name, source.scale * (2 if upsample is not None else 1), block.out_channels)
        units.append(Block(name, source, target, block=block, upsample=upsample))

    add_block("mid.block_1", decoder.mid.block_1, None)
    source = units[-1].target
    units.append(Attention("mid.attn_1", source, Tensor2D("mid.attn_1", 1, source.channels),
                           block=decoder.mid.attn_1))
    add_block("mid.block_2", decoder.mid.block_2, None)
    pending: torch.nn.Module | None = None
    for level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[level]
        for i, block in enumerate(up.block):
            add_block(f"up.{level}.block.{i}", block, pending)
            pending = None
        if level != 0:
            pending = up.upsample
    source = units[-1].target
    units.append(Head("head", source, Tensor2D("image", source.scale, decoder.conv_out.out_channels),
                      norm=decoder.norm_out, conv=decoder.conv_out))
    for unit in units:
        unit.target.producer = unit
        if isinstance(unit, Block) and unit.upsample is None:
            unit.source.norm = unit.block.norm1
        elif isinstance(unit, Head):
            unit.source.norm = unit.norm
    return units


# --- one decode: what the forward pass leaves for the backward pass ------------------------------------------


@dataclass(eq=False)
class Run:
    """The state of one :meth:`TiledDecoder.forward` call: the latent's size, the kept tensors and every
    GroupNorm's statistics (keyed by the normalised tensor, or ``(block, "mid" / "in")`` inside a block)."""

    height: int
    width: int
    values: dict[Tensor2D, Tensor] = field(default_factory=dict)
    stats: dict[object, GroupStats] = field(default_factory=dict)
    dropped: set[Tensor2D] = field(default_factory=set)
    """Unit outputs not kept for the backward pass (recomputed from the nearest kept tensor)."""

    def release(self) -> None:
        self.values.clear()


def _silu(x: Tensor) -> Tensor:
    return F.silu(x)


def _add_pair(acc: tuple[Tensor, Tensor] | None, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """``acc + (mean, rstd)``: a band's share of the gradient with respect to a GroupNorm's statistics added to
    the bands' sum so far (``None``: none yet)."""
    return (mean, rstd) if acc is None else (acc[0] + mean, acc[1] + rstd)


def plain_conv(conv: object) -> bool:
    """Whether ``conv`` is a stride-1 ``Conv2d`` with zero "same" padding (3x3 / 1x1), whose input gradient is
    one transposed convolution of the output gradient (:func:`conv_input_vjp`)."""
    return (isinstance(conv, torch.nn.Conv2d) and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and all(2 * p + 1 == k for p, k in zip(conv.padding, conv.kernel_size, strict=True)))


def conv_input_vjp(conv: torch.nn.Conv2d, grad: Tensor, lo: int, hi: int) -> Tensor:
    """Rows ``[lo, hi)`` of the gradient with respect to a :func:`plain_conv` convolution's input, from ``grad``,
    the full-height gradient with respect to its output: the transposed convolution of ``grad``'s rows
    ``[lo - p, hi + p)`` (``p``: the padding; clipped to the image, whose border is zero padding), float32. No
    forward pass is needed: the convolution is linear in its input."""
    p = conv.padding[0]
    g_lo, g_hi = max(lo - p, 0), min(hi + p, grad.shape[2])
    w = conv.weight
    out = F.conv_transpose2d(grad[:, :, g_lo:g_hi].to(w.dtype), w, padding=conv.padding)
    return out[:, :, lo - g_lo:hi - g_lo].float()


def nearest_up_vjp(grad: Tensor) -> Tensor:
    """The adjoint of the 2x nearest-neighbour upsampling: each 2x2 block of ``grad`` (B, C, 2h, 2w) summed."""
    b, c, h, w = grad.shape
    return grad.reshape(b, c, h // 2, 2, w // 2, 2).sum(dim=(3, 5))


class TiledDecoder:
    """The decoder's forward pass and exact vector-Jacobian product in bands (module docstring).

    Args:
        decoder: ComfyUI's KL ``Decoder`` (``first_stage_model.decoder`` of an SD3 / Flux / SDXL VAE copy);
            :func:`supports_tiling` must accept it. Its parameters need not require grad.
        band_pixels: pixels per band (rows x width) of a tensor with the output level's channels (128 for SD3),
            proportionally fewer for wider tensors; at the 8x level of the SD3 VAE a band's graph takes about
            5 KB per pixel in float32.
        keep_budget: bytes of unit outputs kept from the forward pass for the backward pass, lowest resolution
            first (the rest is recomputed from the nearest kept tensor, band by band: slower). ``None``: keep
            everything. Latent-resolution tensors are always kept.
        interrupt: called between bands (ComfyUI's interrupt check); may raise.
        hold_temporaries: whether the forward pass holds a block's upsampled input and its first convolution's
            output as full-size temporaries (faster: nothing recomputed in the forward pass; the temporaries
            stay below the backward pass's peak when everything is kept). ``None``: when ``keep_budget`` is
            ``None``.
        lean: whether a ResNet block's backward pass holds none of its inner tensors full-size (autograd inside
            each band, its second convolution's VJP redone in each band of the second pass: slower) instead of
            :meth:`_backward_block_direct`'s maps. ``None``: when ``keep_budget`` is set. Blocks whose
            convolutions are not :func:`plain_conv` are always lean.
    """

    def __init__(self, decoder: torch.nn.Module, *, band_pixels: int = 1 << 17, keep_budget: int | None = None,
                 interrupt: Interrupt = _no_interrupt, hold_temporaries: bool | None = None,
                 lean: bool | None = None) -> None:
        reason = supports_tiling(decoder)
        if reason is not None:
            raise ValueError(f"tiled decoding is not available: {reason}")
        self.decoder = decoder
        self.band_pixels = max(1, int(band_pixels))
        self.keep_budget = keep_budget
        self.hold_temporaries = keep_budget is None if hold_temporaries is None else hold_temporaries
        self.lean = keep_budget is not None if lean is None else lean
        self.interrupt = interrupt
        self.units = decoder_units(decoder)
        self.tensors = [self.units[0].source, *(u.target for u in self.units)]
        self.base_channels = self.units[-1].source.channels

    # ---- sizes -------------------------------------------------------------------------------------------
    def bands(self, t: Tensor2D, run: Run) -> Iterator[tuple[int, int]]:
        """Row ranges ``[lo, hi)`` of ``t`` covering it, aligned to whole latent rows: ``band_pixels`` pixels
        for a tensor of the output level's channel count, proportionally fewer for wider tensors (a band's
        graph grows with pixels x channels)."""
        height, width = run.height * t.scale, run.width * t.scale
        pixels = self.band_pixels * self.base_channels // max(t.channels, self.base_channels)
        rows = max(t.scale, (pixels // width) // t.scale * t.scale)
        for lo in range(0, height, rows):
            yield lo, min(height, lo + rows)

    def shape(self, t: Tensor2D, run: Run, batch: int) -> tuple[int, int, int, int]:
        return (batch, t.channels, run.height * t.scale, run.width * t.scale)

    def kept_bytes(self, height: int, width: int, batch: int, element_size: int) -> dict[str, int]:
        """Bytes of every tensor the forward pass would keep (unit outputs, not the image)."""
        return {t.name: batch * t.channels * height * t.scale * width * t.scale * element_size
                for t in self.tensors[1:-1]}

    # ---- reading rows --------------------------------------------------------------------------------------
    def rows(self, t: Tensor2D, lo: int, hi: int, run: Run) -> tuple[Tensor, int]:
        """Rows ``[max(lo, 0), min(hi, H))`` of ``t`` (kept, or recomputed by its producer) and the first one's
        index."""
        lo, hi = max(lo, 0), min(hi, run.height * t.scale)
        value = run.values.get(t)
        if value is not None:
            return value[:, :, lo:hi], lo
        unit = t.producer
        if not isinstance(unit, Block | ConvIn):
            raise RuntimeError(f"{t.name} is neither kept nor recomputable band by band")
        return self.unit_rows(unit, lo, hi, run), lo

    def unit_rows(self, unit: Unit, lo: int, hi: int, run: Run) -> Tensor:
        """``unit``'s output rows ``[lo, hi)`` (no autograd) from its source's kept or recomputed rows."""
        if isinstance(unit, Block):
            r = unit.ratio
            src, first = self.rows(unit.source, (lo - 3) // r, (hi + 2) // r + 1, run)
            x, x_lo = self.block_input(unit, src, first, lo - 2, hi + 2, run)
            out = self.second_half(unit, x, self.first_half(unit, x, run), run)
            return out[:, :, lo - x_lo:hi - x_lo]
        src, first = self.rows(unit.source, lo - 1, hi + 1, run)
        out = unit.conv(src) if isinstance(unit, ConvIn) else self.head(unit, src, run)  # type: ignore[attr-defined]
        return out[:, :, lo - first:hi - first]

    # ---- unit bodies ---------------------------------------------------------------------------------------
    def _mean_rstd(self, key: object, run: Run, given: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        if given is not None:
            return given
        s = run.stats[key]
        assert s.mean is not None
        assert s.rstd is not None
        return s.mean, s.rstd

    def head(self, unit: Head, x: Tensor, run: Run, stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        mean, rstd = self._mean_rstd(unit.source, run, stats)
        return unit.conv(_silu(group_norm(x, unit.norm, mean, rstd)))

    def block_input(self, unit: Block, src: Tensor, first: int, lo: int, hi: int, run: Run) -> tuple[Tensor, int]:
        """Rows ``[lo, hi)`` of the block's input (clipped to the image and to what ``src``, rows from ``first``,
        determines), and the first row's index: ``src`` itself, or its 2x upsampling (ComfyUI's ``Upsample``:
        nearest, then a 3x3 convolution; the first and last upsampled rows of a slab that does not reach the
        image border are not valid and are never asked for)."""
        r = unit.ratio
        lo, hi = max(lo, first * r), min(hi, (first + src.shape[2]) * r, run.height * unit.target.scale)
        if unit.upsample is None:
            return src[:, :, lo - first:hi - first], lo
        return unit.upsample(src)[:, :, lo - 2 * first:hi - 2 * first], lo

    def first_half(self, unit: Block, x: Tensor, run: Run, stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``conv1(silu(norm1(x)))``."""
        mean, rstd = self._mean_rstd((unit, "in"), run, stats)
        b = unit.block
        return b.conv1(_silu(group_norm(x, b.norm1, mean, rstd)))

    def second_half(self, unit: Block, x: Tensor, h1: Tensor, run: Run,
                    stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``shortcut(x) + conv2(silu(norm2(h1)))`` on the rows x and h1 share."""
        mean, rstd = self._mean_rstd((unit, "mid"), run, stats)
        b = unit.block
        return self.shortcut(unit, x) + b.conv2(_silu(group_norm(h1, b.norm2, mean, rstd)))

    def shortcut(self, unit: Block, x: Tensor) -> Tensor:
        b = unit.block
        return b.nin_shortcut(x) if b.in_channels != b.out_channels else x

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, z: Tensor, *, keep: bool = True) -> tuple[Tensor, Run]:
        """The decoded image ``(B, 3, 8h, 8w)`` of the decoder input ``z: (B, C, h, w)``, without autograd, and
        the run's state for :meth:`backward` (with ``keep=False`` nothing is kept beyond the forward pass)."""
        run = Run(z.shape[2], z.shape[3])
        with torch.no_grad():
            run.values[self.units[0].source] = z
            budget = self.keep_budget if keep else 0
            kept = 0
            for unit in self.units:
                self.interrupt()
                last = unit is self.units[-1]
                size = self._bytes(unit.target, run, z.shape[0])
                stays = keep and (unit.target.scale == 1 or budget is None or kept + size <= budget)
                if keep and not stays and not last:      # not kept: only its statistics, never materialised
                    self._forward_unit(unit, run, z.shape[0], materialize=False)
                    run.dropped.add(unit.target)
                    continue
                out = self._forward_unit(unit, run, z.shape[0])
                if last:
                    if not keep:
                        run.release()
                    return out, run
                kept += size if stays else 0
                run.values[unit.target] = out
                if unit.source in run.dropped:
                    run.values.pop(unit.source, None)
                if not stays:
                    run.dropped.add(unit.target)
        raise AssertionError("unreachable")

    def _stats(self, key: object, norm: torch.nn.GroupNorm, run: Run) -> GroupStats:
        if key not in run.stats:
            run.stats[key] = GroupStats(norm.num_groups, norm.eps)
        return run.stats[key]

    def _bytes(self, t: Tensor2D, run: Run, batch: int) -> int:
        return math.prod(self.shape(t, run, batch)) * next(self.decoder.parameters()).dtype.itemsize

    def _forward_unit(self, unit: Unit, run: Run, batch: int, materialize: bool = True) -> Tensor | None:
        """The unit's output (``None`` with ``materialize=False``: only the statistics of the GroupNorm that
        normalises it are gathered, band by band, from recomputed rows)."""
        t = unit.target
        consumer = self._stats(t, t.norm, run) if t.norm is not None else None
        if isinstance(unit, Attention):
            out = attention_block(unit.block, run.values[unit.source], self.interrupt)
            if consumer is not None:
                consumer.add(out)
                consumer.freeze()
            return out
        if isinstance(unit, Block) and self.hold_temporaries and materialize and unit.source in run.values:
            out = self._forward_block_held(unit, run, batch)
            if consumer is not None:
                for lo, hi in self.bands(t, run):
                    consumer.add(out[:, :, lo:hi])
                consumer.freeze()
            return out
        if isinstance(unit, Block):
            b = unit.block
            if unit.upsample is not None:                    # statistics of the upsampled input
                s_in = self._stats((unit, "in"), b.norm1, run)
                for lo, hi in self.bands(t, run):
                    self.interrupt()
                    src, first = self.rows(unit.source, (lo - 1) // 2, (hi + 1) // 2 + 1, run)
                    s_in.add(self.block_input(unit, src, first, lo, hi, run)[0])
                s_in.freeze()
            else:
                run.stats[(unit, "in")] = run.stats[unit.source]
            s_mid = self._stats((unit, "mid"), b.norm2, run)
            for lo, hi in self.bands(t, run):                 # statistics of conv1's output
                self.interrupt()
                r = unit.ratio
                src, first = self.rows(unit.source, (lo - 2) // r, (hi + 1) // r + 1, run)
                x, x_lo = self.block_input(unit, src, first, lo - 1, hi + 1, run)
                s_mid.add(self.first_half(unit, x, run)[:, :, lo - x_lo:hi - x_lo])
            s_mid.freeze()
        dtype = next(self.decoder.parameters()).dtype
        out = None
        if materialize:
            out = torch.empty(self.shape(t, run, batch), dtype=dtype, device=run.values[self.units[0].source].device)
        for lo, hi in self.bands(t, run):
            self.interrupt()
            rows = self.unit_rows(unit, lo, hi, run)
            if out is not None:
                out[:, :, lo:hi] = rows
            if consumer is not None:
                consumer.add(rows)
        if consumer is not None:
            consumer.freeze()
        return out

    @staticmethod
    def _slab(x: Tensor, lo: int, hi: int, halo: int) -> tuple[Tensor, int]:
        """Rows ``[lo - halo, hi + halo)`` of ``x`` clipped to its height, and the offset of row ``lo`` in them."""
        first = max(lo - halo, 0)
        return x[:, :, first:min(hi + halo, x.shape[2])], lo - first

    def _forward_block_held(self, unit: Block, run: Run, batch: int) -> Tensor:
        """A ResNet block's forward pass with its (upsampled) input and ``conv1``'s output held as full-size
        temporaries: every layer runs once, as in the module's own forward pass (the path without them runs
        the upsampling three times and ``conv1`` twice to get the statistics without holding anything)."""
        t, b = unit.target, unit.block
        src = run.values[unit.source]
        height, width = run.height * t.scale, run.width * t.scale
        if unit.upsample is None:
            x = src
            run.stats[(unit, "in")] = run.stats[unit.source]
        else:
            x = src.new_empty((batch, unit.source.channels, height, width))
            s_in = self._stats((unit, "in"), b.norm1, run)
            for lo, hi in self.bands(t, run):
                self.interrupt()
                rows, first = self.rows(unit.source, (lo - 1) // 2, (hi + 1) // 2 + 1, run)
                x[:, :, lo:hi] = self.block_input(unit, rows, first, lo, hi, run)[0]
                s_in.add(x[:, :, lo:hi])
            s_in.freeze()
        h1 = src.new_empty((batch, t.channels, height, width))
        s_mid = self._stats((unit, "mid"), b.norm2, run)
        for lo, hi in self.bands(t, run):
            self.interrupt()
            slab, at = self._slab(x, lo, hi, 1)
            h1[:, :, lo:hi] = self.first_half(unit, slab, run)[:, :, at:at + hi - lo]
            s_mid.add(h1[:, :, lo:hi])
        s_mid.freeze()
        out = torch.empty_like(h1)
        for lo, hi in self.bands(t, run):
            self.interrupt()
            slab, at = self._slab(h1, lo, hi, 1)
            h = b.conv2(_silu(group_norm(slab, b.norm2, *self._mean_rstd((unit, "mid"), run, None))))
            out[:, :, lo:hi] = self.shortcut(unit, x[:, :, lo:hi]) + h[:, :, at:at + hi - lo]
        return out

    # ---- backward --------------------------------------------------------------------------------------
    def backward(self, run: Run, grad_image: Tensor) -> Tensor:
        """``J^T grad_image`` (float32): the gradient with respect to the decoder input of ``run``'s forward pass;
        releases the run's kept tensors as it goes."""
        grad = grad_image.float()
        try:
            for unit in reversed(self.units):
                self.interrupt()
                run.values.pop(unit.target, None)   # only the later units' backward passes read it
                grad = self._backward_unit(unit, grad, run)
        finally:
            run.release()
        return grad

    @staticmethod
    def _leaf(t: Tensor) -> Tensor:
        return t.detach().requires_grad_(True)

    def _stats_leaves(self, key: object, run: Run) -> tuple[Tensor, Tensor]:
        s = run.stats[key]
        assert s.mean is not None
        assert s.rstd is not None
        return self._leaf(s.mean.clone()), self._leaf(s.rstd.clone())

    def _zeros(self, t: Tensor2D, run: Run, batch: int, device: torch.device) -> Tensor:
        return torch.zeros(self.shape(t, run, batch), dtype=torch.float32, device=device)

    def _add_stats_gradient(self, grad: Tensor, t: Tensor2D, lam: tuple[Tensor, Tensor], run: Run) -> None:
        """``grad += d(stats of t)/dt^T lam`` (``lam``: the gradient with respect to ``t``'s GroupNorm ``mean``
        and ``rstd``), band by band; ``grad`` has ``t``'s shape."""
        for lo, hi in self.bands(t, run):
            self.interrupt()
            rows, _ = self.rows(t, lo, hi, run)
            grad[:, :, lo:hi] += stats_gradient(rows, run.stats[t], *lam)

    def _backward_unit(self, unit: Unit, grad: Tensor, run: Run) -> Tensor:
        """The gradient with respect to ``unit.source`` from ``grad`` with respect to ``unit.target`` (which
        already holds the statistics' gradient of the GroupNorm that normalises the target, if any)."""
        if isinstance(unit, Attention):
            x = run.values[unit.source]
            with torch.inference_mode(False), torch.enable_grad():
                leaf = self._leaf(x)
                out = attention_block(unit.block, leaf, self.interrupt)
                (g,) = torch.autograd.grad(out, leaf, grad.to(out.dtype))
            return g.float()
        if isinstance(unit, Block):
            return self._backward_block(unit, grad, run)
        g_src = self._zeros(unit.source, run, grad.shape[0], grad.device)
        lam: tuple[Tensor, Tensor] | None = None
        for lo, hi in self.bands(unit.target, run):
            self.interrupt()
            src, first = self.rows(unit.source, lo - 1, hi + 1, run)
            with torch.inference_mode(False), torch.enable_grad():
                leaf = self._leaf(src)
                if isinstance(unit, Head):
                    leaves = self._stats_leaves(unit.source, run)
                    out = self.head(unit, leaf, run, leaves)[:, :, lo - first:hi - first]
                    grads = torch.autograd.grad(out, (leaf, *leaves), grad[:, :, lo:hi].to(out.dtype))
                    lam = _add_pair(lam, grads[1], grads[2])
                else:
                    out = unit.conv(leaf)[:, :, lo - first:hi - first]  # type: ignore[attr-defined]
                    grads = torch.autograd.grad(out, leaf, grad[:, :, lo:hi].to(out.dtype))
            g_src[:, :, first:first + src.shape[2]] += grads[0]
        if lam is not None:
            self._add_stats_gradient(g_src, unit.source, lam, run)
        return g_src

    def _direct(self, unit: Block) -> bool:
        """Whether the block's backward pass can use transposed convolutions (:meth:`_backward_block_direct`)."""
        b = unit.block
        convs = [b.conv1, b.conv2] + ([b.nin_shortcut] if b.in_channels != b.out_channels else [])
        if unit.upsample is not None:
            convs.append(getattr(unit.upsample, "conv", None))
        return not self.lean and all(plain_conv(c) for c in convs)

    def _elementwise_vjp(self, x: Tensor, norm: torch.nn.GroupNorm, key: object, run: Run, g_out: Tensor
                         ) -> tuple[Tensor, Tensor, Tensor]:
        """The VJP of ``silu(norm(x))`` (statistics ``run.stats[key]`` frozen) for a band ``x``: the gradient
        with respect to ``x`` (float32) and to the statistics' mean and rstd (the band's share)."""
        with torch.inference_mode(False), torch.enable_grad():
            leaf = self._leaf(x)
            stats = self._stats_leaves(key, run)
            out = _silu(group_norm(leaf, norm, *stats))
            g_x, l_mean, l_rstd = torch.autograd.grad(out, (leaf, *stats), g_out.to(out.dtype))
        return g_x.float(), l_mean, l_rstd

    def _backward_block_direct(self, unit: Block, grad: Tensor, run: Run) -> Tensor:
        """:meth:`_backward_block` with the convolutions' input gradients taken as transposed convolutions of the
        output gradients (no forward pass of ``conv2``, of ``conv1`` in the second pass or of the upsampling
        in its VJP) and the block's inner tensors held full-size for the duration of its backward pass:
        ``conv1``'s output, its gradient map, and for a block behind an upsampling the upsampled input and its
        gradient map. Per block this runs ``conv1`` forward once and each convolution's VJP once."""
        b, t, src = unit.block, unit.target, unit.source
        batch, device = grad.shape[0], grad.device
        identity = unit.upsample is None and b.in_channels == b.out_channels
        dtype = next(self.decoder.parameters()).dtype
        shape = self.shape(t, run, batch)
        h1_all = torch.empty(shape, dtype=dtype, device=device)
        x_all = (torch.empty((batch, src.channels, *shape[2:]), dtype=dtype, device=device)
                 if unit.upsample is not None else None)
        g_h1 = torch.empty(shape, dtype=torch.float32, device=device)
        lam_mid: tuple[Tensor, Tensor] | None = None
        for lo, hi in self.bands(t, run):   # pass 1: conv1's output (held), conv2's VJP, norm2 frozen
            self.interrupt()
            s, first = self.rows(src, (lo - 2) // unit.ratio, (hi + 1) // unit.ratio + 1, run)
            with torch.no_grad():
                x, x_lo = self.block_input(unit, s, first, lo - 1, hi + 1, run)
                if x_all is not None:
                    x_all[:, :, lo:hi] = x[:, :, lo - x_lo:hi - x_lo]
                h1_all[:, :, lo:hi] = self.first_half(unit, x, run)[:, :, lo - x_lo:hi - x_lo]
            g_a2 = conv_input_vjp(b.conv2, grad, lo, hi)
            g_h1[:, :, lo:hi], l_mean, l_rstd = self._elementwise_vjp(h1_all[:, :, lo:hi], b.norm2, (unit, "mid"),
                                                                    run, g_a2)
            lam_mid = _add_pair(lam_mid, l_mean, l_rstd)
        assert lam_mid is not None
        for lo, hi in self.bands(t, run):   # norm2's statistics' gradient, on conv1's output
            g_h1[:, :, lo:hi] += stats_gradient(h1_all[:, :, lo:hi], run.stats[(unit, "mid")], *lam_mid)
        del h1_all
        # the gradient with respect to the block's input: for an identity shortcut grad itself, updated in place
        # (pass 2 no longer reads grad then); behind an upsampling a full-size map at this resolution
        g_x = grad if identity else torch.empty((batch, src.channels, *shape[2:]), dtype=torch.float32,
                                                 device=device)
        lam_in: tuple[Tensor, Tensor] | None = None
        for lo, hi in self.bands(t, run):   # pass 2: conv1's VJP, norm1 frozen, and the shortcut
            self.interrupt()
            g_a1 = conv_input_vjp(b.conv1, g_h1, lo, hi)
            x = x_all[:, :, lo:hi] if x_all is not None else self.rows(src, lo, hi, run)[0]
            g_band, l_mean, l_rstd = self._elementwise_vjp(x, b.norm1, (unit, "in"), run, g_a1)
            if identity:
                g_x[:, :, lo:hi] += g_band
            else:                           # the bands tile the rows: each written once
                short = (grad[:, :, lo:hi] if b.in_channels == b.out_channels
                         else conv_input_vjp(b.nin_shortcut, grad, lo, hi))
                g_x[:, :, lo:hi] = g_band + short
            lam_in = _add_pair(lam_in, l_mean, l_rstd)
        del g_h1
        assert lam_in is not None
        if x_all is None:                   # pass 3: norm1's statistics' gradient, on the block's input
            self._add_stats_gradient(g_x, src, lam_in, run)
            return g_x
        for lo, hi in self.bands(t, run):   # ... on the upsampled input, then through the upsampling
            g_x[:, :, lo:hi] += stats_gradient(x_all[:, :, lo:hi], run.stats[(unit, "in")], *lam_in)
        del x_all
        g_src = self._zeros(src, run, batch, device)
        conv = unit.upsample.conv  # type: ignore[union-attr]
        for lo, hi in self.bands(t, run):   # bands start and end on even rows (whole latent rows)
            self.interrupt()
            g_src[:, :, lo // 2:hi // 2] = nearest_up_vjp(conv_input_vjp(conv, g_x, lo, hi))
        return g_src

    def _backward_block(self, unit: Block, grad: Tensor, run: Run) -> Tensor:
        """The gradient with respect to the block's source: :meth:`_backward_block_direct`, or lean (autograd
        inside each band, no full-size map of the block's inner tensors: the first pass gathers norm2's
        statistics' gradient, the second redoes conv2's VJP on its band and differentiates conv1 and the
        shortcut, a third adds norm1's statistics' gradient, through the upsampling in front of the block)."""
        if self._direct(unit):
            return self._backward_block_direct(unit, grad, run)
        r, b, t, src = unit.ratio, unit.block, unit.target, unit.source
        height = run.height * t.scale
        identity = unit.upsample is None and b.in_channels == b.out_channels
        # the gradient with respect to the source; for an identity shortcut it starts as the output's gradient,
        # updated in place by pass 2 (pass 1 reads grad before that; pass 2 reads grad only for a shortcut that is
        # not the identity)
        g_src = grad if identity else self._zeros(src, run, grad.shape[0], grad.device)
        lam_mid: tuple[Tensor, Tensor] | None = None
        for lo, hi in self.bands(t, run):   # pass 1: norm2's statistics' gradient through conv2(silu(norm2(h1)))
            self.interrupt()
            s, first = self.rows(src, (lo - 3) // r, (hi + 2) // r + 1, run)
            h_lo, h_hi = max(lo - 1, 0), min(hi + 1, height)
            with torch.no_grad():
                x, x_lo = self.block_input(unit, s, first, h_lo - 1, h_hi + 1, run)
                h1 = self.first_half(unit, x, run)[:, :, h_lo - x_lo:h_hi - x_lo]
            _, lam = self._conv2_vjp(unit, h1, h_lo, grad, lo, hi, run, need_input=False)
            lam_mid = _add_pair(lam_mid, *lam)
        assert lam_mid is not None
        lam_in: tuple[Tensor, Tensor] | None = None
        carry: tuple[int, Tensor] | None = None
        halo = 3                            # conv1's output two rows wider, to redo pass 1's conv2 on the band
        for lo, hi in self.bands(t, run):   # pass 2: conv1(silu(norm1(x))) seeded with norm2's statistics too,
            self.interrupt()                # and the shortcut (when it is not the identity) on the same input
            s, first = self.rows(src, (lo - halo - 2) // r, (hi + halo + 1) // r + 1, run)
            with torch.inference_mode(False), torch.enable_grad():
                s_leaf = self._leaf(s)
                inn = self._stats_leaves((unit, "in"), run)
                x, x_lo = self.block_input(unit, s_leaf, first, lo - halo, hi + halo, run)
                h1_all = self.first_half(unit, x, run, inn)
                e_lo, e_hi = max(lo - 2, 0), min(hi + 2, height)   # g_h1 of the band, complete: conv2's VJP
                c_lo, c_hi = max(lo - 1, 0), min(hi + 1, height)   # on rows lo - 1 .. hi + 1
                g_ext, _ = self._conv2_vjp(unit, h1_all[:, :, e_lo - x_lo:e_hi - x_lo].detach(), e_lo, grad,
                                           c_lo, c_hi, run, need_input=True, need_stats=False)
                g_band = g_ext[:, :, lo - e_lo:hi - e_lo]
                h1 = h1_all[:, :, lo - x_lo:hi - x_lo]
                seed = g_band + stats_gradient(h1.detach(), run.stats[(unit, "mid")], *lam_mid)
                outs, seeds = [h1], [seed.to(h1.dtype)]
                if not identity:
                    core = self.shortcut(unit, x[:, :, lo - x_lo:hi - x_lo])
                    outs.append(core)
                    seeds.append(grad[:, :, lo:hi].to(core.dtype))
                grads = torch.autograd.grad(outs, (s_leaf, *inn), seeds)
            # an identity block's g_src is grad itself, which this pass reads two rows around the next band:
            # the rows from hi - 2 on are added only after that band has read them
            split = hi - 2 - first if identity else grads[0].shape[2]
            if carry is not None:
                g_src[:, :, carry[0]:carry[0] + carry[1].shape[2]] += carry[1]
            g_src[:, :, first:first + min(split, grads[0].shape[2])] += grads[0][:, :, :split]
            carry = (first + split, grads[0][:, :, split:]) if split < grads[0].shape[2] else None
            lam_in = _add_pair(lam_in, grads[1], grads[2])
        if carry is not None:
            g_src[:, :, carry[0]:carry[0] + carry[1].shape[2]] += carry[1]
        assert lam_in is not None
        if unit.upsample is None:           # pass 3: norm1's statistics' gradient, on the block's input
            self._add_stats_gradient(g_src, src, lam_in, run)
            return g_src
        for lo, hi in self.bands(t, run):   # ... through the upsampling in front of the block
            self.interrupt()
            s, first = self.rows(src, (lo - 2) // 2, (hi + 1) // 2 + 1, run)
            with torch.inference_mode(False), torch.enable_grad():
                s_leaf = self._leaf(s)
                x, _ = self.block_input(unit, s_leaf, first, lo, hi, run)
                seed = stats_gradient(x.detach(), run.stats[(unit, "in")], *lam_in)
                (g,) = torch.autograd.grad(x, s_leaf, seed.to(x.dtype))
            g_src[:, :, first:first + s.shape[2]] += g
        return g_src


    def _conv2_vjp(self, unit: Block, h1: Tensor, h_lo: int, grad: Tensor, lo: int, hi: int, run: Run, *,
                   need_input: bool, need_stats: bool = True) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The VJP of ``conv2(silu(norm2(h1)))`` (norm2's statistics frozen) for its output rows ``[lo, hi)``,
        seeded with ``grad``'s rows: the gradient with respect to ``h1`` (rows from ``h_lo``; the rows next to a
        slab edge that is not the image border get only part of it) and with respect to norm2's mean and rstd."""
        b = unit.block
        with torch.inference_mode(False), torch.enable_grad():
            h_leaf = self._leaf(h1)
            mid = self._stats_leaves((unit, "mid"), run) if need_stats else self._mean_rstd((unit, "mid"), run, None)
            h = b.conv2(_silu(group_norm(h_leaf, b.norm2, *mid)))[:, :, lo - h_lo:hi - h_lo]
            wanted = ((h_leaf,) if need_input else ()) + (tuple(mid) if need_stats else ())
            grads = torch.autograd.grad(h, wanted, grad[:, :, lo:hi].to(h.dtype))
        g_in = grads[0] if need_input else h1.new_zeros(0)
        lam = (grads[-2], grads[-1]) if need_stats else (h1.new_zeros(0), h1.new_zeros(0))
        return g_in, lam


class _TiledDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, engine: TiledDecoder) -> Tensor:
        image, run = engine.forward(z.detach())
        ctx.engine, ctx.run, ctx.dtype = engine, run, z.dtype
        return image

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        g = ctx.engine.backward(ctx.run, grad)
        ctx.run = None
        return g.to(ctx.dtype), None


def tiled_decode(engine: TiledDecoder, z: Tensor) -> Tensor:
    """``engine.decoder(z)``, autograd-aware: its backward pass is :meth:`TiledDecoder.backward`. Without a
    graph to build (no grad mode, or ``z`` does not require grad) nothing is kept past the forward pass."""
    if not (torch.is_grad_enabled() and z.requires_grad):
        return engine.forward(z.detach(), keep=False)[0]
    out: Tensor = _TiledDecode.apply(z, engine)
    return out
