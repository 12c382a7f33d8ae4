"""How the training planner divides a cluster: identical cells (planned once, repeated), and subsets of its nodes
(quick solves that warm-start the whole).

A split into `k` cells gives each cell `len(nodes) // k` nodes of every node class, in listed order (with a
topology, ordered by their switches first, so that a cell takes the nodes of one rack, one pod, before the next's,
whatever the order in the file); nodes left over stay idle. Only splits whose cells can hold the model's weights,
gradients and optimizer state are tried, so a decomposition never turns a feasible problem into an infeasible one
for lack of memory alone.
"""

from __future__ import annotations

import dataclasses

from planners.cluster import ClusterSpec
from planners.cost_model import STATE_BYTES_PER_PARAM
from planners.errors import PlanningError
from planners.model import ModelSpec
from planners.train_model import Cell
from planners.workload import TrainWorkload

WHOLE_CLUSTER_DEVICES = 32
MAX_MODEL_DEVICES = 64  # no CP-SAT model spans more devices: its arcs grow with the square of the groups


def state_bytes(model: ModelSpec) -> float:
    """Weights, gradients and optimizer state of the whole model (one copy: every plan holds at least this)."""
    return STATE_BYTES_PER_PARAM * model.num_params


def usable_bytes(cluster: ClusterSpec) -> float:
    """The usable memory of all devices together."""
    return sum(n.count * cluster.profile(n.kind).capacity_bytes for n in cluster.nodes)


def split_cell(cluster: ClusterSpec, k: int) -> Cell | None:
    """`cluster` split into `k` identical cells, each taking `len(nodes) // k` nodes of every node class (the nodes
    left over stay idle), with the topology level all cells' nodes span; None if the cells would be empty."""
    offsets, topology = cluster.node_offsets(), cluster.topology
    classes = [
        sorted(nodes, key=lambda n: topology.sort_key(cluster.nodes[n].name)) for nodes in cluster.node_classes()
    ]
    per = [len(nodes) // k for nodes in classes]
    if not any(per):
        return None
    chosen = [
        sorted(n for nodes, q in zip(classes, per, strict=True) for n in nodes[c * q : (c + 1) * q]) for c in range(k)
    ]
    maps = tuple(tuple(offsets[n] + i for n in nodes for i in range(cluster.nodes[n].count)) for nodes in chosen)
    level = cluster.level_of(n for nodes in chosen for n in nodes)
    return Cell(dataclasses.replace(cluster, nodes=tuple(cluster.nodes[n] for n in chosen[0])), k, maps, level)


def _splits(
    cluster: ClusterSpec, model: ModelSpec, workload: TrainWorkload, use_all: bool
) -> list[tuple[int, int, int]]:
    """`(devices per cell, idle devices, k)` of every split into `k > 1` cells that hold the model's state and
    divide the batch (and leave no device idle, with `use_all`)."""
    state = state_bytes(model)
    out = []
    for k in range(max(len(nodes) for nodes in cluster.node_classes()), 1, -1):
        cell = split_cell(cluster, k)
        if cell is None or workload.global_batch % k or usable_bytes(cell.cluster) < state:
            continue
        idle = cluster.num_devices - k * cell.cluster.num_devices
        if not (use_all and idle):
            out.append((cell.cluster.num_devices, idle, k))
    return out


def cell_splits(
    cluster: ClusterSpec, model: ModelSpec, workload: TrainWorkload, max_cell_devices: int, use_all: bool
) -> list[int]:
    """Numbers of identical cells worth trying, finest first, the whole cluster (1) last when tried: of the splits
    (`_splits`) into cells of at most `max_cell_devices` devices, those leaving the fewest devices idle; or else
    the two splits into the smallest cells of at most `MAX_MODEL_DEVICES` devices (where memory binds, a little more
    room per cell pays); 1 if the cluster has at most `WHOLE_CLUSTER_DEVICES` devices, or no split qualifies and it
    has at most `MAX_MODEL_DEVICES`."""
    splits = _splits(cluster, model, workload, use_all)
    small = [s for s in splits if s[0] <= max_cell_devices]
    if small:
        least = min(idle for _, idle, _ in small)
        ks = [k for _, idle, k in small if idle == least]
    else:
        ks = [k for _, _, k in sorted(s for s in splits if s[0] <= MAX_MODEL_DEVICES)[:2]]
    if cluster.num_devices <= WHOLE_CLUSTER_DEVICES or (not ks and cluster.num_devices <= MAX_MODEL_DEVICES):
        ks.append(1)
    if not ks:
        raise PlanningError(
            f"no split of the cluster into identical cells of at most {MAX_MODEL_DEVICES} devices holds "
            f"{model.name}'s weights, gradients and optimizer state and divides global_batch {workload.global_batch}"
        )
    return ks


def coarser_splits(
    cluster: ClusterSpec, model: ModelSpec, workload: TrainWorkload, tried: list[int], use_all: bool
) -> list[int]:
    """The splits into fewer cells than any tried (cells of at most `MAX_MODEL_DEVICES`), finest first: the
    fallback when the tried ones leave no plan."""
    splits = _splits(cluster, model, workload, use_all)
    coarser = [k for devices, _, k in splits if k < min(tried) and devices <= MAX_MODEL_DEVICES]
    return coarser + ([1] if 1 not in tried and cluster.num_devices <= MAX_MODEL_DEVICES else [])


def subsets(cluster: ClusterSpec) -> list[tuple[ClusterSpec, tuple[int, ...]]]:
    """For each node class, the cluster without one of its nodes and (with several classes) without the whole
    class, each with the original index of every device left."""
    offsets, classes = cluster.node_offsets(), cluster.node_classes()
    drops = {(members[-1],) for members in classes}
    if len(classes) > 1:
        drops |= {tuple(members) for members in classes}
    return [
        cluster.without_devices([offsets[n] + i for n in nodes for i in range(cluster.nodes[n].count)])
        for nodes in sorted(drops)
        if len(nodes) < len(cluster.nodes)
    ]
