"""The serving MILP: optimal against enumeration of replica counts, sensible choices, explained infeasibility."""

import json
import random

import pytest

import planners
from planners.brute_force import best_serving
from planners.serve import ServePlan, plan_serving

KINDS = ["H100", "A100-80GB", "L40S", "L4", "A10G", "RTX4090"]


def random_instance(
    seed: int,
) -> tuple[planners.ClusterSpec, list[planners.ModelSpec], planners.ServeWorkload, str, list[float]]:
    rng = random.Random(seed)
    nodes = [{"gpu": rng.choice(KINDS), "count": rng.choice([1, 2])} for _ in range(rng.choice([1, 2]))]
    cluster = planners.ClusterSpec.from_dict({"nodes": nodes})
    models = [planners.ModelSpec.preset(rng.choice(["llama-2-7b", "llama-3-8b"]))]
    if rng.random() < 0.3:
        models.append(planners.ModelSpec.preset("tiny"))
    workload = planners.ServeWorkload(
        arrival_rate=rng.choice([0.5, 2.0, 10.0]),
        input_len=rng.choice([128, 1024]),
        output_len=rng.choice([32, 256]),
        ttft_slo_s=rng.choice([0.5, 2.0]),
        tpot_slo_s=rng.choice([0.05, 0.2]),
        budget_per_hour=rng.choice([None, 3.0, 8.0]),
    )
    objective = rng.choice(["max_throughput", "min_cost"])
    rates = [workload.arrival_rate * rng.choice([1, 2]) for _ in models]
    return cluster, models, workload, objective, rates


def test_serving_matches_enumeration() -> None:
    solved = 0
    for seed in range(30):
        cluster, models, workload, objective, rates = random_instance(seed)
        expected = best_serving(cluster, models, workload, objective, rates)
        if expected is None:
            with pytest.raises(planners.PlanningError):
                plan_serving(cluster, models, workload, objective=objective, rates=rates)
            continue
        plan = plan_serving(cluster, models, workload, objective=objective, rates=rates)
        value = plan.throughput_scale if objective == "max_throughput" else plan.price_per_hour
        assert value == pytest.approx(expected, rel=1e-3), seed
        assert plan.status == "OPTIMAL" and plan.objective_bound == pytest.approx(value, rel=1e-3), seed
        devices = [d for r in plan.replicas for d in r.devices]
        assert len(devices) == len(set(devices))
        kinds = [d.kind for d in cluster.devices]
        assert all(kinds[d] == r.kind for r in plan.replicas for d in r.devices)
        assert all(r.routed_rps <= r.capacity_rps * (1 + 1e-6) for r in plan.replicas)
        solved += 1
    assert solved >= 20


def test_min_latency_matches_enumeration() -> None:
    solved = 0
    for seed in range(30):
        cluster, models, workload, _, rates = random_instance(seed)
        utilization = random.Random(seed).choice([0.6, 1.0])
        expected = best_serving(cluster, models, workload, "min_latency", rates, utilization=utilization)
        if expected is None:
            with pytest.raises(planners.PlanningError):
                plan_serving(cluster, models, workload, objective="min_latency", rates=rates, utilization=utilization)
            continue
        plan = plan_serving(cluster, models, workload, objective="min_latency", rates=rates, utilization=utilization)
        assert sum(r.routed_rps * r.latency_s for r in plan.replicas) == pytest.approx(expected, rel=1e-3), seed
        assert all(r.routed_rps <= utilization * r.capacity_rps * (1 + 1e-6) for r in plan.replicas)
        solved += 1
    assert solved >= 20


def test_cheap_gpus_win_min_cost_at_low_rate_and_json_round_trip() -> None:
    cluster = planners.ClusterSpec.load("h100x4_l4x4")
    model = planners.ModelSpec.preset("llama-2-7b")
    workload = planners.ServeWorkload(arrival_rate=2.0, input_len=256, output_len=64, ttft_slo_s=1.0, tpot_slo_s=0.1)
    plan = plan_serving(cluster, [model], workload, objective="min_cost")
    assert {r.kind for r in plan.replicas} == {"L4"}
    assert sum(r.routed_rps for r in plan.replicas) == pytest.approx(2.0)
    assert ServePlan.from_json(plan.to_json()) == plan


def test_serving_infeasible_budget_is_explained() -> None:
    cluster = planners.ClusterSpec.load("h100x4_l4x4")
    workload = planners.ServeWorkload(budget_per_hour=0.5)
    with pytest.raises(planners.PlanningError, match="budget: 0.50/h is below the cheapest replica"):
        plan_serving(cluster, [planners.ModelSpec.preset("llama-2-7b")], workload)
    l4_only = planners.ClusterSpec.from_dict({"nodes": [{"gpu": "L4", "count": 4}]})
    with pytest.raises(planners.PlanningError, match="llama-2-70b: no GPU group in the cluster meets"):
        plan_serving(l4_only, [planners.ModelSpec.preset("llama-2-70b")], planners.ServeWorkload())


def test_disaggregation_pays_on_a_mixed_fleet() -> None:
    cluster = planners.ClusterSpec.from_dict(
        {"nodes": [{"gpu": "A100-80GB", "count": 8}, {"gpu": "L40S", "count": 8}, {"gpu": "H100", "count": 8}]}
    )
    model = planners.ModelSpec.preset("llama-2-7b")
    workload = planners.ServeWorkload(input_len=512, output_len=128, ttft_slo_s=2.0, tpot_slo_s=0.1, budget_per_hour=20)
    colocated = plan_serving(cluster, [model], workload, disaggregate=False)
    split = plan_serving(cluster, [model], workload)
    assert {r.role for r in colocated.replicas} == {"both"}
    assert split.throughput_scale > 1.05 * colocated.throughput_scale
    routed = {
        role: sum(r.routed_rps for r in split.replicas if r.role == role) for role in ("both", "prefill", "decode")
    }
    assert routed["prefill"] == pytest.approx(routed["decode"]) and routed["prefill"] > 0
    assert routed["both"] + routed["prefill"] == pytest.approx(split.throughput_scale)
    assert split.price_per_hour <= 20 + 1e-6


def test_replanning_keeps_running_replicas() -> None:
    cluster = planners.ClusterSpec.from_dict({"nodes": [{"gpu": "L4", "count": 4, "repeat": 2}]})
    model = planners.ModelSpec.preset("llama-2-7b")

    def workload(rate: float) -> planners.ServeWorkload:
        return planners.ServeWorkload(arrival_rate=rate, input_len=256, output_len=64, ttft_slo_s=1.0, tpot_slo_s=0.1)

    before = plan_serving(cluster, [model], workload(4.0), objective="min_cost")
    # Workload shift: twice the traffic; what was running stays where it was.
    fresh = plan_serving(cluster, [model], workload(8.0), objective="min_cost")
    after = planners.replan_serving(cluster, [], [model], workload(8.0), before, objective="min_cost")
    assert after.price_per_hour == pytest.approx(fresh.price_per_hour) and len(after.replicas) > len(before.replicas)
    assert after.kept == len(before.replicas) >= 1
    assert {r.devices for r in before.replicas} <= {r.devices for r in after.replicas}
    # Failure: the devices of one running replica die; the others stay put.
    lost = after.replicas[0].devices
    again = planners.replan_serving(cluster, list(lost), [model], workload(8.0), after, objective="min_cost")
    assert not set(lost) & {d for r in again.replicas for d in r.devices}
    assert again.kept == len(after.replicas) - 1 and again.cluster == cluster.name
    assert again.price_per_hour == pytest.approx(after.price_per_hour)


def test_serve_plan_status_round_trips_and_older_plans_load() -> None:
    cluster = planners.ClusterSpec.load("h100x4_l4x4")
    workload = planners.ServeWorkload(arrival_rate=3.0, budget_per_hour=10.0)
    plan = plan_serving(cluster, [planners.ModelSpec.preset("llama-2-7b")], workload, objective="min_cost")
    assert ServePlan.from_json(plan.to_json()) == plan and plan.status == "OPTIMAL"
    data = json.loads(plan.to_json())
    del data["status"], data["objective_bound"]
    older = ServePlan.from_json(json.dumps(data))
    assert older.status == "" and older.objective_bound is None and older.replicas == plan.replicas
