"""Benchmarks run end to end on tiny settings, so they cannot rot between GPU sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.multiprocess.launch import fast_compile_environment

ROOT = Path(__file__).resolve().parents[1]


def _run_bench(script: str, *args: str, out: Path) -> subprocess.CompletedProcess:
    """Run a bench script on this checkout's packages (PYTHONPATH) with 8 emulated CPU devices, writing into `out`,
    with `fast_compile_environment` (its cache in a folder of `out`)."""
    fast = fast_compile_environment(out / "compilation-cache")
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            **fast,
            "PYTHONPATH": str(ROOT),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {fast['XLA_FLAGS']}",
        },
    )


def test_hspmd_overhead_benchmark_runs(tmp_path):
    """Compiling (HSPMD's per-replica programs, then the 2-process row's 3 worker processes) is most of the smoke
    run: see `fast_compile_environment`."""
    args = ["--steps", "1", "--seq-len", "16", "--batch-per-device", "1", "--hidden", "64", "--layers", "2"]
    result = _run_bench("hspmd_overhead.py", *args, out=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "hspmd_overhead_cpu.json").read_text())
    assert [r["layout"] for r in record["results"]] == ["dp=8", "dp=4 tp=2"]
    assert all(r["plain_s"] > 0 and r["hspmd_s"] > 0 for r in record["results"])
    row = record["multi_process"]  # the same plan as 2 real processes and as 1
    assert row["shape"] == {"hidden": 64, "layers": 2, "seq": 16, "microbatch": 1}
    assert row["one_process_step_s"] > 0 and row["two_process_step_s"] > 0 and row["ratio_two_over_one"] > 0
    assert row["bytes_between_processes_per_step"] > 0 and row["cost_model_bytes_per_step"] > 0


def test_serve_benchmark_runs(tmp_path):
    result = _run_bench("serve.py", "--smoke", out=tmp_path)
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("serve_*_smoke_*.json")
    record = json.loads(path.read_text())
    (row,) = record["rows"]
    assert row["engine"]["tokens_per_s"] > 0 and row["naive"]["tokens_per_s"] > 0
    assert record["decode"]["step_ms"] > 0


def test_serve_prefix_cache_benchmark_runs(tmp_path):
    result = _run_bench("serve.py", "--prefix-cache", "--smoke", out=tmp_path)
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("prefix_cache_*_smoke_*.json")
    record = json.loads(path.read_text())
    assert record["same_tokens"] and record["cached"]["prefix_cache_hits"] > 0
    assert record["uncached"]["prefix_cache_queries"] == 0
    assert all(r > 0 for r in record["ratio_uncached_over_cached"].values())


def test_serve_soak_runs(tmp_path):
    """A few seconds of the soak against a real `jaxhet serve` process: no 5xx, no hang, nothing held afterwards."""
    result = _run_bench("serve.py", "--soak", "--smoke", out=tmp_path)
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("serve_soak_*_smoke_*.json")
    record = json.loads(path.read_text())
    assert record["requests"] > 0 and record["by_kind_and_status"]["greedy"].get("200", 0) > 0
    assert record["responses_5xx"] == record["hangs"] == record["greedy_changed"] == 0
    assert record["after"]["kv_pages_used"] == record["after"]["running"] == 0
    assert record["server_exit_status"] == 0


def test_quantized_attention_benchmark_smoke(tmp_path):
    result = _run_bench("quantized_attention.py", "--smoke", out=tmp_path)
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("quantized_attention_*_smoke_*.json")
    record = json.loads(path.read_text())
    prefill = [r for r in record["rows"] if r["kind"] == "prefill"]
    decode = [r for r in record["rows"] if r["kind"] == "decode"]
    assert len(prefill) == 5 and sum("quantized" in r["impl"] for r in prefill) == 3
    assert {r["kv_format"] for r in decode} == {"bfloat16", "int8", "int4"}
    assert {(r["impl"], r["layout"]) for r in decode} == {
        ("xla", "contiguous"),
        ("pallas", "contiguous"),
        ("pallas", "paged 16"),
    }
    assert record["copy_tb_per_s"] > 0 and all(r["ms"] > 0 and r["vs_copy"] > 0 for r in decode)


def test_quantized_accuracy_benchmark_runs(tmp_path):
    args = ["--seq", "48", "--heads", "2", "--kv-heads", "1", "--head-dim", "32", "--block", "16"]
    result = _run_bench("quantized_accuracy.py", *args, out=tmp_path)
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("quantized_accuracy_*.json")
    record = json.loads(path.read_text())
    assert len(record["rows"]) == 16 and record["int8_target_met"]
    assert "cosine" in result.stdout


def test_train_benchmark_runs(tmp_path):
    result = _run_bench("train.py", "--smoke", out=tmp_path)
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("train_*_smoke_*.json")
    record = json.loads(path.read_text())
    assert [(r["step"], r["attention"]) for r in record["rows"]][1:] == [("jaxhet", "cudnn"), ("jaxhet", "flash")]
    assert record["rows"][0]["step"] == "plain jax.jit" and record["rows"][0]["vs_plain"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["model_tflops"] > 0 for r in record["rows"])
    # Same initial parameters and batch: every variant trains the same model to (nearly) the same loss.
    np.testing.assert_allclose([r["last_loss"] for r in record["rows"]], record["rows"][0]["last_loss"], rtol=1e-4)
    assert record["versions"]["jax"] and record["shapes"]["seq_len"] == 32
    # jaxhet's step on a 4-device plan with recompute and with ZeRO-1, each against both off.
    plan = record["plan"]
    baseline, recompute, zero1, zero3 = plan["rows"]
    assert [(r["recompute"], r["zero"]) for r in plan["rows"]] == [(False, 0), (True, 0), (False, 1), (False, 3)]
    assert all(r["step_ms"] > 0 and r["step_vs_baseline"] > 0 for r in plan["rows"])
    # Same model, batch and arithmetic up to rematerialisation and moment layout: the same loss after the same steps.
    np.testing.assert_allclose([r["last_loss"] for r in plan["rows"]], baseline["last_loss"], rtol=1e-5)
    # AdamW keeps two float32 moments per parameter; ZeRO-1 splits them evenly over the stage's 4 devices.
    assert sorted(zero1["opt_state_bytes_per_device"].values()) == [2 * 4 * plan["num_params"] // 4] * 4
    assert baseline["opt_state_bytes_max_per_device"] > zero1["opt_state_bytes_max_per_device"]
    assert recompute["forward_output_bytes"] < baseline["forward_output_bytes"]
    # ZeRO-3 splits the parameters too (over CP; the TP-replicated ones over TP as well), and moments with them.
    assert zero3["param_bytes_max_per_device"] < baseline["param_bytes_max_per_device"]
    assert zero3["opt_state_bytes_per_device"] == zero1["opt_state_bytes_per_device"]


def test_attention_benchmark_runs(tmp_path):
    result = _run_bench("attention.py", "--smoke", out=tmp_path)
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("attention_*_smoke_*.json")
    report = json.loads(path.read_text())
    assert report["smoke"] and report["versions"]["jax"] and report["device"]
    dense = [r for r in report["rows"] if r["kind"] == "dense"]
    sparse = [r for r in report["rows"] if r["kind"] == "block_sparse"]
    assert {(r["impl"].split("[")[0], r["causal"]) for r in dense} == {("pallas flash", False), ("jax.nn", False)}
    assert [r["target_density"] for r in sparse] == [0.5]
    assert sparse[0]["fwd_vs_dense"] > 0 and sparse[0]["fwd_vs_ideal"] > 0
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in report["rows"])
    assert "pallas flash" in result.stdout


def test_hspmd_multiprocess_benchmark_runs(tmp_path):
    """The same plan as 1 and as 2 real processes; bytes across processes are counted and compared. Compiling is
    most of the smoke run, and its step times are only checked to be positive: see `fast_compile_environment`."""
    result = _run_bench("hspmd_multiprocess.py", "--smoke", out=tmp_path)
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("hspmd_multiprocess_*_smoke_*.json")
    record = json.loads(path.read_text())
    assert record["one_process_step_s"] > 0 and record["two_process_step_s"] > 0
    assert record["bytes_between_processes_per_step"] > 0 and record["cost_model_bytes_per_step"] > 0


def test_compression_error_benchmark_runs(tmp_path):
    args = ["--batch", "1", "--seq", "8", "--hidden", "256", "--outliers", "3"]
    result = _run_bench("compression_error.py", *args, out=tmp_path)
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("compression_error_*.json")
    record = json.loads(path.read_text())
    assert len(record["rows"]) == 8 and record["hadamard_beats_plain_int4_on_outliers"]
    assert "rel err" in result.stdout


def test_compression_training_benchmark_runs(tmp_path):
    args = ["--steps", "2", "--batch", "4", "--seq", "8", "--hidden", "32", "--layers", "2"]
    result = _run_bench("compression_training.py", *args, out=tmp_path)
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("compression_training_*.json")
    record = json.loads(path.read_text())
    assert [r["codec"] for r in record["rows"]] == ["none", "int8", "int4_hadamard"]
    # hidden 32: float32 is 128 bytes a token, int4_hadamard 16 of values plus a 4-byte scale.
    assert record["rows"][2]["bytes_reduction"] == 128 / 20
