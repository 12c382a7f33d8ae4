"""Candidate stages of the training planner: aligned power-of-two device groups inside one node, each run as
`cp` context-parallel ranks of `tp` tensor-parallel devices."""

from __future__ import annotations

import dataclasses

from planners.cluster import ClusterSpec
from planners.model import ModelSpec


@dataclasses.dataclass(frozen=True)
class Group:
    """A candidate stage: `size` aligned devices of one node (indices into the planned cluster's device list), as
    `cp` context-parallel ranks of `tp = size / cp` devices (device `devices[c * tp + t]`: TP rank t of CP rank c)."""

    node: int
    devices: tuple[int, ...]
    kind: str
    cp: int = 1

    @property
    def size(self) -> int:
        return len(self.devices)

    @property
    def tp(self) -> int:
        return len(self.devices) // self.cp


Slot = tuple[list[tuple[Group, int, bool, int]], int]
"""A replica of a cell's plan: its stages (group, blocks, recompute, ZeRO stage) in pipeline order, and its
micro-batch count."""


def shapes(size: int, model: ModelSpec, seq_len: int) -> list[int]:
    """The CP degrees a group of `size` devices may run `model` with: powers of two dividing `size` and `seq_len`
    whose TP degree `size / cp` the model supports."""
    return [cp for cp in _powers_up_to(size) if size % cp == 0 and seq_len % cp == 0 and model.supports_tp(size // cp)]


def _powers_up_to(n: int) -> list[int]:
    return [1 << k for k in range(n.bit_length()) if 1 << k <= n]


def candidate_groups(cluster: ClusterSpec, model: ModelSpec, seq_len: int) -> list[Group]:
    """Every aligned power-of-two group inside every node, in every (tp, cp) shape `model` and `seq_len` allow
    (`shapes`), ordered by first device, size, then CP degree."""
    groups = []
    for n, (node, offset) in enumerate(zip(cluster.nodes, cluster.node_offsets(), strict=True)):
        for size in _powers_up_to(node.count):
            for k in range(node.count // size):
                start = offset + k * size
                devices = tuple(range(start, start + size))
                groups += [Group(n, devices, node.kind, cp) for cp in shapes(size, model, seq_len)]
    return sorted(groups, key=lambda g: (g.devices[0], g.size, g.cp))
