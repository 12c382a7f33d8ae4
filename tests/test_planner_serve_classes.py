"""Serving several request classes: per-class routing is optimal against enumeration, cheaper than one class on a
bimodal trace, and the simulator confirms the SLOs it promises."""

import random
from pathlib import Path

import pytest

import planners
from planners.brute_force import best_serving
from planners.serve import plan_serving
from planners.simulate_serving import simulate_serving
from planners.workload import Request, RequestClass

KINDS = ["H100", "L40S", "L4", "A10G"]


def bimodal_trace(count: int, chat_rate: float, doc_rate: float, seed: int = 0) -> list[Request]:
    """Short chat requests and long documents, Poisson arrivals, lengths uniform within each mode."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(chat_rate + doc_rate)
        if rng.random() < chat_rate / (chat_rate + doc_rate):
            out.append(Request(t, rng.randint(128, 384), rng.randint(64, 192)))
        else:
            out.append(Request(t, rng.randint(6000, 8000), rng.randint(128, 384)))
    return out


def write_trace(path: Path, trace: list[Request]) -> Path:
    rows = "".join(f"{r.arrival_s},{r.input_len},{r.output_len}\n" for r in trace)
    path.write_text("arrival_s,input_len,output_len\n" + rows)
    return path


def test_bimodal_trace_multi_class_plan_is_cheaper_and_meets_its_slos(tmp_path: Path) -> None:
    cluster = planners.ClusterSpec.from_dict(
        {"nodes": [{"gpu": "H100", "count": 2}, {"gpu": "L40S", "count": 8, "repeat": 2}]}
    )
    model = planners.ModelSpec.preset("llama-2-7b")
    trace = bimodal_trace(2000, chat_rate=40.0, doc_rate=2.0)
    path = write_trace(tmp_path / "bimodal.csv", trace)
    slos = {"ttft_slo_s": 0.5, "tpot_slo_s": 0.1}
    multi = planners.ServeWorkload.from_trace(path, input_edges=(2048,), **slos)
    assert [c.name for c in multi.classes] == ["prompt 0-2047", "prompt >= 2048"]
    assert sum(c.rate for c in multi.classes) == pytest.approx(multi.arrival_rate)
    options = {"objective": "min_cost", "utilization": 0.8, "time_limit_s": 10.0}
    routed = plan_serving(cluster, [model], multi, **options)
    mixed = plan_serving(cluster, [model], multi, route_by_class=False, **options)
    assert routed.status == mixed.status == "OPTIMAL"
    # One class: every replica takes the trace's mix; routing by class saves at least 5%.
    assert routed.price_per_hour <= 0.95 * mixed.price_per_hour
    for klass in multi.classes:
        for roles in (("both", "prefill"), ("both", "decode")):
            shares = [
                s.routed_rps for r in routed.replicas if r.role in roles for s in r.classes if s.name == klass.name
            ]
            assert sum(shares) == pytest.approx(klass.rate, rel=1e-6)
    stats = simulate_serving(routed, cluster, [model], multi, trace)
    assert len(stats.ttft_s) == len(trace) and stats.slo_attainment >= 0.98
    assert min(stats.class_attainment.values()) >= 0.95
    # Collapsing the trace to mean lengths (one class) plans for lighter requests than it gets: cheaper on paper,
    # and the simulator shows it missing the SLOs.
    means = planners.ServeWorkload.from_trace(path, **slos)
    collapsed = plan_serving(cluster, [model], means, **options)
    assert simulate_serving(collapsed, cluster, [model], means, trace).slo_attainment < 0.9


def tiny_instance(seed: int) -> tuple[planners.ClusterSpec, planners.ServeWorkload, str, bool]:
    rng = random.Random(seed)
    nodes = [{"gpu": kind, "count": rng.choice([1, 2])} for kind in rng.sample(KINDS, 2)]
    classes = [
        RequestClass("short", rng.choice([1.0, 4.0]), rng.choice([128, 256]), 64, 1.0, rng.choice([0.05, 0.1])),
        RequestClass("long", rng.choice([0.2, 1.0]), rng.choice([2048, 4096]), 256, rng.choice([2.0, 4.0]), 0.1),
    ]
    budget = rng.choice([None, 4.0])
    workload = planners.ServeWorkload.of_classes(classes, budget)
    return (
        planners.ClusterSpec.from_dict({"nodes": nodes}),
        workload,
        rng.choice(list(planners.serve.OBJECTIVES)),
        rng.random() < 0.5,
    )


def test_multi_class_milp_matches_enumerated_counts_and_routings() -> None:
    model = planners.ModelSpec.preset("llama-2-7b")
    solved = 0
    for seed in range(12):
        cluster, workload, objective, disaggregate = tiny_instance(seed)
        rates = [workload.arrival_rate]
        expected = best_serving(cluster, [model], workload, objective, rates, disaggregate)
        if expected is None:
            with pytest.raises(planners.PlanningError):
                plan_serving(cluster, [model], workload, objective=objective, disaggregate=disaggregate)
            continue
        plan = plan_serving(cluster, [model], workload, objective=objective, disaggregate=disaggregate)
        value = {
            "max_throughput": plan.throughput_scale,
            "min_cost": plan.price_per_hour,
            "min_latency": sum(s.routed_rps * s.latency_s for r in plan.replicas for s in r.classes),
        }[objective]
        assert value == pytest.approx(expected, rel=1e-4), (seed, objective)
        for r in plan.replicas:
            assert sum(s.routed_rps / s.capacity_rps for s in r.classes) <= 1 + 1e-6
        solved += 1
    assert solved >= 6


def test_workload_file_gives_classes_and_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(
        "budget_per_hour: 40\nttft_slo_s: 2.0\nclasses:\n"
        "  - {name: chat, rate: 8.0, input_len: 256, output_len: 128}\n"
        "  - {name: docs, rate: 1.0, input_len: 8192, output_len: 256, ttft_slo_s: 4.0}\n"
    )
    workload = planners.ServeWorkload.load(path)
    assert workload.arrival_rate == 9.0 and workload.budget_per_hour == 40
    assert [(c.name, c.ttft_slo_s, c.tpot_slo_s) for c in workload.classes] == [("chat", 2.0, 0.1), ("docs", 4.0, 0.1)]
    assert workload.class_of(Request(0.0, 7000, 300)).name == "docs"
    with pytest.raises(planners.SpecError, match=r"classes\[0\]: unknown field\(s\) \['prompt'\]"):
        planners.ServeWorkload.from_dict({"classes": [{"name": "b", "rate": 1, "prompt": 3}]})
    with pytest.raises(planners.SpecError, match="classes: names must be unique"):
        planners.ServeWorkload.of_classes([RequestClass("a", 1.0, 8, 8), RequestClass("a", 1.0, 8, 8)])
    with pytest.raises(planners.SpecError, match=r"workload: \['input_len'\] cannot be given with classes"):
        planners.ServeWorkload.from_dict({"input_len": 5, "classes": []})
    with pytest.raises(planners.SpecError, match="classes.a.rate must be a positive number"):
        RequestClass("a", 0.0, 8, 8)
    with pytest.raises(planners.SpecError, match="input_edges must be strictly increasing"):
        planners.ServeWorkload.from_trace(write_trace(tmp_path / "t.csv", bimodal_trace(5, 1, 1)), (4096, 1024))


def test_multi_class_plan_round_trips() -> None:
    cluster = planners.ClusterSpec.load("h100x4_l4x4")
    classes = [RequestClass("chat", 4.0, 256, 64, 1.0, 0.1), RequestClass("docs", 0.5, 4096, 256, 4.0, 0.1)]
    plan = plan_serving(
        cluster,
        [planners.ModelSpec.preset("llama-2-7b")],
        planners.ServeWorkload.of_classes(classes),
        objective="min_cost",
    )
    assert plan.classes == tuple(classes)
    assert planners.ServePlan.from_json(plan.to_json()) == plan
