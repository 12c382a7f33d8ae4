"""Solve time of the training planner on clusters of two GPU kinds (default H100 + L4), 8 to 1024 GPUs.

Half of each cluster is 8-GPU nodes of a fast kind, half 8-GPU nodes of a slower one (default H100 and L4; the
8-GPU case: one node of 4 of each), with a 200 Gb/s inter-node network. For each model (default llama-2-7b and
llama-2-70b) and size it plans `--seq-len` tokens per sequence (4096) and two sequences per GPU per iteration
under a time limit, and prints the wall time of the whole call (model building included) against the limit, the
solver status (OPTIMAL: proven over the planner's search space), the predicted iteration time, its gap to the
proven lower bound, the throughput, the plan's largest context-parallel degree, and the iteration time on the fast
half alone and for a uniform baseline (every replica a two-stage fast -> slow pipeline, layers split evenly).
Figures are the cost model's, not measurements.

    python bench/planner_solve_time.py [--models llama-2-7b llama-2-70b] [--sizes 8 32 128 512 1024]
                                       [--kinds H100 L4] [--seq-len 4096]
                                       [--out bench/results/planner_solve_time.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import planners

MODELS = ["llama-2-7b", "llama-2-70b"]
SEQ_LEN = 4096
TIME_LIMITS = {8: 5.0, 32: 5.0, 128: 20.0, 512: 40.0, 1024: 60.0}


def mixed_cluster(gpus: int, kinds: tuple[str, str], only_first: bool = False) -> planners.ClusterSpec:
    """Half `kinds[0]` nodes, half `kinds[1]` nodes (or only the first half)."""
    per_node = 4 if gpus == 8 else 8
    nodes = gpus // (2 * per_node)
    spec = [{"name": k.lower(), "gpu": k, "count": per_node, "repeat": nodes} for k in kinds[: 1 if only_first else 2]]
    link = {"gb_s": 25.0, "latency_us": 10}
    return planners.ClusterSpec.from_dict({"name": f"mixed{gpus}", "nodes": spec, "inter_node_link": link})


def uniform_baseline(
    cluster: planners.ClusterSpec, model: planners.ModelSpec, batch: int, seq_len: int
) -> float | None:
    """Pair each node of the first kind with one of the second as a two-stage TP=node pipeline, layers split
    evenly; None if over memory."""
    half = len(cluster.nodes) // 2
    offsets = cluster.node_offsets()
    split = model.num_layers // 2
    replicas = []
    for i in range(half):
        h, l4 = cluster.nodes[i], cluster.nodes[half + i]
        stages = (
            planners.Stage(tuple(range(offsets[i], offsets[i] + h.count)), h.kind, h.count, (0, split), True),
            planners.Stage(
                tuple(range(offsets[half + i], offsets[half + i] + l4.count)),
                l4.kind,
                l4.count,
                (split, model.num_layers),
                True,
            ),
        )
        replicas.append(planners.Replica(stages, batch // half, 1))
    plan = planners.TrainPlan(tuple(replicas), model.num_layers, batch, seq_len)
    estimate = planners.evaluate_train_plan(plan, cluster, model)
    return None if planners.memory_excess(plan, cluster, estimate) else estimate.iteration_s


def measure(model: planners.ModelSpec, gpus: int, kinds: tuple[str, str], workers: int, seq_len: int) -> dict | None:
    """Plan `model` on the mixed cluster of `gpus` GPUs; None when no plan exists (printed with the reason)."""
    cluster = mixed_cluster(gpus, kinds)
    batch = 2 * gpus
    workload = planners.TrainWorkload(batch, seq_len, microbatch_sizes=(1, 2))
    limit = TIME_LIMITS.get(gpus, 60.0)
    start = time.perf_counter()
    try:
        plan, info = planners.plan_training_with_info(cluster, model, workload, time_limit_s=limit, num_workers=workers)
    except planners.PlanningError as err:
        print(f"{model.name:>12} {gpus:>5} {limit:>8.0f}  no plan: {err}", flush=True)
        return None
    wall = time.perf_counter() - start
    try:
        fast = mixed_cluster(gpus, kinds, only_first=True)
        homogeneous = planners.plan_training(fast, model, workload, time_limit_s=limit, num_workers=workers).estimate
    except planners.PlanningError:
        homogeneous = None
    assert plan.estimate is not None
    return {
        "model": model.name,
        "gpus": gpus,
        "time_limit_s": limit,
        "wall_s": wall,
        "within_limit": wall <= 1.1 * limit,
        "status": info.status,
        "gap": info.gap,
        "cells": info.cells,
        "iteration_s": plan.estimate.iteration_s,
        "lower_bound_s": info.lower_bound_s,
        "tokens_per_s": workload.tokens / plan.estimate.iteration_s,
        "first_kind_only_iteration_s": None if homogeneous is None else homogeneous.iteration_s,
        "uniform_iteration_s": uniform_baseline(cluster, model, batch, seq_len),
        "replicas": len(plan.replicas),
        "microbatch_size": info.microbatch_size,
        "max_cp": max(r.cp for r in plan.replicas),
    }


def _seconds(value: float | None) -> str:
    return "no plan" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(TIME_LIMITS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kinds", nargs=2, default=["H100", "L4"], help="The two GPU kinds, fast one first.")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="Tokens per sequence.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/planner_solve_time.json"))
    args = parser.parse_args()
    rows = []
    kinds = tuple(args.kinds)
    only = f"{kinds[0]}-only iter s"
    print(
        f"{'model':>12} {'GPUs':>5} {'limit s':>8} {'wall s':>7} {'status':>9} {'cells':>5} {'iter s':>8} "
        f"{'gap %':>6} {'Mtok/s':>7} {'CP':>3} {only:>16} {'uniform iter s':>14}"
    )
    for name in args.models:
        model = planners.ModelSpec.preset(name)
        for gpus in args.sizes:
            row = measure(model, gpus, kinds, args.workers, args.seq_len)
            if row is None:
                continue
            rows.append(row)
            print(
                f"{name:>12} {gpus:>5} {row['time_limit_s']:>8.0f} {row['wall_s']:>7.1f} {row['status']:>9} "
                f"{row['cells']:>5} {row['iteration_s']:>8.3f} {100 * row['gap']:>6.1f} "
                f"{row['tokens_per_s'] / 1e6:>7.2f} {row['max_cp']:>3} "
                f"{_seconds(row['first_kind_only_iteration_s']):>16} "
                f"{'over memory' if row['uniform_iteration_s'] is None else _seconds(row['uniform_iteration_s']):>14}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "planner_solve_time",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": f"{platform.node()} ({os.cpu_count()} CPU cores, {args.workers} CP-SAT workers)",
        "models": args.models,
        "seq_len": args.seq_len,
        "kinds": kinds,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
