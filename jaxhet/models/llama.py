"""A Llama-family decoder in Flax NNX.

Module and parameter names follow Hugging Face's `LlamaForCausalLM` (`layers[i].self_attn.q_proj`, ...), so the
checkpoint mapping in `jaxhet.models.hf` is a table, not a translation. Two entry points share every layer:
`__call__` (full sequences: training and scoring, with optional packed-document segment ids) and `extend`
(append tokens to a `KVCache`: prefill, then one-token decode, for serving).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Float, Int

from jaxhet.models.attention import attention
from jaxhet.models.config import LlamaConfig
from jaxhet.models.rope import apply_rope, inverse_frequencies

_INIT = nnx.initializers.normal(stddev=0.02)


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
    """Grouped-query self-attention with rotary embeddings; the kernel is chosen by `config.attention_backend`."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        hidden, heads, kv_heads, head_dim = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = _linear(hidden, heads * head_dim, config, config.attention_bias, rngs)
        self.k_proj = _linear(hidden, kv_heads * head_dim, config, config.attention_bias, rngs)
        self.v_proj = _linear(hidden, kv_heads * head_dim, config, config.attention_bias, rngs)
        self.o_proj = _linear(heads * head_dim, hidden, config, config.attention_bias, rngs)

    def _project(self, x: Float[Array, "batch seq hidden"], positions: Int[Array, "batch seq"]):
        batch, seq, _ = x.shape
        cfg = self.config
        q = self.q_proj(x).reshape(batch, seq, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
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
        out = attention(q, k, v, backend=self.config.attention_backend, causal=True, segment_ids=segment_ids)
        return self._output(out)

    def extend(
        self,
        x: Float[Array, "batch seq hidden"],
        cache_k: Float[Array, "batch max_len kv_heads head_dim"],
        cache_v: Float[Array, "batch max_len kv_heads head_dim"],
        lengths: Int[Array, " batch"],
        input_lengths: Int[Array, " batch"],
    ):
        """Write this chunk's keys/values after each row's cached tokens and attend over the whole cache."""
        seq = x.shape[1]
        offsets = jnp.arange(seq)[None, :]
        positions = lengths[:, None] + offsets
        q, k, v = self._project(x, positions)
        max_len = cache_k.shape[1]
        # Padding tokens (beyond input_lengths) are written out of bounds and dropped, never over valid entries.
        slots = jnp.where(offsets < input_lengths[:, None], positions, max_len)
        rows = jnp.arange(x.shape[0])[:, None]
        cache_k = cache_k.at[rows, slots].set(k.astype(cache_k.dtype), mode="drop")
        cache_v = cache_v.at[rows, slots].set(v.astype(cache_v.dtype), mode="drop")
        out = attention(
            q,
            cache_k.astype(q.dtype),
            cache_v.astype(q.dtype),
            backend=self.config.attention_backend,
            causal=True,
            q_offsets=lengths,
            kv_lengths=lengths + input_lengths,
        )
        return self._output(out), cache_k, cache_v


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

    def extend(self, x, cache_k, cache_v, lengths, input_lengths):
        attn_out, cache_k, cache_v = self.self_attn.extend(
            self.input_layernorm(x), cache_k, cache_v, lengths, input_lengths
        )
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), cache_k, cache_v


def segment_positions(segment_ids: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """Position of each token within its own document, restarting at 0 wherever the segment id changes."""
    seq = segment_ids.shape[1]
    index = jnp.broadcast_to(jnp.arange(seq), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


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
    """Llama-family causal language model: token ids in, next-token logits out."""

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
            if segment_ids is None:
                positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
            else:
                positions = segment_positions(segment_ids)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, segment_ids)
        return output_logits(self, x)

    def extend(
        self,
        input_ids: Int[Array, "batch seq"],
        cache: KVCache,
        input_lengths: Int[Array, " batch"] | None = None,
    ) -> tuple[Float[Array, "batch seq vocab"], KVCache]:
        """Append `input_ids` to each row of `cache` and return their logits and the updated cache.

        Row b contributes its first `input_lengths[b]` tokens (default: all); the rest is padding whose logits
        are meaningless. A prefill is an `extend` on an empty cache; a decode step is an `extend` by one token.
        """
        if input_lengths is None:
            input_lengths = jnp.full((input_ids.shape[0],), input_ids.shape[1], jnp.int32)
        x = self.embed_tokens(input_ids)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer.extend(x, cache.k[i], cache.v[i], cache.lengths, input_lengths)
            new_k.append(k)
            new_v.append(v)
        cache = KVCache(k=jnp.stack(new_k), v=jnp.stack(new_v), lengths=cache.lengths + input_lengths)
        return output_logits(self, x), cache

    def num_parameters(self) -> int:
        return sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param)))

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: str | None = None,
        param_dtype: str | None = None,
        attention_backend: str | None = None,
    ) -> Llama:
        """Load a local Hugging Face Llama directory (config.json + safetensors, single file or sharded)."""
        from jaxhet.models.hf import load_pretrained

        return load_pretrained(path, dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config.json and model.safetensors that `transformers.LlamaForCausalLM` loads."""
        from jaxhet.models.hf import save_pretrained

        save_pretrained(self, path)
