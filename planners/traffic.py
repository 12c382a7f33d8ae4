"""The bytes one training step of a plan moves between device groups, as `meshes.PlanExecutor` moves them.

Two kinds of traffic cross groups: activations forward and their gradients backward across every pipeline stage
edge, once per micro-batch; and the gradient sync, a ring over the stages that hold the same parameters (every
replica holds every block; a tied embedding is held by each replica's first stage and, in a pipeline, its last
too), each of `H` holders sending `2(H-1)/H` of those parameters' gradient bytes (the same under ZeRO: across holders
its reduce-scatter and all-gather move the bytes of the all-reduce they replace, and zero 3's collectives stay
inside a group). An edge whose sending stage
compresses carries the packed form both ways (`planners.compression`). The iteration-time model
(`planners.cost_model`) prices the same two patterns; this module gives their byte counts, for checking that the
runtime moves what the plan says.
"""

from __future__ import annotations

import dataclasses

from planners.cluster import ClusterSpec
from planners.compression import edge_bytes_per_token
from planners.cost_model import piece_holders, piece_params
from planners.model import ModelSpec
from planners.plan import Stage, TrainPlan


@dataclasses.dataclass(frozen=True)
class StepTraffic:
    """Bytes per step between device groups, and the part of them that crosses nodes."""

    between_groups: float
    between_nodes: float


def _pieces(plan: TrainPlan, model: ModelSpec) -> list[tuple[int, list[Stage]]]:
    """(parameter count, the stages holding it) for every block, the embedding and the head
    (`planners.cost_model.piece_holders`)."""
    return [
        (piece_params(model, piece), [plan.replicas[r].stages[s] for r, s in holders])
        for piece, holders in piece_holders(plan, model)
    ]


def step_traffic(
    plan: TrainPlan, cluster: ClusterSpec, model: ModelSpec, act_bytes: int, grad_bytes: int
) -> StepTraffic:
    """What one step of `plan` moves between groups: `act_bytes` per activation element across stage edges,
    `grad_bytes` per parameter in the gradient sync (an edge whose sending stage compresses: its codec's packed
    bytes)."""
    node_of = [d.node for d in cluster.devices]

    def nodes(stages: list[Stage]) -> set[int]:
        return {node_of[d] for s in stages for d in s.devices}

    groups = crossing = 0.0
    for replica in plan.replicas:
        tokens = replica.microbatch_size * plan.seq_len
        for a, b in zip(replica.stages, replica.stages[1:], strict=False):
            activation = tokens * edge_bytes_per_token(a.compress, model.hidden_size, act_bytes)
            moved = 2 * activation * replica.num_microbatches
            groups += moved
            crossing += moved if len(nodes([a, b])) > 1 else 0.0
    for params, holders in _pieces(plan, model):
        moved = 2 * (len(holders) - 1) * params * grad_bytes
        groups += moved
        crossing += moved if len(nodes(holders)) > 1 else 0.0
    return StepTraffic(groups, crossing)
