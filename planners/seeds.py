"""Starting points for the training solver: regular plans built by rule, to hint CP-SAT and to fall back on.

Each seed uses one kind of node (or all), one TP degree everywhere, and replicas of equal depth made of
consecutive groups; blocks are split in proportion to each stage's speed and micro-batches in proportion to each
replica's throughput. All seeds lie in the planner's search space. They are not optimised: CP-SAT improves on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from planners.cluster import ClusterSpec
from planners.cost_model import TrainCosts
from planners.groups import Group, Slot, candidate_groups
from planners.model import ModelSpec


def _split(total: int, weights: list[float]) -> list[int] | None:
    """`total` split into positive integers roughly proportional to `weights` (largest remainder), or None."""
    if total < len(weights):
        return None
    spare = total - len(weights)
    raw = [spare * w / sum(weights) for w in weights]
    parts = [1 + math.floor(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)[: total - sum(parts)]:
        parts[i] += 1
    return parts


def seed_slots(
    cluster: ClusterSpec, model: ModelSpec, seq_len: int, microbatch: int, microbatches: int, recompute: bool
) -> Iterator[list[Slot]]:
    """Regular plans for one cell (memory not checked)."""
    costs = TrainCosts(cluster, model, seq_len)
    classes = cluster.node_classes()
    subsets = [list(range(len(cluster.nodes)))] + (classes if len(classes) > 1 else [])
    candidates = candidate_groups(cluster, model)
    for nodes in subsets:
        tp = 1
        while tp <= max(cluster.nodes[n].count for n in nodes):
            groups = [g for g in candidates if g.node in nodes and g.tp == tp]
            depth = 1
            while depth <= min(len(groups), model.num_layers):
                replicas = [groups[i : i + depth] for i in range(0, len(groups) - depth + 1, depth)]
                for rc in (False, True) if recompute else (False,):
                    slots = _balanced(costs, cluster, replicas, microbatch, microbatches, rc)
                    if slots is not None:
                        yield slots
                depth *= 2
            tp *= 2


def _balanced(
    costs: TrainCosts,
    cluster: ClusterSpec,
    replicas: list[list[Group]],
    microbatch: int,
    microbatches: int,
    recompute: bool,
) -> list[Slot] | None:
    layers_of, slowest = [], []
    for stages in replicas:
        per_layer = [
            costs.layer_seconds(g.kind, g.tp, microbatch, recompute, cluster.nodes[g.node].intra_link) for g in stages
        ]
        layers = _split(costs.model.num_layers, [1 / t for t in per_layer])
        if layers is None:
            return None
        layers_of.append(layers)
        slowest.append(max(n * t for n, t in zip(layers, per_layer, strict=True)))
    counts = _split(microbatches, [1 / t for t in slowest])
    if counts is None:
        return None
    return [
        ([(g, n, recompute) for g, n in zip(stages, layers, strict=True)], count)
        for stages, layers, count in zip(replicas, layers_of, counts, strict=True)
    ]
