"""Quality of dynamic block sparsity: fraction of blocks kept and error against dense attention, per τ.

Inputs are synthetic local + global attention patterns (`pallas_kernels.synthetic`). For every estimator and τ it
prints the density (kept blocks / blocks the causal mask leaves visible) and the relative L1 error
sum|sparse - dense| / sum|dense| of the attention output, and writes the table as JSON into bench/results/.
Runs on any backend (the attention kernels run in interpret mode off GPU).

    python bench/sparsity_quality.py [--length 1024] [--block 64] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels.synthetic import local_global_qkv

TAUS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def measure(length: int, block: int, heads: int, kv_heads: int, head_dim: int, causal: bool, seed: int) -> list[dict]:
    q, k, v = local_global_qkv(
        jax.random.key(seed), batch=1, length=length, heads=heads, kv_heads=kv_heads, head_dim=head_dim
    )
    attend = jax.jit(
        lambda q, k, v, mask: pk.flash_attention(q, k, v, causal=causal, block_mask=mask, block_q=block, block_k=block)
    )
    visible = pk.Geometry(length, length, block, block, causal=causal).block_visibility()
    everything = jnp.broadcast_to(visible, (1, 1, *visible.shape))
    dense = attend(q, k, v, everything)
    rows = []
    for method in pk.ESTIMATORS:
        for tau in TAUS:
            mask = pk.estimate_block_mask(q, k, block_q=block, block_k=block, causal=causal, keep=tau, method=method)
            out = attend(q, k, v, mask)
            rows.append(
                dict(
                    method=method,
                    causal=causal,
                    tau=tau,
                    density=float(mask.sum() / (visible.sum() * heads)),
                    rel_l1=float(jnp.abs(out - dense).sum() / jnp.abs(dense).sum()),
                )
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    rows = []
    for causal in (True, False):
        rows += measure(args.length, args.block, args.heads, args.kv_heads, args.head_dim, causal, args.seed)
    print(f"{'method':9} {'causal':6} {'tau':>5} {'density':>8} {'rel L1':>9}")
    for r in rows:
        print(f"{r['method']:9} {str(r['causal']):6} {r['tau']:5.2f} {r['density']:8.3f} {r['rel_l1']:9.4f}")
    device = jax.devices()[0]
    report = dict(
        benchmark="sparsity_quality",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device.device_kind,
        platform=device.platform,
        host=platform.node(),
        jax_version=jax.__version__,
        shape=dict(batch=1, length=args.length, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim),
        block=args.block,
        inputs="pallas_kernels.synthetic.local_global_qkv",
        rows=rows,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sparsity_quality_{device.platform}_{report['date'].replace(':', '')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
