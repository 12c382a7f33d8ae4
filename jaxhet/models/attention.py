"""The model's one attention dispatch point.

Every attention call in the model goes through `attention`, which builds the mask semantics once (causal,
packed-document segment ids, and the KV-cache view of positions) and hands the tensors to the backend the config
names. Layout is that of `jax.nn.dot_product_attention`: q [batch, q_len, heads, head_dim], k/v [batch, kv_len,
kv_heads, head_dim], grouped-query when heads is a multiple of kv_heads.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

import pallas_kernels as pk
from jaxhet.models.config import ATTENTION_BACKENDS, ConfigError

Mask = Bool[Array, "batch 1 q_len kv_len"]


def attention_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    segment_ids: Int[Array, "batch q_len"] | None = None,
    q_offsets: Int[Array, " batch"] | None = None,
    kv_lengths: Int[Array, " batch"] | None = None,
    kv_segment_ids: Int[Array, "batch kv_len"] | None = None,
    window: int | None = None,
) -> Mask:
    """Which kv positions each query may see.

    Query t of row b sits at absolute position `q_offsets[b] + t` (default: the queries are the last q_len
    positions of the kv sequence); kv position s is visible when it is valid (`s < kv_lengths[b]`), not in the
    future (if causal), among the last `window` positions up to the query's own (if a window is given) and in the
    same document (if segment ids are given: `segment_ids` of the queries and `kv_segment_ids` of the keys, which
    default to the same when q_len == kv_len).
    """
    if q_offsets is None:
        q_offsets = jnp.full((batch,), kv_len - q_len, jnp.int32)
    q_pos = q_offsets[:, None] + jnp.arange(q_len)[None, :]
    kv_pos = jnp.arange(kv_len)
    mask = jnp.ones((batch, q_len, kv_len), bool)
    if kv_lengths is not None:
        mask &= kv_pos[None, None, :] < kv_lengths[:, None, None]
    if causal:
        mask &= kv_pos[None, None, :] <= q_pos[:, :, None]
    if window is not None:
        mask &= kv_pos[None, None, :] > q_pos[:, :, None] - window
    if segment_ids is not None:
        if kv_segment_ids is None:
            if q_len != kv_len:
                raise ValueError(f"segment_ids without kv_segment_ids need q_len == kv_len, got {q_len} and {kv_len}")
            kv_segment_ids = segment_ids
        mask &= segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return mask[:, None]


def xla_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    mask: Mask,
    *,
    causal_only: bool,
) -> Float[Array, "batch q_len heads head_dim"]:
    """Plain-jnp reference: float32 scores and softmax, GQA by grouping (K/V never repeated).

    Rows with nothing to attend to return zeros rather than a uniform average or NaN.
    """
    del causal_only
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    mask = mask[:, :, None]  # [batch, 1, 1, q_len, kv_len] against [batch, kv_heads, groups, q_len, kv_len]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def cudnn_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    mask: Mask,
    *,
    causal_only: bool,
) -> Float[Array, "batch q_len heads head_dim"]:
    """`jax.nn.dot_product_attention`: cuDNN's fused kernel on a GPU, its XLA implementation elsewhere.

    A plain causal mask is passed as `is_causal` so cuDNN skips the masked half instead of reading a mask.
    """
    implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    if causal_only:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


Backend = Callable[..., Float[Array, "batch q_len heads head_dim"]]
_BACKENDS: dict[str, Backend] = {"xla": xla_attention, "cudnn": cudnn_attention}
# Pallas kernels take the mask as structure (causal flag, segment ids) rather than as a dense array, so they can
# skip masked blocks. `block_sparse` estimates a block mask per input (`pk.sparse_attention`, default threshold).
_KERNEL_BACKENDS: dict[str, Backend] = {"flash": pk.flash_attention, "block_sparse": pk.sparse_attention}
assert tuple(_BACKENDS) + tuple(_KERNEL_BACKENDS) == ATTENTION_BACKENDS


def attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    *,
    backend: str = "xla",
    causal: bool = True,
    segment_ids: Int[Array, "batch seq"] | None = None,
    q_offsets: Int[Array, " batch"] | None = None,
    kv_lengths: Int[Array, " batch"] | None = None,
    kv_segment_ids: Int[Array, "batch kv_len"] | None = None,
    window: int | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """Scaled dot-product attention through the backend named by `backend` (see `ATTENTION_BACKENDS`).

    The Pallas backends (`flash`, `block_sparse`) serve full-sequence attention (training, prefill); calls over a
    KV cache or a context-parallel slice (`q_offsets`, `kv_lengths` or `kv_segment_ids` given) use the `xla` path.
    `window` (a sliding window: each query sees the last `window` positions, itself included) is a local window
    of the `flash` kernel; `block_sparse` has none and refuses it.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend in _KERNEL_BACKENDS:
        if window is not None and backend == "block_sparse":
            raise ConfigError("the block_sparse attention backend has no sliding window; use xla, cudnn or flash")
        if q_offsets is None and kv_lengths is None and kv_segment_ids is None:
            local = {} if window is None else {"local_window": (window - 1, 0)}
            return _KERNEL_BACKENDS[backend](q, k, v, causal=causal, segment_ids=segment_ids, **local)
        backend = "xla"
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    plain = segment_ids is None and q_offsets is None and kv_lengths is None and window is None
    causal_only = causal and plain and q_len == kv_len
    mask = attention_mask(
        batch,
        q_len,
        kv_len,
        causal=causal,
        segment_ids=segment_ids,
        q_offsets=q_offsets,
        kv_lengths=kv_lengths,
        kv_segment_ids=kv_segment_ids,
        window=window,
    )
    return _BACKENDS[backend](q, k, v, mask, causal_only=causal_only)
