"""`BlockSizes`: validated, chosen per head_dim, and honoured by `flash_attention` (interpret mode vs reference)."""

import jax
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.flash_attention import resolve_block_sizes


def test_defaults_per_head_dim():
    assert pk.BlockSizes.for_head_dim(64) == pk.BlockSizes(128, 64, num_warps=8, num_stages=2)
    assert pk.BlockSizes.for_head_dim(128) == pk.BlockSizes(64, 64, num_warps=8, num_stages=2)
    assert pk.BlockSizes.for_head_dim(256) == pk.BlockSizes(32, 32, num_warps=8, num_stages=2)


@pytest.mark.parametrize("kwargs", [dict(block_q=48), dict(block_k=0), dict(num_warps=3), dict(num_stages=0)])
def test_bad_sizes_are_named(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        pk.BlockSizes(**kwargs)


def test_resolution_order():
    """Explicit tiles beat `block_sizes`, which beats the head_dim default; short sequences shrink the tiles."""
    given = pk.BlockSizes(32, 16, num_warps=4, num_stages=3)
    assert resolve_block_sizes(given, 128, None, 64, 1000, 1000, False) == pk.BlockSizes(32, 64, 4, 3)
    assert resolve_block_sizes(None, 64, None, None, 1000, 20, False) == pk.BlockSizes(128, 32, 8, 2)
    assert resolve_block_sizes(None, 64, None, None, 1000, 1000, True).block_q == 64  # block masks: 64


def test_flash_attention_runs_with_given_block_sizes():
    kq, kk, kv, kd = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (1, 50, 4, 32))
    k, v = (jax.random.normal(key, (1, 50, 2, 32)) for key in (kk, kv))
    do = jax.random.normal(kd, q.shape)
    sizes = pk.BlockSizes(16, 32, num_warps=4, num_stages=1)

    def value_and_grads(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(do))

    got = value_and_grads(lambda q, k, v: pk.flash_attention(q, k, v, causal=True, block_sizes=sizes))
    want = value_and_grads(lambda q, k, v: pk.reference.flash_attention(q, k, v, causal=True))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
