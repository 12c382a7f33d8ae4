"""KV-cache formats and the XLA decode path against the float32 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import kv_cache


@pytest.mark.parametrize(("kv_format", "bound"), [("bfloat16", 2**-8), ("int8", 0.5 / 127), ("int4", 0.5 / 7)])
def test_round_trip_error_is_within_half_a_step(kv_format, bound):
    x = jax.random.normal(jax.random.key(0), (3, 5, 2, 64)) * 3.0
    data, scale = pk.quantize_kv(x, kv_format, group_size=16)
    back = pk.dequantize_kv(data, scale)
    if kv_format == "int8":
        step_size = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    elif kv_format == "int4":
        step_size = jnp.repeat(jnp.max(jnp.abs(x.reshape(3, 5, 2, 4, 16)), axis=-1), 16, axis=-1)
    else:
        step_size = jnp.abs(x)
    assert np.all(np.abs(np.asarray(back - x)) <= np.asarray(step_size) * bound * 1.0001 + 1e-7)


def test_int4_packs_even_channels_low_and_odd_channels_high():
    x = jnp.array([[1.0, -1.0, 7.0, 0.0]])
    data, scale = pk.quantize_kv(x, "int4", group_size=4)
    assert data.dtype == jnp.uint8 and data.shape == (1, 2) and scale.shape == (1, 1)
    assert data.tolist() == [[(1 + 8) | ((-1 + 8) << 4), (7 + 8) | (8 << 4)]]
    assert kv_cache.kv_format_of(data) == "int4"


def test_zero_rows_quantise_to_zero_without_nan():
    for kv_format in ("int8", "int4"):
        data, scale = pk.quantize_kv(jnp.zeros((2, 32)), kv_format)
        assert np.all(np.asarray(pk.dequantize_kv(data, scale)) == 0)


def test_bad_format_and_group_are_named():
    with pytest.raises(ValueError, match="kv_format must be one of"):
        pk.quantize_kv(jnp.zeros((2, 32)), "int3")
    with pytest.raises(ValueError, match="group_size"):
        pk.quantize_kv(jnp.zeros((2, 48)), "int4", group_size=32)


@pytest.mark.parametrize("kv_format", ["float32", "int8", "int4"])
@pytest.mark.parametrize("page_size", [None, 16])
def test_xla_decode_matches_reference(kv_format, page_size):
    batch, max_len, heads, kv_heads, head_dim = 4, 37, 6, 2, 64
    kq, kk, kv, kp = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(kq, (batch, heads, head_dim))
    k, k_scale = pk.quantize_kv(jax.random.normal(kk, (batch, max_len, kv_heads, head_dim)), kv_format)
    v, v_scale = pk.quantize_kv(jax.random.normal(kv, (batch, max_len, kv_heads, head_dim)), kv_format)
    lengths = jnp.array([0, 1, 20, 37], jnp.int32)
    tables = None
    if page_size:
        paged = lambda x: kv_cache.scatter_pages(x, page_size, key=kp, spare_pages=3)  # noqa: E731
        (k, tables), (v, _) = paged(k), paged(v)
        if k_scale is not None:
            (k_scale, _), (v_scale, _) = paged(k_scale), paged(v_scale)
    args = dict(k_scale=k_scale, v_scale=v_scale, block_tables=tables)
    got = pk.decode_attention(q, k, v, lengths, implementation="xla", **args)
    want = pk.reference.decode_attention(q, k, v, lengths, **args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got[0]) == 0)
