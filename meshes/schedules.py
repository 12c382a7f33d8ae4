"""Pipeline schedules as a global order of (stage, pass, micro-batch) steps that respects every dependency.

Forward of micro-batch m on stage s needs its forward on stage s-1; backward on stage s needs the backward on
stage s+1 and its own forward. GPipe runs all forwards, then all backwards. 1F1B lets stage s run
`num_stages - s - 1` warm-up forwards and then alternate one forward with one backward, which bounds the
activations a stage keeps to its depth instead of the micro-batch count.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Pass = Literal["F", "B"]


class Step(NamedTuple):
    tick: int
    stage: int
    kind: Pass
    microbatch: int


def stage_program_order(num_stages: int, num_microbatches: int, stage: int, schedule: str) -> list[tuple[Pass, int]]:
    """The sequence of passes one stage runs under `schedule` ("gpipe" or "1f1b")."""
    forwards = [("F", m) for m in range(num_microbatches)]
    backwards = [("B", m) for m in range(num_microbatches)]
    if schedule == "gpipe":
        return forwards + backwards
    if schedule != "1f1b":
        raise ValueError(f"schedule must be one of gpipe, 1f1b, got {schedule!r}")
    warmup = min(num_stages - stage - 1, num_microbatches)
    order = forwards[:warmup]
    for m in range(warmup, num_microbatches):
        order += [forwards[m], backwards[m - warmup]]
    return order + backwards[num_microbatches - warmup :]


def pipeline_steps(num_stages: int, num_microbatches: int, schedule: str) -> list[Step]:
    """All steps in tick order: at each tick every stage runs its next pass if its inputs are ready."""
    programs = [stage_program_order(num_stages, num_microbatches, s, schedule) for s in range(num_stages)]
    position = [0] * num_stages
    done: set[tuple[int, Pass, int]] = set()
    steps: list[Step] = []
    tick = 0
    while any(position[s] < len(programs[s]) for s in range(num_stages)):
        ready = []
        for s in range(num_stages):
            if position[s] == len(programs[s]):
                continue
            kind, m = programs[s][position[s]]
            if kind == "F":
                needs = [(s - 1, "F", m)] if s > 0 else []
            else:
                needs = [(s, "F", m)] + ([(s + 1, "B", m)] if s < num_stages - 1 else [])
            if all(n in done for n in needs):
                ready.append(Step(tick, s, kind, m))
        if not ready:
            raise RuntimeError(f"schedule {schedule!r} deadlocks at tick {tick}")
        for step in ready:
            done.add((step.stage, step.kind, step.microbatch))
            position[step.stage] += 1
        steps += ready
        tick += 1
    return steps
