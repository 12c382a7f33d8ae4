"""Batched text generation with a KV cache: one jitted prefill + decode loop per (model, shape, sampling) set-up.

This is the straightforward generator that notebooks and the CLI use; the serving engine builds continuous batching
on the same `Llama.extend` path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int, PRNGKeyArray

from jaxhet.models.llama import KVCache, Llama
from jaxhet.sampling import sample_rows


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked: greedy when `temperature` is 0, else sampled after top-k / top-p filtering."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_token(
    logits: Float[Array, "batch vocab"], key: PRNGKeyArray, sampling: SamplingConfig
) -> Int[Array, " batch"]:
    """Pick one token per row from its logits according to `sampling`."""
    batch = logits.shape[0]
    return sample_rows(
        logits,
        jax.random.split(key, batch),
        jnp.full((batch,), sampling.temperature, jnp.float32),
        jnp.full((batch,), sampling.top_k or 0, jnp.int32),
        jnp.full((batch,), sampling.top_p or 1.0, jnp.float32),
    )


@partial(jax.jit, static_argnames=("graphdef", "sampling", "cache_len"))
def _generate(graphdef, state, tokens, lengths, key, *, sampling: SamplingConfig, cache_len: int):
    model = nnx.merge(graphdef, state)
    batch = tokens.shape[0]
    cache = KVCache.create(model.config, batch, cache_len)
    logits, cache = model.extend(tokens, cache, lengths, last_only=True)
    last = logits[:, 0]
    keys = jax.random.split(key, sampling.max_new_tokens)
    first = sample_token(last, keys[0], sampling)

    def step(i, carry):
        out, cache = carry
        logits, cache = model.extend(jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1), cache)
        return out.at[:, i].set(sample_token(logits[:, 0], keys[i], sampling)), cache

    out = jnp.zeros((batch, sampling.max_new_tokens), jnp.int32).at[:, 0].set(first)
    out, _ = jax.lax.fori_loop(1, sampling.max_new_tokens, step, (out, cache))
    return out


def generate(
    model: Llama,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    key: PRNGKeyArray,
    *,
    stop_ids: Collection[int] = (),
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to `sampling.max_new_tokens` tokens, each ending before the
    first of `stop_ids` it produces (the tokenizer's EOS ids)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    prompt_len = max(len(p) for p in prompts)
    padded_len = 1 << (prompt_len - 1).bit_length()  # power-of-two buckets bound the number of compilations
    tokens = np.zeros((len(prompts), padded_len), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts], np.int32)
    cache_len = padded_len + sampling.max_new_tokens
    graphdef, state = nnx.split(model)
    out = np.asarray(_generate(graphdef, state, tokens, lengths, key, sampling=sampling, cache_len=cache_len)).tolist()
    return [row[: next((i for i, t in enumerate(row) if t in stop_ids), len(row))] for row in out]
