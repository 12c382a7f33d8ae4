"""Block schedules: which kv blocks each query block visits (and, transposed, which query blocks each kv block).

A block-sparse kernel must not pay for blocks it skips, so the boolean block mask is turned, once and outside the
kernels, into compact lists in the manner of splash attention's mask info: for every query block the indices of
its kept kv blocks in increasing order followed by padding, plus how many are kept. A kernel loops `count` times
and reads the block index from the list, so its work follows the number of kept blocks, not the sequence length
squared. The backward dK/dV kernel walks the transposed lists (for every kv block, its query blocks).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from pallas_kernels.geometry import Geometry


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSchedule:
    """Kept-block lists for the forward/dQ kernels (`kv_*`) and the dK/dV kernel (`q_*`).

    Leading dimensions are those of the block mask: batch or 1, heads or 1.
    """

    kv_indices: Int[Array, "mb mh num_q_blocks num_kv_blocks"]
    kv_counts: Int[Array, "mb mh num_q_blocks"]
    q_indices: Int[Array, "mb mh num_kv_blocks num_q_blocks"]
    q_counts: Int[Array, "mb mh num_kv_blocks"]


def _kept_first(mask: Bool[Array, "... n m"]) -> tuple[Int[Array, "... n m"], Int[Array, "... n"]]:
    """Per row, the column indices of kept entries in increasing order (then the dropped ones), and the count."""
    order = jnp.argsort(jnp.logical_not(mask), axis=-1, stable=True).astype(jnp.int32)
    return order, jnp.sum(mask, axis=-1, dtype=jnp.int32)


def effective_block_mask(
    block_mask: Bool[Array, "mb mh num_q_blocks num_kv_blocks"], geometry: Geometry
) -> Bool[Array, "mb mh num_q_blocks num_kv_blocks"]:
    """The user's block mask, less the blocks that causality, the window or the lengths leave empty."""
    expected = (geometry.num_q_blocks, geometry.num_kv_blocks)
    if block_mask.ndim != 4 or block_mask.shape[2:] != expected:
        raise ValueError(
            f"block_mask must have shape [batch or 1, heads or 1, {expected[0]}, {expected[1]}] "
            f"(cdiv(q_len, block_q), cdiv(kv_len, block_k) with block_q={geometry.block_q}, "
            f"block_k={geometry.block_k}), got {tuple(block_mask.shape)}"
        )
    return jnp.asarray(block_mask, bool) & geometry.block_visibility()[None, None]


def build_schedule(block_mask: Bool[Array, "mb mh num_q_blocks num_kv_blocks"], geometry: Geometry) -> BlockSchedule:
    """Kept-block lists for `block_mask` intersected with the geometry's own block visibility."""
    mask = effective_block_mask(block_mask, geometry)
    kv_indices, kv_counts = _kept_first(mask)
    q_indices, q_counts = _kept_first(jnp.swapaxes(mask, -1, -2))
    return BlockSchedule(kv_indices, kv_counts, q_indices, q_counts)
