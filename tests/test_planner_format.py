"""The plan format: construction checks, JSON round trip, errors naming the field, HSPMD-shaped strategies."""

import dataclasses
import json
import re

import pytest

from planners import PlanError, PlanEstimate, Replica, SolveInfo, Stage, TrainPlan


def hspmd_like() -> TrainPlan:
    """A scaled-down strategy in the shape of HSPMD's 24xH20 + 15xH800 example: three replicas of depths 4, 3, 4,
    uneven layer counts and micro-batch counts, on 16 devices."""

    def stages(spec: list[tuple[tuple[int, ...], str, int, int]]) -> tuple[Stage, ...]:
        out, start = [], 0
        for devices, kind, tp, layers in spec:
            out.append(Stage(devices, kind, tp, (start, start + layers)))
            start += layers
        return tuple(out)

    return TrainPlan(
        replicas=(
            Replica(
                stages([((0,), "H20", 1, 7), ((1,), "H20", 1, 7), ((2, 3), "H800", 2, 23), ((4, 5), "H800", 2, 23)]),
                29,
                1,
            ),
            Replica(stages([((6,), "H20", 1, 11), ((7,), "H20", 1, 11), ((8, 9), "H800", 2, 38)]), 18, 1),
            Replica(
                stages(
                    [((10,), "H20", 1, 12), ((11,), "H20", 1, 11), ((12, 13), "H800", 2, 24), ((14,), "H800", 1, 13)]
                ),
                17,
                1,
                cp=1,
            ),
        ),
        num_layers=60,
        global_batch=64,
        seq_len=4096,
        estimate=PlanEstimate(1.5, (1.2, 1.4, 1.3), 0.1, ((1.0, 2.0, 3.0, 4.0), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0, 4.0))),
    )


def test_hspmd_strategy_is_expressible_and_round_trips() -> None:
    plan = hspmd_like()
    assert plan.layer_counts() == [[7, 7, 23, 23], [11, 11, 38], [12, 11, 24, 13]]
    assert [r.num_microbatches for r in plan.replicas] == [29, 18, 17]
    assert TrainPlan.from_json(plan.to_json()) == plan
    data = json.loads(plan.to_json())
    assert data["format"] == "jaxhet.train_plan" and data["version"] == 4 and data["solve"] is None
    assert data["replicas"][0]["stages"][2] == {
        "devices": [2, 3],
        "kind": "H800",
        "tp": 2,
        "layers": [14, 37],
        "recompute": False,
        "zero": 0,
        "compress": "none",
    }


def test_context_parallel_devices() -> None:
    stage = Stage((0, 1, 2, 3), "H100", 2, (0, 4))
    replica = Replica((stage,), 2, 1, cp=2)
    assert replica.devices == (0, 1, 2, 3)
    with pytest.raises(PlanError, match=r"stages\[0\].devices has 4 devices but tp \* cp = 4 \* 2 = 8"):
        Replica((Stage((0, 1, 2, 3), "H100", 4, (0, 4)),), 2, 1, cp=2)


def mutate(path: list, value: object) -> dict:
    data = json.loads(hspmd_like().to_json())
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["replicas", 1, "stages", 0, "tp"], 0, "replicas[1].stages[0].tp must be a positive integer"),
        (
            ["replicas", 1, "stages", 0, "devices"],
            [0],
            "replicas[1].stages[0].devices[0]: device 0 is already used by replicas[0].stages[0]",
        ),
        (
            ["replicas", 0, "stages", 1, "layers"],
            [8, 14],
            "replicas[0].stages[1].layers starts at 8 but the previous stage stops at 7",
        ),
        (
            ["replicas", 2, "stages", 3, "layers"],
            [47, 59],
            "replicas[2].stages[3].layers stops at 59 but num_layers is 60",
        ),
        (["replicas", 0, "num_microbatches"], 30, "sum to 65, but global_batch is 64"),
        (["replicas", 0, "microbatch_size"], -1, "replicas[0].microbatch_size must be a positive integer"),
        (["replicas", 0, "stages", 0, "kind"], "", "replicas[0].stages[0].kind must be a non-empty GPU kind name"),
        (["replicas", 0, "stages", 0, "speed"], 3, "replicas[0].stages[0]: unknown field(s) ['speed']"),
        (["schedule"], "zigzag", "schedule must be one of ['1f1b', 'gpipe']"),
        (["replicas", 1, "stages", 0, "zero"], 2, "replicas[1].stages[0].zero must be one of [0, 1, 3], got 2"),
        (["version"], 7, "version must be one of [1, 2, 3, 4]"),
        (["solve"], {"status": "PROVEN"}, "solve: missing required field(s) ['lower_bound_s'"),
        (["replicas"], [], "replicas must not be empty"),
        (["device_kinds"], "H100", "device_kinds must be a list of GPU kind names, got 'H100'"),
    ],
)
def test_errors_name_the_field(path: list, value: object, message: str) -> None:
    with pytest.raises(PlanError) as err:
        TrainPlan.from_dict(mutate(path, value))
    assert message in str(err.value)


def test_device_kinds_are_checked() -> None:
    plan = hspmd_like()
    kinds = tuple(["H20"] * 2 + ["H800"] * 4 + ["H20"] * 2 + ["H800"] * 2 + ["H20"] * 2 + ["H800"] * 3)
    data = json.loads(plan.to_json())
    data["device_kinds"] = list(kinds)
    assert TrainPlan.from_dict(data).device_kinds == kinds
    data["device_kinds"][0] = "L4"
    with pytest.raises(PlanError, match="replicas\\[0\\].stages\\[0\\].kind is 'H20' but device 0 is 'L4'"):
        TrainPlan.from_dict(data)
    with pytest.raises(PlanError, match="not valid JSON"):
        TrainPlan.from_json("{")


SOLVE = SolveInfo("FEASIBLE", 1.25, 0.2, 3.1, 5.0, 1, 2, 3)


def test_solve_info_round_trips_and_version_1_plans_still_load() -> None:
    plan = dataclasses.replace(hspmd_like(), solve=SOLVE)
    assert TrainPlan.from_json(plan.to_json()) == plan
    data = json.loads(plan.to_json())
    data["version"] = 1
    del data["solve"]
    assert TrainPlan.from_dict(data) == hspmd_like()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("status", "PROVEN", "solve.status must be one of ['OPTIMAL', 'FEASIBLE']"),
        ("gap", -0.1, "solve.gap must be a non-negative number"),
        ("cells", 0, "solve.cells must be a positive integer"),
    ],
)
def test_solve_info_errors_name_the_field(field: str, value: object, message: str) -> None:
    data = json.loads(dataclasses.replace(hspmd_like(), solve=SOLVE).to_json())
    data["solve"][field] = value
    with pytest.raises(PlanError, match=re.escape(message)):
        TrainPlan.from_dict(data)
