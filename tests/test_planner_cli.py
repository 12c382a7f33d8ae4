"""`jaxhet plan train|serve|cascade` through the real command line."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import planners
from jaxhet.cli import app

RUNNER = CliRunner()


def test_plan_train_writes_json_and_png(tmp_path: Path) -> None:
    out, png = tmp_path / "plan.json", tmp_path / "map.png"
    result = RUNNER.invoke(
        app,
        [
            "plan",
            "train",
            "--cluster",
            "h100x4_l4x4",
            "--model",
            "llama-2-7b",
            "--global-batch",
            "8",
            "--seq-len",
            "1024",
            "--time-limit",
            "3",
            "-o",
            str(out),
            "--png",
            str(png),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "predicted iteration" in result.output and "H100" in result.output
    plan = planners.TrainPlan.from_json(out.read_text())
    assert plan.model == "llama-2-7b" and plan.global_batch == 8 and plan.cluster == "h100x4_l4x4"
    assert plan.solve is not None and plan.solve.time_limit_s == 3
    assert f"solver: {plan.solve.status}, lower bound" in result.output and "gap" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_train_defaults_run(tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["plan", "train", "--time-limit", "2"])
    assert result.exit_code == 0, result.output
    assert "tiny on emulated8" in result.output
    out = tmp_path / "all.json"
    result = RUNNER.invoke(app, ["plan", "train", "--time-limit", "3", "--use-all-devices", "-o", str(out)])
    assert result.exit_code == 0, result.output
    first = planners.TrainPlan.from_json(out.read_text())
    assert sorted(first.devices) == list(range(8))
    again = tmp_path / "again.json"
    result = RUNNER.invoke(app, ["plan", "train", "--time-limit", "2", "--current", str(out), "-o", str(again)])
    assert result.exit_code == 0, result.output
    replanned = planners.TrainPlan.from_json(again.read_text())
    assert replanned.estimate.iteration_s <= first.estimate.iteration_s * (1 + 1e-9)
    result = RUNNER.invoke(app, ["plan", "train", "--global-batch", "8", "--current", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "current plan: global_batch is 16, the workload's is 8" in result.output


def test_user_mistakes_are_one_line(tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["plan", "train", "--cluster", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "cluster file not found" in result.output and "Traceback" not in result.output
    result = RUNNER.invoke(app, ["plan", "train", "--model", "gpt-9"])
    assert result.exit_code == 2 and "neither a preset" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [{gpu: H100, count: 4, speed: 9}]\n")
    result = RUNNER.invoke(app, ["plan", "train", "--cluster", str(bad)])
    assert result.exit_code == 2 and "unknown field(s) ['speed']" in result.output
    result = RUNNER.invoke(app, ["plan", "train", "--cluster", "h100x4_l4x4", "--model", "llama-2-70b"])
    assert result.exit_code == 2 and "weights, gradients and Adam state" in result.output
    result = RUNNER.invoke(app, ["plan", "train", "--compress", "fp8"])
    assert result.exit_code == 2 and "compress must be one of ['none', 'int8', 'int4_hadamard']" in result.output


def test_plan_train_compresses_a_slow_pipeline_edge(tmp_path: Path) -> None:
    """Two single-H100 nodes over 12.5 GB/s: a 7B model must pipeline across them, and its edge is compressed."""
    cluster = tmp_path / "two.yaml"
    cluster.write_text(
        "nodes: [{name: a, gpu: H100, count: 1}, {name: b, gpu: H100, count: 1}]\n"
        "inter_node_link: {gb_s: 12.5, latency_us: 15}\n"
    )
    out = tmp_path / "plan.json"
    args = ["--cluster", str(cluster), "--model", "llama-2-7b", "--global-batch", "8", "--seq-len", "2048"]
    result = RUNNER.invoke(app, ["plan", "train", *args, "--compress", "int4_hadamard", "-o", str(out)])
    assert result.exit_code == 0, result.output
    plan = planners.TrainPlan.from_json(out.read_text())
    assert [s.compress for s in plan.replicas[0].stages] == ["int4_hadamard", "none"]


def test_plan_serve(tmp_path: Path) -> None:
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    result = RUNNER.invoke(
        app,
        [
            "plan",
            "serve",
            "--model",
            "llama-2-7b",
            "--rate",
            "3",
            "--budget",
            "10",
            "--objective",
            "min_cost",
            "--time-limit",
            "5",
            "-o",
            str(out),
            "--png",
            str(png),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "L4" in result.output and "solver: OPTIMAL, objective bound" in result.output
    plan = planners.ServePlan.from_json(out.read_text())
    assert plan.price_per_hour <= 10 and plan.objective == "min_cost" and plan.status == "OPTIMAL"
    assert plan.objective_bound == pytest.approx(plan.price_per_hour, rel=1e-6)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = RUNNER.invoke(app, ["plan", "serve", "--objective", "fastest"])
    assert result.exit_code == 2 and "objective must be one of" in result.output


def test_plan_cascade_writes_json_and_png(tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(planners.CascadeProfile.synthetic(2, count=300, seed=2).to_dict()))
    out, png = tmp_path / "cascade.json", tmp_path / "front.png"
    args = ["plan", "cascade", "--profile", str(profile), "--grid", "5", "--simulate", "200", "--min-quality", "0.8"]
    args += ["--time-limit", "20"]
    result = RUNNER.invoke(app, [*args, "-o", str(out), "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "latency/quality front" in result.output and "simulated 200 requests" in result.output
    plan = planners.CascadePlan.load(out)
    assert plan.models == ("llama-3-8b", "llama-3-70b") and plan.quality >= 0.8 and len(plan.thresholds) == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = RUNNER.invoke(app, [*args, "--rate", "6", "--current", str(out), "-o", str(tmp_path / "after.json")])
    assert result.exit_code == 0, result.output
    assert "running replica(s) in place" in result.output
    assert planners.CascadePlan.load(tmp_path / "after.json").arrival_rate == 6
    result = RUNNER.invoke(app, [*args[:4], "--model", "tiny", "--model", "llama-2-7b", "--model", "llama-2-13b"])
    assert result.exit_code == 2 and "profile describes 2 models, the cascade has 3" in result.output


def test_plan_serve_replans_after_a_failure(tmp_path: Path) -> None:
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    args = ["plan", "serve", "--model", "llama-2-7b", "--rate", "6", "--objective", "min_cost", "--colocate"]
    assert RUNNER.invoke(app, [*args, "-o", str(before)]).exit_code == 0
    running = planners.ServePlan.from_json(before.read_text())
    lost = running.replicas[0].devices
    failed = [x for d in lost for x in ("--failed", str(d))]
    result = RUNNER.invoke(app, [*args, "--current", str(before), *failed, "-o", str(after)])
    assert result.exit_code == 0, result.output
    assert f"kept {len(running.replicas) - 1} running replica(s) in place" in result.output
    plan = planners.ServePlan.from_json(after.read_text())
    assert not set(lost) & {d for r in plan.replicas for d in r.devices}
    result = RUNNER.invoke(app, [*args, "--failed", "0"])
    assert result.exit_code == 2 and "--failed needs --current" in result.output


def test_plan_serve_routes_request_classes_of_a_workload_file(tmp_path: Path) -> None:
    workload = tmp_path / "workload.yaml"
    workload.write_text(
        "ttft_slo_s: 0.5\nclasses:\n  - {name: chat, rate: 40, input_len: 256, output_len: 128}\n"
        "  - {name: docs, rate: 2, input_len: 7000, output_len: 256}\n"
    )
    out = tmp_path / "serve.json"
    args = ["--workload", str(workload), "--objective", "min_cost", "--time-limit", "5", "-o", str(out)]
    result = RUNNER.invoke(app, ["plan", "serve", *args])
    assert result.exit_code == 0, result.output
    assert "routing by request class" in result.output and "docs" in result.output
    plan = planners.ServePlan.from_json(out.read_text())
    assert [c.name for c in plan.classes] == ["chat", "docs"]
    bad = RUNNER.invoke(app, ["plan", "serve", "--bucket-edge", "1024"])
    assert bad.exit_code == 2 and "--bucket-edge needs --trace" in bad.output
    wrong = RUNNER.invoke(app, ["plan", "serve", "--objective", "fastest"])
    assert wrong.exit_code == 2 and "min_latency" in wrong.output


def test_plan_train_shows_and_forbids_zero(tmp_path: Path) -> None:
    """Four H100s beside two L4s, each holding well under the model's weights, gradients and Adam state: with every
    device busy the plan splits moments (zero 1), and `--no-zero` leaves no plan."""
    config = {"vocab_size": 8000, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 2}
    config |= {"num_attention_heads": 8, "num_key_value_heads": 8}
    (tmp_path / "config.json").write_text(json.dumps(config))
    state_gb = 16 * planners.ModelSpec.from_hf_config(config).num_params / 1e9
    cluster = {
        "nodes": [{"gpu": "H100", "count": 4}, {"gpu": "L4", "count": 2}],
        "gpus": {
            k: {"memory_gb": share * state_gb, "usable_memory": 1.0} for k, share in (("H100", 0.45), ("L4", 0.3))
        },
        "inter_node_link": {"gb_s": 50, "latency_us": 5},
    }
    (tmp_path / "cluster.json").write_text(json.dumps(cluster))
    out = tmp_path / "plan.json"
    args = ["plan", "train", "--cluster", str(tmp_path / "cluster.json"), "--model", str(tmp_path / "config.json")]
    args += ["--global-batch", "2", "--seq-len", "128", "--no-recompute", "--use-all-devices", "--time-limit", "20"]
    result = RUNNER.invoke(app, [*args, "-o", str(out)], env={"COLUMNS": "160"})  # the table's header unwrapped
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "replica" in line and "GPU" in line)
    assert "zero" in [c.strip() for c in header.split("┃")] and "ZeRO stage" in result.output
    assert {s.zero for r in planners.TrainPlan.from_json(out.read_text()).replicas for s in r.stages} == {1}
    result = RUNNER.invoke(app, [*args, "--no-zero"])
    assert result.exit_code != 0 and "memory" in result.output
