"""The model's one attention path: the configured backend is what runs, in every case, or a named error.

Tolerances: `flash` and `block_sparse` (exact within one 64-token block, which every sequence here fits) against
`xla` differ only in summation order: 2e-5 in float32 (as tests/test_flash_attention_model.py). `sage` quantises
q and k to int8, so it is compared as tests/test_quantized_attention.py compares int8 with full precision: cosine
similarity of at least 0.999.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from jaxhet.models import LlamaConfig
from jaxhet.models.attention import ROUTES, attention
from jaxhet.models.config import ConfigError
from jaxhet.models.llama import KVCache, Llama
from jaxhet.serve import Engine, EngineConfig, SamplingParams
from jaxhet.tokenizers import ByteTokenizer

TOL = 2e-5
MIN_COSINE = 0.999
KERNEL_BACKENDS = ["flash", "block_sparse", "sage"]


def _qkv(seed: int, q_shape: tuple, kv_shape: tuple) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Standard-normal queries, keys and values (keys and values of one shape)."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return jax.random.normal(kq, q_shape), jax.random.normal(kk, kv_shape), jax.random.normal(kv, kv_shape)


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _assert_matches(backend: str, got, want) -> None:
    if backend == "sage":
        assert _cosine(got, want) >= MIN_COSINE
    else:
        np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


def _model(backend: str) -> Llama:
    return Llama(LlamaConfig.tiny(num_layers=1, attention_backend=backend), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def ids():
    return jax.random.randint(jax.random.key(0), (2, 25), 0, 264)


@pytest.fixture(scope="module")
def reference(ids):
    return _model("xla")(ids)


@pytest.mark.parametrize("backend", ["cudnn", *KERNEL_BACKENDS])
def test_full_forward_logits_equal_the_xla_backend(backend, ids, reference):
    before = ROUTES[(backend, "full")]
    logits = nnx.jit(lambda m, ids: m(ids))(_model(backend), ids)
    assert ROUTES[(backend, "full")] > before
    _assert_matches(backend, logits, reference)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cached_prefill_and_decode_run_the_backend_and_equal_the_full_forward(backend, ids, reference):
    """Prefill 10 tokens, extend the cache by 14 (queries at an offset into the cache), decode the last token."""
    model = _model(backend)
    extend = nnx.jit(lambda m, ids, cache: m.extend(ids, cache))
    routed = {case: ROUTES[(backend, case)] for case in ("offset", "decode")}
    cache = KVCache.create(model.config, batch=2, max_len=32)
    first, cache = extend(model, ids[:, :10], cache)
    second, cache = extend(model, ids[:, 10:24], cache)
    last, cache = extend(model, ids[:, 24:], cache)
    assert all(ROUTES[(backend, case)] > count for case, count in routed.items())
    _assert_matches(backend, jnp.concatenate([first, second, last], axis=1), reference)


def _value_and_grads(f, *args):
    """f(*args) and the gradients of sum(f(*args)²) with respect to every argument, jitted."""
    return jax.jit(lambda *a: (f(*a), jax.grad(lambda *b: jnp.sum(f(*b) ** 2), argnums=range(len(a)))(*a)))(*args)


def test_context_parallel_flash_inside_shard_map_equals_xla_forward_and_backward():
    """A shard of queries against all-gathered keys, with packed documents, under `shard_map`'s varying check; the
    backward kernels run there too (the dK/dV kernel loops over a GQA group of 2 heads)."""
    q, k, v = _qkv(1, (2, 32, 4, 16), (2, 32, 2, 16))
    segments = jnp.broadcast_to((jnp.arange(32) >= 20).astype(jnp.int32), (2, 32))
    mesh = Mesh(np.array(jax.devices()[:2]), ("cp",))

    def shard(backend):
        def body(q, k, v, segments):
            gather = lambda x: jax.lax.all_gather(x, "cp", axis=1, tiled=True)  # noqa: E731
            offsets = jnp.full((q.shape[0],), jax.lax.axis_index("cp") * q.shape[1], jnp.int32)
            return attention(
                q,
                gather(k),
                gather(v),
                backend=backend,
                segment_ids=segments,
                q_offsets=offsets,
                kv_segment_ids=gather(segments),
            )

        sharded = jax.shard_map(body, mesh=mesh, in_specs=P(None, "cp"), out_specs=P(None, "cp"))
        return lambda q, k, v: sharded(q, k, v, segments)

    want = _value_and_grads(lambda q, k, v: attention(q, k, v, backend="xla", segment_ids=segments), q, k, v)
    for backend in ("flash", "xla"):
        got = _value_and_grads(shard(backend), q, k, v)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL), got, want)


@pytest.mark.parametrize("causal", [False, True])
def test_tensor_parallel_flash_inside_shard_map_forward_and_backward(causal):
    """Heads split over a mesh axis: the kernels' outputs vary over it like their inputs, in both passes."""
    kq, kk = jax.random.split(jax.random.key(2))
    q, k = jax.random.normal(kq, (1, 16, 4, 16)), jax.random.normal(kk, (1, 16, 2, 16))
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    heads = P(None, None, "tp")
    attend = lambda q, k: pk.flash_attention(q, k, k, causal=causal)  # noqa: E731
    sharded = jax.shard_map(attend, mesh=mesh, in_specs=heads, out_specs=heads)
    got, want = _value_and_grads(sharded, q, k), _value_and_grads(attend, q, k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL), got, want)


def test_quantized_attention_with_segment_ids_matches_across_implementations_and_full_precision():
    q, k, v = _qkv(3, (2, 24, 4, 32), (2, 40, 2, 32))
    segments = (jnp.broadcast_to(jnp.arange(24) >= 10, (2, 24)), jnp.broadcast_to(jnp.arange(40) >= 26, (2, 40)))
    segments = tuple(s.astype(jnp.int32) for s in segments)
    run = {
        impl: pk.quantized_attention(q, k, v, causal=True, segment_ids=segments, implementation=impl, interpret=True)
        for impl in ("pallas", "xla")
    }
    np.testing.assert_allclose(run["pallas"], run["xla"], atol=1e-2, rtol=0)
    full = pk.reference.flash_attention(q, k, v, causal=True, segment_ids=segments)
    assert _cosine(run["xla"], full) >= MIN_COSINE


def test_training_through_sage_raises_naming_the_backend_and_those_that_can(ids):
    def loss(model):
        return jnp.mean(model(ids))

    with pytest.raises(ConfigError, match=r"attention_backend='sage' cannot do gradients.*xla, cudnn, flash"):
        nnx.grad(loss)(_model("sage"))


def test_an_unknown_backend_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="sage"):
        LlamaConfig.tiny(attention_backend="sdpa")


@pytest.mark.parametrize(("kv_format", "backend"), [("int8", "sage"), ("float32", "xla")])
def test_the_server_prefills_an_int8_cache_with_sage(kv_format, backend):
    config = LlamaConfig.tiny(vocab_size=ByteTokenizer.vocab_size, num_layers=1, hidden_size=64, num_heads=2)
    model = Llama(config, rngs=nnx.Rngs(4))
    settings = EngineConfig(
        max_running=2, page_size=16, num_pages=8, kv_format=kv_format, max_model_len=64, prefill_chunk=16
    )
    routes_before = ROUTES.copy()
    engine = Engine(model, ByteTokenizer(), settings)
    (out,) = engine.generate([list(b"hello there")], SamplingParams(max_tokens=3, temperature=0.0))
    routed = ROUTES - routes_before
    assert engine.attention_backend == backend and len(out.token_ids) == 3
    assert routed[(backend, "offset")] > 0 and routed[(backend, "decode")] > 0
    assert {name for name, _ in routed} == {backend}
