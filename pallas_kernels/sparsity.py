"""Dynamic block sparsity: choose, per input, which (query block, kv block) tiles attention needs.

An estimator maps (q, k) to a block-level attention distribution: for every query block, how much softmax mass
its queries put on each kv block (rows sum to 1 over visible blocks). `estimate_block_mask` then keeps, per query
block, the heaviest kv blocks until their cumulative mass reaches `keep` (the threshold τ of SpargeAttn), and
always keeps the diagonal blocks (the query's own position) and the first, "sink", block. Blocks that causality
or the window hide are never kept.

Estimators (`ESTIMATORS`; a new one is a function with the `BlockMass` signature added to that table):
- "pooled" (SpargeAttn-like): mean-pool q and k over each block and take the softmax of the pooled scores over
  kv blocks, weighted by how many keys each block holds. Cost O((T/block)^2 · d).
- "lowbit" (in the spirit of SALE): quantise q and k per token to 4-bit integers, compute the approximate scores
  with an integer matmul, and take each block's share of every row's softmax mass, averaged over the block's rows.
  More faithful than pooling when blocks are not internally similar, at the cost of a full low-precision
  score matrix (done here in jnp, so meant for moderate lengths).
- "quantized": the q·kᵀ of `quantized_attention` at 4 bits: K smoothed (mean over the sequence removed), Q and K
  quantised per block with one scale per tile, integer matmul; per-block scales cost less to compute than
  per-token ones and smoothing keeps channel outliers in K from eating the 4-bit range.
- "exact": the same block shares from float32 scores; an oracle for measuring the others, not a saving.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from pallas_kernels import block_masks
from pallas_kernels.flash_attention import DEFAULT_BLOCK, flash_attention
from pallas_kernels.geometry import Geometry, normalize_window
from pallas_kernels.quantization import quantized_scores

BlockMass = Callable[..., Float[Array, "batch heads num_q_blocks num_kv_blocks"]]


def _block_sums(x: Float[Array, "batch seq heads dim"], block: int) -> tuple[Array, Array]:
    """Per-block sums over the sequence axis and the number of real (unpadded) positions per block."""
    batch, length, heads, dim = x.shape
    blocks = -(-length // block)
    padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, blocks * block - length), (0, 0), (0, 0)))
    sums = padded.reshape(batch, blocks, block, heads, dim).sum(axis=2)
    counts = jnp.clip(length - block * jnp.arange(blocks), 0, block).astype(jnp.float32)
    return sums, counts


def masked_softmax(scores: Array, visible: Bool[Array, "... nq nk"]) -> Array:
    """Softmax over the last axis restricted to visible entries; all-hidden rows give zeros."""
    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.where(visible, jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


def pooled_block_mass(
    q: Float[Array, "batch q_len heads dim"],
    k: Float[Array, "batch kv_len kv_heads dim"],
    geometry: Geometry,
    sm_scale: float,
) -> Float[Array, "batch heads num_q_blocks num_kv_blocks"]:
    """Block distribution from mean-pooled q and k: softmax over kv blocks of pooled q·kᵀ + log(keys in block)."""
    groups = q.shape[2] // k.shape[2]
    q_sums, q_counts = _block_sums(q, geometry.block_q)
    k_sums, k_counts = _block_sums(k, geometry.block_k)
    q_mean = q_sums / q_counts[None, :, None, None]
    k_mean = jnp.repeat(k_sums / k_counts[None, :, None, None], groups, axis=2)
    scores = jnp.einsum("bihd,bjhd->bhij", q_mean, k_mean) * sm_scale + jnp.log(k_counts)
    return masked_softmax(scores, geometry.block_visibility())


def _row_mass_per_block(
    scores: Float[Array, "batch heads q_len kv_len"], geometry: Geometry
) -> Float[Array, "batch heads num_q_blocks num_kv_blocks"]:
    """Each kv block's share of every row's softmax (over visible keys), averaged over a query block's rows."""
    g = geometry
    visible = g.element_mask(0, 0, g.q_len, g.kv_len)
    probs = masked_softmax(scores, jnp.ones(scores.shape[-2:], bool) if visible is None else visible)
    nq, nk = g.num_q_blocks, g.num_kv_blocks
    padded = jnp.pad(probs, ((0, 0), (0, 0), (0, nq * g.block_q - g.q_len), (0, nk * g.block_k - g.kv_len)))
    blocks = padded.reshape(*probs.shape[:2], nq, g.block_q, nk, g.block_k).sum(axis=(3, 5))
    rows = jnp.clip(g.q_len - g.block_q * jnp.arange(nq), 0, g.block_q).astype(jnp.float32)
    return blocks / rows[:, None]


def lowbit_block_mass(
    q: Float[Array, "batch q_len heads dim"],
    k: Float[Array, "batch kv_len kv_heads dim"],
    geometry: Geometry,
    sm_scale: float,
    *,
    bits: int = 4,
) -> Float[Array, "batch heads num_q_blocks num_kv_blocks"]:
    """Block distribution from per-token `bits`-bit q·kᵀ: each block's share of the row softmax, averaged over rows."""
    scores = quantized_scores(q, k, bits=bits, block_q=1, block_k=1, smooth=False)
    return _row_mass_per_block(scores * sm_scale, geometry)


def quantized_block_mass(
    q: Float[Array, "batch q_len heads dim"],
    k: Float[Array, "batch kv_len kv_heads dim"],
    geometry: Geometry,
    sm_scale: float,
    *,
    bits: int = 4,
) -> Float[Array, "batch heads num_q_blocks num_kv_blocks"]:
    """Block distribution from the q·kᵀ of `quantized_attention` at `bits` bits: K smoothed, Q and K quantised
    per block (the estimate's own tiles), integer matmul; then as "lowbit"."""
    scores = quantized_scores(q, k, bits=bits, block_q=geometry.block_q, block_k=geometry.block_k, smooth=True)
    return _row_mass_per_block(scores * sm_scale, geometry)


def exact_block_mass(
    q: Float[Array, "batch q_len heads dim"],
    k: Float[Array, "batch kv_len kv_heads dim"],
    geometry: Geometry,
    sm_scale: float,
) -> Float[Array, "batch heads num_q_blocks num_kv_blocks"]:
    """The true block distribution from float32 scores: an oracle to measure the estimators against (it costs a
    full attention score matrix, so it saves nothing in practice)."""
    k = jnp.repeat(k.astype(jnp.float32), q.shape[2] // k.shape[2], axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k) * sm_scale
    return _row_mass_per_block(scores, geometry)


ESTIMATORS: Mapping[str, BlockMass] = types.MappingProxyType(
    {
        "pooled": pooled_block_mass,
        "lowbit": lowbit_block_mass,
        "quantized": quantized_block_mass,
        "exact": exact_block_mass,
    }
)


def select_by_mass(
    mass: Float[Array, "... nq nk"], keep: float, visible: Bool[Array, "nq nk"]
) -> Bool[Array, "... nq nk"]:
    """Per row, the fewest heaviest visible blocks whose mass reaches `keep` of the row total (all when keep >= 1)."""
    if keep >= 1.0:
        return jnp.broadcast_to(visible, mass.shape)
    mass = jnp.where(visible, mass, 0.0)
    order = jnp.argsort(-mass, axis=-1)
    ranked = jnp.take_along_axis(mass, order, axis=-1)
    before = jnp.cumsum(ranked, axis=-1) - ranked
    chosen = before < keep * jnp.sum(mass, axis=-1, keepdims=True)
    return jnp.put_along_axis(jnp.zeros(mass.shape, bool), order, chosen, axis=-1, inplace=False) & visible


def estimate_block_mask(
    q: Float[Array, "batch q_len heads dim"],
    k: Float[Array, "batch kv_len kv_heads dim"],
    *,
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
    causal: bool = False,
    keep: float = 0.9,
    method: str = "pooled",
    local_window: int | tuple[int, int] | None = None,
    sm_scale: float | None = None,
    **options,
) -> Bool[Array, "batch heads num_q_blocks num_kv_blocks"]:
    """Block mask for `flash_attention(..., block_mask=...)` keeping about `keep` of each block row's mass.

    Args:
      keep: the threshold τ in (0, 1]; 1 keeps every visible block.
      method: a key of `ESTIMATORS`; `options` go to that estimator (e.g. `bits` for "lowbit").
      causal, local_window, sm_scale: as for `flash_attention`; blocks they hide are never kept.
    """
    if method not in ESTIMATORS:
        raise ValueError(f"method must be one of {', '.join(ESTIMATORS)}, got {method!r}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    geometry = Geometry(q.shape[1], k.shape[1], block_q, block_k, causal=causal, window=normalize_window(local_window))
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    visible = geometry.block_visibility()
    mass = ESTIMATORS[method](q, k, geometry, scale, **options)
    diagonal = Geometry(q.shape[1], k.shape[1], block_q, block_k, window=(0, 0)).block_visibility()
    sink = jnp.arange(geometry.num_kv_blocks) == 0
    always = (diagonal | sink[None, :]) & visible
    return select_by_mass(mass, keep, visible) | always


def sparse_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    *,
    tau: float = 0.9,
    causal: bool = False,
    sm_scale: float | None = None,
    segment_ids=None,
    local_window: int | tuple[int, int] | None = None,
    method: str = "pooled",
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
    interpret: bool | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """Attention over the blocks `estimate_block_mask` keeps at threshold `tau`, in one call.

    The mask is chosen without gradient; the result is differentiable in q, k, v like `flash_attention`.
    The estimators look at positions only; with `segment_ids`, tiles without a same-document pair are dropped
    as well (`block_masks.segments`) and the kernel applies the element-level segment mask.
    """
    mask = estimate_block_mask(
        q,
        k,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        keep=tau,
        method=method,
        local_window=local_window,
        sm_scale=sm_scale,
    )
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        mask &= block_masks.segments(q_seg, block_q, block_k, kv_seg)
    return flash_attention(
        q,
        k,
        v,
        causal=causal,
        sm_scale=sm_scale,
        segment_ids=segment_ids,
        block_mask=mask,
        local_window=local_window,
        interpret=interpret,
        block_q=block_q,
        block_k=block_k,
    )
