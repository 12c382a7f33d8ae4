"""Plain-jnp references of the kernels, used as test oracles.

They materialise the full [q_len, kv_len] score matrix in float32 and build the element mask directly from
positions, without the block bounds or schedules the kernels use, so that a mistake there cannot hide in both.
The mask conventions (end-aligned queries, window sides, segment pairs) are those documented in
`pallas_kernels.geometry`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.geometry import normalize_window
from pallas_kernels.kv_cache import contiguous_kv, valid_token_mask
from pallas_kernels.quantization import quantize_blocks, quantize_values, row_scales, smooth_keys


def block_to_element_mask(
    block_mask: Bool[Array, "mb mh nq nk"], q_len: int, kv_len: int, block_q: int, block_k: int
) -> Bool[Array, "mb mh q_len kv_len"]:
    """Expand a block mask to the element mask it stands for (block (i, j) covers rows i*bq.., keys j*bk..)."""
    rows = jnp.repeat(jnp.asarray(block_mask, bool), block_q, axis=2)[:, :, :q_len]
    return jnp.repeat(rows, block_k, axis=3)[:, :, :, :kv_len]


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    local_window: int | tuple[int, int] | None = None,
    segment_ids: Int[Array, "batch seq"] | tuple[Int[Array, "batch q_len"], Int[Array, "batch kv_len"]] | None = None,
    block_mask: Bool[Array, "mb mh nq nk"] | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> Bool[Array, "mb mh q_len kv_len"]:
    """Which keys each query may see, broadcastable against [batch, heads, q_len, kv_len]."""
    p = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    s = jnp.arange(kv_len)[None, :]
    mask = jnp.ones((q_len, kv_len), bool)
    if causal:
        mask &= s <= p
    window = normalize_window(local_window)
    if window is not None:
        mask &= (s >= p - window[0]) & (s <= p + window[1])
    mask = mask[None, None]
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        mask = mask & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    if block_mask is not None:
        mask = mask & block_to_element_mask(block_mask, q_len, kv_len, block_q, block_k)
    return mask


def masked_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    mask: Bool[Array, "mb mh q_len kv_len"],
    *,
    sm_scale: float | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """Float32 softmax attention under an explicit element mask; rows with no visible key give 0."""
    batch, q_len, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    k32 = jnp.repeat(k.astype(jnp.float32), groups, axis=2)
    v32 = jnp.repeat(v.astype(jnp.float32), groups, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k32) * scale
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhts,bshd->bthd", probs, v32).astype(q.dtype)


def flash_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    segment_ids=None,
    block_mask: Bool[Array, "mb mh nq nk"] | None = None,
    local_window: int | tuple[int, int] | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> Float[Array, "batch q_len heads head_dim"]:
    """Reference of `pallas_kernels.flash_attention` (same arguments, block sizes only matter with a block mask)."""
    mask = attention_mask(
        q.shape[1],
        k.shape[1],
        causal=causal,
        local_window=local_window,
        segment_ids=segment_ids,
        block_mask=block_mask,
        block_q=block_q,
        block_k=block_k,
    )
    return masked_attention(q, k, v, mask, sm_scale=sm_scale)


def _dequantized_blocks(
    x: Float[Array, "batch seq heads dim"], bits: int, block: int
) -> Float[Array, "batch seq heads dim"]:
    """x after block quantisation and back, in float32."""
    values, scales = quantize_blocks(x, bits, block)
    length = x.shape[1]
    return values[:, :length].astype(jnp.float32) * jnp.moveaxis(row_scales(scales, block, length), 1, 2)[..., None]


def quantized_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    qk_bits: int = 8,
    pv_dtype=jnp.bfloat16,
    smooth_k: bool = True,
    block_q: int = 64,
    block_k: int = 64,
) -> Float[Array, "batch q_len heads head_dim"]:
    """Reference of `pallas_kernels.quantized_attention`: float32 attention over the dequantised operands.

    Q, (smoothed) K and V go through exactly the kernel's quantisation and back; what remains between the two is
    the kernel's rounding of the probabilities to `pv_dtype` (blockwise, before normalisation).
    """
    qd = _dequantized_blocks(q, qk_bits, block_q)
    kd = _dequantized_blocks(smooth_keys(k) if smooth_k else k, qk_bits, block_k)
    v_op, v_scale = quantize_values(v, pv_dtype)
    vd = v_op.astype(jnp.float32) * (1.0 if v_scale is None else v_scale[:, None])
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal)
    return masked_attention(qd, kd, vd, mask, sm_scale=sm_scale).astype(q.dtype)


def decode_attention(
    q: Float[Array, "batch heads head_dim"],
    k_cache: Array,
    v_cache: Array,
    lengths: Int[Array, " batch"],
    *,
    k_scale: Array | None = None,
    v_scale: Array | None = None,
    block_tables: Int[Array, "batch pages"] | None = None,
    sm_scale: float | None = None,
) -> Float[Array, "batch heads head_dim"]:
    """Reference of `pallas_kernels.decode_attention`: dequantise the whole cache, mask by length, attend."""
    k = contiguous_kv(k_cache, k_scale, block_tables, jnp.float32)
    v = contiguous_kv(v_cache, v_scale, block_tables, jnp.float32)
    mask = valid_token_mask(lengths, k.shape[1])[:, None, None, :]
    return masked_attention(q[:, None], k, v, mask, sm_scale=sm_scale)[:, 0]
