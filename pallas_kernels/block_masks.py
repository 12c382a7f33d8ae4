"""Builders of static block masks for `flash_attention(..., block_mask=...)`.

A block mask is a bool array [batch or 1, heads or 1, cdiv(q_len, block_q), cdiv(kv_len, block_k)]: entry
(i, j) keeps the tile of query rows [i*block_q, (i+1)*block_q) and keys [j*block_k, (j+1)*block_k). The builders
return shape [1, 1, nq, nk] (broadcast over batch and heads); pass the same `block_q` / `block_k` to the kernel.
A tile is kept when at least one of its (query, key) pairs is allowed by the pattern, so combine a pattern with the
matching element-level option (`causal`, `local_window`) when the pattern's edges must be exact: the block mask
only decides which tiles are computed, and masks are ANDed.

Positions follow `pallas_kernels.geometry`: query row t is at position t + kv_len - q_len.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from pallas_kernels.geometry import Geometry

BlockMask = Bool[Array, "1 1 num_q_blocks num_kv_blocks"]


def _blocks(geometry: Geometry) -> BlockMask:
    return geometry.block_visibility()[None, None]


def causal(q_len: int, kv_len: int, block_q: int, block_k: int) -> BlockMask:
    """Tiles with at least one key at or before some query's position."""
    return _blocks(Geometry(q_len, kv_len, block_q, block_k, causal=True))


def sliding_window(
    q_len: int, kv_len: int, block_q: int, block_k: int, window: int, *, causal: bool = True
) -> BlockMask:
    """Tiles touching the band p - window <= s <= p (or <= p + window when not causal)."""
    return _blocks(Geometry(q_len, kv_len, block_q, block_k, causal=causal, window=(window, window)))


def _key_blocks_of(positions: Sequence[int] | np.ndarray, kv_len: int, block_k: int) -> np.ndarray:
    """Bool [nk]: kv blocks holding any of the given key positions (out-of-range positions ignored)."""
    nk = -(-kv_len // block_k)
    keep = np.zeros(nk, bool)
    positions = np.asarray(positions, np.int64)
    positions = positions[(positions >= 0) & (positions < kv_len)]
    keep[positions // block_k] = True
    return keep


def a_shape(
    q_len: int, kv_len: int, block_q: int, block_k: int, *, sink: int, window: int, causal: bool = True
) -> BlockMask:
    """ "A-shape" (attention sink + local window, StreamingLLM): the first `sink` keys plus a sliding window."""
    geometry = Geometry(q_len, kv_len, block_q, block_k, causal=causal)
    sink_blocks = jnp.asarray(_key_blocks_of(np.arange(sink), kv_len, block_k))
    local = sliding_window(q_len, kv_len, block_q, block_k, window, causal=causal)
    return local | (sink_blocks[None, None, None, :] & _blocks(geometry))


def vertical_slash(
    q_len: int,
    kv_len: int,
    block_q: int,
    block_k: int,
    *,
    verticals: Sequence[int],
    slashes: Sequence[int],
    causal: bool = True,
) -> BlockMask:
    """Vertical lines (keys every query attends to) and slash lines (keys at fixed distances p - s).

    `verticals` are key positions; `slashes` are offsets d, the line s = p - d (0 is the diagonal; negative
    offsets, above the diagonal, only matter without `causal`).
    This is the block-level shape of MInference's vertical-slash pattern.
    """
    geometry = Geometry(q_len, kv_len, block_q, block_k, causal=causal)
    nq, nk = geometry.num_q_blocks, geometry.num_kv_blocks
    keep = np.zeros((nq, nk), bool)
    offset = kv_len - q_len
    for i in range(nq):
        p_lo = i * block_q + offset
        p_hi = min((i + 1) * block_q, q_len) - 1 + offset
        visible_verticals = [s for s in verticals if not causal or s <= p_hi]
        keep[i] |= _key_blocks_of(visible_verticals, kv_len, block_k)
        for d in slashes:
            s_lo, s_hi = max(p_lo - d, 0), min(p_hi - d, kv_len - 1)
            if s_lo <= s_hi:
                keep[i, s_lo // block_k : s_hi // block_k + 1] = True
    return jnp.asarray(keep)[None, None] & _blocks(geometry)


def from_element_mask(mask: Bool[Array, "... q_len kv_len"], block_q: int, block_k: int) -> Bool[Array, "... nq nk"]:
    """Arbitrary pattern: a tile is kept when any element of the element mask inside it is True.

    Accepts [q_len, kv_len] (returned as [1, 1, nq, nk]) or [batch|1, heads|1, q_len, kv_len].
    """
    mask = jnp.asarray(mask, bool)
    if mask.ndim == 2:
        mask = mask[None, None]
    *lead, q_len, kv_len = mask.shape
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    padded = jnp.pad(mask, [(0, 0)] * len(lead) + [(0, nq * block_q - q_len), (0, nk * block_k - kv_len)])
    return padded.reshape(*lead, nq, block_q, nk, block_k).any(axis=(-3, -1))


def segments(
    segment_ids: Int[Array, "batch seq"],
    block_q: int,
    block_k: int,
    kv_segment_ids: Int[Array, "batch kv"] | None = None,
) -> Bool[Array, "batch 1 nq nk"]:
    """Per-batch tiles whose query and key segment-id ranges overlap (packed documents).

    A tile whose query ids span [a, b] and key ids [c, d] with no overlap has no same-document pair, so it can be
    skipped; overlapping ranges are kept (exact for sorted, contiguous ids; conservative otherwise). Combine with
    `segment_ids=` for the element-level mask. Ragged tails are ignored.
    """
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids

    def ranges(ids, block):
        length = ids.shape[1]
        n = -(-length // block)
        pad = n * block - length
        blocks = jnp.pad(jnp.asarray(ids, jnp.int32), ((0, 0), (0, pad)), mode="edge").reshape(-1, n, block)
        return blocks.min(axis=-1), blocks.max(axis=-1)

    q_lo, q_hi = ranges(segment_ids, block_q)
    k_lo, k_hi = ranges(kv_segment_ids, block_k)
    overlap = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
    return overlap[:, None]


def random_blocks(
    key: jax.Array, shape: tuple[int, int, int, int], density: float, *, keep_diagonal: bool = True
) -> Bool[Array, "mb mh nq nk"]:
    """Each tile kept independently with probability `density` (for tests and benchmarks)."""
    keep = jax.random.uniform(key, shape) < density
    if keep_diagonal:
        keep |= jnp.eye(shape[2], shape[3], dtype=bool)[None, None]
    return keep
