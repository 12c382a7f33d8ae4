"""Accuracy of quantized attention against full-precision attention: cosine similarity and relative L1.

Inputs: random normal q, k, v ("normal"), and the same with a large per-channel bias added to K ("k_bias": every
channel of K offset by `--bias` times a standard normal draw, the channel outliers SageAttention smooths away).
For int8 and int4 q·kᵀ, with and without K smoothing, and P·V in bf16 and fp8 e4m3, it compares
`pk.quantized_attention` with float32 attention (`pk.reference.flash_attention`) and prints
cosine = <o, o_ref> / (|o| |o_ref|) and rel L1 = sum|o - o_ref| / sum|o_ref| over the whole output. JSON
(device, versions, shapes, date, rows) goes into bench/results/. Runs on CPU: `implementation=None` is the XLA
path there (same quantisation as the kernel); `--implementation pallas` measures the kernel itself.

    python bench/quantized_accuracy.py [--seq 1024] [--bias 10] [--causal] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk

INT8_TARGET = 0.999  # cosine int8 must reach on both inputs
PV_DTYPES = {"bf16": jnp.bfloat16, "fp8": jnp.float8_e4m3fn}


def inputs(key: jax.Array, shape: dict, bias: float) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
    kq, kk, kv, kb = jax.random.split(key, 4)
    q = jax.random.normal(kq, (shape["batch"], shape["seq"], shape["heads"], shape["head_dim"]))
    k = jax.random.normal(kk, (shape["batch"], shape["seq"], shape["kv_heads"], shape["head_dim"]))
    v = jax.random.normal(kv, k.shape)
    return {"normal": (q, k, v), "k_bias": (q, k + bias * jax.random.normal(kb, (shape["head_dim"],)), v)}


def metrics(out: jax.Array, ref: jax.Array) -> dict[str, float]:
    a, b = np.asarray(out, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return dict(cosine=cosine, rel_l1=float(np.abs(a - b).sum() / np.abs(b).sum()))


def measure(data: dict, *, causal: bool, block: int, implementation: str | None) -> list[dict]:
    rows = []
    for name, (q, k, v) in data.items():
        ref = pk.reference.flash_attention(q, k, v, causal=causal)
        for bits in (8, 4):
            for smooth in (True, False):
                for pv_name, pv_dtype in PV_DTYPES.items():
                    out = pk.quantized_attention(
                        q,
                        k,
                        v,
                        causal=causal,
                        qk_bits=bits,
                        pv_dtype=pv_dtype,
                        smooth_k=smooth,
                        block_q=block,
                        block_k=block,
                        implementation=implementation,
                    )
                    rows.append(dict(inputs=name, qk_bits=bits, smooth_k=smooth, pv=pv_name, **metrics(out, ref)))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'inputs':8} {'qk':>4} {'smooth':6} {'pv':4} {'cosine':>9} {'rel L1':>8}")
    for r in rows:
        print(
            f"{r['inputs']:8} {'int' + str(r['qk_bits']):>4} {str(r['smooth_k']):6} {r['pv']:4} "
            f"{r['cosine']:9.6f} {r['rel_l1']:8.4f}"
        )


def main(argv: list[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--bias", type=float, default=10.0, help="scale of the per-channel bias added to K")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--implementation", choices=["pallas", "xla"], default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    shape = dict(batch=args.batch, seq=args.seq, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    data = inputs(jax.random.key(args.seed), shape, args.bias)
    rows = measure(data, causal=args.causal, block=args.block, implementation=args.implementation)
    print_table(rows)
    int8 = [r["cosine"] for r in rows if r["qk_bits"] == 8 and r["smooth_k"]]
    device = jax.devices()[0]
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report = dict(
        benchmark="quantized_accuracy",
        date=date,
        device=device.device_kind,
        platform=device.platform,
        host=platform.node(),
        jax_version=jax.__version__,
        numpy_version=np.__version__,
        implementation=args.implementation or ("xla" if pk.default_interpret() else "pallas"),
        shape=shape,
        block=args.block,
        causal=args.causal,
        k_bias=args.bias,
        int8_smoothed_min_cosine=min(int8),
        int8_target_met=min(int8) >= INT8_TARGET,
        rows=rows,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"quantized_accuracy_{device.platform}_{date.replace(':', '')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"int8 (smoothed) min cosine {min(int8):.6f} (target {INT8_TARGET}); wrote {path}")
    return path


if __name__ == "__main__":
    main()
