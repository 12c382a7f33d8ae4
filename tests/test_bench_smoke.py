"""Benchmarks run end to end on tiny settings, so they cannot rot between GPU sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_hspmd_overhead_benchmark_runs(tmp_path):
    args = ["--steps", "1", "--seq-len", "16", "--batch-per-device", "1", "--hidden", "64", "--layers", "2"]
    args += ["--out", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "hspmd_overhead.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "hspmd_overhead_cpu.json").read_text())
    assert [r["layout"] for r in record["results"]] == ["dp=8", "dp=4 tp=2"]
    assert all(r["plain_s"] > 0 and r["hspmd_s"] > 0 for r in record["results"])


def test_train_benchmark_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("train_*_smoke_*.json")
    record = json.loads(path.read_text())
    assert [(r["step"], r["attention"]) for r in record["rows"]][1:] == [("jaxhet", "cudnn"), ("jaxhet", "flash")]
    assert record["rows"][0]["step"] == "plain jax.jit" and record["rows"][0]["vs_plain"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["model_tflops"] > 0 for r in record["rows"])
    # Same initial parameters and batch: every variant trains the same model to (nearly) the same loss.
    np.testing.assert_allclose([r["last_loss"] for r in record["rows"]], record["rows"][0]["last_loss"], rtol=1e-4)
    assert record["versions"]["jax"] and record["shapes"]["seq_len"] == 32
