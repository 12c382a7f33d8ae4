"""Attention kernel benchmark: Pallas flash attention against `jax.nn.dot_product_attention` in the same run.

For each sequence length and causal setting it times, on the default device:
- dense forward and forward+backward of `pk.flash_attention` and of the baseline
  (`jax.nn.dot_product_attention(implementation="cudnn")` on a GPU, its XLA implementation elsewhere);
- block-sparse forward and forward+backward at several block densities (random block masks, diagonal kept),
  reported as time relative to the dense kernel (no block mask) and against the ideal `density x dense time`;
  density 1.0 measures the cost of walking the kept-block lists.
It prints a table and writes JSON (device, versions, shapes, date, every row) into bench/results/.

TFLOP/s count the useful matmul work: forward 4·B·H·S²·D (halved when causal), forward+backward 3.5 times that
(the backward pass does 2.5 forwards' worth: dQ, dK, dV and the recomputed scores).

    python bench/attention.py                 # GPU: S = 1k, 4k, 16k, 32k, B=4 H=16 D=128 bf16
    python bench/attention.py --smoke         # any machine: tiny shapes, one setting each, interpret mode off GPU
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from record import provenance, save

import pallas_kernels as pk

DENSITIES = (1.0, 0.5, 0.25, 0.1)


def _time(fn: Callable, *args, repeats: int) -> float:
    """Median wall time of `fn(*args)` in seconds, after one compiling call."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _fwd_bwd(attend: Callable) -> Callable:
    """q, k, v, do -> (dq, dk, dv): one forward and one backward pass."""

    def run(q, k, v, do):
        _, vjp = jax.vjp(attend, q, k, v)
        return vjp(do)

    return jax.jit(run)


def _baseline(causal: bool) -> tuple[str, Callable]:
    implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)  # noqa: E731
    return f"jax.nn[{implementation}]", attend


def bench_dense(q, k, v, do, *, causal: bool, block: int, repeats: int) -> list[dict]:
    batch, seq, heads, dim = q.shape
    flops = 4 * batch * heads * seq * seq * dim * (0.5 if causal else 1.0)
    flash = lambda q, k, v: pk.flash_attention(q, k, v, causal=causal, block_q=block, block_k=block)  # noqa: E731
    rows = []
    for name, attend in (("pallas flash", flash), _baseline(causal)):
        fwd = _time(jax.jit(attend), q, k, v, repeats=repeats)
        both = _time(_fwd_bwd(attend), q, k, v, do, repeats=repeats)
        rows.append(
            dict(
                kind="dense",
                impl=name,
                seq=seq,
                causal=causal,
                fwd_ms=fwd * 1e3,
                fwd_bwd_ms=both * 1e3,
                fwd_tflops=flops / fwd / 1e12,
                fwd_bwd_tflops=3.5 * flops / both / 1e12,
            )
        )
    return rows


def bench_sparse(q, k, v, do, *, block: int, densities, repeats: int, key: jax.Array, dense: dict) -> list[dict]:
    """Block-sparse rows, each compared with `dense`, the dense (non-causal, no block mask) kernel's row."""
    batch, seq, heads, _ = q.shape
    n = -(-seq // block)
    rows = []
    for density in densities:
        mask = pk.block_masks.random_blocks(jax.random.fold_in(key, int(density * 1000)), (batch, heads, n, n), density)
        attend = lambda q, k, v, mask=mask: pk.flash_attention(q, k, v, block_mask=mask, block_q=block, block_k=block)  # noqa: E731
        fwd = _time(jax.jit(attend), q, k, v, repeats=repeats)
        both = _time(_fwd_bwd(attend), q, k, v, do, repeats=repeats)
        kept = float(mask.mean())
        rows.append(
            dict(
                kind="block_sparse",
                impl="pallas flash",
                seq=seq,
                causal=False,
                target_density=density,
                density=kept,
                fwd_ms=fwd * 1e3,
                fwd_bwd_ms=both * 1e3,
                fwd_vs_dense=fwd * 1e3 / dense["fwd_ms"],
                fwd_bwd_vs_dense=both * 1e3 / dense["fwd_bwd_ms"],
                fwd_vs_ideal=fwd * 1e3 / dense["fwd_ms"] / kept,  # target on H100: <= 1.15
            )
        )
    return rows


def _print_table(rows: list[dict]) -> None:
    print(
        f"{'kind':12} {'impl':18} {'S':>6} {'causal':6} {'density':>7} {'fwd ms':>9} {'fwd TF/s':>8} "
        f"{'f+b ms':>9} {'f+b TF/s':>8} {'fwd/dense':>9} {'/ideal':>6}"
    )
    for r in rows:
        density = f"{r['density']:.2f}" if "density" in r else "-"
        fwd_tf = f"{r['fwd_tflops']:.2f}" if "fwd_tflops" in r else "-"
        both_tf = f"{r['fwd_bwd_tflops']:.2f}" if "fwd_bwd_tflops" in r else "-"
        vs = f"{r['fwd_vs_dense']:.3f}" if "fwd_vs_dense" in r else "-"
        ideal = f"{r['fwd_vs_ideal']:.2f}" if "fwd_vs_ideal" in r else "-"
        print(
            f"{r['kind']:12} {r['impl']:18} {r['seq']:6d} {str(r['causal']):6} {density:>7} {r['fwd_ms']:9.3f} "
            f"{fwd_tf:>8} {r['fwd_bwd_ms']:9.3f} {both_tf:>8} {vs:>9} {ideal:>6}"
        )


def main(argv: list[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; interpret mode off GPU")
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--sparse-seq", type=int, default=None, help="sequence length of the block-sparse runs")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq, args.batch, args.heads, args.head_dim, args.block, args.repeats = [48], 1, 2, 16, 16, 1
        args.dtype = "float32"
    densities = (0.5,) if args.smoke else DENSITIES
    sparse_seq = args.sparse_seq or args.seq[min(1, len(args.seq) - 1)]
    key = jax.random.key(0)
    dtype = jnp.dtype(args.dtype)

    def inputs(seq: int):
        shape = (args.batch, seq, args.heads, args.head_dim)
        return [jax.random.normal(jax.random.fold_in(key, i), shape, dtype) for i in range(4)]

    rows = []
    for seq in args.seq:
        for causal in (False,) if args.smoke else (False, True):
            rows += bench_dense(*inputs(seq), causal=causal, block=args.block, repeats=args.repeats)
    is_reference = lambda r: r["impl"] == "pallas flash" and r["seq"] == sparse_seq and not r["causal"]  # noqa: E731
    if not any(map(is_reference, rows)):
        rows += bench_dense(*inputs(sparse_seq), causal=False, block=args.block, repeats=args.repeats)
    dense = next(filter(is_reference, rows))
    rows += bench_sparse(
        *inputs(sparse_seq), block=args.block, densities=densities, repeats=args.repeats, key=key, dense=dense
    )
    _print_table(rows)

    report = dict(
        **provenance("attention"),
        interpret=pk.default_interpret(),
        smoke=args.smoke,
        shape=dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype, block=args.block),
        rows=rows,
    )
    return save(report, args.out, smoke=args.smoke)


if __name__ == "__main__":
    main()
