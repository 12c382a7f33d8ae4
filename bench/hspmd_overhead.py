"""Overhead of running a *symmetric* strategy through HSPMD instead of plain `jax.jit` SPMD on the same devices.

Two comparisons, each in the same run on the same devices, one training step's loss and gradients (no optimizer):
  1. data parallel over all devices: `meshes.AsymmetricDataParallel` with equal micro-batch counts vs `jax.jit` of
     the whole-batch loss with the batch sharded over a 1-D mesh;
  2. data x tensor parallel: `meshes.PlanExecutor` running replicas of one TP stage each vs `jax.jit` with the
     batch sharded over `data` and the parameters in Megatron layout over `model` (XLA's SPMD partitioner).
Then the multi-process row (`bench/hspmd_multiprocess.py`'s `compare`, at this run's width, depth, sequence and
per-device batch): its heterogeneous plan as 2 real JAX processes on 127.0.0.1 (4 devices each, gloo) vs 1 process
of 8 devices, and the bytes a step moves across processes against what the cost model charges for them.
Prints the tables (median step time, ratio HSPMD / plain; 2 processes / 1) and writes JSON to bench/results/.

On a CPU machine the devices are emulated (`--xla_force_host_platform_device_count`), set here before JAX starts.
    python bench/hspmd_overhead.py [--steps 20] [--devices 8] [--tp 2] [--no-multiprocess]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 3 warm-up steps)")
    parser.add_argument("--devices", type=int, default=8, help="devices to use (emulated on CPU)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel degree for comparison 2")
    parser.add_argument("--batch-per-device", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256, help="model width (FFN is 2.6875x, 8 heads, 4 kv heads)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-multiprocess", action="store_true", help="skip the 2-process row")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return parser.parse_args()


def multi_process_row(args: argparse.Namespace) -> dict:
    """`hspmd_multiprocess.compare` at this run's shapes (its plan, model family and 8 devices), printed."""
    import hspmd_multiprocess

    shape = dict(hidden=args.hidden, layers=args.layers, seq=args.seq_len, microbatch=args.batch_per_device)
    row = hspmd_multiprocess.compare(shape, args.steps)
    print("multi-process:", row["plan"])
    hspmd_multiprocess.print_comparison(row)
    return row


def main() -> None:
    args = parse_args()
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
        )
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxhet import Llama, LlamaConfig
    from jaxhet.parallel import StagedLlama, llama_loss_sum, llama_params, megatron_specs
    from meshes import AsymmetricDataParallel, HetMesh, PlanExecutor
    from planners import Replica, Stage, TrainPlan
    from planners.cluster import ClusterSpec

    devices = jax.devices()[: args.devices]
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 43 // 16,
        num_layers=args.layers,
        num_heads=8,
        num_kv_heads=4,
    )
    model = Llama(config, rngs=nnx.Rngs(0))
    params = llama_params(model)
    rows = args.batch_per_device * len(devices)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (rows, args.seq_len + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((rows, args.seq_len), np.float32)}
    loss_sum = llama_loss_sum(model)

    def plain_step(mesh: Mesh, param_specs, data_axis: str):
        batch_sharding = NamedSharding(mesh, P(data_axis))
        placed_params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs))
        step = jax.jit(jax.value_and_grad(lambda p, b: loss_sum(p, b) / jnp.sum(b["weights"])))
        return lambda: step(placed_params, jax.device_put(batch, batch_sharding))

    def timed(run) -> float:
        for _ in range(3):
            jax.block_until_ready(run())
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    results = []

    dp_mesh = Mesh(np.array(devices), ("data",))
    no_tp = jax.tree.map(lambda _: P(), params)
    dp = AsymmetricDataParallel(loss_sum, devices, [1] * len(devices), args.batch_per_device)
    plain = timed(plain_step(dp_mesh, no_tp, "data"))
    hspmd = timed(lambda: dp.value_and_grad(params, batch))
    results.append(("data parallel", f"dp={len(devices)}", plain, hspmd))

    replicas = len(devices) // args.tp
    cluster = ClusterSpec.from_dict({"nodes": [{"name": "n", "gpu": "H100", "count": len(devices)}]})
    plan = TrainPlan(
        tuple(
            Replica(
                (Stage(tuple(range(r * args.tp, (r + 1) * args.tp)), "H100", args.tp, (0, args.layers)),),
                1,
                args.batch_per_device * args.tp,
            )
            for r in range(replicas)
        ),
        num_layers=config.num_layers,
        global_batch=rows,
        seq_len=args.seq_len,
    )
    executor = PlanExecutor(plan, HetMesh.from_cluster(cluster, devices), StagedLlama(config))
    dtp_mesh = Mesh(np.array(devices).reshape(replicas, args.tp), ("data", "model"))
    plain = timed(plain_step(dtp_mesh, megatron_specs(params, args.tp, "model"), "data"))
    copies = executor.place(params)
    hspmd = timed(lambda: executor.value_and_grad(copies, batch))
    results.append(("data x tensor parallel", f"dp={replicas} tp={args.tp}", plain, hspmd))

    device_name = f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"
    print(f"device: {device_name}; model: {model.num_parameters():,} parameters; batch {rows} x {args.seq_len}")
    print(f"{'strategy':<24}{'layout':<14}{'plain jit ms':>14}{'HSPMD ms':>12}{'ratio':>8}")
    for name, layout, plain_s, hspmd_s in results:
        print(f"{name:<24}{layout:<14}{plain_s * 1e3:>14.1f}{hspmd_s * 1e3:>12.1f}{hspmd_s / plain_s:>8.2f}")

    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "hspmd_overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "machine": platform.machine()},
        "versions": {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax, "lib") else ""},
        "shapes": {"batch": rows, "seq_len": args.seq_len, "config": config.to_hf_dict()},
        "steps": args.steps,
        "results": [
            {"strategy": n, "layout": lay, "plain_s": p, "hspmd_s": h, "ratio": h / p} for n, lay, p, h in results
        ],
    }
    if not args.no_multiprocess:
        record["multi_process"] = multi_process_row(args)
    path = args.out / f"hspmd_overhead_{devices[0].platform}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
