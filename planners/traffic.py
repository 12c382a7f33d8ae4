"""The bytes one training step of a plan moves between device groups, as `meshes.PlanExecutor` moves them.

Two kinds of traffic cross groups: activations forward and their gradients backward across every pipeline stage
edge, once per micro-batch; and the gradient sync, a ring over the stages that hold the same parameters (every
replica holds every block; a tied embedding is held by each replica's first stage and, in a pipeline, its last
too), each of `H` holders sending `2(H-1)/H` of those parameters' gradient bytes. An edge whose sending stage
compresses carries the packed form both ways (`planners.compression`). The iteration-time model
(`planners.cost_model`) prices the same two patterns; this module gives their byte counts, for checking that the
runtime moves what the plan says.
"""

from __future__ import annotations

import dataclasses

from planners.cluster import ClusterSpec
from planners.compression import edge_bytes_per_token
from planners.model import ModelSpec
from planners.plan import Stage, TrainPlan


@dataclasses.dataclass(frozen=True)
class StepTraffic:
    """Bytes per step between device groups, and the part of them that crosses nodes."""

    between_groups: float
    between_nodes: float


def _pieces(plan: TrainPlan, model: ModelSpec) -> list[tuple[int, list[Stage]]]:
    """(parameter count, the stages holding it) for every block, the embedding and the head."""
    pieces = []
    for layer in range(plan.num_layers):
        holders = [s for r in plan.replicas for s in r.stages if s.layers[0] <= layer < s.layers[1]]
        pieces.append((model.layer_params, holders))
    embedding = [r.stages[0] for r in plan.replicas]
    lasts = [r.stages[-1] for r in plan.replicas]
    if model.tied_embeddings:
        embedding += [r.stages[-1] for r in plan.replicas if len(r.stages) > 1]
        pieces.append((model.hidden_size, lasts))  # the final norm
    else:
        pieces.append((model.head_params, lasts))
    pieces.append((model.embedding_params, embedding))
    return pieces


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
