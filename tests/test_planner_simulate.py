"""The pipeline simulator against the cost model's closed form."""

import random

import pytest

import planners
from planners.simulate import simulate_pipeline, simulate_replica, stage_order


def test_schedules() -> None:
    assert stage_order(0, 3, 4, "1f1b") == [
        ("F", 0),
        ("F", 1),
        ("F", 2),
        ("B", 0),
        ("F", 3),
        ("B", 1),
        ("B", 2),
        ("B", 3),
    ]
    assert stage_order(2, 3, 2, "1f1b") == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert stage_order(1, 3, 2, "gpipe") == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]


def test_uniform_stages_match_the_closed_form_exactly() -> None:
    for p, m in ((1, 1), (3, 4), (4, 16), (5, 2)):
        assert simulate_pipeline([1.0] * p, [2.0] * p, [0.0] * (p - 1), m) == pytest.approx((m + p - 1) * 3.0)


def test_closed_form_bounds_uneven_stages_without_transfers() -> None:
    rng = random.Random(0)
    for _ in range(300):
        p = rng.randint(1, 5)
        m = rng.randint(p, 24)
        t = [rng.uniform(0.2, 3.0) for _ in range(p)]
        simulated = simulate_pipeline([x / 3 for x in t], [2 * x / 3 for x in t], [0.0] * (p - 1), m)
        closed = sum(t) + (m - 1) * max(t)
        assert simulated <= closed * (1 + 1e-9)
        assert closed <= 1.25 * simulated


def test_planned_replicas_match_the_simulator() -> None:
    cluster = planners.ClusterSpec.load("h100x4_l4x4")
    model = planners.ModelSpec.preset("llama-2-7b")
    plan = planners.plan_training(
        cluster, model, planners.TrainWorkload(32, 2048, microbatch_sizes=(1,)), time_limit_s=4
    )
    for replica, predicted in zip(plan.replicas, plan.estimate.replica_s, strict=True):
        assert simulate_replica(replica, cluster, model, 2048) == pytest.approx(predicted, rel=0.02)


def test_serving_plan_meets_slos_below_capacity_and_not_above() -> None:
    from planners.simulate_serving import poisson_trace, simulate_serving

    cluster = planners.ClusterSpec.from_dict(
        {"nodes": [{"gpu": "A100-80GB", "count": 8}, {"gpu": "L40S", "count": 8}, {"gpu": "H100", "count": 8}]}
    )
    model = planners.ModelSpec.preset("llama-2-7b")
    workload = planners.ServeWorkload(input_len=512, output_len=128, ttft_slo_s=2.0, tpot_slo_s=0.1, budget_per_hour=20)
    for disaggregate in (False, True):
        plan = planners.plan_serving(cluster, [model], workload, disaggregate=disaggregate)
        capacity = plan.throughput_scale
        calm = simulate_serving(plan, cluster, [model], workload, poisson_trace(0.8 * capacity, 2000, 512, 128))
        assert calm.slo_attainment >= 0.99 and len(calm.ttft_s) == 2000
        assert max(calm.tpot_s) <= workload.tpot_slo_s
        overload = simulate_serving(plan, cluster, [model], workload, poisson_trace(1.5 * capacity, 2000, 512, 128))
        assert overload.slo_attainment < calm.slo_attainment
        assert sorted(overload.ttft_s)[1000] > sorted(calm.ttft_s)[1000]
