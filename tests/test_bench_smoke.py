"""Benchmarks run end to end on tiny settings, so they cannot rot between GPU sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a bench script on this checkout's packages (PYTHONPATH) with 8 emulated CPU devices."""
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )


def test_hspmd_overhead_benchmark_runs(tmp_path):
    args = ["--steps", "1", "--seq-len", "16", "--batch-per-device", "1", "--hidden", "64", "--layers", "2"]
    result = _run_bench("hspmd_overhead.py", *args, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "hspmd_overhead_cpu.json").read_text())
    assert [r["layout"] for r in record["results"]] == ["dp=8", "dp=4 tp=2"]
    assert all(r["plain_s"] > 0 and r["hspmd_s"] > 0 for r in record["results"])


def test_serve_benchmark_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("serve_*_smoke_*.json")
    record = json.loads(path.read_text())
    (row,) = record["rows"]
    assert row["engine"]["tokens_per_s"] > 0 and row["naive"]["tokens_per_s"] > 0
    assert record["decode"]["step_ms"] > 0


def test_quantized_attention_benchmark_smoke(tmp_path):
    result = _run_bench("quantized_attention.py", "--smoke", "--out", str(tmp_path))
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
    result = _run_bench("quantized_accuracy.py", *args, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("quantized_accuracy_*.json")
    record = json.loads(path.read_text())
    assert len(record["rows"]) == 16 and record["int8_target_met"]
    assert "cosine" in result.stdout
