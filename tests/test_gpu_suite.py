"""bench/gpu_suite.sh --smoke: the one-call GPU suite end to end on tiny shapes, so it cannot rot between GPU loans."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multiprocess.launch import fast_compile_environment

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_step_and_every_kernel_is_correct(tmp_path):
    fast = fast_compile_environment(tmp_path / "compilation-cache")  # its steps' smoke times are not checked
    xla_flags = f"--xla_force_host_platform_device_count=8 {fast['XLA_FLAGS']}"
    env = {**os.environ, **fast, "PYTHON": sys.executable, "XLA_FLAGS": xla_flags}
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1500,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.splitlines()[-5:]
    steps = ["kernel_correctness", "attention", "quantized_attention", "train", "serve"]
    assert [line.split()[:2] for line in summary] == [[step, "ok"] for step in steps]
    (path,) = tmp_path.glob("kernel_correctness_*_smoke_*.json")
    rows = json.loads(path.read_text())["rows"]
    assert all(row["ok"] for row in rows)
    variants = {(r["kernel"], r["variant"]) for r in rows}
    assert variants >= {("flash", "block sparse"), ("flash", "causal gqa4 shard_map"), ("decode", "int4 paged")}
    assert len(rows) == 6 * 4 + 4 + 6
