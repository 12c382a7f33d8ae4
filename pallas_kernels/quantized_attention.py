"""Quantized prefill attention in the spirit of SageAttention: int8/int4 q·kᵀ, float32 online softmax, bf16/fp8 P·V.

Steps (the quantisation itself is `pallas_kernels.quantization`, shared with block-mask estimation):
1. K is smoothed (its mean over the sequence subtracted per batch, kv head and channel; softmax-invariant);
2. Q is quantised per block of `block_q` rows, K per block of `block_k` rows, to int8 (`qk_bits=8`) or to the
   4-bit range [-7, 7] (`qk_bits=4`, still stored in int8), with one float32 scale per block and head;
3. each program of the kernel owns one query block of one head and walks the kv blocks causality leaves, like
   `flash_attention`'s forward kernel (same schedules, tile masks and online softmax): an integer q·kᵀ tile
   accumulated in int32, rescaled by the two block scales (and sm_scale, log2 e), the running softmax in float32,
   and P·V with P cast to `pv_dtype`: bfloat16 (or float16), or float8 e4m3 with V scaled per channel (below).
GQA/MQA: K/V are never repeated, query head h reads kv head h // groups through its BlockSpec.

Implementations: "pallas" (the kernel; interpret mode off GPU) and "xla" (the same quantised operands, dense
scores from an int32 einsum, for CPU and for checking); `implementation=None` picks pallas on a GPU, xla elsewhere.

What the sm_90a compile shows (`pallas_kernels.sm90_report`, deviceless, jax 0.10.2): q·kᵀ is a Hopper `wgmma`
s8 x s8 -> s32 (Q and K both contract along head_dim, their contiguous axis). An e4m3 P·V reaches `wgmma` e4m3
only when (a) V is stored transposed, [batch, kv_heads, head_dim, kv_len], so that both 8-bit operands contract
along their contiguous axis, as FlashAttention-3 does, and (b) the dot accumulates in float16: Pallas's Triton
lowering sets no `max_num_imprecise_acc`, and Triton compiles an fp8 dot with a float32 accumulator to float16
`mma.sync` after converting both operands. So the fp8 path keeps V transposed, accumulates each tile in float16
(P scaled so the sum stays finite, `quantization.fp8_p_scale`) and adds tiles in float32. The numerics are tested
in interpret mode; speed has not been measured.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from pallas_kernels import online_softmax
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.flash_attention import (
    DEFAULT_BLOCK,
    SegmentIds,
    _block_slice,
    _call,
    _dot_nn,
    _dot_nt,
    _Extras,
    _loop,
    _loop_schedule,
    _pad_axis,
    _q_tile_spec,
    _segments,
    _shared_kv_spec,
    _side_inputs,
    _Static,
    default_interpret,
    padded_head_dim,
    resolve_block_sizes,
    tile_mask,
)
from pallas_kernels.geometry import Geometry, attention_shapes
from pallas_kernels.quantization import (
    check_pv_dtype,
    output_scale,
    probabilities_operand,
    quantize_blocks,
    quantize_values,
    quantized_scores,
    smooth_keys,
)
from pallas_kernels.sparsity import masked_softmax

IMPLEMENTATIONS = ("pallas", "xla")


def _values(r: dict, kv_slice, fp8: bool, block_k: int, p):
    """P·V of one tile in float32. fp8: V is stored transposed, so both e4m3 operands contract along their
    contiguous axis (Hopper `wgmma` e4m3 needs that), into a float16 accumulator (see `quantization`)."""
    if fp8:
        vt = r["v"][:, kv_slice]
        return _dot_nt(probabilities_operand(p, vt.dtype, block_k), vt, jnp.float16).astype(jnp.float32)
    v = r["v"][kv_slice, :]
    return _dot_nn(probabilities_operand(p, v.dtype, block_k), v)


def _kernel(*refs, st: _Static, fp8: bool, names: tuple[str, ...]):
    """One query block of one head: integer scores tile by tile, online softmax, P·V in the V operand's dtype."""
    r = dict(zip(names, refs, strict=False))
    g = st.geometry
    q_block = pl.program_id(2)
    q = r["q"][...]
    q_scale = r["q_scale"][q_block] * st.scale_log2
    q_segments = r["q_segments"][...] if st.has_segments else None

    def body(kv_block, masked, carry):
        kv_slice = _block_slice(kv_block, g.block_k)
        k = r["k"][kv_slice, :]
        scores = _dot_nt(q, k, jnp.int32).astype(jnp.float32) * (q_scale * r["k_scale"][kv_block])
        kv_segments = r["kv_segments"][kv_slice] if st.has_segments else None
        mask = tile_mask(st, q_block, kv_block, q_segments, kv_segments) if masked else None
        return online_softmax.update(carry, scores, mask, functools.partial(_values, r, kv_slice, fp8, g.block_k))

    init = online_softmax.init(jnp.zeros(q.shape, jnp.float32), g.block_q)
    out, _ = online_softmax.finish(_loop(_loop_schedule(r, st, q_block, transposed=False), body, init), 0.0)
    if fp8:
        out = out * output_scale(r["v_scale"][...], g.block_k)[None, :]
    r["o"][...] = out.astype(r["o"].dtype)


def _pallas(q, k, v, segments, st: _Static, bits: int, pv_dtype, smooth: bool):
    g = st.geometry
    batch, q_len, heads, head_dim = q.shape
    dim_pad = padded_head_dim(head_dim)
    q_int, q_scale = quantize_blocks(q, bits, g.block_q)
    k_int, k_scale = quantize_blocks(smooth_keys(k) if smooth else k, bits, g.block_k)
    v_op, v_scale = quantize_values(v, pv_dtype)
    kv_pad = k_int.shape[1]
    q_int, k_int = _pad_axis(q_int, 3, dim_pad), _pad_axis(k_int, 3, dim_pad)
    v_op = _pad_axis(_pad_axis(v_op, 1, kv_pad), 3, dim_pad)
    groups = st.groups
    kv_spec = _shared_kv_spec(kv_pad, dim_pad, groups)
    if v_scale is None:
        v_input = ("v", v_op, kv_spec)
    else:  # [batch, kv_heads, dim, kv_len]: K-major for the fp8 P·V (the transpose fuses into V's quantisation)
        vt_spec = pl.BlockSpec((None, None, dim_pad, kv_pad), lambda b, h, i: (b, lax.div(h, groups), 0, 0))
        v_input = ("v", jnp.transpose(v_op, (0, 2, 3, 1)), vt_spec)
    inputs = [
        ("q", q_int, _q_tile_spec(g, dim_pad)),
        ("k", k_int, kv_spec),
        v_input,
        ("q_scale", q_scale, pl.BlockSpec((None, None, g.num_q_blocks), lambda b, h, i: (b, h, 0))),
        ("k_scale", k_scale, pl.BlockSpec((None, None, g.num_kv_blocks), lambda b, h, i: (b, lax.div(h, groups), 0))),
    ]
    if v_scale is not None:
        v_scale = _pad_axis(v_scale, 2, dim_pad)
        inputs.append(
            ("v_scale", v_scale, pl.BlockSpec((None, None, dim_pad), lambda b, h, i: (b, lax.div(h, groups), 0)))
        )
    if st.has_segments:
        q_seg, kv_seg = segments
        extras = _Extras(_pad_axis(q_seg, 1, q_int.shape[1]), _pad_axis(kv_seg, 1, kv_pad), None)
        inputs += _side_inputs(st, extras, transposed=False)
    out_shape = jax.ShapeDtypeStruct((batch, q_int.shape[1], heads, dim_pad), q.dtype)
    kernel = functools.partial(_kernel, fp8=v_scale is not None)
    (out,) = _call(
        kernel,
        st,
        (batch, heads, g.num_q_blocks),
        inputs,
        [("o", out_shape, _q_tile_spec(g, dim_pad))],
        "quantized_attention",
    )
    return out[:, :q_len, :, :head_dim]


def _xla(q, k, v, segments, st: _Static, bits: int, pv_dtype, smooth: bool):
    g = st.geometry
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    scores = quantized_scores(q, k, bits=bits, block_q=g.block_q, block_k=g.block_k, smooth=smooth) * st.sm_scale
    mask = g.element_mask(0, 0, g.q_len, g.kv_len)
    mask = jnp.ones(scores.shape[-2:], bool) if mask is None else mask
    if st.has_segments:  # against scores [batch, heads, q_len, kv_len]
        q_seg, kv_seg = segments
        mask = mask & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    probs = masked_softmax(scores, mask)
    v_op, v_scale = quantize_values(v, pv_dtype)
    p = probabilities_operand(probs, v_op.dtype, g.block_k).reshape(batch, kv_heads, st.groups, q_len, g.kv_len)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v_op, preferred_element_type=jnp.float32)
    scale = output_scale(v_scale, g.block_k)
    if v_scale is not None:
        scale = scale[:, None, :, None, :]
    return (out * scale).reshape(batch, q_len, heads, head_dim).astype(q.dtype)


@functools.partial(
    jax.jit,
    static_argnames=(
        "causal",
        "sm_scale",
        "qk_bits",
        "pv_dtype",
        "smooth_k",
        "block_q",
        "block_k",
        "interpret",
        "implementation",
    ),
)
def quantized_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    segment_ids: SegmentIds | None = None,
    qk_bits: int = 8,
    pv_dtype=jnp.bfloat16,
    smooth_k: bool = True,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    implementation: str | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """Softmax(q·kᵀ·sm_scale)·v with q·kᵀ from `qk_bits`-bit block-quantised Q and (smoothed) K, P·V in `pv_dtype`.

    Args:
      q, k, v: the layout of `jax.nn.dot_product_attention`; `heads` a multiple of `kv_heads` (GQA, MQA).
      causal: as in `flash_attention` (queries aligned to the end of the key sequence).
      sm_scale: defaults to head_dim ** -0.5.
      segment_ids: as in `flash_attention` (one array when q_len == kv_len, else a (q ids, kv ids) pair); a
        query sees only keys with the same id.
      qk_bits: 8 (int8) or 4 (values in [-7, 7]); any width from 2 to 8 works.
      pv_dtype: bfloat16 or float16 (V cast), or float8_e4m3fn (V scaled per channel, P stretched to [0, 448]).
      smooth_k: subtract K's mean over the sequence before quantising (recommended; softmax-invariant).
      block_q, block_k: quantisation blocks, which are also the kernel's tiles (powers of two).
      interpret: None picks compiled kernels on a GPU and interpret mode elsewhere.
      implementation: "pallas", "xla", or None (pallas on a GPU, xla elsewhere).

    Returns the output in q's dtype; rows that see no key (causal with q_len > kv_len, or no key of their
    segment) are 0.
    """
    batch, q_len, heads, head_dim, kv_len, kv_heads = attention_shapes(q, k, v)
    implementation = implementation or ("xla" if default_interpret() else "pallas")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got {implementation!r}")
    check_pv_dtype(pv_dtype)
    # Tiles are the quantisation blocks: DEFAULT_BLOCK unless given; warps and stages per head_dim.
    tiles = BlockSizes.for_head_dim(padded_head_dim(head_dim))
    tiles = dataclasses.replace(tiles, block_q=DEFAULT_BLOCK, block_k=DEFAULT_BLOCK)
    sizes = resolve_block_sizes(tiles, head_dim, block_q, block_k, q_len, kv_len, False)
    geometry = Geometry(q_len=q_len, kv_len=kv_len, block_q=sizes.block_q, block_k=sizes.block_k, causal=causal)
    st = _Static(
        geometry=geometry,
        sm_scale=float(head_dim**-0.5 if sm_scale is None else sm_scale),
        groups=heads // kv_heads,
        has_segments=segment_ids is not None,
        sparse=False,
        mask_per_head=False,
        interpret=default_interpret() if interpret is None else bool(interpret),
        num_warps=sizes.num_warps,
        num_stages=sizes.num_stages,
    )
    run = _pallas if implementation == "pallas" else _xla
    return run(q, k, v, _segments(segment_ids, batch, q_len, kv_len), st, qk_bits, pv_dtype, smooth_k)
