"""Context parallelism in the training planner: against the exhaustive enumerator on small long-sequence instances
whose optima use cp > 1 (some with no cp = 1 plan at all), long-context presets within the time limit, and the
CLI's CP column."""

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

import planners
from jaxhet.cli import app
from planners.brute_force import best_plan
from planners.train import _seeds
from planners.train_model import Cell, CellProblem

KINDS = ["H100", "L4", "T4", "A100-40GB"]
# A Qwen2-1.5B-shaped decoder: 2 kv heads, so tensor parallelism stops at 2 and a 4-GPU group needs cp 2.
GQA_MODEL = planners.ModelSpec("gqa-1.5b", 151936, 1536, 8960, 28, 12, 2, tied_embeddings=True)


def drawn(seed: int) -> tuple[dict, planners.ModelSpec, planners.TrainWorkload]:
    """A cluster file of 1-3 nodes of 3-5 GPUs with tight memories, a 2-3 block model of 1-4 kv heads, and
    sequences of 8k-32k tokens."""
    rng = random.Random(seed)
    sizes = rng.choice([[4], [2, 2], [4, 1], [2, 1], [2, 2, 1]])
    nodes = [{"gpu": rng.choice(KINDS), "count": c} for c in sizes]
    memory = rng.choice([0.1, 0.2, 0.4, 0.8])
    gpus = {k: {"memory_gb": memory * rng.choice([1, 2])} for k in {n["gpu"] for n in nodes}}
    link = {"gb_s": rng.choice([12.5, 50.0]), "latency_us": 10}
    spec = {"name": f"cp{seed}", "nodes": nodes, "gpus": gpus, "inter_node_link": link}
    hidden = rng.choice([128, 256])
    model = planners.ModelSpec("m", 1000, hidden, 4 * hidden, rng.choice([2, 3]), 4, rng.choice([1, 2, 4]))
    seq_len = rng.choice([8192, 16384, 32768])
    workload = planners.TrainWorkload(rng.choice([1, 2]), seq_len, microbatch_sizes=(1,), zero_stages=(0,))
    return spec, model, workload


def instance(seed: int) -> tuple[planners.ClusterSpec, planners.ModelSpec, planners.TrainWorkload]:
    spec, model, workload = drawn(seed)
    return planners.ClusterSpec.from_dict(spec), model, workload


def without_cp(plan: planners.TrainPlan) -> bool:
    return all(r.cp == 1 for r in plan.replicas)


def test_planner_matches_enumeration_with_context_parallelism() -> None:
    matched, with_cp, only_cp = 0, 0, 0
    for seed in range(30):
        cluster, model, workload = instance(seed)
        expected = best_plan(cluster, model, workload)
        if expected is None:
            with pytest.raises(planners.PlanningError, match="memory"):
                planners.plan_training(cluster, model, workload, time_limit_s=30, num_workers=1)
            continue
        plan, info = planners.plan_training_with_info(cluster, model, workload, time_limit_s=30, num_workers=1)
        assert info.status == "OPTIMAL", seed
        assert plan.estimate.iteration_s == pytest.approx(expected[0], rel=1e-3), seed
        assert planners.evaluate_train_plan(plan, cluster, model) == plan.estimate
        assert all(workload.seq_len % r.cp == 0 for r in plan.replicas)
        matched += 1
        if not without_cp(expected[1]):
            with_cp += 1
            assert not without_cp(plan), seed
            plain = best_plan(cluster, model, workload, where=without_cp)
            if plain is None:
                only_cp += 1
            else:  # cp > 1 is the optimum: strictly faster than every plan without it
                assert plain[0] > expected[0] * (1 + 1e-3), seed
    assert matched >= 20 and with_cp >= 5 and only_cp >= 2, (matched, with_cp, only_cp)


def test_llama_7b_at_128k_plans_within_its_time_limit() -> None:
    """CP is in the search; the optimum keeps cp 1 here, since CP leaves the 16 bytes of state per parameter where
    TP divides them and its consecutive slices give the last rank 3/4 of the causal attention at cp 2 (TP: 1/2)."""
    cluster = planners.ClusterSpec.load("h100x4_l4x4")
    model = planners.ModelSpec.preset("llama-2-7b")
    workload = planners.TrainWorkload(global_batch=16, seq_len=131072, microbatch_sizes=(1, 2))
    # A warm start within memory exists only where the seeds split layers by memory, L4 stage first.
    cell = Cell(cluster, 1, (tuple(range(cluster.num_devices)),))
    assert _seeds(CellProblem(cell, model, workload.seq_len, 1, 16, True))
    plan, info = planners.plan_training_with_info(cluster, model, workload, time_limit_s=5)
    assert info.solve_s <= 5.5
    assert not planners.memory_excess(plan, cluster, plan.estimate)
    assert info.lower_bound_s <= plan.estimate.iteration_s


def test_long_context_gqa_model_plans_with_context_parallelism() -> None:
    cluster = planners.ClusterSpec.load("h100x4_l4x4")
    workload = planners.TrainWorkload(global_batch=8, seq_len=131072)
    plan, info = planners.plan_training_with_info(cluster, GQA_MODEL, workload, time_limit_s=10)
    assert info.solve_s <= 11.0
    assert any(r.cp > 1 for r in plan.replicas)
    for r in plan.replicas:
        assert all(len(s.devices) == s.tp * r.cp and GQA_MODEL.supports_tp(s.tp) for s in r.stages)
    assert not planners.memory_excess(plan, cluster, plan.estimate)


def test_plan_train_shows_cp(tmp_path: Path) -> None:
    """A 1-kv-head model on one 4-GPU node at 16k tokens: the only plans that fit split the sequence."""
    spec, model, workload = drawn(7)
    config = {
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "cluster.json").write_text(json.dumps(spec))
    out = tmp_path / "plan.json"
    args = ["plan", "train", "--cluster", str(tmp_path / "cluster.json"), "--model", str(tmp_path / "config.json")]
    args += ["--global-batch", str(workload.global_batch), "--seq-len", str(workload.seq_len), "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--time-limit", "5"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = [c.strip() for c in next(line for line in lines if "replica" in line and "GPU" in line).split("┃")]
    first_row = [c.strip() for c in next(line for line in lines if line.startswith("│")).split("│")]
    plan = planners.TrainPlan.from_json(out.read_text())
    assert plan.replicas[0].cp > 1
    assert first_row[header.index("CP")] == str(plan.replicas[0].cp)
    assert first_row[header.index("TP")] == str(plan.replicas[0].stages[0].tp)
