"""FlashAttention-2 style attention in Pallas: online-softmax forward, dQ and dK/dV backward kernels.

The kernels are written for Pallas's Triton lowering (GPU): a grid over (batch, heads, blocks), BlockSpecs that
hand each program one query (or key) block plus the whole key (or query) sequence of its head, and a loop
(`varying.fori_loop`, a while loop also for static bounds, so that interpret mode runs inside `shard_map`) over the
other sequence's blocks that loads slices with `pl.ds`. Elsewhere they run in Pallas interpret mode, which is what
the CPU tests exercise.

Numerics: scores, the running max/sum and all accumulators are float32 whatever the input dtype; probabilities
are cast to the input dtype only as the left operand of the P·V and dS·K / dS·Q products, as in FlashAttention.
Scores are kept in base 2 (`exp2`, with log2(e) folded into the scale) and the saved logsumexp is base 2 as well.
A row with no visible key has sum 0: its output is 0 and its logsumexp +inf, which makes every recomputed
probability 0 in the backward pass, so such rows give 0 outputs and 0 gradients, never NaN.

Work follows the mask: without a block mask each program loops over the kv-block range that causality and the
window leave (`Geometry.kv_block_range`), and only the edge tiles of that range pay for element masking (tiles
entirely visible by position, `Geometry.full_kv_block_range`, skip it); with a block mask it loops over its
kept-block list (`schedule.BlockSchedule`). The dK/dV kernel uses the transposed ranges/lists.

GQA/MQA: K/V are never repeated; the BlockSpec index maps send query head `h` to kv head `h // groups`. The dK/dV
kernel runs per kv head and loops over the query heads of its group, so dK/dV are written once, at kv-head size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels import online_softmax
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.geometry import Geometry, attention_shapes, normalize_window, segment_mask
from pallas_kernels.schedule import BlockSchedule, build_schedule
from pallas_kernels.varying import align_varying, fori_loop, output_struct

DEFAULT_BLOCK = 64
MIN_BLOCK = 16  # the smallest tile Triton's matrix-multiply instruction accepts
_LOG2_E = math.log2(math.e)

SegmentIds = Int[Array, "batch seq"] | tuple[Int[Array, "batch q_len"], Int[Array, "batch kv_len"]]


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything about a call that is fixed at trace time (hashable: a `custom_vjp` non-diff argument)."""

    geometry: Geometry
    sm_scale: float
    groups: int
    has_segments: bool
    sparse: bool
    mask_per_head: bool
    interpret: bool
    num_warps: int = 8
    num_stages: int = 2

    @property
    def scale_log2(self) -> float:
        return self.sm_scale * _LOG2_E


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Extras:
    """Integer side inputs of the kernels; they receive no gradient."""

    q_segments: Int[Array, "batch q_pad"] | None
    kv_segments: Int[Array, "batch kv_pad"] | None
    schedule: BlockSchedule | None


def _dot(a, b, contract: tuple[int, int], out_dtype=jnp.float32):
    """2-D matmul contracting a's axis `contract[0]` with b's `contract[1]`, accumulated in `out_dtype`.

    HIGHEST precision makes float32 operands multiply in full float32 on GPU (Triton's default is TF32); it
    changes nothing for 16-bit, 8-bit float or integer operands (int8 operands accumulate in int32).
    """
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=out_dtype)


def _dot_nt(a, b, out_dtype=jnp.float32):
    """a @ b.T"""
    return _dot(a, b, (1, 1), out_dtype)


def _dot_nn(a, b):
    """a @ b"""
    return _dot(a, b, (1, 0))


def _dot_tn(a, b):
    """a.T @ b"""
    return _dot(a, b, (0, 0))


def _block_slice(block, size: int):
    """The `size` rows of block number `block` (a traced scalar)."""
    return pl.ds(pl.multiple_of(block * size, size), size)


def tile_mask(st: _Static, q_block, kv_block, q_segments=None, kv_segments=None):
    """Mask of one (query block, kv block) tile: positions (causal, window, ragged tails, via
    `Geometry.element_mask`) and segments; None when nothing is masked."""
    g = st.geometry
    mask = g.element_mask(q_block * g.block_q, kv_block * g.block_k, g.block_q, g.block_k)
    if q_segments is not None:
        same = segment_mask(q_segments, kv_segments)
        mask = same if mask is None else mask & same
    return mask


def _scores(st: _Static, q, k, q_block, kv_block, q_segments, kv_segments, masked: bool):
    """Base-2 scores of one tile and its mask (None for tiles known to need none)."""
    scores = _dot_nt(q, k) * st.scale_log2
    return scores, tile_mask(st, q_block, kv_block, q_segments, kv_segments) if masked else None


@dataclasses.dataclass(frozen=True)
class _Run:
    """`count` consecutive visits; the j-th visits block `block_at(j)`; `masked` says whether tiles need a mask."""

    count: object
    block_at: Callable
    masked: bool


def _loop_schedule(refs: dict, st: _Static, block, transposed: bool, head=None) -> list[_Run]:
    """The blocks program `block` visits, as runs of tiles that do or do not need masking.

    Sparse: the kept-block list and its count (the dK/dV kernel, which walks the query heads of its group, passes
    `head` to pick that head's list when the block mask differs per head). Dense: the contiguous range the
    geometry allows, split so that the tiles entirely visible by position skip the mask (segment ids, being data,
    always need it).
    """
    needs_mask = st.geometry.has_static_mask or st.has_segments
    if st.sparse:
        indices, counts = (
            (refs["q_indices"], refs["q_counts"]) if transposed else (refs["kv_indices"], refs["kv_counts"])
        )
        if head is not None and st.mask_per_head:
            return [_Run(counts[head, 0], lambda j: indices[head, j], needs_mask)]
        return [_Run(counts[0], lambda j: indices[j], needs_mask)]
    g = st.geometry
    lo, hi = (g.q_block_range if transposed else g.kv_block_range)(block)
    if st.has_segments or not g.has_static_mask:
        return [_Run(jnp.maximum(hi - lo, 0), lambda j: lo + j, needs_mask)]
    full_lo, full_hi = (g.full_q_block_range if transposed else g.full_kv_block_range)(block)
    return [
        _Run(full_lo - lo, lambda j: lo + j, True),
        _Run(full_hi - full_lo, lambda j: full_lo + j, False),
        _Run(jnp.maximum(hi - full_hi, 0), lambda j: full_hi + j, True),
    ]


def _loop(runs: list[_Run], body: Callable, carry):
    """Runs `body(block, masked, carry)` over every visit of every run."""
    for run in runs:
        carry = fori_loop(0, run.count, lambda j, c, run=run: body(run.block_at(j), run.masked, c), carry)
    return carry


def _probabilities(scores, mask, *, lse):
    """Softmax probabilities recomputed from base-2 scores and the saved base-2 logsumexp; masked -> 0."""
    p = jnp.exp2(scores - lse[:, None])
    return p if mask is None else jnp.where(mask, p, 0.0)


def _forward_kernel(*refs, st: _Static, names: tuple[str, ...]):
    """Output and base-2 logsumexp of one query block: online softmax over the kv blocks it visits."""
    r = dict(zip(names, refs, strict=False))
    g = st.geometry
    q_block = pl.program_id(2)
    q = r["q"][...]
    q_segments = r["q_segments"][...] if st.has_segments else None

    def body(kv_block, masked, carry):
        kv_slice = _block_slice(kv_block, g.block_k)
        k, v = r["k"][kv_slice, :], r["v"][kv_slice, :]
        kv_segments = r["kv_segments"][kv_slice] if st.has_segments else None
        scores, mask = _scores(st, q, k, q_block, kv_block, q_segments, kv_segments, masked)
        return online_softmax.update(carry, scores, mask, lambda p: _dot_nn(p.astype(v.dtype), v))

    init = online_softmax.init(jnp.zeros(q.shape, jnp.float32), g.block_q)
    carry = _loop(_loop_schedule(r, st, q_block, transposed=False), body, init)
    out, lse = online_softmax.finish(carry, empty_lse=jnp.inf)
    r["o"][...] = out.astype(r["o"].dtype)
    r["lse"][...] = lse


def _dq_kernel(*refs, st: _Static, names: tuple[str, ...]):
    """dQ of one query block, over the same kv blocks as its forward pass."""
    r = dict(zip(names, refs, strict=False))
    g = st.geometry
    q_block = pl.program_id(2)
    q, do = r["q"][...], r["do"][...]
    lse, delta = r["lse"][...], r["delta"][...]
    q_segments = r["q_segments"][...] if st.has_segments else None

    def body(kv_block, masked, dq):
        kv_slice = _block_slice(kv_block, g.block_k)
        k, v = r["k"][kv_slice, :], r["v"][kv_slice, :]
        kv_segments = r["kv_segments"][kv_slice] if st.has_segments else None
        p = _probabilities(*_scores(st, q, k, q_block, kv_block, q_segments, kv_segments, masked), lse=lse)
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + _dot_nn(ds.astype(k.dtype), k)

    dq = _loop(_loop_schedule(r, st, q_block, transposed=False), body, jnp.zeros(q.shape, jnp.float32))
    r["dq"][...] = (dq * st.sm_scale).astype(r["dq"].dtype)


def _dkdv_kernel(*refs, st: _Static, names: tuple[str, ...]):
    """dK, dV of one kv block, accumulated over the query heads that share it (GQA) and their query blocks."""
    r = dict(zip(names, refs, strict=False))
    g = st.geometry
    kv_block = pl.program_id(2)
    k, v = r["k"][...], r["v"][...]
    kv_segments = r["kv_segments"][...] if st.has_segments else None

    def head_body(head, carry):
        def body(q_block, masked, carry):
            dk, dv = carry
            q_slice = _block_slice(q_block, g.block_q)
            q, do = r["q"][q_slice, head, :], r["do"][q_slice, head, :]
            q_segments = r["q_segments"][q_slice] if st.has_segments else None
            scores, mask = _scores(st, q, k, q_block, kv_block, q_segments, kv_segments, masked)
            p = _probabilities(scores, mask, lse=r["lse"][head, q_slice])
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            ds = p * (_dot_nt(do, v) - r["delta"][head, q_slice][:, None])
            return dk + _dot_tn(ds.astype(q.dtype), q), dv

        return _loop(_loop_schedule(r, st, kv_block, transposed=True, head=head), body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = fori_loop(0, st.groups, head_body, (zeros, zeros))
    r["dk"][...] = (dk * st.sm_scale).astype(r["dk"].dtype)
    r["dv"][...] = dv.astype(r["dv"].dtype)


def _pick(index, size: int):
    """Index into a broadcastable leading mask dimension: the program's own index, or 0 when the size is 1."""
    return index if size > 1 else 0


def _side_inputs(st: _Static, extras: _Extras, transposed: bool) -> list[tuple[str, Array, pl.BlockSpec]]:
    """Segment ids and schedule lists with their BlockSpecs; the grid is (batch, head, block)."""
    g = st.geometry
    inputs = []
    if st.has_segments:
        q_pad, kv_pad = extras.q_segments.shape[1], extras.kv_segments.shape[1]
        if transposed:
            q_spec = pl.BlockSpec((None, q_pad), lambda b, h, i: (b, 0))
            kv_spec = pl.BlockSpec((None, g.block_k), lambda b, h, i: (b, i))
        else:
            q_spec = pl.BlockSpec((None, g.block_q), lambda b, h, i: (b, i))
            kv_spec = pl.BlockSpec((None, kv_pad), lambda b, h, i: (b, 0))
        inputs += [("q_segments", extras.q_segments, q_spec), ("kv_segments", extras.kv_segments, kv_spec)]
    if st.sparse:
        s = extras.schedule
        indices, counts, prefix = (s.q_indices, s.q_counts, "q") if transposed else (s.kv_indices, s.kv_counts, "kv")
        mb, mh, _, length = indices.shape
        # Forward/dQ grid: one query head per program. dK/dV grid: one kv head, whose `groups` query heads'
        # lists are handed over together when the mask differs per head.
        heads = st.groups if transposed and mh > 1 else None
        inputs += [
            (
                f"{prefix}_indices",
                indices,
                pl.BlockSpec((None, heads, None, length), lambda b, h, i: (_pick(b, mb), _pick(h, mh), i, 0)),
            ),
            (
                f"{prefix}_counts",
                counts,
                pl.BlockSpec((None, heads, 1), lambda b, h, i: (_pick(b, mb), _pick(h, mh), i)),
            ),
        ]
    return inputs


def _call(kernel, st: _Static, grid, inputs, outputs, name: str):
    """`pl.pallas_call` over named inputs/outputs; the kernel receives them by name. Outputs vary over the
    `shard_map` axes their inputs vary over (`varying.output_struct`), so the kernels run inside `shard_map`."""
    names = tuple(n for n, _, _ in inputs) + tuple(n for n, _, _ in outputs)
    arrays = align_varying([array for _, array, _ in inputs])
    return pl.pallas_call(
        functools.partial(kernel, st=st, names=names),
        grid=grid,
        in_specs=[spec for _, _, spec in inputs],
        out_specs=[spec for _, _, spec in outputs],
        out_shape=[output_struct(shape.shape, shape.dtype, arrays) for _, shape, _ in outputs],
        compiler_params=plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages),
        interpret=st.interpret,
        name=name,
    )(*arrays)


def _q_tile_spec(g: Geometry, head_dim: int) -> pl.BlockSpec:
    """[block_q, head_dim] tile of a [batch, q_pad, heads, head_dim] array: query block i of head h."""
    return pl.BlockSpec((None, g.block_q, None, head_dim), lambda b, h, i: (b, i, h, 0))


def _row_tile_spec(g: Geometry) -> pl.BlockSpec:
    """[block_q] slice of a per-row [batch, heads, q_pad] array (logsumexp, delta)."""
    return pl.BlockSpec((None, None, g.block_q), lambda b, h, i: (b, h, i))


def _shared_kv_spec(kv_pad: int, head_dim: int, groups: int) -> pl.BlockSpec:
    """The whole key/value sequence of the kv head that query head h reads (h // groups): K/V never repeated."""
    return pl.BlockSpec((None, kv_pad, None, head_dim), lambda b, h, i: (b, 0, lax.div(h, groups), 0))


def _forward(q, k, v, extras: _Extras, st: _Static):
    g = st.geometry
    batch, q_pad, heads, head_dim = q.shape
    kv_spec = _shared_kv_spec(k.shape[1], head_dim, st.groups)
    inputs = [("q", q, _q_tile_spec(g, head_dim)), ("k", k, kv_spec), ("v", v, kv_spec)]
    outputs = [
        ("o", jax.ShapeDtypeStruct(q.shape, q.dtype), _q_tile_spec(g, head_dim)),
        ("lse", jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32), _row_tile_spec(g)),
    ]
    inputs += _side_inputs(st, extras, transposed=False)
    return _call(_forward_kernel, st, (batch, heads, g.num_q_blocks), inputs, outputs, "flash_attention_fwd")


def _backward(st: _Static, residuals, do):
    """dQ over query blocks (same schedule as the forward), then dK/dV over kv blocks (transposed schedule)."""
    q, k, v, extras, o, lse = residuals
    g = st.geometry
    batch, q_pad, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    do = do.astype(q.dtype)
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))  # rowsum(dO * O)
    q_tile, rows, kv_spec = (
        _q_tile_spec(g, head_dim),
        _row_tile_spec(g),
        _shared_kv_spec(k.shape[1], head_dim, st.groups),
    )
    (dq,) = _call(
        _dq_kernel,
        st,
        (batch, heads, g.num_q_blocks),
        [
            ("q", q, q_tile),
            ("k", k, kv_spec),
            ("v", v, kv_spec),
            ("do", do, q_tile),
            ("lse", lse, rows),
            ("delta", delta, rows),
            *_side_inputs(st, extras, transposed=False),
        ],
        [("dq", jax.ShapeDtypeStruct(q.shape, q.dtype), q_tile)],
        "flash_attention_dq",
    )
    # dK/dV grid: (batch, kv head, kv block); each program sees all query heads of its group.
    group_all = pl.BlockSpec((None, q_pad, st.groups, head_dim), lambda b, h, i: (b, 0, h, 0))
    group_rows = pl.BlockSpec((None, st.groups, q_pad), lambda b, h, i: (b, h, 0))
    kv_tile = pl.BlockSpec((None, g.block_k, None, head_dim), lambda b, h, i: (b, i, h, 0))
    dk, dv = _call(
        _dkdv_kernel,
        st,
        (batch, kv_heads, g.num_kv_blocks),
        [
            ("q", q, group_all),
            ("k", k, kv_tile),
            ("v", v, kv_tile),
            ("do", do, group_all),
            ("lse", lse, group_rows),
            ("delta", delta, group_rows),
            *_side_inputs(st, extras, transposed=True),
        ],
        [
            ("dk", jax.ShapeDtypeStruct(k.shape, k.dtype), kv_tile),
            ("dv", jax.ShapeDtypeStruct(v.shape, v.dtype), kv_tile),
        ],
        "flash_attention_dkdv",
    )
    return dq, dk, dv, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, extras: _Extras, st: _Static):
    return _forward(q, k, v, extras, st)[0]


def _attention_fwd(q, k, v, extras: _Extras, st: _Static):
    o, lse = _forward(q, k, v, extras, st)
    return o, (q, k, v, extras, o, lse)


_attention.defvjp(_attention_fwd, _backward)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def padded_head_dim(head_dim: int) -> int:
    """head_dim as the kernels see it: the next power of two, at least MIN_BLOCK (zero channels added)."""
    return max(MIN_BLOCK, _next_power_of_2(head_dim))


def _block_size(requested: int | None, default: int, length: int, fixed: bool) -> int:
    """The requested block size; else `default`, shrunk for short sequences unless a block mask fixes it."""
    if requested is not None:
        if requested < 1 or requested & (requested - 1):
            raise ValueError(f"block sizes must be powers of two, got {requested}")
        return requested
    if fixed:
        return default
    return min(default, max(MIN_BLOCK, _next_power_of_2(length)))


def resolve_block_sizes(
    block_sizes: BlockSizes | None,
    head_dim: int,
    block_q: int | None,
    block_k: int | None,
    q_len: int,
    kv_len: int,
    fixed: bool,
) -> BlockSizes:
    """The sizes a call runs with: `block_sizes` or the head_dim's compile-checked defaults (`BlockSizes`), tiles
    overridden by explicit `block_q`/`block_k` and shrunk for short sequences; with a block mask (`fixed`) and no
    `block_sizes`, tiles of DEFAULT_BLOCK, the size masks are estimated at."""
    sizes = block_sizes or BlockSizes.for_head_dim(padded_head_dim(head_dim))
    if fixed and block_sizes is None:
        default_q = default_k = DEFAULT_BLOCK
    else:
        default_q, default_k = sizes.block_q, sizes.block_k
    return dataclasses.replace(
        sizes,
        block_q=_block_size(block_q, default_q, q_len, fixed),
        block_k=_block_size(block_k, default_k, kv_len, fixed),
    )


def _pad_axis(x: Array, axis: int, size: int) -> Array:
    """Zero-pad `axis` up to `size`."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _segments(segment_ids: SegmentIds | None, batch: int, q_len: int, kv_len: int):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids
    else:
        if q_len != kv_len:
            raise ValueError(
                f"a single segment_ids array needs q_len == kv_len (got {q_len} and {kv_len}); "
                "pass (q_segment_ids, kv_segment_ids) instead"
            )
        q_seg = kv_seg = segment_ids
    if q_seg.shape != (batch, q_len) or kv_seg.shape != (batch, kv_len):
        raise ValueError(
            f"segment ids must have shapes ({batch}, {q_len}) and ({batch}, {kv_len}), "
            f"got {q_seg.shape} and {kv_seg.shape}"
        )
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def default_interpret() -> bool:
    """Compiled kernels on a GPU, Pallas interpret mode on every other backend."""
    return jax.default_backend() != "gpu"


@functools.partial(
    jax.jit, static_argnames=("causal", "sm_scale", "local_window", "interpret", "block_q", "block_k", "block_sizes")
)
def flash_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    segment_ids: SegmentIds | None = None,
    block_mask: Bool[Array, "mb mh num_q_blocks num_kv_blocks"] | None = None,
    local_window: int | tuple[int, int] | None = None,
    interpret: bool | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """Softmax(q·kᵀ·sm_scale + mask)·v, differentiable, in the layout of `jax.nn.dot_product_attention`.

    Args:
      q, k, v: float32, bfloat16 or float16; `heads` must be a multiple of `kv_heads` (GQA, MQA when 1).
      causal: keys after the query's position are hidden; queries are aligned to the end of the key sequence
        (query row t sits at position t + kv_len - q_len), see `pallas_kernels.geometry`.
      sm_scale: defaults to head_dim ** -0.5.
      segment_ids: int [batch, seq] (needs q_len == kv_len) or a pair (q ids [batch, q_len], kv ids
        [batch, kv_len]); a query sees only keys with the same id.
      block_mask: bool [batch or 1, heads or 1, cdiv(q_len, block_q), cdiv(kv_len, block_k)]; only kept
        (query block, kv block) tiles are computed, and the cost of forward and backward follows its density.
        Combined (AND) with every other mask. Block sizes then default to 64 and must match its shape.
      local_window: int w or (left, right): a query at position p sees keys in [p - left, p + right].
      interpret: None picks compiled kernels on a GPU and interpret mode elsewhere.
      block_q, block_k: tile sizes (powers of two; at least 16 for compiled kernels); override `block_sizes`.
      block_sizes: tiles, warps and pipeline stages (`BlockSizes`); None: `BlockSizes.for_head_dim`.

    Rows that can see no key return 0 (and get 0 gradients).
    """
    batch, q_len, heads, head_dim, kv_len, kv_heads = attention_shapes(q, k, v)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    sizes = resolve_block_sizes(block_sizes, head_dim, block_q, block_k, q_len, kv_len, block_mask is not None)
    geometry = Geometry(
        q_len=q_len,
        kv_len=kv_len,
        block_q=sizes.block_q,
        block_k=sizes.block_k,
        causal=causal,
        window=normalize_window(local_window),
    )
    q_seg, kv_seg = _segments(segment_ids, batch, q_len, kv_len)
    if block_mask is not None and (
        block_mask.ndim != 4 or block_mask.shape[0] not in (1, batch) or block_mask.shape[1] not in (1, heads)
    ):
        raise ValueError(f"block_mask must be [batch or 1, heads or 1, nq, nk], got shape {block_mask.shape}")
    st = _Static(
        geometry=geometry,
        sm_scale=float(head_dim**-0.5 if sm_scale is None else sm_scale),
        groups=heads // kv_heads,
        has_segments=q_seg is not None,
        sparse=block_mask is not None,
        mask_per_head=block_mask is not None and block_mask.shape[1] > 1,
        interpret=default_interpret() if interpret is None else bool(interpret),
        num_warps=sizes.num_warps,
        num_stages=sizes.num_stages,
    )
    q_pad = geometry.num_q_blocks * geometry.block_q
    kv_pad = geometry.num_kv_blocks * geometry.block_k
    dim_pad = padded_head_dim(head_dim)
    extras = _Extras(
        q_segments=None if q_seg is None else _pad_axis(q_seg, 1, q_pad),
        kv_segments=None if kv_seg is None else _pad_axis(kv_seg, 1, kv_pad),
        schedule=None if block_mask is None else build_schedule(block_mask, geometry),
    )
    q, k, v = (_pad_axis(_pad_axis(x, 1, n), 3, dim_pad) for x, n in ((q, q_pad), (k, kv_pad), (v, kv_pad)))
    out = _attention(q, k, v, extras, st)
    return out[:, :q_len, :, :head_dim]
