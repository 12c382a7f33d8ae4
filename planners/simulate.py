"""Discrete-event simulation of one pipeline replica's iteration under 1F1B or GPipe.

The cost model (and so the planner) uses the closed form `sum t_i + sum c_j + (m - 1) * max t_i`; this simulator
runs the actual schedule (every stage executes its forward and backward passes in schedule order, each waiting for
its input from the neighbouring stage plus the transfer) so the closed form can be checked against it and plans
can be compared under an exact schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

from planners.cluster import ClusterSpec
from planners.cost_model import TrainCosts, boundary_link, stage_links
from planners.model import ModelSpec
from planners.plan import Replica

FORWARD_SHARE = 1 / 3  # of a stage's forward+backward time without recomputation


def stage_order(stage: int, stages: int, microbatches: int, schedule: str) -> list[tuple[str, int]]:
    """The (pass, micro-batch) sequence one stage executes."""
    if schedule == "gpipe":
        return [("F", k) for k in range(microbatches)] + [("B", k) for k in range(microbatches)]
    warmup = min(stages - stage - 1, microbatches)
    order = [("F", k) for k in range(warmup)]
    for k in range(microbatches - warmup):
        order += [("F", warmup + k), ("B", k)]
    order += [("B", k) for k in range(microbatches - warmup, microbatches)]
    return order


def simulate_pipeline(
    forward_s: Sequence[float],
    backward_s: Sequence[float],
    transfer_s: Sequence[float],
    microbatches: int,
    schedule: str = "1f1b",
) -> float:
    """Makespan of one iteration: stage `i` takes `forward_s[i]` / `backward_s[i]` per micro-batch, and a message
    between stages `i` and `i + 1` takes `transfer_s[i]` in either direction."""
    p = len(forward_s)
    orders = [stage_order(i, p, microbatches, schedule) for i in range(p)]
    done: dict[tuple[str, int, int], float] = {}
    position, free = [0] * p, [0.0] * p
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for i in range(p):
            while position[i] < len(orders[i]):
                kind, k = orders[i][position[i]]
                if kind == "F":
                    dep = None if i == 0 else ("F", i - 1, k)
                    ready = 0.0 if dep is None else done.get(dep, -1.0) + transfer_s[i - 1]
                    duration = forward_s[i]
                else:
                    dep = ("F", i, k) if i == p - 1 else ("B", i + 1, k)
                    ready = done.get(dep, -1.0) + (0.0 if i == p - 1 else transfer_s[i])
                    duration = backward_s[i]
                if dep is not None and dep not in done:
                    break
                start = max(free[i], ready)
                free[i] = done[(kind, i, k)] = start + duration
                position[i] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise AssertionError("pipeline schedule deadlocked")
    return max(free)


def simulate_replica(
    replica: Replica, cluster: ClusterSpec, model: ModelSpec, seq_len: int, schedule: str = "1f1b"
) -> float:
    """Simulated iteration time of one replica of a plan, with the cost model's stage and transfer times."""
    costs = TrainCosts(cluster, model, seq_len)
    b, cp, depth, forward, backward, transfer = replica.microbatch_size, replica.cp, len(replica.stages), [], [], []
    for i, stage in enumerate(replica.stages):
        link, cp_link = stage_links(cluster, stage, cp)
        shape = (stage.kind, stage.tp, stage.num_layers, b)
        ends = (i == 0, i == depth - 1, link, cp, cp_link, stage.zero)
        plain = costs.stage_seconds(*shape, False, *ends)
        total = costs.stage_seconds(*shape, stage.recompute, *ends)
        forward.append(FORWARD_SHARE * plain)
        backward.append(total - FORWARD_SHARE * plain)
        if i + 1 < depth:
            following = replica.stages[i + 1]
            edge = costs.p2p_seconds(
                boundary_link(cluster, stage, following), b, stage.compress, (stage.kind, following.kind)
            )
            transfer.append(edge / 2)
    return simulate_pipeline(forward, backward, transfer, replica.num_microbatches, schedule)
