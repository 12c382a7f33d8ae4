"""Pallas flash-decoding kernel: one query token per sequence against a float, int8 or int4 KV cache, paged or not.

Grid (batch, kv head, split). A program holds the query heads of its kv head as the rows of one tile (padded to
16 rows, the smallest dot Pallas's Triton lowering accepts; the padding is done once on the small query outside
the kernel and costs no cache traffic), walks the pages of its split of the context through the block table,
and for each page loads the stored K and V, dequantises them in registers and folds the page into an online softmax
(`pallas_kernels.online_softmax`). It writes its normalised partial output and base-2 logsumexp; the splits are
merged outside the kernel (`online_softmax.combine`). A contiguous cache is viewed as a paged one with an
identity block table (a free reshape when its length is a multiple of the page size, a padded copy otherwise).
The default split count is the smallest that launches `PROGRAMS_PER_SM` programs per SM (`default_splits`).

Dots run on the tensor cores in the query's dtype when it is a 16-bit float (bfloat16 or float16 operands,
float32 accumulation); a float32 query keeps float32 operands at HIGHEST precision, so that path matches the XLA
one to float32 rounding. Both products are formed transposed, scoresᵀ = K·qᵀ [page, rows] and outᵀ = Vᵀ·Pᵀ
[channels, rows], so that the page or the channels are the MMA's rows: Hopper's `wgmma` takes 64 rows at least,
and the 16 query rows become its narrow N side (on sm_90a: `wgmma` m64n16k16 instead of `mma.sync` m16n8k16).
Dequantisation needs no in-kernel reshape or interleave:
- int8 (one scale per token and head): integer levels (exact in any float dtype) enter the dot as they are and
  the per-token scale multiplies the score columns (K) or the probability columns (V);
- int4 (two channels per byte, one scale per group of channels): a page is read as its low nibbles (the even
  channels) and its high nibbles (the odd ones), each multiplied by its byte's group scale; each half is one dot,
  for K against the matching half of a query permuted to (even channels, odd channels), for V into its half of
  an output kept in that permuted order and put back in order outside the kernel.

The kernel is written for Pallas's Triton lowering (power-of-two tiles, dots of at least 16 in every dimension:
int4 head_dim of at least 32, pages of at least 16 tokens). Its numerics are tested in interpret mode; its sm_90a
machine code (registers, spills, MMA instructions, grid) is checked by a deviceless compile
(`pallas_kernels.sm90_report`); its speed has not been measured.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from pallas_kernels import online_softmax
from pallas_kernels.flash_attention import MIN_BLOCK, _dot_nt, _dot_tn, _next_power_of_2, _pad_axis
from pallas_kernels.kv_cache import has_scale, kv_format_of
from pallas_kernels.varying import align_varying, output_struct

CONTIGUOUS_PAGE = 64  # page size a contiguous cache is viewed with
PROGRAMS_PER_SM = 2  # the default split count launches at least this many programs per SM
H100_SM_COUNT = 132  # SMs assumed off GPU (the deviceless sm_90a compile targets an H100)
_INT4_OFFSET = 8


@dataclasses.dataclass(frozen=True)
class _Part:
    """A slice of channels handled by one dot: `width` channels at `offset` of the (possibly permuted) head_dim.

    For int4, `nibble` is 0 (the low nibbles of the packed row: even channels) or 1 (high: odd channels).
    """

    offset: int
    width: int
    nibble: int | None = None


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one cache (K or V) is stored: its format, the channel parts a page is read in, int4's scale groups."""

    kv_format: str
    parts: tuple[_Part, ...]
    groups: int = 0

    @property
    def permuted(self) -> bool:
        return self.kv_format == "int4"

    @classmethod
    def of(cls, cache: Array, scale: Array | None, head_dim: int) -> _Layout:
        kv_format = kv_format_of(cache)
        if has_scale(kv_format) and scale is None:
            raise ValueError(f"a {kv_format} cache needs its scales")
        if kv_format != "int4":
            return cls(kv_format, (_Part(0, head_dim),))
        half = head_dim // 2
        return cls(kv_format, tuple(_Part(n * half, half, nibble=n) for n in (0, 1)), groups=scale.shape[-1])


def _int4_scales(layout: _Layout, scale_ref, page, shape: tuple[int, int]):
    """Each packed byte's group scale, [page_size, head_dim // 2]: byte b holds channels 2b, 2b + 1 of group
    b // (bytes per group); built with one select per group, since the Triton lowering has no gather."""
    group_of_byte = lax.broadcasted_iota(jnp.int32, shape, 1) // (shape[1] // layout.groups)
    scales = jnp.zeros(shape, jnp.float32)
    for g in range(layout.groups):
        scales = jnp.where(group_of_byte == g, scale_ref[page, :, g][:, None], scales)
    return scales


def _page_part(layout: _Layout, cache_ref, scale_ref, page, part: _Part, dtype):
    """One part of one page in the dot dtype, [page_size, width], and the per-token scale still to apply (or None).

    int4 pages are dequantised here (levels times their group scale); int8 levels enter the dot as they are
    (exact in any float dtype) and their per-token scale is returned to multiply score or probability columns.
    """
    if layout.kv_format == "int4":
        packed = cache_ref[page].astype(jnp.int32)
        nibble = packed & 0xF if part.nibble == 0 else packed >> 4
        values = (nibble - _INT4_OFFSET).astype(jnp.float32) * _int4_scales(layout, scale_ref, page, packed.shape)
        return values.astype(dtype), None
    levels = cache_ref[page].astype(dtype)
    return levels, scale_ref[page] if layout.kv_format == "int8" else None


def _scaled_columns(x, scale):
    return x if scale is None else x * scale[None, :]


@dataclasses.dataclass(frozen=True)
class _Static:
    k: _Layout
    v: _Layout
    page_size: int
    pages_per_split: int
    dtype: str
    names: tuple[str, ...]


def _kernel(*refs, st: _Static):
    """Partial attention of one sequence's query heads (one kv head) over the pages of one split."""
    r = dict(zip(st.names, refs, strict=True))
    length = r["lengths"][0]
    first = pl.program_id(2) * st.pages_per_split
    last = jnp.minimum(first + st.pages_per_split, lax.div(length + st.page_size - 1, st.page_size))
    rows = r["q"].shape[0]
    positions = lax.broadcasted_iota(jnp.int32, (rows, st.page_size), 1)

    def body(j, carry):
        page = r["tables"][j]
        scores = 0.0
        for part in st.k.parts:
            levels, scale = _page_part(st.k, r["k"], r.get("k_scale"), page, part, st.dtype)
            q = r["q"][:, pl.ds(part.offset, part.width)]
            scores = scores + _scaled_columns(_dot_nt(levels, q).T, scale)
        mask = j * st.page_size + positions < length

        def values(p):
            out = []
            for part in st.v.parts:
                levels, scale = _page_part(st.v, r["v"], r.get("v_scale"), page, part, st.dtype)
                out.append(_dot_tn(levels, _scaled_columns(p, scale).astype(st.dtype).T).T)
            return out

        return online_softmax.update(carry, scores, mask, values)

    init = online_softmax.init([jnp.zeros((rows, part.width), jnp.float32) for part in st.v.parts], rows)
    carry = lax.fori_loop(first, jnp.maximum(last, first), body, init)
    out, lse = online_softmax.finish(carry, empty_lse=-jnp.inf)
    for part, o in zip(st.v.parts, out, strict=True):
        r["o"][:, pl.ds(part.offset, part.width)] = o
    r["lse"][...] = lse


def sm_count() -> int:
    """Streaming multiprocessors of the default GPU; an H100's 132 on other backends."""
    if jax.default_backend() == "gpu":
        return getattr(jax.devices()[0], "core_count", H100_SM_COUNT)
    return H100_SM_COUNT


def default_splits(batch: int, kv_heads: int) -> int:
    """Fewest context splits that give every SM `PROGRAMS_PER_SM` programs: the grid is (batch, kv_heads, splits)."""
    return max(1, math.ceil(PROGRAMS_PER_SM * sm_count() / (batch * kv_heads)))


def _as_pages(cache: Array, scale: Array | None, page_size: int):
    """A contiguous cache [batch, max_len, ...] (and its scales) as a page pool, plus the identity block table."""
    batch, max_len = cache.shape[:2]
    pages = -(-max_len // page_size)

    def paged(x):
        x = _pad_axis(x, 1, pages * page_size)
        return x.reshape(batch * pages, page_size, *x.shape[2:])

    tables = jnp.arange(batch * pages, dtype=jnp.int32).reshape(batch, pages)
    return paged(cache), None if scale is None else paged(scale), tables


def _permute_channels(x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
    """Even channels, then odd ones: the order of an int4 page's low and high nibbles."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def _unpermute_channels(x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
    half = x.shape[-1] // 2
    return jnp.stack([x[..., :half], x[..., half:]], axis=-1).reshape(x.shape)


def _cache_spec(pool: Array) -> pl.BlockSpec:
    """The whole page pool of kv head h: [num_pages, page_size, (channels or scale groups)]."""
    rest = pool.shape[3:]
    return pl.BlockSpec((pool.shape[0], pool.shape[1], None, *rest), lambda b, h, s: (0, 0, h, *(0 for _ in rest)))


def pallas_decode(
    q: Float[Array, "batch heads head_dim"],
    k: tuple[Array, Array | None],
    v: tuple[Array, Array | None],
    lengths: Int[Array, " batch"],
    block_tables: Int[Array, "batch pages"] | None,
    *,
    sm_scale: float,
    num_splits: int | None,
    interpret: bool,
) -> Float[Array, "batch heads head_dim"]:
    """Flash-decoding over a cache given as (data, scale) pairs in the formats of `pallas_kernels.kv_cache`."""
    (k_cache, k_scale), (v_cache, v_scale) = k, v
    batch, heads, head_dim = q.shape
    dtype = q.dtype
    kv_heads = k_cache.shape[2]
    groups = heads // kv_heads
    if block_tables is None:
        page_size = min(CONTIGUOUS_PAGE, max(MIN_BLOCK, _next_power_of_2(k_cache.shape[1])))
        k_cache, k_scale, block_tables = _as_pages(k_cache, k_scale, page_size)
        v_cache, v_scale, _ = _as_pages(v_cache, v_scale, page_size)
    page_size, pages = k_cache.shape[1], block_tables.shape[1]
    splits = max(1, min(num_splits or default_splits(batch, kv_heads), pages))
    k_layout, v_layout = _Layout.of(k_cache, k_scale, head_dim), _Layout.of(v_cache, v_scale, head_dim)

    rows = max(MIN_BLOCK, _next_power_of_2(groups))
    dot_dtype = dtype if jnp.dtype(dtype).itemsize == 2 else jnp.float32
    q = (q.astype(jnp.float32) * (sm_scale * math.log2(math.e))).astype(dot_dtype)
    q = _permute_channels(q) if k_layout.permuted else q
    q = _pad_axis(q.reshape(batch, kv_heads, groups, head_dim), 2, rows)

    inputs = [
        ("q", q, pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0))),
        ("lengths", lengths.astype(jnp.int32)[:, None], pl.BlockSpec((None, 1), lambda b, h, s: (b, 0))),
        ("tables", block_tables.astype(jnp.int32), pl.BlockSpec((None, pages), lambda b, h, s: (b, 0))),
        ("k", k_cache, _cache_spec(k_cache)),
        ("v", v_cache, _cache_spec(v_cache)),
    ]
    inputs += [(name, s, _cache_spec(s)) for name, s in (("k_scale", k_scale), ("v_scale", v_scale)) if s is not None]
    outputs = [
        (
            "o",
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, head_dim), jnp.float32),
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
        ),
        (
            "lse",
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ),
    ]
    st = _Static(
        k=k_layout,
        v=v_layout,
        page_size=page_size,
        pages_per_split=-(-pages // splits),
        dtype=jnp.dtype(dot_dtype).name,
        names=tuple(n for n, _, _ in inputs) + tuple(n for n, _, _ in outputs),
    )
    arrays = align_varying([array for _, array, _ in inputs])
    out, lse = pl.pallas_call(
        functools.partial(_kernel, st=st),
        grid=(batch, kv_heads, splits),
        in_specs=[spec for _, _, spec in inputs],
        out_specs=[spec for _, _, spec in outputs],
        out_shape=[output_struct(shape.shape, shape.dtype, arrays) for _, shape, _ in outputs],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="decode_attention",
    )(*arrays)
    out = online_softmax.combine(out, lse)[:, :, :groups]
    out = _unpermute_channels(out) if v_layout.permuted else out
    return out.reshape(batch, heads, head_dim).astype(dtype)
