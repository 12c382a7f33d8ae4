"""The model's one attention dispatch point, for training, prefill and decode.

Every attention call in the model goes through `attention` (keys and values in hand) or `cache_attention` (keys
and values as a cache stores them: contiguous or paged, float or quantised), and the backend the config names is
the one that runs; a combination it cannot do raises `ConfigError` naming the backend, the combination and the
backends that can. Layout is that of `jax.nn.dot_product_attention`: q [batch, q_len, heads, head_dim], k/v
[batch, kv_len, kv_heads, head_dim], grouped-query when heads is a multiple of kv_heads.

Backends: `xla` (plain jnp, dense mask), `cudnn` (`jax.nn.dot_product_attention`, dense mask), and the Pallas
kernels `flash`, `block_sparse` and `sage` (quantised int8 q·kᵀ, inference only), which take the mask as structure:
an end-aligned causal flag and segment ids. Queries at an offset into a longer key sequence (cached prefill, a
context-parallel shard of queries against all-gathered keys) reach them through `end_aligned`, which rolls each
row's keys so that the queries sit at the end, and marks keys that are invalid (past `kv_lengths`, or of another
document) through the segment ids. One-token decode over a cache runs `pallas_kernels.decode_attention` (its XLA
implementation for `xla`; for the Pallas backends its default: the kernel on a GPU, its XLA implementation of
the same numerics elsewhere, as `sage` runs `pallas_kernels.quantized_attention`'s default); `cudnn` decodes over
the cache's dense view. `ROUTES` counts the calls traced per (backend, case), so callers can check what ran.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

import pallas_kernels as pk
from jaxhet.models.config import ATTENTION_BACKENDS, TRAINABLE_BACKENDS, ConfigError
from pallas_kernels.kv_cache import contiguous_kv

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
SegmentPair = tuple[Int[Array, "batch q_len"], Int[Array, "batch kv_len"]]
# (backend, case) -> calls traced; cases: "full" (queries and keys alike), "offset" (queries at an offset into
# longer keys, or keys with a valid length or their own segment ids), "decode" (one token over a stored cache).
ROUTES: collections.Counter[tuple[str, str]] = collections.Counter()


def unsupported(backend: str, combination: str, able: tuple[str, ...]) -> ConfigError:
    """The error for a combination `backend` cannot do, naming the backends that can."""
    return ConfigError(f"attention_backend={backend!r} cannot do {combination}; backends that can: {', '.join(able)}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sage(causal: bool, q, k, v, segment_ids: SegmentPair | None):
    return pk.quantized_attention(q, k, v, causal=causal, segment_ids=segment_ids)


def _sage_forward(causal, q, k, v, segment_ids):
    return _sage(causal, q, k, v, segment_ids), None


def _sage_backward(causal, residuals, cotangent):
    """Quantised scores have no useful gradient, so differentiating through `sage` is refused, not zeroed."""
    raise unsupported("sage", "gradients (training; it is a quantised inference kernel)", TRAINABLE_BACKENDS)


_sage.defvjp(_sage_forward, _sage_backward)


def sage_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    *,
    causal: bool,
    segment_ids: Int[Array, "batch seq"] | SegmentPair | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """`pallas_kernels.quantized_attention` with its defaults (int8 q·kᵀ, bf16 P·V), refusing gradients."""
    return _sage(causal, q, k, v, segment_ids)


_BACKENDS: dict[str, Backend] = {"xla": xla_attention, "cudnn": cudnn_attention}
# Pallas kernels take the mask as structure (causal flag, segment ids) rather than as a dense array, so they can
# skip masked blocks. `block_sparse` estimates a block mask per input (`pk.sparse_attention`, default threshold).
_KERNEL_BACKENDS: dict[str, Backend] = {
    "flash": pk.flash_attention,
    "block_sparse": pk.sparse_attention,
    "sage": sage_attention,
}
assert tuple(_BACKENDS) + tuple(_KERNEL_BACKENDS) == ATTENTION_BACKENDS
# `pk.decode_attention` implementation per backend (None: the kernel on a GPU, its XLA implementation elsewhere).
_DECODE_IMPLEMENTATIONS: dict[str, str | None] = {"xla": "xla", "flash": None, "block_sparse": None, "sage": None}


def check_backend(backend: str) -> None:
    """ConfigError unless `backend` is one of `ATTENTION_BACKENDS`."""
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")


def _roll_rows(x: Array, shift: Int[Array, " batch"]) -> Array:
    """Row b of `x` ([batch, length, ...]) rotated right by `shift[b]` along axis 1."""
    length = x.shape[1]
    source = (jnp.arange(length)[None, :] - shift[:, None]) % length
    return jnp.take_along_axis(x, source.reshape(*source.shape, *([1] * (x.ndim - 2))), axis=1)


def end_aligned(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    *,
    causal: bool,
    segment_ids: Int[Array, "batch q_len"] | None,
    q_offsets: Int[Array, " batch"] | None,
    kv_lengths: Int[Array, " batch"] | None,
    kv_segment_ids: Int[Array, "batch kv_len"] | None,
) -> tuple[Array, Array, SegmentPair]:
    """Keys, values and (query, key) segment ids with which a kernel's end-aligned causal mask and segment
    equality give exactly `attention_mask`'s visibility.

    Causal: keys are padded by q_len slots and row b is rotated right by `kv_len - q_offsets[b]`, which puts
    query t (at position `q_offsets[b] + t`) at the end-aligned position of key `q_offsets[b] + t`. The keys the
    rotation wraps to the front lie past every query of the row, so marking them invalid is exact. Validity
    (`kv_lengths`, padding, wrap) and documents share the segment ids: a key's id is `2 * document + valid`, a
    query's `2 * document + 1`, so a query sees a key only when both agree and the key is valid.
    """
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    if segment_ids is not None and kv_segment_ids is None:
        if q_len != kv_len:
            raise ValueError(f"segment_ids without kv_segment_ids need q_len == kv_len, got {q_len} and {kv_len}")
        kv_segment_ids = segment_ids
    if q_offsets is None:
        q_offsets = jnp.full((batch,), kv_len - q_len, jnp.int32)
    position = jnp.broadcast_to(jnp.arange(kv_len), (batch, kv_len))
    valid = position < (kv_len if kv_lengths is None else kv_lengths[:, None])
    documents = jnp.zeros((batch, kv_len), jnp.int32) if kv_segment_ids is None else kv_segment_ids
    if causal:
        pad = ((0, 0), (0, q_len), (0, 0), (0, 0))
        shift = kv_len - q_offsets
        k, v = (_roll_rows(jnp.pad(x, pad), shift) for x in (k, v))
        position = _roll_rows(jnp.pad(position, ((0, 0), (0, q_len)), constant_values=kv_len), shift)
        valid = position < jnp.minimum(kv_len if kv_lengths is None else kv_lengths, q_offsets + q_len)[:, None]
        documents = _roll_rows(jnp.pad(documents, ((0, 0), (0, q_len))), shift)
    q_documents = jnp.zeros((batch, q_len), jnp.int32) if segment_ids is None else segment_ids
    return k, v, (2 * q_documents + 1, 2 * documents + valid.astype(jnp.int32))


def check_window(backend: str, window: int | None, offset: bool) -> None:
    """A sliding window is a local window of the `flash` kernel over a full sequence; nothing else on the Pallas
    backends (ConfigError naming what can)."""
    if window is None:
        return
    if backend == "block_sparse":
        raise ConfigError("the block_sparse attention backend has no sliding window; use xla, cudnn or flash")
    if offset:
        raise ConfigError(
            f"the {backend} attention backend runs a sliding window on full sequences only, not over a KV cache or "
            "a context-parallel shard; use xla or cudnn there"
        )


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
    """Scaled dot-product attention through the backend named by `backend` (see `ATTENTION_BACKENDS`), with the
    visibility of `attention_mask`. Full-sequence calls reach the Pallas kernels as they are; calls with
    `q_offsets`, `kv_lengths` or `kv_segment_ids` (a KV cache, a context-parallel shard) through `end_aligned`.
    `window` (a sliding window: each query sees the last `window` positions, itself included) is a local window
    of the `flash` kernel on full sequences; a combination a backend cannot do raises naming it."""
    check_backend(backend)
    offset = q_offsets is not None or kv_lengths is not None or kv_segment_ids is not None
    ROUTES[(backend, "offset" if offset else "full")] += 1
    if backend in _KERNEL_BACKENDS:
        check_window(backend, window, offset)
        kernel = _KERNEL_BACKENDS[backend]
        if not offset:
            local = {} if window is None else {"local_window": (window - 1, 0)}
            return kernel(q, k, v, causal=causal, segment_ids=segment_ids, **local)
        k, v, segments = end_aligned(
            q,
            k,
            v,
            causal=causal,
            segment_ids=segment_ids,
            q_offsets=q_offsets,
            kv_lengths=kv_lengths,
            kv_segment_ids=kv_segment_ids,
        )
        return kernel(q, k, v, causal=causal, segment_ids=segments)
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    causal_only = causal and segment_ids is None and not offset and window is None and q_len == kv_len
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


@struct.dataclass
class StoredKV:
    """Keys and values as a cache stores them (`pallas_kernels.kv_cache`): contiguous `[batch, max_len, kv_heads,
    head_dim']` or, with `block_tables`, pages `[num_pages, page_size, ...]`; float, or int8/int4 with scales."""

    k: Array
    v: Array
    k_scale: Array | None = None
    v_scale: Array | None = None
    block_tables: Int[Array, "batch pages"] | None = None

    def dense(self, dtype: jnp.dtype) -> tuple[Array, Array]:
        """Keys and values as `[batch, max_len, kv_heads, head_dim]` arrays of `dtype` (pages gathered)."""
        return (
            contiguous_kv(self.k, self.k_scale, self.block_tables, dtype),
            contiguous_kv(self.v, self.v_scale, self.block_tables, dtype),
        )


def cache_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    kv: StoredKV,
    lengths: Int[Array, " batch"],
    input_lengths: Int[Array, " batch"],
    *,
    backend: str,
    window: int | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """Causal attention of a chunk appended after row b's `lengths[b]` cached tokens (its first
    `input_lengths[b]` queries real), over the cache that already holds the chunk's keys and values.

    One-token chunks (decode) run the backend's decode kernel on the cache as stored; longer chunks (prefill),
    and every chunk of a sliding-window model (the decode kernel has no window), attend over its dense view
    through `attention`.
    """
    check_backend(backend)
    total = lengths + input_lengths
    if q.shape[1] == 1 and window is None and backend in _DECODE_IMPLEMENTATIONS:
        ROUTES[(backend, "decode")] += 1
        out = pk.decode_attention(
            q[:, 0],
            kv.k,
            kv.v,
            total,
            k_scale=kv.k_scale,
            v_scale=kv.v_scale,
            block_tables=kv.block_tables,
            implementation=_DECODE_IMPLEMENTATIONS[backend],
        )
        return out[:, None].astype(q.dtype)
    k, v = kv.dense(q.dtype)
    return attention(q, k, v, backend=backend, causal=True, q_offsets=lengths, kv_lengths=total, window=window)
