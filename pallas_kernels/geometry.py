"""Where queries and keys sit, which (query, key) pairs a static mask allows, and which blocks that leaves.

Conventions shared by every kernel, the block-mask builders and the reference:

- Query row `t` (0 <= t < q_len) sits at absolute position `p = t + (kv_len - q_len)`: the queries are the last
  q_len positions of the key sequence (the KV-cache / chunked-prefill convention). When q_len == kv_len this is
  the usual `p = t`.
- `causal`: key `s` is visible to a query at position `p` only when `s <= p`.
- `window = (left, right)`: key `s` is visible only when `p - left <= s <= p + right`. So `left` is how many
  previous tokens a query may see (besides itself); an int `w` means `(w, w)`, the convention of
  `jax.nn.dot_product_attention(local_window_size=w)`. With `causal=True` the right side is cut at `p`, so
  `local_window=w` lets each query see itself and its `w` predecessors.
- Block `(i, j)` covers query rows `[i * block_q, (i + 1) * block_q)` and keys `[j * block_k, (j + 1) * block_k)`;
  rows and keys past the true lengths are padding and are always masked.

The block bounds below are written with `jnp`/`lax` integer ops so that the same code runs on traced scalars
inside a kernel (from `pl.program_id`) and on whole index vectors outside it (to build block masks), which keeps
the kernels' loop bounds and the sparse schedules consistent by construction.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Int


def attention_shapes(q: Array, k: Array, v: Array) -> tuple[int, int, int, int, int, int]:
    """(batch, q_len, heads, head_dim, kv_len, kv_heads) of attention inputs in `jax.nn.dot_product_attention`
    layout, or a ValueError naming what disagrees."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [b, t, h, d] and k, v [b, s, kh, d] alike, got {q.shape}, {k.shape}, {v.shape}")
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    return batch, q_len, heads, head_dim, kv_len, kv_heads


def normalize_window(local_window: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """`w` -> `(w, w)`; checks that both sides are non-negative."""
    if local_window is None:
        return None
    left, right = (local_window, local_window) if isinstance(local_window, int) else tuple(local_window)
    if left < 0 or right < 0:
        raise ValueError(f"local_window sides must be >= 0, got {local_window!r}")
    return int(left), int(right)


def _cdiv(x, d: int):
    """Ceiling division of a non-negative integer (scalar or array) by a positive constant."""
    return lax.div(x + (d - 1), jnp.int32(d))


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static shape and mask parameters of one attention call; hashable so it can be a static argument."""

    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    causal: bool = False
    window: tuple[int, int] | None = None

    @property
    def q_offset(self) -> int:
        return self.kv_len - self.q_len

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_k)

    @property
    def has_static_mask(self) -> bool:
        """Whether some element of some block is masked by position alone (causal, window or ragged tails)."""
        ragged = self.q_len % self.block_q or self.kv_len % self.block_k
        return bool(self.causal or self.window is not None or ragged)

    def _key_upper_slack(self) -> int | None:
        """Largest `s - p` a visible pair may have, or None when unbounded."""
        bounds = ([0] if self.causal else []) + ([self.window[1]] if self.window is not None else [])
        return min(bounds) if bounds else None

    def kv_block_range(self, q_block):
        """Half-open range `[lo, hi)` of kv blocks that may hold keys visible to query block `q_block`.

        The range can be empty (`hi <= lo`) when no key is visible, e.g. causal attention with q_len > kv_len.
        """
        p_min = q_block * self.block_q + self.q_offset
        p_max = jnp.minimum(p_min + self.block_q - 1, self.kv_len - 1)
        lo = jnp.zeros_like(q_block)
        if self.window is not None:
            lo = lax.div(jnp.maximum(p_min - self.window[0], 0), jnp.int32(self.block_k))
        hi = jnp.full_like(q_block, self.num_kv_blocks)
        slack = self._key_upper_slack()
        if slack is not None:
            hi = jnp.minimum(hi, _cdiv(jnp.maximum(p_max + slack + 1, 0), self.block_k))
        return lo, hi

    def q_block_range(self, kv_block):
        """Half-open range `[lo, hi)` of query blocks with a row that may see a key of kv block `kv_block`."""
        s_min = kv_block * self.block_k
        s_max = jnp.minimum(s_min + self.block_k - 1, self.kv_len - 1)
        lo = jnp.zeros_like(kv_block)
        slack = self._key_upper_slack()
        if slack is not None:
            lo = lax.div(jnp.maximum(s_min - slack - self.q_offset, 0), jnp.int32(self.block_q))
        hi = jnp.full_like(kv_block, self.num_q_blocks)
        if self.window is not None:
            last_row = s_max + self.window[0] - self.q_offset
            hi = jnp.minimum(hi, _cdiv(jnp.clip(last_row + 1, 0, self.q_len), self.block_q))
        return lo, hi

    def full_kv_block_range(self, q_block):
        """Half-open range of kv blocks whose tile with `q_block` is entirely visible by position (no mask needed).

        Empty for a query block with padding rows. Always inside `kv_block_range`.
        """
        p_min = q_block * self.block_q + self.q_offset
        rows_valid = (q_block + 1) * self.block_q <= self.q_len
        hi = jnp.full_like(q_block, self.kv_len // self.block_k)
        slack = self._key_upper_slack()
        if slack is not None:
            hi = jnp.minimum(hi, lax.div(jnp.maximum(p_min + slack + 1, 0), jnp.int32(self.block_k)))
        lo = jnp.zeros_like(q_block)
        if self.window is not None:
            lo = _cdiv(jnp.maximum(p_min + self.block_q - 1 - self.window[0], 0), self.block_k)
        return self._inside(lo, jnp.where(rows_valid, hi, lo), self.kv_block_range(q_block))

    def full_q_block_range(self, kv_block):
        """Half-open range of query blocks whose tile with `kv_block` is entirely visible by position."""
        s_min = kv_block * self.block_k
        keys_valid = s_min + self.block_k <= self.kv_len
        lo = jnp.zeros_like(kv_block)
        slack = self._key_upper_slack()
        if slack is not None:
            lo = _cdiv(jnp.maximum(s_min + self.block_k - 1 - slack - self.q_offset, 0), self.block_q)
        hi = jnp.full_like(kv_block, self.q_len // self.block_q)
        if self.window is not None:
            last = s_min + self.window[0] - self.q_offset + 1  # rows t with t + 1 <= last are within the window
            hi = jnp.minimum(hi, lax.div(jnp.maximum(last, 0), jnp.int32(self.block_q)))
        return self._inside(lo, jnp.where(keys_valid, hi, lo), self.q_block_range(kv_block))

    @staticmethod
    def _inside(lo, hi, outer):
        """[lo, hi) clipped into the range `outer`, empty ranges collapsed onto the outer start."""
        outer_lo, outer_hi = outer
        lo = jnp.clip(lo, outer_lo, jnp.maximum(outer_hi, outer_lo))
        return lo, jnp.clip(hi, lo, jnp.maximum(outer_hi, lo))

    def block_visibility(self) -> Bool[Array, "num_q_blocks num_kv_blocks"]:
        """Blocks inside `kv_block_range` of their query block: the blocks a dense kernel visits."""
        lo, hi = self.kv_block_range(jnp.arange(self.num_q_blocks, dtype=jnp.int32))
        kv = jnp.arange(self.num_kv_blocks, dtype=jnp.int32)
        return (kv[None, :] >= lo[:, None]) & (kv[None, :] < hi[:, None])

    def element_mask(self, q_start, kv_start, rows: int, cols: int) -> Bool[Array, "rows cols"] | None:
        """Position-only mask of the `rows x cols` tile whose first query row / key are `q_start` / `kv_start`.

        Returns None when nothing is masked by position, so callers can skip the select entirely.
        """
        if not self.has_static_mask:
            return None
        t = q_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
        s = kv_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
        p = t + self.q_offset
        mask = (t < self.q_len) & (s < self.kv_len)
        if self.causal:
            mask &= s <= p
        if self.window is not None:
            mask &= (s >= p - self.window[0]) & (s <= p + self.window[1])
        return mask


def segment_mask(q_segments: Int[Array, " rows"], kv_segments: Int[Array, " cols"]) -> Bool[Array, "rows cols"]:
    """Queries see only keys of their own segment (packed documents)."""
    return q_segments[:, None] == kv_segments[None, :]
