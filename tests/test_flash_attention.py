"""Flash attention kernels (interpret mode on CPU) against `pk.reference` and `jax.nn.dot_product_attention`.

Every case checks the output and all three gradients (dq, dk, dv) for one random cotangent.

Tolerances: in float32 the kernel and the references compute the same sums in a different order (online softmax
with rescaling, block-wise accumulation) and nothing else, so they agree to a few float32 ulps of the values
involved; atol = rtol = 2e-5 leaves room for that at these sizes (observed differences are around 1e-6) while any
masking or indexing mistake moves results by O(0.1). The bfloat16 case casts probabilities to bfloat16 before the
P·V and dS·K products, as FlashAttention does, and bfloat16 has 8 bits of mantissa (relative step 2^-8 ≈ 4e-3), so
it is compared against the float32 reference of the same bfloat16 inputs at 3e-2.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

F32_TOL = 2e-5
BF16_TOL = 3e-2


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    q_len: int
    kv_len: int
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 16
    batch: int = 2
    causal: bool = False
    window: int | tuple[int, int] | None = None
    segments: str | None = None  # "shared": one array for q and kv; "pair": ids differ, some queries see nothing
    block_mask: str | None = None  # "random": per batch and head; "broadcast": [1, 1, ...] with an empty q block
    block_q: int | None = 16
    block_k: int | None = 16
    dtype: str = "float32"
    sm_scale: float | None = None


CASES = [
    Case("odd_len_mha", 37, 37, head_dim=32),
    Case("causal_gqa2", 70, 70, kv_heads=2, causal=True),
    Case("mqa_causal_window", 70, 70, kv_heads=1, causal=True, window=10),
    Case("two_sided_window_custom_scale", 37, 37, window=(5, 12), block_q=32, sm_scale=0.7),
    Case("short_q_causal_gqa2", 37, 70, kv_heads=2, causal=True),
    Case("long_q_causal_empty_rows", 70, 37, heads=2, kv_heads=2, causal=True),
    Case("segments_causal_gqa2", 70, 70, kv_heads=2, causal=True, segments="shared", head_dim=64),
    Case("segment_pair_empty_rows_gqa4", 37, 70, kv_heads=1, segments="pair", head_dim=24),
    Case("random_blocks_causal_gqa2", 70, 70, kv_heads=2, causal=True, block_mask="random"),
    Case("broadcast_blocks_empty_q_block", 70, 37, kv_heads=2, block_mask="broadcast", block_k=32),
    Case("bf16_causal_gqa2", 70, 70, kv_heads=2, causal=True, dtype="bfloat16"),
]


def _segments(case: Case, key: jax.Array):
    if case.segments is None:
        return None
    if case.segments == "shared":
        boundaries = jax.random.randint(key, (case.batch, case.q_len), 0, 9) == 0
        return jnp.cumsum(boundaries, axis=1).astype(jnp.int32)
    q_ids = jax.random.randint(key, (case.batch, case.q_len), 0, 4)  # id 3 never occurs among the keys
    kv_ids = jax.random.randint(jax.random.fold_in(key, 1), (case.batch, case.kv_len), 0, 3)
    return q_ids, kv_ids


def _block_mask(case: Case, key: jax.Array):
    if case.block_mask is None:
        return None
    nq = -(-case.q_len // case.block_q)
    nk = -(-case.kv_len // case.block_k)
    if case.block_mask == "random":
        return pk.block_masks.random_blocks(key, (case.batch, case.heads, nq, nk), 0.5)
    if case.block_mask == "broadcast":
        mask = jax.random.uniform(key, (1, 1, nq, nk)) < 0.6
        return mask.at[:, :, 1].set(False)
    return None


def _inputs(case: Case, key: jax.Array):
    kq, kk, kv, kd, ks, km = jax.random.split(key, 6)
    dtype = jnp.dtype(case.dtype)
    q = jax.random.normal(kq, (case.batch, case.q_len, case.heads, case.head_dim), dtype)
    k = jax.random.normal(kk, (case.batch, case.kv_len, case.kv_heads, case.head_dim), dtype)
    v = jax.random.normal(kv, (case.batch, case.kv_len, case.kv_heads, case.head_dim), dtype)
    do = jax.random.normal(kd, q.shape, dtype)
    return q, k, v, do, _segments(case, ks), _block_mask(case, km)


def _options(case: Case, segment_ids, block_mask) -> dict:
    return dict(
        causal=case.causal,
        sm_scale=case.sm_scale,
        local_window=case.window,
        segment_ids=segment_ids,
        block_mask=block_mask,
        block_q=case.block_q,
        block_k=case.block_k,
    )


def _value_and_grads(fn, q, k, v, do):
    """Output and (dq, dk, dv) for cotangent `do`, compiled as one program."""

    def run(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(do))

    return jax.jit(run)(q, k, v, do)


def _assert_close(actual, expected, tol, names=("out", "dq", "dk", "dv")):
    for name, a, e in zip(names, actual, expected, strict=True):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.isfinite(a).all(), f"{name} has non-finite values"
        np.testing.assert_allclose(a, e, atol=tol, rtol=tol, err_msg=name)


def _element_mask(case: Case, segment_ids, block_mask):
    """The reference's element mask for a case, [batch|1, heads|1, q_len, kv_len]."""
    options = _options(case, segment_ids, block_mask)
    del options["sm_scale"]
    return pk.reference.attention_mask(case.q_len, case.kv_len, **options)


def _jax_nn(case: Case, q, k, v, segment_ids, block_mask):
    """`jax.nn.dot_product_attention` with the same mask: its own causal/window flags when they mean the same."""
    if case.q_len == case.kv_len and segment_ids is None and block_mask is None:
        window = case.window if case.window is None or isinstance(case.window, tuple) else (case.window,) * 2
        return jax.nn.dot_product_attention(
            q, k, v, scale=case.sm_scale, is_causal=case.causal, local_window_size=window, implementation="xla"
        )
    mask = jnp.broadcast_to(
        _element_mask(case, segment_ids, block_mask), (case.batch, case.heads, case.q_len, case.kv_len)
    )
    return jax.nn.dot_product_attention(q, k, v, scale=case.sm_scale, mask=mask, implementation="xla")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference_and_jax_nn(case: Case):
    q, k, v, do, segment_ids, block_mask = _inputs(case, jax.random.key(CASES.index(case)))
    options = _options(case, segment_ids, block_mask)
    got = _value_and_grads(lambda q, k, v: pk.flash_attention(q, k, v, **options), q, k, v, do)
    ref_options = {**options, "block_q": case.block_q or 64, "block_k": case.block_k or 64}
    upcast = [x.astype(jnp.float32) for x in (q, k, v, do)]
    expected = _value_and_grads(lambda q, k, v: pk.reference.flash_attention(q, k, v, **ref_options), *upcast)
    tol = BF16_TOL if case.dtype == "bfloat16" else F32_TOL
    _assert_close(got, expected, tol)
    assert got[0].dtype == q.dtype and all(g.dtype == x.dtype for g, x in zip(got[1:], (q, k, v), strict=True))

    visible = _element_mask(case, segment_ids, block_mask).any(axis=-1)
    if not bool(visible.all()):
        empty = ~np.asarray(jnp.broadcast_to(visible, (case.batch, case.heads, case.q_len)))
        out = np.moveaxis(np.asarray(got[0]), 1, 2)  # [batch, heads, q_len, dim]
        dq = np.moveaxis(np.asarray(got[1]), 1, 2)
        assert (out[empty] == 0).all() and (dq[empty] == 0).all()
        return  # jax.nn averages the values of rows that see nothing, so compare with it only when none exist
    if case.dtype == "float32":
        _assert_close(
            got,
            _value_and_grads(lambda q, k, v: _jax_nn(case, q, k, v, segment_ids, block_mask), *upcast[:3], do),
            F32_TOL,
        )


@pytest.mark.parametrize("head_dim, block", [(128, 16), (256, None)])
def test_float16_large_head_dims_forward(head_dim, block):
    """Also covers the default block sizes (head_dim 256: 32-row tiles, two blocks for 40 tokens)."""
    kq, kk, kv = jax.random.split(jax.random.key(head_dim), 3)
    shape = (1, 40, 2, head_dim)
    q, k, v = (jax.random.normal(key, shape, jnp.float16) for key in (kq, kk, kv))
    out = pk.flash_attention(q, k, v, causal=True, block_q=block, block_k=block)
    expected = pk.reference.flash_attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True)
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_kernels_on_gpu(causal):
    """The Triton-lowered kernels (not interpret mode) at a realistic shape: bf16, GQA 4, D=128, ragged length,
    against the float32 reference. Long bf16 reductions make elementwise tolerances brittle, so the error is
    measured against each result's scale: max |got - expected| <= 2e-2 * max |expected| (a few bf16 ulps)."""
    kq, kk, kv, kd = jax.random.split(jax.random.key(11), 4)
    q = jax.random.normal(kq, (2, 1000, 8, 128), jnp.bfloat16)
    k = jax.random.normal(kk, (2, 1000, 2, 128), jnp.bfloat16)
    v = jax.random.normal(kv, (2, 1000, 2, 128), jnp.bfloat16)
    do = jax.random.normal(kd, q.shape, jnp.bfloat16)
    got = _value_and_grads(lambda q, k, v: pk.flash_attention(q, k, v, causal=causal, interpret=False), q, k, v, do)
    upcast = [x.astype(jnp.float32) for x in (q, k, v, do)]
    expected = _value_and_grads(lambda q, k, v: pk.reference.flash_attention(q, k, v, causal=causal), *upcast)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.isfinite(a).all(), name
        assert np.abs(a - e).max() <= 2e-2 * np.abs(e).max(), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_q=24), "powers of two"),
        (dict(block_mask=jnp.ones((1, 1, 2, 2), bool)), "block_mask must have shape"),
        (dict(segment_ids=jnp.zeros((1, 8), jnp.int32)), "segment ids must have shapes"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    q = jnp.zeros((1, 20, 2, 16))
    k = v = jnp.zeros((1, 20, 1, 16))
    with pytest.raises(ValueError, match=message):
        pk.flash_attention(q, k, v, **kwargs)
