"""Every Pallas kernel against `pk.reference` at real shapes: the first thing to run on a GPU (bench/gpu_suite.sh).

The tests check the kernels in interpret mode at small shapes; this runs the compiled kernels (interpret mode off
GPU) at the shapes of the sm_90a report: flash forward and backward (dense, causal, GQA 4, GQA 4 inside
`shard_map`, segment ids, block-sparse) at B=4 S=4096 16 heads head_dim 128 bf16; quantized prefill (int8/int4
q·kᵀ, bf16/fp8 P·V) against the reference over the same quantised operands; decode of a bf16 query over
bf16/int8/int4 caches, contiguous and paged, at B=32 with 32k context and 32/8 heads. The error of each output is
max |kernel - reference| / max |reference| (float32 reference); a row passes under its tolerance (bf16 rounding:
2e-2, fp8 P·V: 1e-1). It prints a table and writes JSON with provenance into bench/results/.

    python bench/kernel_correctness.py            # GPU: the shapes above
    python bench/kernel_correctness.py --smoke    # any machine: tiny shapes, interpret mode off GPU
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from record import provenance, save

import pallas_kernels as pk
from pallas_kernels import kv_cache

FULL = dict(batch=4, seq=4096, heads=16, head_dim=128, decode_batch=32, context=32768, page_size=64)
SMOKE = dict(batch=1, seq=128, heads=4, head_dim=32, decode_batch=3, context=256, page_size=16)
BF16_TOL, FP8_TOL = 2e-2, 1e-1


def _error(got, want) -> float:
    got, want = (np.asarray(x, np.float32) for x in (got, want))
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def _normal(key, shape):
    return jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)


def _inside_shard_map(attend):
    """`attend` with its heads split over a one-device mesh axis: the kernels inside `shard_map` with its
    varying-axes check on, as tensor- and context-parallel stages run them."""
    heads = P(None, None, "tp")
    return jax.shard_map(attend, mesh=Mesh(np.array(jax.devices()[:1]), ("tp",)), in_specs=heads, out_specs=heads)


def flash_rows(shape: dict) -> list[dict]:
    """Forward output and dQ/dK/dV of `flash_attention` against the reference, per variant."""
    b, s, h, d = shape["batch"], shape["seq"], shape["heads"], shape["head_dim"]
    keys = jax.random.split(jax.random.key(0), 5)
    q, do = _normal(keys[0], (b, s, h, d)), _normal(keys[3], (b, s, h, d))
    segments = jnp.repeat(jnp.arange(4, dtype=jnp.int32), s // 4)[None].repeat(b, 0)
    block_mask = jax.random.bernoulli(keys[4], 0.5, (1, h, s // 64, s // 64)) | jnp.eye(s // 64, dtype=bool)
    variants = {
        "dense": (h, {}),
        "causal": (h, dict(causal=True)),
        "causal gqa4": (h // 4, dict(causal=True)),
        "causal gqa4 shard_map": (h // 4, dict(causal=True)),
        "causal segments": (h, dict(causal=True, segment_ids=segments)),
        "block sparse": (h, dict(block_mask=block_mask)),
    }
    rows = []
    for name, (kv_heads, options) in variants.items():
        k, v = _normal(keys[1], (b, s, kv_heads, d)), _normal(keys[2], (b, s, kv_heads, d))

        def value_and_grads(attend, *inputs):
            out, vjp = jax.vjp(attend, *inputs[:3])
            return (out, *vjp(inputs[3]))

        attend = functools.partial(pk.flash_attention, **options)
        if name.endswith("shard_map"):
            attend = _inside_shard_map(attend)
        got = jax.jit(functools.partial(value_and_grads, attend))(q, k, v, do)
        ref_options = dict(options, block_q=64, block_k=64) if "block_mask" in options else options
        reference = functools.partial(pk.reference.flash_attention, **ref_options)
        upcast = [x.astype(jnp.float32) for x in (q, k, v, do)]
        want = jax.jit(functools.partial(value_and_grads, reference))(*upcast)
        for output, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            rows.append(dict(kernel="flash", variant=name, output=output, error=_error(a, e), tol=BF16_TOL))
        del got, want
    return rows


def quantized_rows(shape: dict) -> list[dict]:
    b, s, h, d = shape["batch"], shape["seq"], shape["heads"], shape["head_dim"]
    q, k, v = (_normal(key, (b, s, h, d)) for key in jax.random.split(jax.random.key(1), 3))
    rows = []
    for bits in (8, 4):
        for pv_name, pv_dtype in (("bf16", jnp.bfloat16), ("fp8", jnp.float8_e4m3fn)):
            options = dict(causal=True, qk_bits=bits, pv_dtype=pv_dtype, block_q=64, block_k=64)
            got = pk.quantized_attention(q, k, v, implementation="pallas", **options)
            upcast = [x.astype(jnp.float32) for x in (q, k, v)]
            want = jax.jit(functools.partial(pk.reference.quantized_attention, **options))(*upcast)
            tol = FP8_TOL if pv_name == "fp8" else BF16_TOL
            variant = f"int{bits} qk, {pv_name} pv"
            rows.append(dict(kernel="quantized", variant=variant, output="out", error=_error(got, want), tol=tol))
    return rows


def decode_rows(shape: dict) -> list[dict]:
    b, ctx, d, page = shape["decode_batch"], shape["context"], shape["head_dim"], shape["page_size"]
    heads, kv_heads = 32 if b >= 32 else 8, 8 if b >= 32 else 2
    keys = jax.random.split(jax.random.key(2), 4)
    q = _normal(keys[0], (b, heads, d))
    lengths = jnp.linspace(1, ctx, b).astype(jnp.int32)
    rows = []
    for kv_format in ("bfloat16", "int8", "int4"):
        (k, k_scale), (v, v_scale) = (
            pk.quantize_kv(_normal(key, (b, ctx, kv_heads, d)), kv_format) for key in keys[1:3]
        )
        for paged in (False, True):
            cache = dict(k_cache=k, v_cache=v, k_scale=k_scale, v_scale=v_scale, block_tables=None)
            if paged:
                for name in ("k_cache", "v_cache", "k_scale", "v_scale"):
                    if cache[name] is not None:
                        cache[name], cache["block_tables"] = kv_cache.scatter_pages(cache[name], page, key=keys[3])
            got = pk.decode_attention(q, lengths=lengths, implementation="pallas", **cache)
            want = jax.jit(pk.reference.decode_attention)(q.astype(jnp.float32), lengths=lengths, **cache)
            variant = f"{kv_format} {'paged' if paged else 'contiguous'}"
            rows.append(dict(kernel="decode", variant=variant, output="out", error=_error(got, want), tol=BF16_TOL))
            del cache, got, want
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; interpret mode off GPU")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()
    shape = SMOKE if args.smoke else FULL
    rows = flash_rows(shape) + quantized_rows(shape) + decode_rows(shape)
    for row in rows:
        row["ok"] = row["error"] <= row["tol"]
    print(f"{'kernel':10} {'variant':24} {'output':6} {'error':>9} {'tol':>6} ok")
    for r in rows:
        print(f"{r['kernel']:10} {r['variant']:24} {r['output']:6} {r['error']:9.2e} {r['tol']:6.0e} {r['ok']}")
    save(dict(provenance("kernel_correctness"), shape=shape, rows=rows), args.out, smoke=args.smoke)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
