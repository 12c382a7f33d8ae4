"""The Llama model's own behaviour: KV-cache paths, packed documents, backends, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxhet import ConfigError, KVCache, Llama, LlamaConfig
from jaxhet.models import attention, segment_positions
from jaxhet.models.config import RopeScaling

# Float32 throughout; the cached and uncached paths differ only in summation order (masked entries are exact 0).
ATOL = 2e-5


def small_config(**overrides) -> LlamaConfig:
    fields = dict(
        vocab_size=61,
        hidden_size=48,
        intermediate_size=80,
        num_layers=2,
        num_heads=6,
        num_kv_heads=2,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16),
        max_position_embeddings=256,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(small_config(), rngs=nnx.Rngs(0))


@nnx.jit
def forward(model, ids, segment_ids=None):
    return model(ids, segment_ids=segment_ids)


@nnx.jit
def extend(model, ids, cache, input_lengths=None):
    return model.extend(ids, cache, input_lengths)


def random_ids(seed: int, shape) -> jnp.ndarray:
    return jax.random.randint(jax.random.key(seed), shape, 0, 61)


def test_decode_token_by_token_matches_full_forward(model):
    ids = random_ids(1, (3, 19))
    full = forward(model, ids)
    cache = KVCache.create(model.config, batch=3, max_len=24)
    logits, cache = extend(model, ids[:, :7], cache)
    np.testing.assert_allclose(logits, full[:, :7], atol=ATOL)
    for t in range(7, 19):
        logits, cache = extend(model, ids[:, t : t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=ATOL)
    np.testing.assert_array_equal(cache.lengths, [19, 19, 19])


def test_ragged_prefill_and_decode_match_each_row_alone(model):
    """Rows of different prompt lengths share a batch: padding must neither leak into nor overwrite real tokens."""
    prompt_lengths = np.array([5, 11, 1])
    ids = random_ids(2, (3, 16))
    cache = KVCache.create(model.config, batch=3, max_len=16)
    logits, cache = extend(model, ids[:, :11], cache, jnp.asarray(prompt_lengths))
    steps = [logits]
    for t in range(4):
        step_logits, cache = extend(model, ids[:, 11 + t : 12 + t], cache)
        steps.append(step_logits)
    for row, length in enumerate(prompt_lengths):
        row_ids = jnp.concatenate([ids[row : row + 1, :length], ids[row : row + 1, 11:15]], axis=1)
        alone = forward(model, row_ids)[0]
        np.testing.assert_allclose(steps[0][row, :length], alone[:length], atol=ATOL)
        for t in range(4):
            np.testing.assert_allclose(steps[t + 1][row, 0], alone[length + t], atol=ATOL)


def test_padding_beyond_cache_capacity_is_dropped(model):
    """A padded chunk that reaches past the cache end must not clamp onto (and overwrite) valid entries."""
    ids = random_ids(3, (2, 8))
    cache = KVCache.create(model.config, batch=2, max_len=8)
    _, prefilled = extend(model, ids[:, :7], cache)
    chunk = jnp.concatenate([ids[:, 7:8], jnp.zeros((2, 2), jnp.int32)], axis=1)
    logits, cache = extend(model, chunk, prefilled, jnp.array([1, 1]))
    np.testing.assert_allclose(logits[:, 0], forward(model, ids)[:, 7], atol=ATOL)
    np.testing.assert_array_equal(cache.lengths, [8, 8])
    np.testing.assert_array_equal(cache.k[:, :, :7], prefilled.k[:, :, :7])
    _, clean = extend(model, ids[:, 7:8], prefilled)
    # Position 7 from a 3-token chunk against a 1-token one: the same token, attention summed in another order (1e-6
    # relative in float32); a padding token clamped onto it would differ by the size of the keys themselves.
    np.testing.assert_allclose(cache.k, clean.k, rtol=1e-5, atol=1e-6)


def test_chunked_prefill_matches_full_forward(model):
    ids = random_ids(4, (2, 21))
    full = forward(model, ids)
    cache = KVCache.create(model.config, batch=2, max_len=21)
    chunks = []
    for start in range(0, 21, 8):
        logits, cache = extend(model, ids[:, start : start + 8], cache)
        chunks.append(logits)
    np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), full, atol=ATOL)


def test_packed_documents_do_not_attend_across(model):
    docs = [random_ids(5, (1, 7)), random_ids(6, (1, 10)), random_ids(7, (1, 4))]
    packed = jnp.concatenate(docs, axis=1)
    segment_ids = jnp.concatenate([jnp.full((1, d.shape[1]), i + 1) for i, d in enumerate(docs)], axis=1)
    logits = forward(model, packed, segment_ids)
    start = 0
    for doc in docs:
        np.testing.assert_allclose(logits[:, start : start + doc.shape[1]], forward(model, doc), atol=ATOL)
        start += doc.shape[1]


def test_segment_positions_restart_per_document():
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4]])
    np.testing.assert_array_equal(segment_positions(segment_ids), [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])


def test_cudnn_backend_matches_xla_backend():
    """`cudnn` runs jax.nn.dot_product_attention (its XLA implementation on CPU); same logits on every path."""
    xla_model = Llama(small_config(), rngs=nnx.Rngs(1))
    cudnn_model = Llama(small_config(attention_backend="cudnn"), rngs=nnx.Rngs(1))
    ids = random_ids(8, (2, 13))
    segment_ids = jnp.array([[1] * 6 + [2] * 7, [1] * 13])
    np.testing.assert_allclose(forward(cudnn_model, ids), forward(xla_model, ids), atol=ATOL)
    np.testing.assert_allclose(forward(cudnn_model, ids, segment_ids), forward(xla_model, ids, segment_ids), atol=ATOL)
    cache = KVCache.create(xla_model.config, 2, 16)
    lengths = jnp.array([13, 9])
    np.testing.assert_allclose(
        extend(cudnn_model, ids, cache, lengths)[0], extend(xla_model, ids, cache, lengths)[0], atol=ATOL
    )


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (5, 1)])
def test_xla_attention_matches_jax_reference(heads, kv_heads):
    keys = jax.random.split(jax.random.key(9), 3)
    q = jax.random.normal(keys[0], (2, 11, heads, 16))
    k = jax.random.normal(keys[1], (2, 11, kv_heads, 16))
    v = jax.random.normal(keys[2], (2, 11, kv_heads, 16))
    ours = jax.jit(attention, static_argnames=("backend", "causal"))(q, k, v, backend="xla", causal=True)
    expected = jax.jit(jax.nn.dot_product_attention, static_argnames=("is_causal", "implementation"))(
        q, k, v, is_causal=True, implementation="xla"
    )
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_rows_with_nothing_to_attend_are_zero():
    q = jnp.ones((2, 1, 2, 8))
    k = v = jnp.ones((2, 4, 2, 8))
    out = attention(q, k, v, backend="xla", causal=True, q_offsets=jnp.array([0, 0]), kv_lengths=jnp.array([0, 3]))
    assert bool(jnp.all(out[0] == 0)) and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out[1], jnp.ones((1, 2, 8)), atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
    f32 = Llama(small_config(), rngs=nnx.Rngs(2))
    bf16 = Llama(small_config(dtype="bfloat16"), rngs=nnx.Rngs(2))
    ids = random_ids(10, (2, 16))
    out = forward(bf16, ids)
    assert out.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits: logits of this size (|x| ~ 1) agree to a few hundredths.
    np.testing.assert_allclose(out.astype(jnp.float32), forward(f32, ids), atol=5e-2)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(num_heads=6, num_kv_heads=4), "num_heads .6. must be a multiple of num_kv_heads .4."),
        (dict(attention_backend="triton"), "attention_backend must be one of xla, cudnn"),
        (dict(dtype="int8"), "dtype must be one of float32, bfloat16, float16"),
        (dict(hidden_size=50, num_heads=6, num_kv_heads=2), "hidden_size .50. must be a multiple of num_heads"),
        (dict(num_layers=0), "num_layers must be a positive integer"),
    ],
)
def test_invalid_config_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        small_config(**fields)


def test_hf_config_round_trip():
    config = small_config(tie_word_embeddings=True, head_dim=12)
    assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config
