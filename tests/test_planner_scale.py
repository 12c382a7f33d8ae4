"""The training planner on fleets too big to enumerate: big models plan, the whole call keeps its wall-clock time
limit, every plan reports its status, bound and gap, and adding a node never makes the plan worse."""

import dataclasses
import time

import pytest

import planners

LINK = {"gb_s": 25, "latency_us": 10}


def fleet(**nodes: int) -> planners.ClusterSpec:
    """`repeat` 8-GPU nodes of each GPU kind given, joined by 200 Gb/s links."""
    spec = [{"gpu": kind, "count": 8, "repeat": repeat} for kind, repeat in nodes.items()]
    return planners.ClusterSpec.from_dict({"nodes": spec, "inter_node_link": LINK})


def timed(cluster, model, workload, limit):
    start = time.perf_counter()
    plan, info = planners.plan_training_with_info(cluster, model, workload, time_limit_s=limit)
    return plan, info, time.perf_counter() - start


def check_report(plan: planners.TrainPlan, info: planners.SolveInfo, cluster: planners.ClusterSpec) -> None:
    assert plan.solve == info and info.status in ("OPTIMAL", "FEASIBLE")
    assert 0 < info.lower_bound_s <= plan.estimate.iteration_s
    assert info.gap == pytest.approx(1 - info.lower_bound_s / plan.estimate.iteration_s)
    assert not planners.memory_excess(plan, cluster, plan.estimate)


@pytest.mark.slow
def test_llama_70b_plans_on_4x8_h800_within_its_time_limit() -> None:
    """FlagPerf's setup (where TP4PP8 and TP8PP4 both ran): cells of 16 H800 hold the state but not the
    activations, so the planner must search the whole cluster."""
    cluster = fleet(H800=4)
    model = planners.ModelSpec.preset("llama-2-70b")
    plan, info, wall = timed(cluster, model, planners.TrainWorkload(44, 4096), 20.0)
    check_report(plan, info, cluster)
    assert wall <= 22.0 and info.solve_s <= wall
    stages = tuple(planners.Stage(tuple(range(8 * i, 8 * i + 8)), "H800", 8, (20 * i, 20 * i + 20)) for i in range(4))
    tp8pp4 = planners.TrainPlan((planners.Replica(stages, 44, 1),), 80, 44, 4096)
    assert plan.estimate.iteration_s <= planners.evaluate_train_plan(tp8pp4, cluster, model).iteration_s


@pytest.mark.slow
def test_120_gpus_split_into_cells_and_keep_the_wall_clock_limit() -> None:
    """7 H100 nodes and 8 L4 nodes share no divisor: 7 cells of one node of each kind, one L4 node left idle."""
    cluster = fleet(H100=7, L4=8)
    model = planners.ModelSpec.preset("llama-2-7b")
    plan, info, wall = timed(cluster, model, planners.TrainWorkload(224, 4096, microbatch_sizes=(1, 2)), 8.0)
    check_report(plan, info, cluster)
    assert wall <= 8.8 and info.cells == 7 and len(plan.devices) == 7 * 16


@pytest.mark.slow
def test_adding_a_node_to_a_32_gpu_fleet_never_makes_the_plan_worse() -> None:
    small = fleet(H100=2, L4=2)
    extra = dataclasses.replace(small.nodes[-1], name="l4-extra", count=1)
    grown = dataclasses.replace(small, nodes=(*small.nodes, extra))
    model = planners.ModelSpec.preset("llama-2-7b")
    workload = planners.TrainWorkload(64, 4096, microbatch_sizes=(1, 2))
    before, _ = planners.plan_training_with_info(small, model, workload)
    after, info = planners.plan_training_with_info(grown, model, workload)
    check_report(after, info, grown)
    assert after.estimate.iteration_s <= before.estimate.iteration_s * (1 + 1e-9)
