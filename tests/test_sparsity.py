"""Dynamic block-mask estimation: invariants of the selection and quality on structured inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.synthetic import local_global_qkv

BLOCK = 32
LENGTH = 256


@pytest.fixture(scope="module")
def qkv():
    return local_global_qkv(jax.random.key(0), batch=1, length=LENGTH, heads=4, kv_heads=2, head_dim=32)


def _dense_with_blocks(q, k, v, mask, causal):
    """Block-masked attention through the float32 reference (the kernel's block masking is tested elsewhere)."""
    return pk.reference.flash_attention(q, k, v, causal=causal, block_mask=mask, block_q=BLOCK, block_k=BLOCK)


@pytest.mark.parametrize("method", list(pk.ESTIMATORS))
@pytest.mark.parametrize("causal", [True, False])
def test_diagonal_and_sink_always_kept_and_causality_respected(qkv, method, causal):
    q, k, _ = qkv
    mask = np.asarray(
        pk.estimate_block_mask(q, k, block_q=BLOCK, block_k=BLOCK, causal=causal, keep=0.05, method=method)
    )
    n = LENGTH // BLOCK
    assert mask.shape == (1, 4, n, n)
    assert mask[..., np.arange(n), np.arange(n)].all()
    assert mask[..., :, 0].all()
    if causal:
        assert not (mask & ~np.tril(np.ones((n, n), bool))).any()
    assert mask.mean() < 0.5  # a low threshold keeps little beyond the forced blocks


@pytest.mark.parametrize("method", list(pk.ESTIMATORS))
def test_density_falls_and_error_grows_as_tau_falls(qkv, method):
    q, k, v = qkv
    dense = pk.reference.flash_attention(q, k, v, causal=True)
    densities, errors = [], []
    for tau in (0.99, 0.9, 0.7):
        mask = pk.estimate_block_mask(q, k, block_q=BLOCK, block_k=BLOCK, causal=True, keep=tau, method=method)
        out = _dense_with_blocks(q, k, v, mask, causal=True)
        densities.append(float(mask.mean()))
        errors.append(float(jnp.abs(out - dense).sum() / jnp.abs(dense).sum()))
    assert densities[0] >= densities[1] >= densities[2]
    assert densities[2] < densities[0]
    assert errors[0] <= errors[2]
    assert errors[1] < 0.1, errors  # structured inputs: τ = 0.9 keeps most of the mass


def test_tau_one_keeps_every_visible_block_and_matches_dense(qkv):
    """τ = 1 keeps all visible blocks; `sparse_attention` then equals dense attention, packed documents too."""
    q, k, v = qkv
    q, k, v = q[:, :100], k[:, :100], v[:, :100]
    mask = pk.estimate_block_mask(q, k, block_q=BLOCK, block_k=BLOCK, causal=True, keep=1.0)
    visible = pk.Geometry(100, 100, BLOCK, BLOCK, causal=True).block_visibility()
    assert (np.asarray(mask) == np.asarray(visible)[None, None]).all()
    segment_ids = jnp.array([[0] * 30 + [1] * 45 + [2] * 25])  # packed documents: cross-document tiles dropped
    out = jax.jit(
        lambda q, k, v: pk.sparse_attention(
            q, k, v, tau=1.0, causal=True, segment_ids=segment_ids, block_q=BLOCK, block_k=BLOCK
        )
    )(q, k, v)
    expected = pk.reference.flash_attention(q, k, v, causal=True, segment_ids=segment_ids)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


def test_select_by_mass_keeps_the_fewest_heaviest_blocks():
    mass = jnp.array([[0.125, 0.5, 0.0625, 0.25, 0.0625]])  # exact in binary
    visible = jnp.ones((1, 5), bool)
    assert np.asarray(pk.sparsity.select_by_mass(mass, 0.75, visible)).tolist() == [[False, True, False, True, False]]
    assert np.asarray(pk.sparsity.select_by_mass(mass, 0.76, visible)).tolist() == [[True, True, False, True, False]]


def test_unknown_method_is_rejected(qkv):
    q, k, _ = qkv
    with pytest.raises(ValueError, match="method must be one of"):
        pk.estimate_block_mask(q, k, block_q=BLOCK, block_k=BLOCK, method="nope")
