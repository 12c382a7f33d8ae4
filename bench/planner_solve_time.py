"""Solve time of the training planner on clusters of two GPU kinds (default H100 + L4), 8 to 1024 GPUs.

Half of each cluster is 8-GPU nodes of a fast kind, half 8-GPU nodes of a slower one (default H100 and L4; the
8-GPU case: one node of 4 of each), with a 200 Gb/s inter-node network. For each size it plans llama-2-7b at 4096
tokens per sequence and two sequences per GPU per iteration under a time limit, and prints wall time (model
building included), whether CP-SAT proved the plan optimal, the predicted iteration time, its gap to CP-SAT's
lower bound over the searched space, the throughput, and the iteration time on the fast half alone and for a
uniform baseline (every replica a two-stage fast -> slow pipeline, layers split evenly).

    python bench/planner_solve_time.py [--sizes 8 32 128 512 1024] [--kinds H100 L4]
                                       [--out bench/results/planner_solve_time.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import planners

MODEL = "llama-2-7b"
SEQ_LEN = 4096
TIME_LIMITS = {8: 5.0, 32: 5.0, 128: 20.0, 512: 40.0, 1024: 60.0}


def mixed_cluster(gpus: int, kinds: tuple[str, str], only_first: bool = False) -> planners.ClusterSpec:
    """Half `kinds[0]` nodes, half `kinds[1]` nodes (or only the first half)."""
    per_node = 4 if gpus == 8 else 8
    nodes = gpus // (2 * per_node)
    spec = [{"name": k.lower(), "gpu": k, "count": per_node, "repeat": nodes} for k in kinds[: 1 if only_first else 2]]
    link = {"gb_s": 25.0, "latency_us": 10}
    return planners.ClusterSpec.from_dict({"name": f"mixed{gpus}", "nodes": spec, "inter_node_link": link})


def uniform_baseline(cluster: planners.ClusterSpec, model: planners.ModelSpec, batch: int) -> float | None:
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
    plan = planners.TrainPlan(tuple(replicas), model.num_layers, batch, SEQ_LEN)
    estimate = planners.evaluate_train_plan(plan, cluster, model)
    return None if planners.memory_excess(plan, cluster, estimate) else estimate.iteration_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(TIME_LIMITS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kinds", nargs=2, default=["H100", "L4"], help="The two GPU kinds, fast one first.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/planner_solve_time.json"))
    args = parser.parse_args()
    model = planners.ModelSpec.preset(MODEL)
    rows = []
    kinds = tuple(args.kinds)
    only = f"{kinds[0]}-only iter s"
    header = (
        f"{'GPUs':>5} {'limit s':>8} {'wall s':>7} {'status':>9} {'cells':>5} {'iter s':>8} {'gap %':>6} {'Mtok/s':>7} "
        f"{only:>16} {'uniform iter s':>14}"
    )
    print(header)
    for gpus in args.sizes:
        cluster = mixed_cluster(gpus, kinds)
        batch = 2 * gpus
        workload = planners.TrainWorkload(batch, SEQ_LEN, microbatch_sizes=(1, 2))
        limit = TIME_LIMITS.get(gpus, 60.0)
        start = time.perf_counter()
        plan, info = planners.plan_training_with_info(
            cluster, model, workload, time_limit_s=limit, num_workers=args.workers
        )
        wall = time.perf_counter() - start
        homogeneous = planners.plan_training(
            mixed_cluster(gpus, kinds, only_first=True), model, workload, time_limit_s=limit, num_workers=args.workers
        )
        uniform = uniform_baseline(cluster, model, batch)
        assert plan.estimate is not None and homogeneous.estimate is not None
        row = {
            "gpus": gpus,
            "time_limit_s": limit,
            "wall_s": wall,
            "status": info.status,
            "cells": info.cells,
            "iteration_s": plan.estimate.iteration_s,
            "lower_bound_s": info.lower_bound_s,
            "tokens_per_s": workload.tokens / plan.estimate.iteration_s,
            "first_kind_only_iteration_s": homogeneous.estimate.iteration_s,
            "uniform_iteration_s": uniform,
            "replicas": len(plan.replicas),
            "microbatch_size": info.microbatch_size,
        }
        rows.append(row)
        print(
            f"{gpus:>5} {limit:>8.0f} {wall:>7.1f} {info.status:>9} {info.cells:>5} {row['iteration_s']:>8.3f} "
            f"{100 * (1 - info.lower_bound_s / row['iteration_s']):>6.1f} "
            f"{row['tokens_per_s'] / 1e6:>7.2f} {row['first_kind_only_iteration_s']:>16.3f} "
            f"{'over memory' if uniform is None else f'{uniform:.3f}':>14}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": MODEL, "seq_len": SEQ_LEN, "kinds": kinds, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
