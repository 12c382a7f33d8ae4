"""Block-sparse attention: schedules visit exactly the kept blocks, skipped blocks are never read, and the
pattern builders match their element-level definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import block_masks
from pallas_kernels.reference import attention_mask

BQ = BK = 16


def test_schedule_lists_exactly_the_kept_blocks():
    geometry = pk.Geometry(q_len=100, kv_len=90, block_q=BQ, block_k=BK, causal=True)
    mask = block_masks.random_blocks(jax.random.key(0), (2, 3, 7, 6), 0.4, keep_diagonal=False)
    effective = np.asarray(mask & geometry.block_visibility())
    schedule = jax.jit(pk.build_schedule, static_argnums=1)(mask, geometry)
    for b, h, i in np.ndindex(2, 3, 7):
        count = int(schedule.kv_counts[b, h, i])
        assert list(np.asarray(schedule.kv_indices[b, h, i, :count])) == list(np.flatnonzero(effective[b, h, i]))
    for b, h, j in np.ndindex(2, 3, 6):
        count = int(schedule.q_counts[b, h, j])
        assert list(np.asarray(schedule.q_indices[b, h, j, :count])) == list(np.flatnonzero(effective[b, h, :, j]))
    # The kernels' loop trip counts add up to the number of kept blocks: the work follows the density.
    assert int(schedule.kv_counts.sum()) == int(schedule.q_counts.sum()) == int(effective.sum())


def _in_range(lo, hi, n: int, transposed: bool) -> np.ndarray:
    """Bool [blocks, n] (or its transpose): which of n blocks lie in each [lo, hi)."""
    inside = (jnp.arange(n)[None, :] >= lo[:, None]) & (jnp.arange(n)[None, :] < hi[:, None])
    return np.asarray(inside.T if transposed else inside)


@pytest.mark.parametrize(
    "q_len, kv_len, causal, window",
    [
        (70, 70, True, None),
        (37, 70, True, (9, 9)),
        (70, 37, True, None),
        (50, 50, False, (5, 20)),
        (33, 64, False, None),
        (64, 64, True, (40, 0)),
        (48, 96, False, (0, 30)),
    ],
)
def test_geometry_ranges_are_exactly_the_visible_and_the_full_tiles(q_len, kv_len, causal, window):
    """The dense kernels' loop bounds, checked tile by tile against the reference's element mask:
    kv-block ranges (forward/dQ) and q-block ranges (dK/dV) hold exactly the tiles with a visible pair, and the
    unmasked sub-ranges exactly the tiles where every pair is visible (ragged rows/keys count as hidden)."""
    geometry = pk.Geometry(q_len, kv_len, BQ, BK, causal=causal, window=window)
    nq, nk = geometry.num_q_blocks, geometry.num_kv_blocks
    element = attention_mask(q_len, kv_len, causal=causal, local_window=window)[0, 0]
    needed = np.asarray(block_masks.from_element_mask(element, BQ, BK)[0, 0])
    full = ~np.asarray(block_masks.from_element_mask(~element, BQ, BK)[0, 0])
    full[q_len // BQ :, :] = False
    full[:, kv_len // BK :] = False
    q_blocks, kv_blocks = jnp.arange(nq), jnp.arange(nk)
    assert (_in_range(*geometry.kv_block_range(q_blocks), nk, False) == needed).all()
    assert (_in_range(*geometry.q_block_range(kv_blocks), nq, True) == needed).all()
    assert (_in_range(*geometry.full_kv_block_range(q_blocks), nk, False) == full).all()
    assert (_in_range(*geometry.full_q_block_range(kv_blocks), nq, True) == full).all()


def test_skipped_blocks_are_never_read():
    """NaNs planted in K/V blocks that no query block keeps, and in Q/dO rows of a query block that keeps no kv
    block, would poison every output and gradient they touched; they must not reach any of them."""
    batch, q_len, kv_len, heads, kv_heads, dim = 1, 64, 64, 2, 1, 16
    kq, kk, kv, kd = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(kq, (batch, q_len, heads, dim))
    k = jax.random.normal(kk, (batch, kv_len, kv_heads, dim))
    v = jax.random.normal(kv, (batch, kv_len, kv_heads, dim))
    do = jax.random.normal(kd, q.shape)
    mask = jnp.ones((1, 1, 4, 4), bool).at[:, :, :, 2].set(False).at[:, :, 3, :].set(False)
    skipped_keys = slice(2 * BK, 3 * BK)
    skipped_queries = slice(3 * BQ, 4 * BQ)
    poisoned = [
        q.at[:, skipped_queries].set(jnp.nan),
        k.at[:, skipped_keys].set(jnp.nan),
        v.at[:, skipped_keys].set(jnp.nan),
    ]
    do_poisoned = do.at[:, skipped_queries].set(jnp.nan)

    def run(q, k, v, do):
        out, vjp = jax.vjp(
            lambda q, k, v: pk.flash_attention(q, k, v, block_mask=mask, block_q=BQ, block_k=BK), q, k, v
        )
        return (out, *vjp(do))

    got = jax.jit(run)(*poisoned, do_poisoned)
    clean = [
        x.at[:, skipped_queries].set(0.0) if i == 0 else x.at[:, skipped_keys].set(0.0) for i, x in enumerate(poisoned)
    ]
    ref = lambda q, k, v: pk.reference.flash_attention(q, k, v, block_mask=mask, block_q=BQ, block_k=BK)  # noqa: E731
    out, vjp = jax.vjp(ref, *clean)
    expected = (out, *vjp(do.at[:, skipped_queries].set(0.0)))
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        assert np.isfinite(np.asarray(a)).all(), name
        np.testing.assert_allclose(a, e, atol=2e-5, rtol=2e-5, err_msg=name)
    assert (np.asarray(got[0][:, skipped_queries]) == 0).all()
    assert (np.asarray(got[2][:, skipped_keys]) == 0).all()


def _as_blocks(element_mask) -> np.ndarray:
    return np.asarray(block_masks.from_element_mask(element_mask, BQ, BK))


@pytest.mark.parametrize("q_len, kv_len", [(64, 64), (40, 90)])
def test_pattern_builders_match_element_definitions(q_len, kv_len):
    p = jnp.arange(q_len)[:, None] + kv_len - q_len
    s = jnp.arange(kv_len)[None, :]
    causal = s <= p
    window, sink = 20, 5
    local = causal & (s >= p - window)
    vertical, slashes = [7, 50], [0, 33]
    vs = causal & ((s == vertical[0]) | (s == vertical[1]) | (p - s == slashes[0]) | (p - s == slashes[1]))
    expected = {
        "causal": (block_masks.causal(q_len, kv_len, BQ, BK), causal),
        "window": (block_masks.sliding_window(q_len, kv_len, BQ, BK, window), local),
        "a_shape": (
            block_masks.a_shape(q_len, kv_len, BQ, BK, sink=sink, window=window),
            local | (causal & (s < sink)),
        ),
        "vertical_slash": (
            block_masks.vertical_slash(q_len, kv_len, BQ, BK, verticals=vertical, slashes=slashes),
            vs,
        ),
    }
    for name, (built, element) in expected.items():
        assert built.shape == (1, 1, -(-q_len // BQ), -(-kv_len // BK)), name
        assert (np.asarray(built) == _as_blocks(element)).all(), name


def test_block_sparse_equals_dense_with_the_equivalent_element_mask():
    """A sink + local pattern with exact element-level edges gives the dense result of that element mask."""
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(kq, (1, 80, 2, 16))
    k = jax.random.normal(kk, (1, 80, 2, 16))
    v = jax.random.normal(kv, (1, 80, 2, 16))
    blocks = block_masks.a_shape(80, 80, BQ, BK, sink=16, window=16)
    out = jax.jit(lambda q, k, v: pk.flash_attention(q, k, v, causal=True, block_mask=blocks, block_q=BQ, block_k=BK))(
        q, k, v
    )
    element = attention_mask(80, 80, causal=True, block_mask=blocks, block_q=BQ, block_k=BK)
    dense = jax.nn.dot_product_attention(q, k, v, mask=jnp.broadcast_to(element, (1, 2, 80, 80)), implementation="xla")
    np.testing.assert_allclose(out, dense, atol=2e-5, rtol=2e-5)


def test_segment_blocks_keep_exactly_the_tiles_with_same_document_pairs():
    ids = jnp.array([[0] * 20 + [1] * 30 + [2] * 14, [0] * 64])
    built = np.asarray(block_masks.segments(ids, BQ, BK))
    same = ids[:, :, None] == ids[:, None, :]
    assert built.shape == (2, 1, 4, 4)
    assert (built == np.asarray(block_masks.from_element_mask(same[:, None], BQ, BK))).all()
