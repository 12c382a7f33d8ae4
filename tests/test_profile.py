"""`jaxhet profile` on tiny sizes, the profile file, and how it calibrates the cost model."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import planners
from jaxhet.cli import app
from planners.calibrate import StepSample, fit_efficiency, predict_step

ROOT = Path(__file__).resolve().parents[1]


def test_profile_cli_writes_a_profile_the_cost_model_reads(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(
        app,
        [
            "profile",
            "--scale",
            "tiny",
            "--dtype",
            "float32",
            "--dtype",
            "bfloat16",
            "--devices",
            "4",
            "--kind",
            "H100",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "matmul float32" in result.output and "all-reduce link" in result.output
    profile = planners.MeasuredProfile.load(out)
    assert json.loads(out.read_text())["format"] == "jaxhet.device_profile"
    assert (
        profile.kind == "H100"
        and profile.device == "cpu (cpu)"
        and profile.num_devices == 4
        and profile.dtype == "float32"
    )
    assert set(profile.matmul_tflops) == {"float32", "bfloat16"} and profile.link is not None
    assert len(profile.calibration) == 2 and profile.versions["jax"]
    local = profile.local_cluster()
    assert local.num_devices == 4 and local.nodes[0].intra_link == profile.link
    achieved = local.profile("H100").flops_per_s
    assert achieved == pytest.approx(profile.matmul_tflops["float32"] * profile.compute_efficiency * 1e12)
    # Applied to a cluster file: the figures replace the catalog's for that kind only.
    cluster = planners.ClusterSpec.from_dict({"nodes": [{"gpu": "L4", "count": 2}, {"gpu": "H100", "count": 2}]})
    measured = profile.apply(cluster)
    assert measured.profile("H100").source.startswith("measured on") and measured.profile("L4") == cluster.profile("L4")
    assert measured.nodes[1].intra_link == profile.link and measured.nodes[0].intra_link == cluster.nodes[0].intra_link
    with pytest.raises(planners.SpecError, match="profile kind must be one of the cluster's GPU kinds"):
        dataclasses.replace(profile, kind="A10G").apply(cluster)
    # The planners take it: CPU-speed "H100"s, used without the profile, are left out of the training plan.
    plan_json = tmp_path / "plan.json"
    result = CliRunner().invoke(
        app, ["plan", "train", "--device-profile", str(out), "--time-limit", "2", "-o", str(plan_json)]
    )
    assert result.exit_code == 0, result.output
    plan = planners.TrainPlan.from_json(plan_json.read_text())
    assert "H100" not in {stage.kind for replica in plan.replicas for stage in replica.stages}
    result = CliRunner().invoke(app, ["profile", "--scale", "huge", "-o", str(out)])
    assert result.exit_code == 2 and "scale must be one of" in result.output


def test_fit_recovers_the_factors_it_was_given() -> None:
    cluster = planners.ClusterSpec.from_dict({"nodes": [{"gpu": "L4", "count": 1}]})
    truth = cluster.with_profiles({"L4": {"compute_efficiency": 0.37, "layer_overhead_us": 80.0}})
    samples = []
    for hidden, layers, batch in ((256, 2, 4), (512, 4, 2), (1024, 2, 8), (768, 6, 1)):
        model = planners.ModelSpec("m", 1024, hidden, hidden * 3, layers, hidden // 64, hidden // 64)
        samples.append(StepSample(model, batch, 256, predict_step(truth, model, batch, 256)))
    efficiency, overhead = fit_efficiency(cluster, samples)
    assert efficiency * cluster.profile("L4").tflops == pytest.approx(0.37 * cluster.profile("L4").tflops, rel=0.02)
    assert overhead == pytest.approx(80.0, rel=0.05)


def test_calibration_benchmark_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cost_model_calibration.py"), "--scale", "tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "cost_model_calibration_cpu.json").read_text())
    assert record["device"] and record["versions"]["jax"] and len(record["results"]) == 2
    assert all(r["predicted_s"] > 0 and r["measured_s"] > 0 for r in record["results"])


def test_matmul_scaling_slows_small_matmuls() -> None:
    cluster = planners.ClusterSpec.from_dict(
        {"nodes": [{"gpu": "H100", "count": 8}], "profiles": {"H100": {"matmul_scaling": [[4096, 1.0], [1024, 0.5]]}}}
    )
    prof = cluster.profile("H100")
    assert prof.matmul_scaling == ((1024, 0.5), (4096, 1.0))
    assert prof.flops_per_s_at(8192) == prof.flops_per_s and prof.flops_per_s_at(512) == 0.5 * prof.flops_per_s
    assert prof.flops_per_s_at(2048) == pytest.approx(0.75 * prof.flops_per_s)
    # TP 8 splits a 4096-wide block into 512-wide matmuls: slower per FLOP than the flat profile says.
    model = planners.ModelSpec.preset("llama-2-7b")
    flat = planners.ClusterSpec.from_dict({"nodes": [{"gpu": "H100", "count": 8}]})
    link = cluster.nodes[0].intra_link
    scaled = planners.TrainCosts(cluster, model, 2048).layer_seconds("H100", 8, 1, False, link)
    assert scaled > planners.TrainCosts(flat, model, 2048).layer_seconds("H100", 8, 1, False, link)
    for bad, message in (
        ([[1024, 1.5]], r"matmul_scaling\[0\]\[1\] must be a number in \(0, 1\]"),
        ([[1024, 0.5], [1024, 0.6]], "repeats a size"),
    ):
        with pytest.raises(planners.SpecError, match=message):
            planners.ClusterSpec.from_dict(
                {"nodes": [{"gpu": "H100", "count": 1}], "profiles": {"H100": {"matmul_scaling": bad}}}
            )
