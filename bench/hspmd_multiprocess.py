"""One HSPMD plan run as 2 processes (one per node, JAX's multi-controller runtime) vs as 1 process holding both
nodes' devices: step time and the bytes each step moves across processes, against what the cost model charges.

The plan: a TP4 stage on node 0 feeding a TP2 stage on node 1, beside two one-device replicas on node 1, so stage
edges and replicas cross processes. Each variant times `PlanExecutor.value_and_grad` (no optimizer) after two
warm-up steps; `Transfers.log` counts the bytes that crossed between processes. The cost model's figure is its
stage-edge traffic (activations forward, their gradients backward) across nodes plus the gradient rings over the
replicas holding the same layers (`planners.traffic`), in float32 like the run (the planner itself prices bf16
activations).

On CPU the devices are emulated and both processes share this machine's cores, so the ratio measures the
runtime's own overhead (transfers, per-process dispatch), not a network. `compare` is also the multi-process row
of `bench/hspmd_overhead.py`.
    python bench/hspmd_multiprocess.py [--steps 5] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = {
    "name": "two_nodes",
    "nodes": [{"name": "n0", "gpu": "H100", "count": 4}, {"name": "n1", "gpu": "L4", "count": 4}],
}
SHAPES = {
    "full": dict(hidden=256, layers=4, seq=128, microbatch=2),
    "smoke": dict(hidden=32, layers=2, seq=16, microbatch=1),
}
FLOAT32_BYTES = 4
TIMEOUT_S = 600  # for all the processes of one variant together


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and 1 timed step (the CPU test suite)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", nargs=4, metavar=("PROCESS_ID", "NUM_PROCESSES", "PORT", "OUT_JSON"))
    parser.add_argument("--shape", help="the shape as JSON (set by the parent for its workers)")
    return parser.parse_args()


def build(shape: dict):
    """The model config, cluster and plan of the benchmark."""
    from jaxhet import LlamaConfig
    from planners import Replica, Stage, TrainPlan
    from planners.cluster import ClusterSpec

    cluster = ClusterSpec.from_dict(CLUSTER)
    kinds = tuple(d.kind for d in cluster.devices)
    half = shape["layers"] // 2
    replicas = (
        Replica(
            (Stage((0, 1, 2, 3), "H100", 4, (0, half)), Stage((4, 5), "L4", 2, (half, shape["layers"]))),
            2,
            shape["microbatch"],
        ),
        Replica((Stage((6,), "L4", 1, (0, shape["layers"])),), 1, shape["microbatch"]),
        Replica((Stage((7,), "L4", 1, (0, shape["layers"])),), 1, shape["microbatch"]),
    )
    batch = sum(r.batch_share for r in replicas)
    plan = TrainPlan(replicas, shape["layers"], batch, shape["seq"], device_kinds=kinds)
    h = shape["hidden"]
    config = LlamaConfig(
        vocab_size=256, hidden_size=h, intermediate_size=2 * h, num_layers=shape["layers"], num_heads=4, num_kv_heads=4
    )
    return config, cluster, plan


def cost_model_bytes(config, cluster, plan) -> float:
    """What the plan says a step moves across nodes, in float32 (`planners.traffic`): stage edges between nodes
    (forward and backward) and the gradient rings whose holders span nodes."""
    from planners import ModelSpec
    from planners.traffic import step_traffic

    spec = ModelSpec.from_hf_config(config.to_hf_dict(), name="bench")
    return step_traffic(plan, cluster, spec, FLOAT32_BYTES, FLOAT32_BYTES).between_nodes


def worker(process_id: int, num_processes: int, port: int, out: Path, shape: dict, steps: int) -> None:
    from meshes.distributed import Launch, start

    config, cluster, plan = build(shape)
    if num_processes > 1:
        start(cluster, Launch(f"127.0.0.1:{port}", num_processes, process_id))
    import jax
    import numpy as np
    from flax import nnx

    from jaxhet import Llama
    from jaxhet.parallel import StagedLlama, llama_params
    from meshes import HetMesh, PlanExecutor
    from meshes.transfer import host_value

    executor = PlanExecutor(plan, HetMesh.from_cluster(cluster), StagedLlama(config))
    params = executor.place(jax.device_get(llama_params(Llama(config, rngs=nnx.Rngs(0)))))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (plan.global_batch, plan.seq_len + 1))
    batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "weights": np.ones((plan.global_batch, plan.seq_len), np.float32),
    }
    times = []
    for step in range(2 + steps):
        if step == 2:
            executor.transfers.log.reset()
        started = time.perf_counter()
        loss, grads = executor.value_and_grad(params, batch)
        jax.block_until_ready(grads)
        host_value(loss)
        times.append(time.perf_counter() - started)
    result = {
        "step_s": statistics.median(times[2:]),
        "bytes_between_processes": executor.transfers.log.between_processes / steps,
        "bytes_between_groups": executor.transfers.log.between_groups / steps,
        "cost_model_bytes": cost_model_bytes(config, cluster, plan),
        "global_batch": plan.global_batch,
    }
    out.write_text(json.dumps(result))
    if num_processes > 1:
        jax.distributed.shutdown()


def launch(num_processes: int, shape: dict, steps: int, scratch: Path) -> list[dict]:
    """Run the workers of one variant as subprocesses on 127.0.0.1 (a free port, one deadline for all, each
    process killed by its PID if it outlives it), with this process's XLA flags but their own device count; their
    results, process by process."""
    from meshes.distributed import set_host_device_count

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    set_host_device_count(8 // num_processes, env)  # the caller's other XLA flags stay
    outs = [scratch / f"{num_processes}_{i}.json" for i in range(num_processes)]
    logs = [scratch / f"{num_processes}_{i}.log" for i in range(num_processes)]
    common = [sys.executable, __file__, "--shape", json.dumps(shape), "--steps", str(steps), "--worker"]
    procs = []
    try:
        for i in range(num_processes):
            with logs[i].open("w") as log:
                command = [*common, str(i), str(num_processes), str(port), str(outs[i])]
                procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        for i, p in enumerate(procs):
            try:
                code = p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                raise SystemExit(f"worker {i} of {num_processes} still running after {TIMEOUT_S} s") from None
            if code:
                raise SystemExit(f"worker {i} of {num_processes} failed (exit {code}):\n{logs[i].read_text()[-3000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    return [json.loads(o.read_text()) for o in outs]


def compare(shape: dict, steps: int) -> dict:
    """The plan of `shape` as 1 process holding all 8 devices and as 2 processes of 4: step times, their ratio,
    and the bytes a step moves across processes against what the cost model charges for them."""
    with tempfile.TemporaryDirectory() as scratch:
        one = launch(1, shape, steps, Path(scratch))[0]
        two = launch(2, shape, steps, Path(scratch))
    moved = two[0]["bytes_between_processes"]  # every process walks the whole schedule and counts every move
    return {
        "shape": shape,
        "plan": "TP4 stage (process 0) -> TP2 stage (process 1), beside two 1-device replicas (process 1)",
        "timed_steps": steps,
        "one_process_step_s": one["step_s"],
        "two_process_step_s": two[0]["step_s"],
        "ratio_two_over_one": two[0]["step_s"] / one["step_s"],
        "bytes_between_processes_per_step": moved,
        "cost_model_bytes_per_step": two[0]["cost_model_bytes"],
        "moved_over_charged": moved / two[0]["cost_model_bytes"],
    }


def print_comparison(row: dict) -> None:
    print(f"{'variant':<28}{'step (s)':>12}")
    print(f"{'1 process, 8 devices':<28}{row['one_process_step_s']:>12.4f}")
    print(
        f"{'2 processes, 4 devices each':<28}{row['two_process_step_s']:>12.4f}   ratio {row['ratio_two_over_one']:.2f}"
    )
    print(
        f"bytes across processes per step: {row['bytes_between_processes_per_step']:,.0f} moved, "
        f"{row['cost_model_bytes_per_step']:,.0f} charged by the cost model ({row['moved_over_charged']:.2f}x)"
    )


def main() -> None:
    args = parse_args()
    shape = json.loads(args.shape) if args.shape else SHAPES["smoke" if args.smoke else "full"]
    steps = 1 if args.smoke else args.steps
    if args.worker:
        pid, num, port, out = args.worker
        worker(int(pid), int(num), int(port), Path(out), shape, steps)
        return
    row = compare(shape, steps)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    sys.path.insert(0, str(ROOT / "bench"))
    import record

    print_comparison(row)
    record.save({**record.provenance("hspmd_multiprocess"), **row}, args.out, smoke=args.smoke)


if __name__ == "__main__":
    main()
