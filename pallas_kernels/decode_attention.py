"""`decode_attention`: one new query token per sequence against a (quantised, paged) KV cache.

Implementations:
- `"xla"`: dequantise the cache (gathering pages) and attend with grouped einsums, without repeating K/V per query
  head; what a user writes in plain JAX, the CPU path of the serving engine and the baseline of the benchmark.
- `"pallas"` (`decode_kernel`): flash-decoding. The context is split into `num_splits` ranges of pages; one
  program per (sequence, kv head, split) reads each page of its range once, dequantises it in registers and folds
  it into an online softmax for all the query heads of its kv head at once, so the cache is read once per kv head;
  the partial results are merged afterwards by their logsumexps.

`implementation=None` picks pallas on a GPU and xla elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.decode_kernel import pallas_decode
from pallas_kernels.flash_attention import default_interpret
from pallas_kernels.kv_cache import contiguous_kv, valid_token_mask

IMPLEMENTATIONS = ("xla", "pallas")


def _xla_decode(q, k_cache, v_cache, lengths, k_scale, v_scale, block_tables, sm_scale):
    batch, heads, head_dim = q.shape
    k = contiguous_kv(k_cache, k_scale, block_tables, jnp.float32)
    v = contiguous_kv(v_cache, v_scale, block_tables, jnp.float32)
    kv_heads = k.shape[2]
    qg = q.astype(jnp.float32).reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bkgd,bskd->bkgs", qg, k) * sm_scale
    valid = valid_token_mask(lengths, k.shape[1])[:, None, None, :]
    scores = jnp.where(valid, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bkgs,bskd->bkgd", weights / jnp.where(total > 0, total, 1.0), v)
    return out.reshape(batch, heads, head_dim).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "implementation", "num_splits", "interpret"))
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
    implementation: str | None = None,
    num_splits: int | None = None,
    interpret: bool | None = None,
) -> Float[Array, "batch heads head_dim"]:
    """Attention of each sequence's new query over its first `lengths[b]` cached tokens (0 tokens give 0).

    The cache layout and storage format are described in `pallas_kernels.kv_cache`: contiguous
    `[batch, max_len, kv_heads, head_dim']` or, with `block_tables`, a page pool `[num_pages, page_size, ...]`;
    float, int8 (with per-token, per-head `*_scale`) or packed int4 (with grouped `*_scale`). GQA when
    `heads % kv_heads == 0`.

    `implementation`: "pallas", "xla" or None (pallas on a GPU, xla elsewhere). `num_splits` (pallas): how many
    ranges the context is split into (flash-decoding); None picks the fewest that launch 2 programs per SM
    (`decode_kernel.default_splits`). `interpret` (pallas): None runs the compiled kernel on a GPU and interpret
    mode elsewhere. The kernel's dots take a bfloat16/float16 query's dtype (tensor cores), float32 otherwise.
    """
    implementation = implementation or ("xla" if default_interpret() else "pallas")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got {implementation!r}")
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    if implementation == "xla":
        return _xla_decode(q, k_cache, v_cache, lengths, k_scale, v_scale, block_tables, sm_scale)
    interpret = default_interpret() if interpret is None else bool(interpret)
    return pallas_decode(
        q,
        (k_cache, k_scale),
        (v_cache, v_scale),
        lengths,
        block_tables,
        sm_scale=sm_scale,
        num_splits=num_splits,
        interpret=interpret,
    )
