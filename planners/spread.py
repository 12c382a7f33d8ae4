"""How far a training plan's communication groups spread over the cluster's topology (`planners.topology`).

A group's spread is the topology level its devices' nodes span (`ClusterSpec.level_of`: 0 inside one node, 1 in
one rack, ..., `topology.top` across the top). The communication groups of a plan and their maxima:
- `stage`: every stage's TP groups and CP groups (together, the stage's devices);
- `pp`: every replica's pipeline (the devices of all its stages);
- `dp`: for every block, the data-parallel group of the replicas' stages holding it (the devices that reduce its
  gradients).
`max` is the maximum over all groups, the figure Arnold (arXiv 2509.15940) minimises; every group lies inside the
plan and the groups chain all of its devices together, so it equals the level of all the plan's nodes.

The training planner minimises the iteration time first and, with a topology, `max + pp` second (one CP-SAT tick
per level, `planners.train_model.SPREAD_TICKS`; between whole plans, lexicographically: see `planners.train`).
"""

from __future__ import annotations

import dataclasses

from planners.cluster import ClusterSpec
from planners.plan import TrainPlan


@dataclasses.dataclass(frozen=True)
class Spread:
    """The highest topology level any stage (TP/CP), pipeline or data-parallel group of a plan spans."""

    stage: int
    pp: int
    dp: int

    @property
    def max(self) -> int:
        return max(self.stage, self.pp, self.dp)

    @property
    def score(self) -> int:
        """What the planner minimises second: `max + pp`."""
        return self.max + self.pp

    def describe(self, cluster: ClusterSpec) -> str:
        """E.g. 'stage node, pipeline rack, data-parallel pod (max pod)'."""
        names = level_names(cluster)
        return (
            f"stage {names[self.stage]}, pipeline {names[self.pp]}, data-parallel {names[self.dp]} "
            f"(max {names[self.max]})"
        )


def level_names(cluster: ClusterSpec) -> list[str]:
    """The name of each level, from the node (0) up to the top (`topology.top`: across the top level)."""
    top = cluster.topology.levels[-1].name if cluster.topology.levels else "node"
    return ["node", *(lv.name for lv in cluster.topology.levels), f"across {top}s"]


def plan_spread(plan: TrainPlan, cluster: ClusterSpec) -> Spread:
    """The spread of `plan`'s communication groups over `cluster` (whose device indices the plan uses)."""
    node = [d.node for d in cluster.devices]

    def level(devices: list[int]) -> int:
        return cluster.level_of(node[d] for d in devices)

    stage = max(level(list(s.devices)) for r in plan.replicas for s in r.stages)
    pp = max(level(list(r.devices)) for r in plan.replicas)
    dp = max(
        level([d for r in plan.replicas for s in r.stages if s.layers[0] <= block < s.layers[1] for d in s.devices])
        for block in range(plan.num_layers)
    )
    return Spread(stage, pp, dp)
