"""Quantisation of attention operands (SageAttention style), shared by quantized attention and block-mask estimation.

- Keys are smoothed first: subtracting K's mean over the sequence (per batch, kv head and channel) shifts every
  score of a query row by the same amount (q·mean), which softmax ignores, and removes the large per-channel
  offsets that would otherwise set the quantisation scale and crush the informative part of K.
- Q and K are quantised symmetrically per block of rows: one float32 scale per `block` consecutive tokens of a
  head, integers in [-(2^(bits-1) - 1), 2^(bits-1) - 1] stored as int8 (so 4-bit values use [-7, 7]). A block of
  1 is per-token quantisation. q·kᵀ is then an integer matmul accumulated in int32 and rescaled by the product
  of the two blocks' scales.
- V for the P·V product is either cast to bfloat16, or quantised to float8 e4m3 with one scale per channel (over
  the sequence, per batch and kv head) to the whole e4m3 range; P, whose entries lie in [0, 1], is multiplied by
  `fp8_p_scale(block_k)` before its cast. The kernel's e4m3 P·V is a Hopper `wgmma` with a float16 accumulator per
  tile (Pallas's Triton lowering gives fp8 dots with a float32 accumulator no `max_num_imprecise_acc`, and Triton
  then falls back to float16 `mma.sync`), so that scale is the largest power of two that keeps a tile's sum of
  `block_k` products finite in float16: 8 for 16-key tiles, 2 for 64, 1 for 128. Probabilities below about
  2^-9 / scale round to 0 (e4m3's smallest subnormal).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jaxtyping import Array, Float, Int8

FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448
FP16_MAX = float(jnp.finfo(jnp.float16).max)  # 65504
PV_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float8_e4m3fn))


def int_max(bits: int) -> int:
    """Largest magnitude of a symmetric `bits`-bit integer (127 for 8 bits, 7 for 4)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    return 2 ** (bits - 1) - 1


def smooth_keys(k: Float[Array, "batch kv_len kv_heads dim"]) -> Float[Array, "batch kv_len kv_heads dim"]:
    """K minus its mean over the sequence, in float32 (softmax-invariant, removes channel outliers)."""
    k = k.astype(jnp.float32)
    return k - jnp.mean(k, axis=1, keepdims=True)


def quantize_blocks(
    x: Float[Array, "batch seq heads dim"], bits: int, block: int
) -> tuple[Int8[Array, "batch padded heads dim"], Float[Array, "batch heads blocks"]]:
    """Symmetric quantisation with one scale per `block` rows of a head; the sequence is zero-padded to whole blocks.

    Returns (values, scales): x[b, t, h] ≈ values[b, t, h] * scales[b, h, t // block].
    """
    top = int_max(bits)
    batch, length, heads, dim = x.shape
    blocks = -(-length // block)
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, blocks * block - length), (0, 0), (0, 0)))
    grouped = x.reshape(batch, blocks, block, heads, dim)
    scale = jnp.max(jnp.abs(grouped), axis=(2, 4)) / top  # [batch, blocks, heads]
    scale = jnp.where(scale > 0, scale, 1.0)
    values = jnp.clip(jnp.round(grouped / scale[:, :, None, :, None]), -top, top).astype(jnp.int8)
    return values.reshape(x.shape), jnp.moveaxis(scale, 1, 2)


def row_scales(scales: Float[Array, "batch heads blocks"], block: int, length: int) -> Float[Array, "batch heads seq"]:
    """Per-block scales repeated for each of the first `length` rows."""
    return jnp.repeat(scales, block, axis=2)[:, :, :length]


def quantized_scores(
    q: Float[Array, "batch q_len heads dim"],
    k: Float[Array, "batch kv_len kv_heads dim"],
    *,
    bits: int,
    block_q: int,
    block_k: int,
    smooth: bool,
) -> Float[Array, "batch heads q_len kv_len"]:
    """Dense q·kᵀ from block-quantised operands: an int32 matmul rescaled by the block scales (no softmax scale).

    GQA without repeating K: query heads are grouped under their kv head (head h reads kv head h // groups).
    """
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    q_int, q_scale = quantize_blocks(q, bits, block_q)
    k_int, k_scale = quantize_blocks(smooth_keys(k) if smooth else k, bits, block_k)
    q_int = q_int[:, :q_len].reshape(batch, q_len, kv_heads, heads // kv_heads, dim)
    dots = jnp.einsum("btkgd,bskd->bkgts", q_int, k_int[:, :kv_len], preferred_element_type=jnp.int32)
    dots = dots.reshape(batch, heads, q_len, kv_len).astype(jnp.float32)
    k_rows = jnp.repeat(row_scales(k_scale, block_k, kv_len), heads // kv_heads, axis=1)
    return dots * row_scales(q_scale, block_q, q_len)[..., None] * k_rows[:, :, None, :]


def check_pv_dtype(pv_dtype) -> jnp.dtype:
    dtype = jnp.dtype(pv_dtype)
    if dtype not in PV_DTYPES:
        raise ValueError(f"pv_dtype must be one of {[d.name for d in PV_DTYPES]}, got {dtype.name}")
    return dtype


def quantize_values(
    v: Float[Array, "batch kv_len kv_heads dim"], pv_dtype
) -> tuple[Array, Float[Array, "batch kv_heads dim"] | None]:
    """V as the P·V operand: cast to a 16-bit float, or e4m3 with per-channel scales (returned, else None)."""
    dtype = check_pv_dtype(pv_dtype)
    if dtype != jnp.float8_e4m3fn:
        return v.astype(dtype), None
    v = v.astype(jnp.float32)
    scale = jnp.max(jnp.abs(v), axis=1) / FP8_MAX  # [batch, kv_heads, dim]
    scale = jnp.where(scale > 0, scale, 1.0)
    return (v / scale[:, None]).astype(dtype), scale


def fp8_p_scale(block_k: int) -> float:
    """What probabilities are multiplied by before their e4m3 cast: the largest power of two (at most FP8_MAX) for
    which `block_k` products of P (at most 1, times the scale) and V (at most FP8_MAX) stay finite in float16."""
    return min(FP8_MAX, 2.0 ** math.floor(math.log2(FP16_MAX / (block_k * FP8_MAX))))


def probabilities_operand(p: Array, pv_dtype, block_k: int) -> Array:
    """Softmax probabilities (in [0, 1]) as the left P·V operand; fp8 ones are stretched by `fp8_p_scale`."""
    dtype = jnp.dtype(pv_dtype)
    return (p * fp8_p_scale(block_k)).astype(dtype) if dtype == jnp.float8_e4m3fn else p.astype(dtype)


def output_scale(v_scale: Float[Array, "... dim"] | None, block_k: int) -> Float[Array, "... dim"] | float:
    """What P·V must be multiplied by to undo the V and P scalings of `quantize_values`/`probabilities_operand`."""
    return 1.0 if v_scale is None else v_scale / fp8_p_scale(block_k)
