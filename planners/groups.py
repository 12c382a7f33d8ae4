"""Candidate stages of the training planner: aligned power-of-two TP groups inside one node."""

from __future__ import annotations

import dataclasses

from planners.cluster import ClusterSpec
from planners.model import ModelSpec


@dataclasses.dataclass(frozen=True)
class Group:
    """A candidate stage: `tp` aligned devices of one node (indices into the planned cluster's device list)."""

    node: int
    devices: tuple[int, ...]
    kind: str

    @property
    def tp(self) -> int:
        return len(self.devices)


Slot = tuple[list[tuple[Group, int, bool]], int]
"""A replica of a cell's plan: its stages (group, blocks, recompute) in pipeline order, and its micro-batch count."""


def candidate_groups(cluster: ClusterSpec, model: ModelSpec) -> list[Group]:
    """Every aligned power-of-two group inside every node whose size `model` can use as its TP degree, ordered by
    first device then size."""
    groups = []
    for n, (node, offset) in enumerate(zip(cluster.nodes, cluster.node_offsets(), strict=True)):
        tp = 1
        while tp <= node.count and model.supports_tp(tp):
            for k in range(node.count // tp):
                start = offset + k * tp
                groups.append(Group(n, tuple(range(start, start + tp)), node.kind))
            tp *= 2
    return sorted(groups, key=lambda g: (g.devices[0], g.tp))
