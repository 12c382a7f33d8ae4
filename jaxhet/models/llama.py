"""A Llama-family decoder in Flax NNX.

Module and parameter names follow Hugging Face's `LlamaForCausalLM` (`layers[i].self_attn.q_proj`, ...), so the
checkpoint mapping (`jaxhet.models.hf`, which depends on this module, never the reverse) is a table, not a
translation. Two entry points share every layer:
`__call__` (full sequences: training and scoring, with optional packed-document segment ids) and `extend`
(append tokens to a cache: prefill, then one-token decode, for serving; `KVCache` here, paged pools in
`jaxhet.serve`).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from jaxhet.models.attention import StoredKV, attention, cache_attention
from jaxhet.models.config import LlamaConfig
from jaxhet.models.rope import apply_rope, inverse_frequencies

_INIT = nnx.initializers.normal(stddev=0.02)


class LayerCache(Protocol):
    """One layer's key/value store as `Attention.extend` sees it: append this chunk's keys/values, then attend.

    The model never looks inside, so contiguous caches (here) and the serving engine's paged, quantized pools share
    every layer of the model.
    """

    def append(
        self,
        k: Float[Array, "batch seq kv_heads head_dim"],
        v: Float[Array, "batch seq kv_heads head_dim"],
        lengths: Int[Array, " batch"],
        input_lengths: Int[Array, " batch"],
    ) -> LayerCache: ...

    def attend(
        self,
        q: Float[Array, "batch seq heads head_dim"],
        lengths: Int[Array, " batch"],
        input_lengths: Int[Array, " batch"],
        backend: str,
        window: int | None,
    ) -> Float[Array, "batch seq heads head_dim"]: ...


class Cache(Protocol):
    """A per-layer cache with `lengths[b]` valid tokens in row b (see `Llama.extend`)."""

    lengths: Int[Array, " batch"]

    def layer(self, index: int) -> LayerCache: ...

    def with_layers(self, layers: list[LayerCache], lengths: Int[Array, " batch"]) -> Cache: ...


def chunk_slots(
    lengths: Int[Array, " batch"], input_lengths: Int[Array, " batch"], seq: int
) -> tuple[Int[Array, "batch seq"], Bool[Array, "batch seq"]]:
    """Absolute position of each token of an appended chunk, and whether it is a real token (not padding)."""
    offsets = jnp.arange(seq)[None, :]
    return lengths[:, None] + offsets, offsets < input_lengths[:, None]


@struct.dataclass
class ContiguousLayerCache:
    """One layer of a `KVCache`: `[batch, max_len, kv_heads, head_dim]` keys and values."""

    k: Float[Array, "batch max_len kv_heads head_dim"]
    v: Float[Array, "batch max_len kv_heads head_dim"]

    def append(self, k, v, lengths, input_lengths) -> ContiguousLayerCache:
        positions, real = chunk_slots(lengths, input_lengths, k.shape[1])
        # Padding tokens are written out of bounds and dropped, never over valid entries.
        slots = jnp.where(real, positions, self.k.shape[1])
        rows = jnp.arange(k.shape[0])[:, None]
        return ContiguousLayerCache(
            k=self.k.at[rows, slots].set(k.astype(self.k.dtype), mode="drop"),
            v=self.v.at[rows, slots].set(v.astype(self.v.dtype), mode="drop"),
        )

    def attend(self, q, lengths, input_lengths, backend, window):
        kv = StoredKV(self.k, self.v)
        return cache_attention(q, kv, lengths, input_lengths, backend=backend, window=window)


@struct.dataclass
class KVCache:
    """Contiguous per-layer key/value cache; `lengths[b]` tokens of row b are valid."""

    k: Float[Array, "layers batch max_len kv_heads head_dim"]
    v: Float[Array, "layers batch max_len kv_heads head_dim"]
    lengths: Int[Array, " batch"]

    @classmethod
    def create(cls, config: LlamaConfig, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> KVCache:
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        dtype = dtype or config.compute_dtype
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def layer(self, index: int) -> ContiguousLayerCache:
        return ContiguousLayerCache(self.k[index], self.v[index])

    def with_layers(self, layers: list[ContiguousLayerCache], lengths: Int[Array, " batch"]) -> KVCache:
        return KVCache(k=jnp.stack([c.k for c in layers]), v=jnp.stack([c.v for c in layers]), lengths=lengths)


CacheT = TypeVar("CacheT", bound=Cache)


class RMSNorm(nnx.Module):
    """Root-mean-square normalisation, computed in float32 and scaled by a learned weight."""

    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def _linear(in_features: int, out_features: int, config: LlamaConfig, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=bias,
        dtype=config.compute_dtype,
        param_dtype=config.storage_dtype,
        kernel_init=_INIT,
        rngs=rngs,
    )


def _sum_shards(partial: Float[Array, "batch seq hidden"], config: LlamaConfig) -> Float[Array, "batch seq hidden"]:
    """Complete a row-parallel projection: under tensor parallelism each shard holds a partial sum."""
    if config.tensor_parallel_axis is None:
        return partial
    return jax.lax.psum(partial, config.tensor_parallel_axis)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings; the kernel is chosen by `config.attention_backend`.

    With `config.qk_norm` (Qwen3), each head's queries and keys are RMS-normalised over `head_dim` between the
    projection and the rotary embedding; the two weights are per `head_dim`, so every TP shard holds them whole.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        hidden, heads, kv_heads, head_dim = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = _linear(hidden, heads * head_dim, config, qkv_bias, rngs)
        self.k_proj = _linear(hidden, kv_heads * head_dim, config, qkv_bias, rngs)
        self.v_proj = _linear(hidden, kv_heads * head_dim, config, qkv_bias, rngs)
        self.o_proj = _linear(heads * head_dim, hidden, config, config.attention_bias, rngs)
        if config.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, param_dtype=config.storage_dtype)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, param_dtype=config.storage_dtype)

    def _project(self, x: Float[Array, "batch seq hidden"], positions: Int[Array, "batch seq"]):
        batch, seq, _ = x.shape
        cfg = self.config
        q = self.q_proj(x).reshape(batch, seq, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def _output(self, out: Float[Array, "batch seq heads head_dim"]) -> Float[Array, "batch seq hidden"]:
        return _sum_shards(self.o_proj(out.reshape(*out.shape[:2], -1)), self.config)

    def __call__(
        self,
        x: Float[Array, "batch seq hidden"],
        positions: Int[Array, "batch seq"],
        segment_ids: Int[Array, "batch seq"] | None,
    ) -> Float[Array, "batch seq hidden"]:
        q, k, v = self._project(x, positions)
        axis = self.config.context_parallel_axis
        q_offsets = kv_segment_ids = None
        if axis is not None:  # context parallelism: this shard's queries attend over every shard's keys and values
            k, v = (jax.lax.all_gather(t, axis, axis=1, tiled=True) for t in (k, v))
            if segment_ids is not None:
                kv_segment_ids = jax.lax.all_gather(segment_ids, axis, axis=1, tiled=True)
            q_offsets = jnp.full((q.shape[0],), shard_start(q.shape[1], axis), jnp.int32)
        out = attention(
            q,
            k,
            v,
            backend=self.config.attention_backend,
            causal=True,
            segment_ids=segment_ids,
            q_offsets=q_offsets,
            kv_segment_ids=kv_segment_ids,
            window=self.config.sliding_window,
        )
        return self._output(out)

    def extend(
        self,
        x: Float[Array, "batch seq hidden"],
        cache: LayerCache,
        lengths: Int[Array, " batch"],
        input_lengths: Int[Array, " batch"],
    ) -> tuple[Float[Array, "batch seq hidden"], LayerCache]:
        """Append this chunk's keys/values after each row's cached tokens and attend over the whole cache."""
        positions, _ = chunk_slots(lengths, input_lengths, x.shape[1])
        q, k, v = self._project(x, positions)
        cache = cache.append(k, v, lengths, input_lengths)
        out = cache.attend(q, lengths, input_lengths, self.config.attention_backend, self.config.sliding_window)
        return self._output(out), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        hidden, ffn = config.hidden_size, config.intermediate_size
        self.gate_proj = _linear(hidden, ffn, config, config.mlp_bias, rngs)
        self.up_proj = _linear(hidden, ffn, config, config.mlp_bias, rngs)
        self.down_proj = _linear(ffn, hidden, config, config.mlp_bias, rngs)

    def __call__(self, x: Float[Array, "batch seq hidden"]) -> Float[Array, "batch seq hidden"]:
        return _sum_shards(self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x)), self.config)


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        param_dtype = config.storage_dtype
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, segment_ids):
        x = x + self.self_attn(self.input_layernorm(x), positions, segment_ids)
        return x + self.mlp(self.post_attention_layernorm(x))

    def extend(self, x, cache, lengths, input_lengths):
        attn_out, cache = self.self_attn.extend(self.input_layernorm(x), cache, lengths, input_lengths)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), cache


def segment_positions(segment_ids: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """Position of each token within its own document, restarting at 0 wherever the segment id changes."""
    seq = segment_ids.shape[1]
    index = jnp.broadcast_to(jnp.arange(seq), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def shard_start(local_len: int, axis: str) -> Int[Array, ""]:
    """Position of this context-parallel shard's first token: shards hold consecutive equal slices."""
    return jax.lax.axis_index(axis) * local_len


def token_positions(
    input_ids: Int[Array, "batch seq"],
    segment_ids: Int[Array, "batch seq"] | None,
    context_parallel_axis: str | None = None,
) -> Int[Array, "batch seq"]:
    """Each token's position: its index, or its index within its document when segment ids are given.

    Under context parallelism `input_ids` is this shard's slice, and the positions are those in the whole row.
    """
    local = input_ids.shape[1]
    if context_parallel_axis is None:
        if segment_ids is None:
            return jnp.broadcast_to(jnp.arange(local), input_ids.shape)
        return segment_positions(segment_ids)
    start = shard_start(local, context_parallel_axis)
    if segment_ids is None:
        return jnp.broadcast_to(start + jnp.arange(local), input_ids.shape)
    whole = jax.lax.all_gather(segment_ids, context_parallel_axis, axis=1, tiled=True)
    return jax.lax.dynamic_slice_in_dim(segment_positions(whole), start, local, axis=1)


def token_embedding(config: LlamaConfig, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(
        config.vocab_size,
        config.hidden_size,
        dtype=config.compute_dtype,
        param_dtype=config.storage_dtype,
        embedding_init=_INIT,
        rngs=rngs,
    )


def add_output_head(module: nnx.Module, config: LlamaConfig, rngs: nnx.Rngs) -> None:
    """Give `module` the final norm and, unless the embedding is tied, the LM head (see `output_logits`)."""
    module.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=config.storage_dtype)
    if not config.tie_word_embeddings:
        module.lm_head = _linear(config.hidden_size, config.vocab_size, config, False, rngs)


def output_logits(module: nnx.Module, x: Float[Array, "batch seq hidden"]) -> Float[Array, "batch seq vocab"]:
    """Next-token logits from the last hidden states of a module built with `add_output_head`."""
    x = module.norm(x)
    if module.config.tie_word_embeddings:
        return module.embed_tokens.attend(x)
    return module.lm_head(x)


class Llama(nnx.Module):
    """Llama-family causal language model: token ids in, next-token logits out.

    Hugging Face checkpoints are read and written by `jaxhet.load_pretrained` and `jaxhet.save_pretrained`.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = token_embedding(config, rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        add_output_head(self, config, rngs)

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        *,
        segment_ids: Int[Array, "batch seq"] | None = None,
        positions: Int[Array, "batch seq"] | None = None,
    ) -> Float[Array, "batch seq vocab"]:
        """Logits for every position. With `segment_ids`, packed documents never attend to one another and,
        unless `positions` is given, each document's positions start at 0."""
        if positions is None:
            positions = token_positions(input_ids, segment_ids)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, segment_ids)
        return output_logits(self, x)

    def extend(
        self,
        input_ids: Int[Array, "batch seq"],
        cache: CacheT,
        input_lengths: Int[Array, " batch"] | None = None,
        *,
        last_only: bool = False,
    ) -> tuple[Float[Array, "batch seq vocab"], CacheT]:
        """Append `input_ids` to each row of `cache` and return their logits and the updated cache.

        Row b contributes its first `input_lengths[b]` tokens (default: all); the rest is padding whose logits
        are meaningless. A prefill is an `extend` on an empty cache; a decode step is an `extend` by one token.
        With `last_only`, only the logits of each row's last real token are computed (`[batch, 1, vocab]`), which
        is all a generator needs.
        """
        if input_lengths is None:
            input_lengths = jnp.full((input_ids.shape[0],), input_ids.shape[1], jnp.int32)
        x = self.embed_tokens(input_ids)
        layers = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer.extend(x, cache.layer(i), cache.lengths, input_lengths)
            layers.append(layer_cache)
        if last_only:
            x = jnp.take_along_axis(x, jnp.maximum(input_lengths - 1, 0)[:, None, None], axis=1)
        return output_logits(self, x), cache.with_layers(layers, cache.lengths + input_lengths)

    def num_parameters(self) -> int:
        return sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param)))
