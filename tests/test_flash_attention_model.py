"""The Llama model through the Pallas backends gives the logits and gradients of the `xla` backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxhet.models import LlamaConfig
from jaxhet.models.attention import attention
from jaxhet.models.llama import Llama

TOL = 2e-5  # float32 model; attention differs only in summation order (see tests/test_flash_attention.py)


def _model(backend: str) -> Llama:
    config = LlamaConfig.tiny(num_layers=1, attention_backend=backend)
    return Llama(config, rngs=nnx.Rngs(0))  # same seed and construction order: identical parameters


def _loss_and_grads(model: Llama, ids, segment_ids):
    def loss(m):
        logits = m(ids, segment_ids=segment_ids)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]), logits

    (value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return value, logits, grads


@pytest.fixture(scope="module")
def batch():
    ids = jax.random.randint(jax.random.key(0), (2, 40), 0, 264)
    segment_ids = jnp.concatenate([jnp.zeros((2, 25), jnp.int32), jnp.ones((2, 15), jnp.int32)], axis=1)
    return ids, segment_ids


def test_flash_backend_matches_xla_logits_and_gradients(batch):
    ids, segment_ids = batch
    loss_x, logits_x, grads_x = nnx.jit(_loss_and_grads)(_model("xla"), ids, segment_ids)
    loss_f, logits_f, grads_f = nnx.jit(_loss_and_grads)(_model("flash"), ids, segment_ids)
    np.testing.assert_allclose(logits_f, logits_x, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(loss_f, loss_x, atol=TOL, rtol=TOL)
    flat_x, flat_f = jax.tree.leaves(nnx.state(grads_x)), jax.tree.leaves(nnx.state(grads_f))
    assert len(flat_x) == len(flat_f) > 0
    for gx, gf in zip(flat_x, flat_f, strict=True):
        np.testing.assert_allclose(gf, gx, atol=1e-4, rtol=1e-3)


def test_block_sparse_backend_is_exact_within_one_block(batch):
    """A sequence shorter than one 64-token block keeps its only (diagonal) block: identical to dense."""
    ids, _ = batch
    logits_x = _model("xla")(ids)
    logits_s = nnx.jit(lambda m, ids: m(ids))(_model("block_sparse"), ids)
    np.testing.assert_allclose(logits_s, logits_x, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("backend", ["flash", "block_sparse"])
def test_kv_cache_calls_run_the_kernel_and_equal_xla(backend):
    """Per-row cache offsets reach the kernel as end-aligned keys and segment ids: the xla result."""
    kq, kk, kv = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(kq, (2, 3, 4, 16))
    k, v = jax.random.normal(kk, (2, 10, 2, 16)), jax.random.normal(kv, (2, 10, 2, 16))
    cache = dict(causal=True, q_offsets=jnp.array([2, 5]), kv_lengths=jnp.array([5, 8]))
    np.testing.assert_allclose(
        attention(q, k, v, backend=backend, **cache), attention(q, k, v, backend="xla", **cache), atol=TOL, rtol=TOL
    )
