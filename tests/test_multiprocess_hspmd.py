"""HSPMD plans run as several real JAX processes on 127.0.0.1 (gloo): one step's loss and every gradient shard,
checked on the process that holds it, equal one device (float32, relative error <= 1e-5: the plans only reorder
sums)."""

import json

import pytest

from tests.multiprocess.launch import ROOT, free_port, python, run

WORKER = ROOT / "tests" / "multiprocess" / "hspmd_step.py"
RTOL = 1e-5
# After four AdamW steps (the plan-switching case compares parameters, not gradients), the ~1e-7 differences of
# reordered sums grow through Adam's division by sqrt(v): 1e-4, as for the training trajectories.
STEPS_RTOL = 1e-4


EXACT_CASES = ["tp4_feeds_tp2_beside_dp", "cp2_beside_pipelines_across_processes", "switch", "asymmetric_dp", "elastic"]
INT4_CASE = "int4_hadamard_edge_across_processes"


def run_cases(directory, num_processes: int, cases: list[str]) -> list[dict]:
    """Every case in one set of processes, one after the other (they share the processes' start-up and the
    compilation cache); each process's results."""
    port = free_port()
    outs = [directory / f"result{i}.json" for i in range(num_processes)]
    commands = [
        python(WORKER, str(i), str(num_processes), str(port), ",".join(cases), str(outs[i]))
        for i in range(num_processes)
    ]
    run(commands, directory / "logs", timeout=720, compilation_cache=directory / "compilation-cache")
    return [json.loads(out.read_text()) for out in outs]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    """The results of every two-process case, from one pair of processes."""
    return run_cases(tmp_path_factory.mktemp("two_processes"), 2, [*EXACT_CASES, INT4_CASE])


def check(results: list[dict], case: str, rtol: float = RTOL) -> None:
    per_process = [r[case] for r in results]
    for r in per_process:
        assert r["loss_error"] <= rtol
        assert r["grad_error"] <= rtol
        if "processes" in r:  # one SPMD program: its devices span the processes
            assert r["processes"] == list(range(len(results)))
        else:
            assert r["bytes_between_processes"] > 0
    checked = {leaf for r in per_process for leaf, _ in r["shards"]}
    assert len(checked) == per_process[0]["leaves"], "some gradient leaf was checked on no process"


@pytest.mark.slow
def test_two_processes_tp4_feeding_tp2_cp_dp_switching_asymmetric_dp_and_elastic_drop_equal_one_device(
    two_processes,
):
    """Besides single steps: four AdamW steps alternating between the two plans (state resharded between their
    layouts across processes; losses and final parameters against one device), one SPMD program with per-device
    trip counts over devices of both processes, and an elastic drop: two of process 0's devices, half of replica 0,
    fail (their buffers deleted) and the steps continue over the survivors of both processes from the replicas that
    survived on process 1, equal to one device throughout."""
    for case in EXACT_CASES:
        check(two_processes, case, STEPS_RTOL if case in ("switch", "elastic") else RTOL)
    assert two_processes[0]["elastic"]["deleted_on_failed_devices"] > 0, "no buffer on the failed devices was deleted"


@pytest.mark.slow
def test_four_processes_equal_one_device(tmp_path):
    results = run_cases(tmp_path, 4, ["four_nodes_tp2_pipeline_cp2_dp"])
    check(results, "four_nodes_tp2_pipeline_cp2_dp")


@pytest.mark.slow
def test_two_processes_carry_an_int4_hadamard_edge_packed(two_processes):
    """A stage edge from process 0's TP-4 stage to process 1's TP-2 stage in int4_hadamard: the step runs on both
    processes, its loss is within the quantization error of one device's, and what crossed processes is the
    plan's charge for the packed edge plus the gradient sync."""
    for result in two_processes:
        r = result[INT4_CASE]
        assert r["loss_error"] <= 2e-2 and r["finite_local_grads"]
        assert r["bytes_between_processes"] == pytest.approx(r["charged_between_nodes"], rel=0.05)
