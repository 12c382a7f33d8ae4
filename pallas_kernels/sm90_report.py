"""Every Pallas kernel of this package compiled for sm_90a at realistic shapes, without a GPU (`deviceless`).

Shapes: prefill and training B=4, S=4096, 16 query heads, head_dim 128, bfloat16 (GQA: 4 kv heads); decode
B=32 sequences with 32k tokens of context, 32 query and 8 kv heads, head_dim 128, a bfloat16 query, 64-token
pages. Each case is one jitted call (flash cases differentiate, so their forward, dQ and dK/dV kernels compile
together); `report()` compiles each case once and returns `{case: {kernel: KernelResources}}`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import kv_cache
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.deviceless import KernelResources, compile_kernels, on_h100, toolchain_versions
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.quantized_attention import quantized_attention

PREFILL = dict(batch=4, seq=4096, heads=16, kv_heads=16, head_dim=128, dtype="bfloat16")
DECODE = dict(batch=32, context=32768, heads=32, kv_heads=8, head_dim=128, page_size=64, query_dtype="bfloat16")


@dataclasses.dataclass(frozen=True)
class Case:
    """One compiled call: `build()` returns the function and its abstract inputs; `shapes` is what it runs at."""

    name: str
    build: Callable[[], tuple[Callable, tuple[jax.ShapeDtypeStruct, ...]]]
    shapes: dict


def _flash(
    name: str, kv_heads: int = 16, head_dim: int = 128, segments: bool = False, block_sparse: bool = False, **options
) -> Case:
    """Forward and backward of `flash_attention` at the prefill shape (and `head_dim`)."""
    b, s, h, d = PREFILL["batch"], PREFILL["seq"], PREFILL["heads"], head_dim

    def build():
        q = on_h100((b, s, h, d), jnp.bfloat16)
        kv = on_h100((b, s, kv_heads, d), jnp.bfloat16)
        extra = []
        if segments:
            extra.append(on_h100((b, s), jnp.int32))
        if block_sparse:
            extra.append(on_h100((1, h, s // 64, s // 64), jnp.bool_))

        def run(q, k, v, *extra):
            kwargs = dict(options, interpret=False)
            if segments:
                kwargs["segment_ids"] = extra[0]
            if block_sparse:
                kwargs["block_mask"] = extra[-1]
            out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, **kwargs), q, k, v)
            return out, vjp(out)

        return run, (q, kv, kv, *extra)

    shapes = dict(PREFILL, kv_heads=kv_heads, head_dim=head_dim, segments=segments, block_sparse=block_sparse)
    return Case(name, build, dict(shapes, **options))


def _quantized(name: str, qk_bits: int, pv_dtype: str) -> Case:
    """Causal quantized prefill at the prefill shape."""
    b, s, h, d = PREFILL["batch"], PREFILL["seq"], PREFILL["heads"], PREFILL["head_dim"]

    def build():
        x = on_h100((b, s, h, d), jnp.bfloat16)

        def run(q, k, v):
            options = dict(causal=True, qk_bits=qk_bits, pv_dtype=jnp.dtype(pv_dtype), implementation="pallas")
            return quantized_attention(q, k, v, interpret=False, **options)

        return run, (x, x, x)

    return Case(name, build, dict(PREFILL, causal=True, qk_bits=qk_bits, pv_dtype=pv_dtype))


def _decode(name: str, kv_format: str, paged: bool) -> Case:
    """Decode of one bfloat16 query token per sequence at the decode shape."""
    b, ctx, h, kvh, d, page = (DECODE[k] for k in ("batch", "context", "heads", "kv_heads", "head_dim", "page_size"))

    def build():
        pool = (b * ctx // page, page) if paged else (b, ctx)
        stored = kv_cache.stored_head_dim(kv_format, d)
        data = on_h100((*pool, kvh, stored), jnp.uint8 if kv_format == "int4" else jnp.dtype(kv_format))
        scale = None
        if kv_cache.has_scale(kv_format):
            scale = on_h100((*pool, kvh, *kv_cache.scale_shape(kv_format, d)), jnp.float32)
        tables = on_h100((b, ctx // page), jnp.int32) if paged else None

        def run(q, k, v, lengths, k_scale, v_scale, tables):
            options = dict(k_scale=k_scale, v_scale=v_scale, block_tables=tables, implementation="pallas")
            return decode_attention(q, k, v, lengths, interpret=False, **options)

        return run, (on_h100((b, h, d), jnp.bfloat16), data, data, on_h100((b,), jnp.int32), scale, scale, tables)

    return Case(name, build, dict(DECODE, kv_format=kv_format, paged=paged))


def cases() -> list[Case]:
    """The compiled calls of the report."""
    listed = [
        _flash("flash_dense"),
        _flash("flash_causal", causal=True),
        _flash("flash_causal_d64", head_dim=64, causal=True),
        _flash("flash_causal_d256", head_dim=256, causal=True),
        _flash("flash_causal_gqa4", kv_heads=4, causal=True),
        _flash("flash_causal_segments", causal=True, segments=True),
        _flash("flash_block_sparse", block_sparse=True),
    ]
    listed += [
        _quantized(f"quantized_int{bits}_pv_{short}", bits, pv_dtype)
        for bits in (8, 4)
        for short, pv_dtype in (("bf16", "bfloat16"), ("fp8", "float8_e4m3fn"))
    ]
    listed += [
        _decode(f"decode_{kv_format}_{'paged' if paged else 'contiguous'}", kv_format, paged)
        for kv_format in ("bfloat16", "int8", "int4")
        for paged in (False, True)
    ]
    return listed


def compile_case(case: Case) -> dict[str, KernelResources]:
    """The resources of every Pallas kernel in one case's sm_90a compile."""
    fn, args = case.build()
    return compile_kernels(fn, *args)


def report(selected: list[Case] | None = None) -> dict:
    """Compile every case once; the JSON-ready report with its provenance."""
    rows = {}
    for case in cases() if selected is None else selected:
        rows[case.name] = dict(shapes=case.shapes, kernels={n: r.to_json() for n, r in compile_case(case).items()})
    return dict(
        provenance=dict(
            target="sm_90a (NVIDIA H100 80GB HBM3 target config), deviceless compile on CPU",
            compiled_on=f"{os.cpu_count()}-core CPU, no GPU",
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            versions=toolchain_versions(),
        ),
        cases=rows,
    )
