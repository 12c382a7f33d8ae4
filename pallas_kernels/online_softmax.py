"""Online (blockwise) softmax, shared by every attention kernel: flash, quantized prefill and split-K decode.

A kernel visits the key blocks of its query rows one at a time and keeps, per row, the running maximum of the
base-2 scores, the running sum of `exp2(score - max)` and the running `P·V` accumulator, rescaling both when the
maximum grows (FlashAttention). `update` is one such visit; how `P·V` is formed (float, fp8 with a scale, or
several channel slices of a quantised cache) is the caller's `values` function, so the softmax bookkeeping exists
once. The accumulator may be any pytree of [rows, ...] arrays.

`combine` merges partial results of the same rows computed over disjoint key ranges (flash-decoding's split-K)
from their outputs and base-2 logsumexps.

Masked scores are set to a large finite negative number, never -inf, so that a fully masked tile cannot produce
`inf - inf`; rows that saw no visible key end with sum 0, output 0 and a caller-chosen logsumexp.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

MASKED = -0.7 * float(np.finfo(np.float32).max)

Carry = tuple[Any, Float[Array, " rows"], Float[Array, " rows"]]


def init(acc: Any, rows: int) -> Carry:
    """Start state: the zero accumulator `acc` (any pytree of [rows, ...] arrays), max MASKED, sum 0."""
    return acc, jnp.full((rows,), MASKED, jnp.float32), jnp.zeros((rows,), jnp.float32)


def update(
    carry: Carry,
    scores: Float[Array, "rows cols"],
    mask: Bool[Array, "rows cols"] | None,
    values: Callable[[Float[Array, "rows cols"]], Any],
) -> Carry:
    """Fold one tile of base-2 scores in; `values(p)` is the tile's P·V contribution (same structure as acc)."""
    acc, row_max, row_sum = carry
    if mask is not None:
        scores = jnp.where(mask, scores, MASKED)
    new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
    correction = jnp.exp2(row_max - new_max)
    p = jnp.exp2(scores - new_max[:, None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    row_sum = correction * row_sum + jnp.sum(p, axis=1)
    acc = jax.tree_util.tree_map(lambda a, d: correction[:, None] * a + d, acc, values(p))
    return acc, new_max, row_sum


def finish(carry: Carry, empty_lse: float) -> tuple[Any, Float[Array, " rows"]]:
    """Normalised output (0 for rows that saw nothing) and base-2 logsumexp (`empty_lse` for those rows)."""
    acc, row_max, row_sum = carry
    seen = row_sum > 0
    safe_sum = jnp.where(seen, row_sum, 1.0)
    out = jax.tree_util.tree_map(lambda a: a / safe_sum[:, None], acc)
    return out, jnp.where(seen, row_max + jnp.log2(safe_sum), empty_lse)


def combine(
    out: Float[Array, "*batch splits rows dim"], lse: Float[Array, "*batch splits rows"]
) -> Float[Array, "*batch rows dim"]:
    """Merge partial outputs over disjoint key ranges; `lse` is base 2 and -inf for a split that saw no key."""
    top = jnp.max(lse, axis=-2, keepdims=True)
    weights = jnp.exp2(lse - jnp.where(jnp.isfinite(top), top, 0.0))
    total = jnp.sum(weights, axis=-2)
    merged = jnp.sum(weights[..., None] * out, axis=-3)
    return merged / jnp.where(total > 0, total, 1.0)[..., None]
