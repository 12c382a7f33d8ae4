"""Speed of quantized attention: prefill against cuDNN bf16, decode over bf16/int8/int4 caches against a device copy.

Prefill (B=4, H=16, D=128 by default, S = 4k and 8k, causal and not): the `pk.quantized_attention` kernel with int8
q·kᵀ and bf16 or fp8 P·V and with int4 q·kᵀ, timed with its quantisation pre-pass, against
`jax.nn.dot_product_attention(implementation="cudnn")` in bf16 (XLA's implementation off GPU) and `pk.flash_attention`
in bf16, all in the same run. TFLOP/s count 4·B·H·S²·D (halved when causal); `vs_baseline` is baseline time / time.

Decode (batch 32, context 32k, 32 query / 8 kv heads, head_dim 128 by default, every sequence full): one query
token against a cache in bf16, int8 and int4, with the XLA path and the Pallas kernel (contiguous and paged).
Achieved bandwidth = bytes of the cache read (data + scales) / time, reported against a measured device copy
(`x + 1` over a large buffer: reads and writes every byte); `vs_bf16` is the bf16 time of the same implementation
and layout / this time.

It prints both tables and writes JSON (device, versions, shapes, date, rows) into bench/results/.

    python bench/quantized_attention.py            # GPU: the shapes above
    python bench/quantized_attention.py --smoke    # any machine: tiny shapes, interpret mode off GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform

import jax
import jax.numpy as jnp
from attention import _time

import pallas_kernels as pk
from pallas_kernels import kv_cache

PREFILL_VARIANTS = {  # name -> (qk_bits, pv_dtype)
    "int8 qk, bf16 pv": (8, jnp.bfloat16),
    "int8 qk, fp8 pv": (8, jnp.float8_e4m3fn),
    "int4 qk, bf16 pv": (4, jnp.bfloat16),
}
CACHE_FORMATS = ("bfloat16", "int8", "int4")


def bench_prefill(seq: int, causal: bool, shape: dict, block: int, repeats: int) -> list[dict]:
    keys = jax.random.split(jax.random.key(seq), 3)
    dims = (shape["batch"], seq, shape["heads"], shape["head_dim"])
    q, k, v = (jax.random.normal(key, dims, jnp.bfloat16) for key in keys)
    flops = 4 * shape["batch"] * shape["heads"] * seq * seq * shape["head_dim"] * (0.5 if causal else 1.0)
    baseline = "cudnn" if jax.default_backend() == "gpu" else "xla"
    calls = {
        f"jax.nn[{baseline}] bf16": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=baseline
        ),
        "pallas flash bf16": lambda q, k, v: pk.flash_attention(q, k, v, causal=causal, block_q=block, block_k=block),
    }
    for name, (bits, pv_dtype) in PREFILL_VARIANTS.items():
        calls[f"pallas quantized {name}"] = lambda q, k, v, bits=bits, pv_dtype=pv_dtype: pk.quantized_attention(
            q,
            k,
            v,
            causal=causal,
            qk_bits=bits,
            pv_dtype=pv_dtype,
            block_q=block,
            block_k=block,
            implementation="pallas",
        )
    rows = []
    for name, call in calls.items():
        seconds = _time(jax.jit(call), q, k, v, repeats=repeats)
        rows.append(
            dict(kind="prefill", impl=name, seq=seq, causal=causal, ms=seconds * 1e3, tflops=flops / seconds / 1e12)
        )
    for row in rows:
        row["vs_baseline"] = rows[0]["ms"] / row["ms"]
    return rows


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes per second of `x + 1` over an `nbytes` bf16 buffer, counting its read and its write."""
    x = jnp.zeros((nbytes // 2,), jnp.bfloat16)
    return 2 * nbytes / _time(jax.jit(lambda x: x + 1), x, repeats=repeats)


def _cache(kv_format: str, shape: dict, page_size: int | None):
    """Full K/V caches in `kv_format` (contiguous, or scattered into a shuffled page pool) and their byte count."""
    dims = (shape["batch"], shape["context"], shape["kv_heads"], shape["head_dim"])
    keys = jax.random.split(jax.random.key(1), 3)
    k, k_scale = pk.quantize_kv(jax.random.normal(keys[0], dims, jnp.bfloat16), kv_format)
    v, v_scale = pk.quantize_kv(jax.random.normal(keys[1], dims, jnp.bfloat16), kv_format)
    arrays = dict(k_cache=k, v_cache=v, k_scale=k_scale, v_scale=v_scale, block_tables=None)
    if page_size:
        for name in ("k_cache", "v_cache", "k_scale", "v_scale"):
            if arrays[name] is not None:
                arrays[name], arrays["block_tables"] = kv_cache.scatter_pages(arrays[name], page_size, key=keys[2])
    nbytes = sum(a.nbytes for n, a in arrays.items() if a is not None and n != "block_tables")
    return arrays, nbytes


def bench_decode(shape: dict, page_sizes: list[int], copy_bps: float, repeats: int) -> list[dict]:
    q = jax.random.normal(jax.random.key(2), (shape["batch"], shape["heads"], shape["head_dim"]), jnp.bfloat16)
    lengths = jnp.full((shape["batch"],), shape["context"], jnp.int32)
    settings = [("xla", None), ("pallas", None)] + [("pallas", p) for p in page_sizes]
    rows = []
    for kv_format in CACHE_FORMATS:
        for impl, page_size in settings:
            cache, nbytes = _cache(kv_format, shape, page_size)
            step = jax.jit(
                lambda q, cache, impl=impl: pk.decode_attention(q, lengths=lengths, implementation=impl, **cache)
            )
            seconds = _time(step, q, cache, repeats=repeats)
            rows.append(
                dict(
                    kind="decode",
                    impl=impl,
                    layout=f"paged {page_size}" if page_size else "contiguous",
                    kv_format=kv_format,
                    context=shape["context"],
                    ms=seconds * 1e3,
                    cache_bytes=nbytes,
                    tb_per_s=nbytes / seconds / 1e12,
                    vs_copy=nbytes / seconds / copy_bps,
                )
            )
            del cache
    for row in rows:
        bf16 = next(
            r for r in rows if r["kv_format"] == "bfloat16" and (r["impl"], r["layout"]) == (row["impl"], row["layout"])
        )
        row["vs_bf16"] = bf16["ms"] / row["ms"]
    return rows


def print_tables(prefill: list[dict], decode: list[dict], copy_bps: float) -> None:
    print(f"{'prefill impl':30} {'S':>6} {'causal':6} {'ms':>9} {'TFLOP/s':>8} {'vs base':>7}")
    for r in prefill:
        print(
            f"{r['impl']:30} {r['seq']:6d} {str(r['causal']):6} {r['ms']:9.3f} {r['tflops']:8.2f} "
            f"{r['vs_baseline']:7.2f}"
        )
    print(f"\ndevice copy: {copy_bps / 1e12:.3f} TB/s")
    print(f"{'decode impl':8} {'layout':11} {'cache':9} {'ms':>9} {'TB/s':>7} {'vs copy':>7} {'vs bf16':>7}")
    for r in decode:
        print(
            f"{r['impl']:8} {r['layout']:11} {r['kv_format']:9} {r['ms']:9.3f} {r['tb_per_s']:7.3f} "
            f"{r['vs_copy']:7.2f} {r['vs_bf16']:7.2f}"
        )


def main(argv: list[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; interpret mode off GPU")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--decode-heads", type=int, default=32)
    parser.add_argument("--decode-kv-heads", type=int, default=8)
    parser.add_argument("--page-sizes", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--copy-bytes", type=int, default=2**31)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq, args.batch, args.heads, args.head_dim, args.block, args.repeats = [32], 1, 2, 64, 16, 1
        args.decode_batch, args.context, args.decode_heads, args.decode_kv_heads = 2, 64, 4, 2
        args.page_sizes, args.copy_bytes = [16], 2**20
    prefill_shape = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim)
    decode_shape = dict(
        batch=args.decode_batch,
        context=args.context,
        heads=args.decode_heads,
        kv_heads=args.decode_kv_heads,
        head_dim=args.head_dim,
    )
    prefill = [
        row
        for seq in args.seq
        for causal in ((False,) if args.smoke else (False, True))
        for row in bench_prefill(seq, causal, prefill_shape, args.block, args.repeats)
    ]
    copy_bps = copy_bandwidth(args.copy_bytes, args.repeats)
    decode = bench_decode(decode_shape, args.page_sizes, copy_bps, args.repeats)
    print_tables(prefill, decode, copy_bps)

    device = jax.devices()[0]
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report = dict(
        benchmark="quantized_attention",
        date=date,
        device=device.device_kind,
        platform=device.platform,
        host=platform.node(),
        jax_version=jax.__version__,
        interpret=pk.default_interpret(),
        smoke=args.smoke,
        prefill_shape=dict(prefill_shape, dtype="bfloat16", block=args.block),
        decode_shape=dict(decode_shape, dtype="bfloat16"),
        copy_tb_per_s=copy_bps / 1e12,
        rows=prefill + decode,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = (
        args.out / f"quantized_attention_{device.platform}{'_smoke' if args.smoke else ''}_{date.replace(':', '')}.json"
    )
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
