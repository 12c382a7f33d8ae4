"""Quantized prefill attention: kernel and XLA path against `pk.reference.quantized_attention` (same quantisation,
float32 attention), and against full-precision attention.

Tolerances against the reference: what remains is the rounding of the probabilities to the P·V dtype, done per
tile before normalisation in the kernel: bf16 (8 significant bits) -> atol 1e-2; fp8 e4m3 (4 bits) -> atol 0.1
and a mean error under 1e-2. Against full precision: int8 keeps cosine >= 0.999, int4 >= 0.95 (with smoothing).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import quantization

BLOCK = 16
FP8 = jnp.float8_e4m3fn


def _qkv(q_len, kv_len, heads, kv_heads, dim=32, bias=0.0, seed=0, batch=2):
    """Random normal q, k, v; `bias` adds a per-channel offset of that scale to K (channel outliers)."""
    kq, kk, kv, kb = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (batch, q_len, heads, dim))
    k = jax.random.normal(kk, (batch, kv_len, kv_heads, dim)) + bias * jax.random.normal(kb, (dim,))
    v = jax.random.normal(kv, (batch, kv_len, kv_heads, dim))
    return q, k, v


def _cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _assert_close(got, want, pv_dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    atol = 0.1 if pv_dtype == FP8 else 1e-2
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    assert np.mean(np.abs(got - want)) < atol / 10


CASES = [
    # q_len, kv_len, heads, kv_heads, causal, qk_bits, pv_dtype
    (37, 37, 4, 2, True, 8, jnp.bfloat16),
    (19, 45, 2, 1, False, 4, jnp.bfloat16),
    (45, 19, 4, 4, True, 8, FP8),
    (1, 33, 2, 2, False, 4, FP8),
]


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
@pytest.mark.parametrize(("q_len", "kv_len", "heads", "kv_heads", "causal", "bits", "pv_dtype"), CASES)
def test_matches_reference(implementation, q_len, kv_len, heads, kv_heads, causal, bits, pv_dtype):
    q, k, v = _qkv(q_len, kv_len, heads, kv_heads, bias=3.0, batch=1)
    kwargs = dict(causal=causal, qk_bits=bits, pv_dtype=pv_dtype, block_q=BLOCK, block_k=BLOCK)
    got = pk.quantized_attention(q, k, v, implementation=implementation, interpret=True, **kwargs)
    want = jax.jit(functools.partial(pk.reference.quantized_attention, **kwargs))(q, k, v)  # jit: one compile
    assert got.shape == q.shape and got.dtype == q.dtype
    _assert_close(got, want, pv_dtype)
    if causal and q_len > kv_len:  # the first q_len - kv_len rows see no key
        assert np.all(np.asarray(got[:, : q_len - kv_len]) == 0)


@pytest.mark.parametrize("smooth", [True, False])
def test_int8_is_close_to_full_precision_even_with_channel_outliers(smooth):
    q, k, v = _qkv(64, 64, 2, 1, bias=8.0, seed=1)
    full = jax.jit(functools.partial(pk.reference.flash_attention, causal=True))(q, k, v)
    got = pk.quantized_attention(q, k, v, causal=True, smooth_k=smooth, block_q=BLOCK, block_k=BLOCK)
    assert _cosine(got, full) >= 0.999


def test_smoothing_rescues_int4_from_channel_outliers():
    q, k, v = _qkv(64, 64, 2, 1, bias=8.0, seed=2)
    full = jax.jit(pk.reference.flash_attention)(q, k, v)
    cos = {
        smooth: _cosine(pk.quantized_attention(q, k, v, qk_bits=4, smooth_k=smooth, block_q=BLOCK, block_k=BLOCK), full)
        for smooth in (True, False)
    }
    assert cos[True] >= 0.95 and cos[True] > cos[False] + 0.05


def test_smoothing_changes_nothing_in_full_precision():
    q, k, v = _qkv(8, 24, 2, 2, bias=5.0)
    smoothed = quantization.smooth_keys(k)
    np.testing.assert_allclose(jnp.mean(smoothed, axis=1), 0.0, atol=1e-5)
    attend = jax.jit(functools.partial(pk.reference.flash_attention, causal=True))
    np.testing.assert_allclose(attend(q, smoothed, v), attend(q, k, v), atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_block_quantisation_error_is_within_half_a_step(bits):
    x = jax.random.normal(jax.random.key(3), (2, 21, 3, 16)) * 4.0
    values, scales = jax.jit(quantization.quantize_blocks, static_argnums=(1, 2))(x, bits, 8)
    top = quantization.int_max(bits)
    assert values.shape == (2, 24, 3, 16) and scales.shape == (2, 3, 3)
    assert int(jnp.max(jnp.abs(values))) == top
    assert np.all(np.asarray(values[:, 21:]) == 0)  # padding rows
    rows = jnp.moveaxis(quantization.row_scales(scales, 8, 21), 1, 2)[..., None]
    err = jnp.abs(values[:, :21] * rows - x)
    assert np.all(np.asarray(err <= rows * 0.5 + 1e-6))


def test_fp8_values_use_per_channel_scales():
    v = jax.random.normal(jax.random.key(4), (1, 10, 2, 16)) * jnp.arange(1, 17)
    v8, scale = quantization.quantize_values(v, FP8)
    assert v8.dtype == FP8 and scale.shape == (1, 2, 16)
    np.testing.assert_allclose(jnp.max(jnp.abs(v8.astype(jnp.float32)), axis=1), quantization.FP8_MAX)
    back = v8.astype(jnp.float32) * scale[:, None]
    np.testing.assert_allclose(back, v, rtol=2**-3)


def test_bad_arguments_are_named():
    q, k, v = _qkv(4, 4, 2, 2)
    with pytest.raises(ValueError, match="pv_dtype"):
        pk.quantized_attention(q, k, v, pv_dtype=jnp.int8)
    with pytest.raises(ValueError, match="implementation"):
        pk.quantized_attention(q, k, v, implementation="cuda")
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        pk.quantized_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="bits"):
        pk.quantized_attention(q, k, v, qk_bits=9)


def test_quantized_block_estimate_beats_per_token_lowbit_on_channel_outliers():
    q, k, _ = _qkv(128, 128, 2, 1, bias=8.0, batch=1)
    geometry = pk.Geometry(128, 128, 16, 16, causal=True)
    mass = {m: jax.jit(pk.ESTIMATORS[m], static_argnums=(2, 3))(q, k, geometry, 32**-0.5) for m in pk.ESTIMATORS}
    error = {
        m: float(jnp.sum(jnp.abs(mass[m] - mass["exact"])) / jnp.sum(mass["exact"])) for m in ("quantized", "lowbit")
    }
    assert error["quantized"] < 0.02 and error["quantized"] < error["lowbit"] / 2
    mask = pk.estimate_block_mask(q, k, block_q=16, block_k=16, causal=True, keep=0.9, method="quantized")
    assert mask.shape == (1, 2, 8, 8) and not np.any(np.asarray(mask) & ~np.asarray(geometry.block_visibility()))


@pytest.mark.parametrize(
    ("bits", "pv_dtype", "pv_ir", "acc_ir"), [(8, jnp.bfloat16, "bf16", "f32"), (4, FP8, "f8E4M3FN", "f16")]
)
def test_kernel_lowers_to_integer_and_fp8_triton_dots(bits, pv_dtype, pv_ir, acc_ir):
    """Pallas -> Triton-dialect lowering for CUDA, on any machine (see test_flash_attention_lowering)."""
    from test_flash_attention_lowering import _triton_modules

    q = jax.ShapeDtypeStruct((2, 300, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16)
    options = dict(causal=True, qk_bits=bits, pv_dtype=pv_dtype, implementation="pallas", interpret=False)
    modules = _triton_modules(lambda q, k, v: pk.quantized_attention(q, k, v, **options), q, kv, kv)
    (text,) = modules.values()
    assert "scf.while" not in text
    assert "tensor<64x128xi8> * tensor<128x64xi8> -> tensor<64x64xi32>" in text
    assert f"tensor<64x64x{pv_ir}> * tensor<64x128x{pv_ir}> -> tensor<64x128x{acc_ir}>" in text
