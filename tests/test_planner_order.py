"""The training planner against an exhaustive enumerator of its search space in every stage order (power-of-two
TP groups inside a node, no context parallelism, one micro-batch size per plan), on small instances chosen to
break it: NICs faster than PCIe, PCIe-only nodes, memory pressure, 2-3 GPU kinds; and metamorphic checks: the
node order never changes the optimum, and adding a GPU never makes a plan worse."""

import dataclasses
import random

import pytest

import planners
from planners.brute_force import best_plan

PCIE_KINDS = ["T4", "L4", "L40S", "RTX3090"]
NVLINK_KINDS = ["H100", "A100-40GB", "V100"]
SHAPES = [[2, 1], [2, 2], [1, 1, 1], [2, 1, 1], [1, 2, 1], [3, 1], [1, 1, 2]]


def instance(seed: int) -> tuple[planners.ClusterSpec, planners.ModelSpec, planners.TrainWorkload]:
    """2-3 nodes of 4-5 GPUs in all, 2-3 kinds (at least one PCIe-only), an inter-node link from slow Ethernet to
    faster than PCIe, memories from tight to ample, a 3-4 block model, a batch of 2-4."""
    rng = random.Random(seed)
    sizes = rng.choice(SHAPES)
    kinds = [rng.choice(PCIE_KINDS), rng.choice(NVLINK_KINDS), rng.choice(PCIE_KINDS + NVLINK_KINDS)]
    nodes = [{"gpu": kinds[i], "count": c} for i, c in enumerate(sizes)]
    memory = rng.choice([0.25, 0.5, 1.0, 8.0])
    gpus = {n["gpu"]: {"memory_gb": memory * rng.choice([1, 2])} for n in nodes}
    link = {"gb_s": rng.choice([1.0, 12.5, 50.0, 200.0]), "latency_us": rng.choice([2, 10])}
    spec = {"name": f"o{seed}", "nodes": nodes, "gpus": gpus, "inter_node_link": link}
    cluster = planners.ClusterSpec.from_dict(spec)
    hidden = rng.choice([256, 512, 1024])
    model = planners.ModelSpec("m", rng.choice([1000, 32000]), hidden, 4 * hidden, rng.choice([3, 4]), 8, 2)
    batch = rng.choice([2, 3, 4])
    sizes = (1,) if batch == 3 else (1, 2)
    workload = planners.TrainWorkload(batch, rng.choice([256, 1024]), microbatch_sizes=sizes, zero_stages=(0,))
    return cluster, model, workload


def solve(cluster: planners.ClusterSpec, model: planners.ModelSpec, workload: planners.TrainWorkload):
    return planners.plan_training_with_info(cluster, model, workload, time_limit_s=30, num_workers=1)


def reorder(cluster: planners.ClusterSpec, order: list[int]) -> planners.ClusterSpec:
    return dataclasses.replace(cluster, nodes=tuple(cluster.nodes[i] for i in order))


@pytest.mark.slow
def test_planner_matches_enumeration_over_every_stage_order() -> None:
    matched = 0
    for seed in range(44):
        cluster, model, workload = instance(seed)
        expected = best_plan(cluster, model, workload)
        if expected is None:
            with pytest.raises(planners.PlanningError, match="memory"):
                solve(cluster, model, workload)
            continue
        plan, info = solve(cluster, model, workload)
        assert info.status == "OPTIMAL", seed
        assert plan.estimate.iteration_s == pytest.approx(expected[0], rel=1e-3), seed
        assert info.lower_bound_s <= expected[0] * (1 + 1e-3) and info.gap <= 1e-3, seed
        matched += 1
    assert matched >= 38  # the rest fit in no memory (the embedding and head are replicated over TP)


@pytest.mark.slow
def test_node_order_leaves_the_optimum_unchanged() -> None:
    for seed in range(100, 112):
        cluster, model, workload = instance(seed)
        try:
            reference, _ = solve(cluster, model, workload)
        except planners.PlanningError:
            continue
        n = len(cluster.nodes)
        shuffled = random.Random(seed).sample(range(n), n)
        for order in (list(range(n))[::-1], shuffled):
            plan, info = solve(reorder(cluster, order), model, workload)
            assert info.status == "OPTIMAL"
            assert plan.estimate.iteration_s == pytest.approx(reference.estimate.iteration_s, rel=1e-3), seed


@pytest.mark.slow
def test_adding_a_gpu_never_makes_the_plan_worse() -> None:
    for seed in range(200, 212):
        cluster, model, workload = instance(seed)
        grown_node = dataclasses.replace(cluster.nodes[0], count=cluster.nodes[0].count + 1)
        bigger = dataclasses.replace(cluster, nodes=(grown_node, *cluster.nodes[1:]))
        try:
            small, _ = solve(cluster, model, workload)
        except planners.PlanningError:
            continue
        large, info = solve(bigger, model, workload)
        assert info.status == "OPTIMAL"
        assert large.estimate.iteration_s <= small.estimate.iteration_s * (1 + 1e-4), seed
