"""Cached batched generation against a naive uncached loop."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxhet import Llama, LlamaConfig
from jaxhet.generate import SamplingConfig, generate


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(LlamaConfig.tiny(vocab_size=67, num_layers=2), rngs=nnx.Rngs(3))


@nnx.jit
def forward(model: Llama, ids: jnp.ndarray) -> jnp.ndarray:
    return model(ids)


def naive_greedy(model: Llama, prompt: list[int], steps: int) -> list[int]:
    """Full uncached forward per step over a fixed-size buffer (causal, so the zero tail changes nothing)."""
    tokens = list(prompt)
    for _ in range(steps):
        buffer = jnp.zeros((1, 16), jnp.int32).at[0, : len(tokens)].set(jnp.asarray(tokens))
        tokens.append(int(jnp.argmax(forward(model, buffer)[0, len(tokens) - 1])))
    return tokens[len(prompt) :]


def test_greedy_batch_equals_each_prompt_alone_without_cache(model):
    prompts = [[5, 9, 2, 33, 7, 1, 60], [4], [8, 8, 8, 3]]
    out = generate(model, prompts, SamplingConfig(max_new_tokens=6), jax.random.key(0))
    for prompt, generated in zip(prompts, out, strict=True):
        assert generated == naive_greedy(model, prompt, 6)


def test_top_k_one_is_greedy_and_sampling_is_seeded(model):
    prompts = [[1, 2, 3], [40, 41]]
    greedy = generate(model, prompts, SamplingConfig(max_new_tokens=5), jax.random.key(0))
    top1 = generate(model, prompts, SamplingConfig(max_new_tokens=5, temperature=1.0, top_k=1), jax.random.key(7))
    assert top1 == greedy
    tiny_p = generate(model, prompts, SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=1e-6), jax.random.key(7))
    assert tiny_p == greedy
    sampled = SamplingConfig(max_new_tokens=12, temperature=1.5)
    first = generate(model, prompts, sampled, jax.random.key(1))
    assert first == generate(model, prompts, sampled, jax.random.key(1))
    assert first != generate(model, prompts, sampled, jax.random.key(2))


def test_generation_stops_at_eos(model):
    prompts = [[1, 2, 3]]
    full = generate(model, prompts, SamplingConfig(max_new_tokens=8), jax.random.key(0))[0]
    eos = full[3]
    stopped = generate(model, prompts, SamplingConfig(max_new_tokens=8), jax.random.key(0), stop_ids={eos})[0]
    assert stopped == full[: full.index(eos)]


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be at least 1"),
    ],
)
def test_invalid_sampling_is_named(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**fields)


def test_empty_prompt_is_rejected(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], SamplingConfig(), jax.random.key(0))
