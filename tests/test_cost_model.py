"""Cost-model sanity: monotone in the right directions, alpha-beta communication, plan evaluation."""

import pytest

import planners
from planners.cost_model import ring_allreduce_seconds

CLUSTER = planners.ClusterSpec.load("h100x4_l4x4")
MODEL = planners.ModelSpec.preset("llama-2-7b")
COSTS = planners.TrainCosts(CLUSTER, MODEL, 2048)
NVLINK = CLUSTER.nodes[0].intra_link
PCIE = CLUSTER.nodes[1].intra_link


def test_faster_gpu_is_faster() -> None:
    assert COSTS.layer_seconds("H100", 1, 2, False, NVLINK) < COSTS.layer_seconds("L4", 1, 2, False, PCIE)
    assert COSTS.head_seconds("H100", 1, 2) < COSTS.head_seconds("L4", 1, 2)


def test_time_grows_with_batch_and_recompute_and_shrinks_with_tp() -> None:
    one = COSTS.layer_seconds("H100", 1, 1, False, NVLINK)
    assert COSTS.layer_seconds("H100", 1, 4, False, NVLINK) > 3 * one
    assert COSTS.layer_seconds("H100", 1, 1, True, NVLINK) > one
    assert COSTS.layer_seconds("H100", 4, 1, False, NVLINK) < one
    # Over slow PCIe, TP's all-reduces can cost more than they save.
    assert COSTS.layer_seconds("L4", 4, 1, False, planners.Link(1.0, 10.0)) > COSTS.layer_seconds(
        "L4", 1, 1, False, PCIE
    )


def test_compute_bound_layer_matches_flops() -> None:
    flops = 3 * COSTS.layer_flops(2048)
    prof = CLUSTER.profile("H100")
    expected = flops / prof.flops_per_s + prof.layer_overhead_us * 1e-6
    assert COSTS.layer_seconds("H100", 1, 1, False, NVLINK) == pytest.approx(expected, rel=1e-9)


def test_memory_grows_with_layers_and_in_flight_and_shrinks_with_recompute_and_tp() -> None:
    def mem(tp: int = 1, layers: int = 4, recompute: bool = False, in_flight: int = 1) -> float:
        return COSTS.stage_memory_bytes(tp, layers, 1, recompute, in_flight, False, False)

    assert mem(layers=8) > mem(layers=4)
    assert mem(in_flight=4) > mem(in_flight=1)
    assert mem(recompute=True, in_flight=4) < mem(in_flight=4)
    assert mem(tp=4) < mem(tp=1)
    assert COSTS.stage_memory_bytes(1, 4, 1, False, 1, True, True) > mem()
    # 16 bytes of weight, gradient and Adam state per parameter.
    assert COSTS.layer_state_bytes(1) == 16 * MODEL.layer_params


def test_alpha_beta() -> None:
    link = planners.Link(10.0, 5.0)
    assert link.seconds(10e9) == pytest.approx(1.0 + 5e-6)
    assert ring_allreduce_seconds(1e9, 1, link) == 0.0
    assert ring_allreduce_seconds(1e9, 4, link) == pytest.approx(6 * 5e-6 + 1.5 * 0.1)
    assert COSTS.p2p_seconds(CLUSTER.inter_link, 1) > COSTS.p2p_seconds(NVLINK, 1)


def test_evaluate_plan() -> None:
    def plan(split: int, microbatches: int = 4) -> planners.TrainPlan:
        stages = (
            planners.Stage((0, 1, 2, 3), "H100", 4, (0, split)),
            planners.Stage((4, 5, 6, 7), "L4", 4, (split, 32), recompute=True),
        )
        return planners.TrainPlan((planners.Replica(stages, microbatches, 1),), 32, microbatches, 2048)

    balanced, skewed = (planners.evaluate_train_plan(plan(s), CLUSTER, MODEL) for s in (26, 16))
    assert balanced.iteration_s < skewed.iteration_s
    assert balanced.grad_sync_s == 0.0 and len(balanced.peak_memory_gb[0]) == 2
    longer = planners.evaluate_train_plan(plan(26, 8), CLUSTER, MODEL)
    # 1F1B: more micro-batches add (m - 1) times the slowest stage.
    stage_max = longer.replica_s[0] - balanced.replica_s[0]
    assert 0 < stage_max < balanced.replica_s[0]
    assert planners.memory_excess(plan(26), CLUSTER, balanced) == []


def test_data_parallel_sync_crosses_nodes() -> None:
    def dp(devices: tuple[int, int]) -> planners.PlanEstimate:
        replicas = tuple(
            planners.Replica((planners.Stage((d,), CLUSTER.devices[d].kind, 1, (0, 32), True),), 1, 1) for d in devices
        )
        return planners.evaluate_train_plan(planners.TrainPlan(replicas, 32, 2, 2048), CLUSTER, MODEL)

    assert dp((0, 4)).grad_sync_s > 10 * dp((0, 1)).grad_sync_s
