"""HSPMD plans run as several real JAX processes on 127.0.0.1 (gloo): one step's loss and every gradient shard,
checked on the process that holds it, equal one device (float32, relative error <= 1e-5: the plans only reorder
sums)."""

import json

import pytest

from tests.multiprocess.launch import ROOT, free_port, python, run

WORKER = ROOT / "tests" / "multiprocess" / "hspmd_step.py"
RTOL = 1e-5


def run_cases(tmp_path, num_processes: int, cases: list[str]) -> list[dict]:
    port = free_port()
    outs = [tmp_path / f"result{i}.json" for i in range(num_processes)]
    commands = [
        python(WORKER, str(i), str(num_processes), str(port), ",".join(cases), str(outs[i]))
        for i in range(num_processes)
    ]
    run(commands, tmp_path / "logs", timeout=480)
    return [json.loads(out.read_text()) for out in outs]


def check(results: list[dict], case: str) -> None:
    per_process = [r[case] for r in results]
    for r in per_process:
        assert r["loss_error"] <= RTOL
        assert r["grad_error"] <= RTOL
        assert r["bytes_between_processes"] > 0
    checked = {leaf for r in per_process for leaf, _ in r["shards"]}
    assert len(checked) == per_process[0]["leaves"], "some gradient leaf was checked on no process"


@pytest.mark.slow
def test_two_processes_tp4_feeding_tp2_cp_and_dp_equal_one_device(tmp_path):
    cases = ["tp4_feeds_tp2_beside_dp", "cp2_beside_pipelines_across_processes"]
    results = run_cases(tmp_path, 2, cases)
    for case in cases:
        check(results, case)


@pytest.mark.slow
def test_four_processes_equal_one_device(tmp_path):
    results = run_cases(tmp_path, 4, ["four_nodes_tp2_pipeline_cp2_dp"])
    check(results, "four_nodes_tp2_pipeline_cp2_dp")
