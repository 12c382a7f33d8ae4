"""The cascade planner: optimal against enumeration of thresholds x deployments, plan format, profile, simulation."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import planners
from planners.brute_force import cascade_points
from planners.cascade import CascadePlan, CascadePoint, pareto_front, plan_cascade, tchebycheff
from planners.cascade_profile import CascadeProfile
from planners.simulate_cascade import simulate_cascade

KINDS = ["H100", "A100-80GB", "L40S", "L4", "A10G"]


def random_instance(seed: int) -> tuple[planners.ClusterSpec, list[planners.ModelSpec], planners.ServeWorkload]:
    rng = random.Random(seed)
    nodes = [{"gpu": rng.choice(KINDS), "count": rng.choice([1, 2])} for _ in range(rng.choice([2, 3]))]
    cluster = planners.ClusterSpec.from_dict({"nodes": nodes})
    models = [planners.ModelSpec.preset("tiny"), planners.ModelSpec.preset(rng.choice(["llama-2-7b", "llama-3-8b"]))]
    workload = planners.ServeWorkload(
        arrival_rate=rng.choice([1.0, 4.0, 12.0]),
        input_len=rng.choice([128, 1024]),
        output_len=rng.choice([32, 256]),
        ttft_slo_s=rng.choice([0.5, 2.0]),
        tpot_slo_s=rng.choice([0.05, 0.2]),
        budget_per_hour=rng.choice([None, 3.0, 8.0]),
    )
    return cluster, models, workload


def test_cascade_matches_enumeration() -> None:
    solved = 0
    for seed in range(30):
        cluster, models, workload = random_instance(seed)
        rng = random.Random(1000 + seed)
        profile = CascadeProfile.synthetic(2, count=200, seed=seed)
        weight, utilization = rng.choice([0.2, 0.5, 0.8]), rng.choice([0.7, 1.0])
        min_quality = rng.choice([None, 0.6])
        disaggregate = rng.random() < 0.5
        options = {"grid": 5, "utilization": utilization, "disaggregate": disaggregate}
        points = cascade_points(cluster, models, workload, profile, 5, utilization, disaggregate)
        eligible = [p for p in points if min_quality is None or p.quality >= min_quality]
        if not eligible:
            with pytest.raises(planners.PlanningError):
                plan_cascade(cluster, models, workload, profile, weight=weight, min_quality=min_quality, **options)
            continue
        front = pareto_front(points)
        expected, value = tchebycheff(eligible, weight, front)
        plan = plan_cascade(cluster, models, workload, profile, weight=weight, min_quality=min_quality, **options)
        assert [x for p in plan.front for x in (p.latency_s, p.quality)] == pytest.approx(
            [x for p in front for x in (p.latency_s, p.quality)], rel=1e-3
        ), seed
        mine = CascadePoint(plan.thresholds, plan.reach, plan.quality, plan.latency_s, plan.deployment.price_per_hour)
        assert tchebycheff([mine], weight, front)[1] == pytest.approx(value, rel=1e-3, abs=1e-6), seed
        assert plan.latency_s == pytest.approx(expected.latency_s, rel=1e-3), seed
        assert plan.quality == pytest.approx(expected.quality), seed
        solved += len(front) > 1
    assert solved >= 20


def setting() -> tuple[planners.ClusterSpec, list[planners.ModelSpec], planners.ServeWorkload]:
    cluster = planners.ClusterSpec.load("h100x4_l4x4")
    models = [planners.ModelSpec.preset("llama-3-8b"), planners.ModelSpec.preset("llama-3-70b")]
    workload = planners.ServeWorkload(arrival_rate=4.0, input_len=512, output_len=128, ttft_slo_s=2.0, tpot_slo_s=0.1)
    return cluster, models, workload


def test_weights_trade_latency_for_quality_and_plan_round_trips(tmp_path: Path) -> None:
    cluster, models, workload = setting()
    fast = plan_cascade(cluster, models, workload, weight=1.0)
    careful = plan_cascade(cluster, models, workload, weight=0.0)
    assert fast.latency_s < careful.latency_s and fast.quality < careful.quality
    assert fast.reach == (1.0, 0.0) and fast.thresholds[0] <= min(
        s.confidence[0] for s in CascadeProfile.synthetic().samples
    )
    assert len(fast.thresholds) == 1 and fast.models == ("llama-3-8b", "llama-3-70b")
    bounded = plan_cascade(cluster, models, workload, weight=1.0, min_quality=0.8)
    assert bounded.quality >= 0.8 and bounded.latency_s < careful.latency_s
    assert {r.model for r in bounded.deployment.replicas} == set(bounded.models)
    assert all(r.kind == "H100" for r in bounded.replicas("llama-3-70b"))
    # The front is Pareto: latency and quality both increase along it.
    lat = [p.latency_s for p in bounded.front]
    qual = [p.quality for p in bounded.front]
    assert lat == sorted(lat) and qual == sorted(qual) and len(set(qual)) == len(qual)
    # At the single large model's quality or close to it, the cascade is faster.
    large = next(s for s in bounded.single if s.model == "llama-3-70b")
    near = [p for p in bounded.front if p.quality >= large.quality - 0.01]
    assert near and min(p.latency_s for p in near) < large.latency_s
    path = bounded.save(tmp_path / "cascade.json")
    assert json.loads(path.read_text())["format"] == "jaxhet.cascade_plan"
    assert CascadePlan.load(path) == bounded
    with pytest.raises(planners.SpecError, match="format must be 'jaxhet.cascade_plan'"):
        CascadePlan.from_json(json.dumps({"format": "jaxhet.serve_plan"}))


def test_simulation_agrees_with_the_plan() -> None:
    cluster, models, workload = setting()
    profile = CascadeProfile.synthetic(2, seed=3)
    plan = plan_cascade(cluster, models, workload, profile, min_quality=0.8)
    trace = planners.poisson_trace(workload.arrival_rate, 1500, workload.input_len, workload.output_len)
    stats = simulate_cascade(plan, cluster, models, workload, profile, trace)
    assert len(stats.latency_s) == 1500
    assert stats.quality == pytest.approx(plan.quality, abs=0.04)
    assert stats.reach[1] == pytest.approx(plan.reach[1], abs=0.04)
    # The planned service times bound the simulated ones below the planned load.
    assert stats.mean_latency_s <= plan.latency_s * 1.1


def test_profile_json_and_errors(tmp_path: Path) -> None:
    profile = CascadeProfile.synthetic(3, count=50, seed=1)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile.to_dict()))
    assert CascadeProfile.load(path) == profile
    assert profile.num_models == 3 and len(profile.candidates(1, 4)) <= 4
    bad = {"samples": [{"confidence": [-0.1], "correct": [True]}]}
    with pytest.raises(planners.SpecError, match=r"samples\[0\]\.correct must have one entry per model"):
        CascadeProfile.from_dict(bad)
    bad = {"samples": [{"confidence": [-0.1, -0.2], "correct": [True, False]}]}
    with pytest.raises(planners.SpecError, match=r"samples\[0\]\.confidence must have 1 entries"):
        CascadeProfile.from_dict(bad)
    bad = {"samples": [{"confidence": [-0.1], "correct": [True, False], "score": 1}]}
    with pytest.raises(planners.SpecError, match=r"unknown field\(s\) \['score'\]"):
        CascadeProfile.from_dict(bad)
    cluster, models, workload = setting()
    with pytest.raises(planners.SpecError, match="profile describes 3 models, the cascade has 2"):
        plan_cascade(cluster, models, workload, profile)
    with pytest.raises(planners.SpecError, match="weight must be in"):
        plan_cascade(cluster, models, workload, weight=2.0)
    with pytest.raises(planners.PlanningError, match="below min_quality 0.99"):
        plan_cascade(cluster, models, workload, min_quality=0.99)


def test_cascade_benchmark_runs(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "cascade.json"
    result = subprocess.run(
        [sys.executable, str(root / "bench" / "planner_cascade.py"), "--requests", "100", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 4 and all(r["cascade"]["quality"] >= r["llama-3-70b alone"]["quality"] - 0.01 for r in rows)


def test_grid_must_hold_two_thresholds() -> None:
    cluster, models, workload = setting()
    with pytest.raises(planners.SpecError, match="grid must be an integer >= 2, got 1"):
        plan_cascade(cluster, models, workload, grid=1)


def test_replanning_after_a_workload_shift_keeps_running_replicas() -> None:
    cluster = planners.ClusterSpec.load("examples/clusters/h100x16_l4x16.yaml")
    models = [planners.ModelSpec.preset("llama-3-8b"), planners.ModelSpec.preset("llama-3-70b")]

    def workload(rate: float) -> planners.ServeWorkload:
        return planners.ServeWorkload(arrival_rate=rate, input_len=512, output_len=128, ttft_slo_s=2.0, tpot_slo_s=0.1)

    before = plan_cascade(cluster, models, workload(8.0), min_quality=0.85, grid=6)
    fresh = plan_cascade(cluster, models, workload(12.0), min_quality=0.85, grid=6)
    after = plan_cascade(cluster, models, workload(12.0), min_quality=0.85, grid=6, current=before)
    assert after.latency_s == pytest.approx(fresh.latency_s, rel=1e-6) and after.quality == fresh.quality
    running = {r.devices for r in before.deployment.replicas}
    kept = running & {r.devices for r in after.deployment.replicas}
    assert len(kept) == after.deployment.kept > len(running & {r.devices for r in fresh.deployment.replicas})
