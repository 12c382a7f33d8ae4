"""The Pallas decode kernel (interpret mode off GPU) against `pk.reference.decode_attention` and full precision.

Against the reference, which dequantises the same cache, the kernel differs only by float32 rounding (atol 1e-5).
Against attention over the unquantised K/V: cosine >= 0.9999 for int8 caches and >= 0.99 for int4 ones.
The batch holds an empty sequence, one of a single token, one that ends exactly on a page boundary (16), partially
filled last pages, and one using the whole cache.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import kv_cache

MAX_LEN, HEAD_DIM = 100, 64
LENGTHS = (0, 1, 16, 37, 70, MAX_LEN)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _inputs(kv_format, page_size, heads, kv_heads, seed=0):
    """Query, float K/V, the cache built from them (paged into a shuffled pool when page_size is given)."""
    kq, kk, kv, kp = jax.random.split(jax.random.key(seed), 4)
    batch = len(LENGTHS)
    q = jax.random.normal(kq, (batch, heads, HEAD_DIM))
    k = jax.random.normal(kk, (batch, MAX_LEN, kv_heads, HEAD_DIM))
    v = jax.random.normal(kv, (batch, MAX_LEN, kv_heads, HEAD_DIM))
    (k_cache, k_scale), (v_cache, v_scale) = pk.quantize_kv(k, kv_format), pk.quantize_kv(v, kv_format)
    tables = None
    if page_size:
        paged = lambda x: kv_cache.scatter_pages(x, page_size, key=kp, spare_pages=2)  # noqa: E731
        (k_cache, tables), (v_cache, _) = paged(k_cache), paged(v_cache)
        if k_scale is not None:
            (k_scale, _), (v_scale, _) = paged(k_scale), paged(v_scale)
    cache = dict(k_cache=k_cache, v_cache=v_cache, k_scale=k_scale, v_scale=v_scale, block_tables=tables)
    return q, (k, v), cache, jnp.array(LENGTHS, jnp.int32)


def _run(q, cache, lengths, **kwargs):
    return pk.decode_attention(q, cache["k_cache"], cache["v_cache"], lengths, **_scales(cache), **kwargs)


def _scales(cache):
    return dict(k_scale=cache["k_scale"], v_scale=cache["v_scale"], block_tables=cache["block_tables"])


CASES = [
    # kv_format, page_size (None: contiguous), heads, kv_heads, num_splits (None: default)
    ("bfloat16", None, 8, 2, 2),
    ("int8", 16, 8, 2, 3),
    ("int4", 32, 4, 1, 2),
    ("int8", 64, 2, 2, 1),
    ("int4", None, 8, 2, None),
    ("float32", 16, 4, 4, 8),
]


@pytest.mark.parametrize(("kv_format", "page_size", "heads", "kv_heads", "splits"), CASES)
def test_kernel_matches_reference(kv_format, page_size, heads, kv_heads, splits):
    q, _, cache, lengths = _inputs(kv_format, page_size, heads, kv_heads)
    got = _run(q, cache, lengths, implementation="pallas", num_splits=splits, interpret=True)
    want = jax.jit(pk.reference.decode_attention)(q, cache["k_cache"], cache["v_cache"], lengths, **_scales(cache))
    assert got.shape == q.shape and got.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got[0]) == 0)  # the empty sequence


@pytest.mark.parametrize(("kv_format", "page_size"), [("bfloat16", None), ("int8", 16), ("int4", 32)])
def test_bfloat16_query_runs_bfloat16_dots_close_to_reference(kv_format, page_size):
    """A bfloat16 query makes the kernel's dots bfloat16 (tensor cores): P is rounded to bfloat16 before P·V."""
    q, _, cache, lengths = _inputs(kv_format, page_size, 8, 2)
    q = q.astype(jnp.bfloat16)
    got = _run(q, cache, lengths, implementation="pallas", num_splits=2, interpret=True)
    want = jax.jit(pk.reference.decode_attention)(q, cache["k_cache"], cache["v_cache"], lengths, **_scales(cache))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("kv_format", "min_cosine"), [("int8", 0.9999), ("int4", 0.99)])
def test_quantised_cache_is_close_to_full_precision(kv_format, min_cosine):
    q, (k, v), cache, lengths = _inputs(kv_format, 16, 4, 2, seed=1)
    got = _run(q, cache, lengths, implementation="pallas", interpret=True)
    mask = kv_cache.valid_token_mask(lengths, MAX_LEN)[:, None, None, :]
    full = jax.jit(pk.reference.masked_attention)(q[:, None], k, v, mask)[:, 0]
    a, b = np.asarray(got[1:], np.float64).ravel(), np.asarray(full[1:], np.float64).ravel()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= min_cosine


def test_split_combine_ignores_empty_splits():
    out = jnp.stack([jnp.ones((2, 3)), jnp.zeros((2, 3)), 3 * jnp.ones((2, 3))])
    lse = jnp.array([[0.0, -jnp.inf], [-jnp.inf, -jnp.inf], [0.0, 1.0]])
    merged = pk.online_softmax.combine(out, lse)
    np.testing.assert_allclose(merged, [[2.0] * 3, [3.0] * 3])
    empty = pk.online_softmax.combine(jnp.zeros((2, 1, 3)), jnp.full((2, 1), -jnp.inf))
    assert np.all(np.asarray(empty) == 0)


def test_default_implementation_is_xla_off_gpu_and_unknown_ones_are_named():
    q, _, cache, lengths = _inputs("int8", None, 2, 1)
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(_run(q, cache, lengths), _run(q, cache, lengths, implementation="xla"))
    with pytest.raises(ValueError, match="implementation"):
        _run(q, cache, lengths, implementation="triton")
    with pytest.raises(ValueError, match="needs its scales"):
        pk.decode_attention(q, cache["k_cache"], cache["v_cache"], lengths, implementation="pallas", interpret=True)


@pytest.mark.parametrize("kv_format", ["bfloat16", "int8", "int4"])
@pytest.mark.parametrize("page_size", [None, 16])
def test_kernel_lowers_to_triton(kv_format, page_size):
    """Pallas -> Triton-dialect lowering for CUDA, on any machine (see test_flash_attention_lowering)."""
    from test_flash_attention_lowering import _triton_modules

    batch, max_len, heads, kv_heads, head_dim = 4, 1024, 32, 8, 128
    pool = (batch, max_len) if page_size is None else (batch * max_len // page_size + 3, page_size)
    stored = kv_cache.stored_head_dim(kv_format, head_dim)
    data = jax.ShapeDtypeStruct((*pool, kv_heads, stored), jnp.uint8 if kv_format == "int4" else jnp.dtype(kv_format))
    scale = None
    if kv_cache.has_scale(kv_format):
        scale = jax.ShapeDtypeStruct((*pool, kv_heads, *kv_cache.scale_shape(kv_format, head_dim)), jnp.float32)
    tables = None if page_size is None else jax.ShapeDtypeStruct((batch, max_len // page_size), jnp.int32)

    def run(q, k, v, lengths, k_scale, v_scale, tables):
        options = dict(k_scale=k_scale, v_scale=v_scale, block_tables=tables, implementation="pallas", interpret=False)
        return pk.decode_attention(q, k, v, lengths, **options)

    q = jax.ShapeDtypeStruct((batch, heads, head_dim), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    (text,) = _triton_modules(run, q, data, data, lengths, scale, scale, tables).values()
    assert "scf.while" not in text and "tt.dot" in text
