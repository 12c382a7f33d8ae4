"""`jaxhet train` as two real processes on 127.0.0.1 over a plan whose stage edge and replicas cross processes:
it follows the one-device trajectory, resumes exactly, and a killed process takes the run down with it.

The learning rate is constant (no warm-up, no decay) so that runs of different lengths share one trajectory.
Tolerance 1e-4 relative: a few optimizer steps amplify the ~1e-7 differences of reordered float32 sums.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.multiprocess.launch import ROOT, environment, free_port, log_text, processes, run, wait_all

CLUSTER = """name: two_nodes
nodes:
  - {name: h100, gpu: H100, count: 2}
  - {name: l4, gpu: L4, count: 2}
"""
PLAN = {
    "num_layers": 2,
    "global_batch": 4,
    "seq_len": 32,
    "device_kinds": ["H100", "H100", "L4", "L4"],
    "replicas": [
        {
            "stages": [
                {"devices": [0, 1], "kind": "H100", "tp": 2, "layers": [0, 1]},
                {"devices": [2], "kind": "L4", "tp": 1, "layers": [1, 2]},
            ],
            "num_microbatches": 1,
            "microbatch_size": 2,
        },
        {
            "stages": [{"devices": [3], "kind": "L4", "tp": 1, "layers": [0, 2]}],
            "num_microbatches": 2,
            "microbatch_size": 1,
        },
    ],
}
SETTINGS = {
    "num_layers": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "data.seq_len": 32,
    "data.batch_size": 4,
    "data.max_documents": 40,
    "save_every": 1,
    "optim.warmup_steps": 0,
    "optim.min_lr_ratio": 1.0,
}
RTOL = 1e-4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The cluster and plan files, and the compilation cache every run of this module shares (each run compiles
    the same programs)."""
    root = tmp_path_factory.mktemp("mp_train")
    (root / "cluster.yaml").write_text(CLUSTER)
    (root / "plan.json").write_text(json.dumps(PLAN))
    return root


def compilation_cache(files):
    return files / "compilation-cache"


def command(files, run_dir, steps: int, *extra: str) -> list[str]:
    sets = [
        arg
        for key, value in {**SETTINGS, "cluster": files / "cluster.yaml"}.items()
        for arg in ("--set", f"{key}={value}")
    ]
    return [
        sys.executable,
        "-m",
        "jaxhet",
        "train",
        "--steps",
        str(steps),
        "--checkpoint-dir",
        str(run_dir),
        *sets,
        *extra,
    ]


def two_processes(files, run_dir, steps: int, *extra: str) -> list[list[str]]:
    port = free_port()
    launch = ["--plan", str(files / "plan.json"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    return [command(files, run_dir, steps, *launch, "--process-id", str(i), *extra) for i in range(2)]


def start_two(files, run_dir, logs, steps: int, *extra: str):
    """`jaxhet train` as two processes (a context manager: `launch.processes`)."""
    return processes(two_processes(files, run_dir, steps, *extra), logs, compilation_cache(files))


def run_two(files, run_dir, logs, steps: int, *extra: str) -> None:
    """`jaxhet train` as two processes, to the end; both must succeed."""
    run(two_processes(files, run_dir, steps, *extra), logs, timeout=480, compilation_cache=compilation_cache(files))


def records(run_dir) -> list[str]:
    """Process 0's metrics records, one JSON line per step."""
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in records(run_dir)]


@pytest.fixture(scope="module")
def single(files):
    """The reference: one process, one device, 6 steps."""
    run_dir = files / "single"
    single_run = command(files, run_dir, 6, "--plan", "single")
    subprocess.run(single_run, check=True, env=environment(compilation_cache(files)), cwd=ROOT, timeout=480)
    return losses(run_dir)


@pytest.mark.slow
def test_two_processes_follow_one_device_and_resume_exactly(files, single, tmp_path):
    """`--steps 2`, then `--steps 4 --resume`: the resumed run continues from step 2 (the first run's records of
    steps 1-2 stay as written: a run that started again would rewrite them with its own timings), and the four
    losses follow one device."""
    run_dir = tmp_path / "run"
    run_two(files, run_dir, tmp_path / "first", 2)
    first = records(run_dir)
    run_two(files, run_dir, tmp_path / "resumed", 4, "--resume")
    assert sorted(p.name for p in run_dir.glob("process-*")) == ["process-0", "process-1"]
    assert not (run_dir / "process-1" / "metrics.jsonl").exists()
    assert records(run_dir)[:2] == first, "the resumed run did not continue from step 2"
    np.testing.assert_allclose(losses(run_dir), single[:4], rtol=RTOL)


def wait_for_steps(run_dir, started, logs, steps: int, timeout: float = 240) -> None:
    """Wait until process 0 has logged `steps` steps, every process still running."""
    deadline = time.monotonic() + timeout
    while not (run_dir / "metrics.jsonl").is_file() or len(losses(run_dir)) < steps:
        assert time.monotonic() < deadline, log_text(logs, 0)[-3000:]
        assert all(p.poll() is None for p in started), log_text(logs, 0)[-3000:]
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_a_killed_one_stops_the_other_and_resumes_continue(files, single, tmp_path):
    """SIGTERM to process 1 alone: both save the same step and exit 130. kill -9 of process 1 in the resumed run
    (which continues from the saved step): process 0 exits non-zero within 60 s. A second resume then continues
    the one-device trajectory."""
    run_dir = tmp_path / "run"
    with start_two(files, run_dir, tmp_path / "terminated", 200) as started:
        wait_for_steps(run_dir, started, tmp_path / "terminated", 2)
        os.kill(started[1].pid, signal.SIGTERM)
        assert wait_all(started, timeout=60) == [130, 130]
    saved = [sorted(int(p.name) for p in (run_dir / f"process-{i}").iterdir() if p.name.isdigit()) for i in range(2)]
    assert saved[0] == saved[1] and saved[0][-1] == len(losses(run_dir))
    terminated = records(run_dir)
    with start_two(files, run_dir, tmp_path / "killed", 200, "--resume") as started:
        wait_for_steps(run_dir, started, tmp_path / "killed", saved[0][-1] + 1)
        os.kill(started[1].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert wait_all(started[:1], timeout=60)[0] != 0
        assert time.monotonic() - killed_at < 60
    assert records(run_dir)[: len(terminated)] == terminated, "the resumed run did not continue from the saved step"
    run_two(files, run_dir, tmp_path / "resumed", len(single), "--resume")
    reached = losses(run_dir)
    assert len(reached) >= len(single)
    np.testing.assert_allclose(reached[: len(single)], single, rtol=RTOL)
