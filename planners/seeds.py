"""Starting points for the training solver: regular plans built by rule, to hint CP-SAT and to fall back on.

Each seed uses one class of nodes (or all), one group size per node class, one CP degree (the smallest that
fits), one recomputation flag and one ZeRO stage for all its stages, and replicas of equal depth made of consecutive
groups (reversed where that does not fit); blocks are split to minimise the slowest stage (the LM head counted on
the last) within each stage's memory (moments split inside the stage: the caller checks the plan with its moments
split across holders), and micro-batches in proportion to each replica's throughput. All seeds lie in the
planner's search space; CP-SAT starts from the best of them and improves on it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

from planners.cluster import ClusterSpec
from planners.cost_model import TrainCosts, in_flight
from planners.groups import Group, Slot, candidate_groups, shapes
from planners.model import ModelSpec

MAX_DEPTH = 8


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
    cluster: ClusterSpec,
    model: ModelSpec,
    seq_len: int,
    microbatch: int,
    microbatches: int,
    recompute: bool,
    zero_stages: tuple[int, ...] = (0,),
) -> Iterator[list[Slot]]:
    """Regular plans for one cell (layer splits within memory under 1F1B; the caller checks the whole plan), with
    each of `zero_stages` on all stages."""
    costs = TrainCosts(cluster, model, seq_len)
    classes = cluster.node_classes()
    candidates = candidate_groups(cluster, model, seq_len)
    subsets = [classes] + ([[c] for c in classes] if len(classes) > 1 else [])
    for chosen in subsets:
        options = [[d for d in _degrees(cluster.nodes[c[0]].count) if shapes(d, model, seq_len)] or [1] for c in chosen]
        for sizes in itertools.product(*options):
            size_of = {n: size for c, size in zip(chosen, sizes, strict=True) for n in c}
            for cp in sorted(set.intersection(*(set(shapes(size, model, seq_len)) for size in sizes))):
                groups = [g for g in candidates if size_of.get(g.node) == g.size and g.cp == cp]
                found = [
                    slots
                    for zero in zero_stages
                    for slots in _seeds_of(costs, cluster, groups, microbatch, microbatches, recompute, zero)
                ]
                yield from found
                if found:  # larger CP degrees are left to CP-SAT once a smaller one fits
                    break


def _seeds_of(
    costs: TrainCosts,
    cluster: ClusterSpec,
    groups: list[Group],
    microbatch: int,
    microbatches: int,
    recompute: bool,
    zero: int,
) -> Iterator[list[Slot]]:
    """The seeds over `groups` with ZeRO stage `zero`: replicas of every depth made of consecutive groups,
    recomputing or not; in device order, or reversed where that does not fit and kinds differ (the stage nearer
    the end holds fewer micro-batches in flight)."""
    mixed = len({g.kind for g in groups}) > 1
    for depth in range(1, min(len(groups), costs.model.num_layers, MAX_DEPTH) + 1):
        for rc in (False, True) if recompute else (False,):
            for ordered in (groups, groups[::-1]) if mixed else (groups,):
                replicas = [ordered[i : i + depth] for i in range(0, len(ordered) - depth + 1, depth)]
                slots = _balanced(costs, cluster, replicas, microbatch, microbatches, rc, zero)
                if slots is not None:
                    yield slots
                    break


def _degrees(count: int) -> list[int]:
    """The group sizes seeds use on a node of `count` GPUs: powers of two from a quarter of the node up."""
    out, tp = [], 1
    while tp <= count:
        if 4 * tp >= count:
            out.append(tp)
        tp *= 2
    return out


def _minmax_split(total: int, per_item: list[float], extra: list[float], caps: list[int]) -> list[int] | None:
    """`total` items over stages (each at least one, at most `caps[i]`) minimising the slowest stage
    `n_i * per_item[i] + extra[i]`; None if the caps leave no such split."""
    if total < len(per_item) or min(caps) < 1 or sum(caps) < total:
        return None

    def fits(limit: float) -> list[int]:
        return [
            min(cap, max(0, math.floor((limit - e) / t + 1e-9)))
            for t, e, cap in zip(per_item, extra, caps, strict=True)
        ]

    lo = max(t + e for t, e in zip(per_item, extra, strict=True))
    hi = total * max(per_item) + max(extra)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if sum(fits(mid)) >= total else (mid, hi)
    counts = fits(hi)
    for i in sorted(range(len(counts)), key=lambda i: per_item[i], reverse=True):
        surplus = sum(counts) - total
        counts[i] -= min(surplus, counts[i] - 1)
    return counts


def _memory_caps(
    costs: TrainCosts,
    cluster: ClusterSpec,
    stages: list[Group],
    microbatch: int,
    microbatches: int,
    recompute: bool,
    zero: int,
) -> list[int]:
    """The most blocks each stage of a replica holds within its devices' usable memory under 1F1B (with as many
    micro-batches in flight as the cell's count allows: never fewer than the replica will have), its moments split
    inside the stage."""
    caps = []
    for i, g in enumerate(stages):
        held = in_flight("1f1b", len(stages), i, microbatches)
        ends = (held, i == 0, i == len(stages) - 1, g.cp, zero)
        fixed = costs.stage_memory_bytes(g.tp, 1, microbatch, recompute, *ends)
        per_block = costs.stage_memory_bytes(g.tp, 2, microbatch, recompute, *ends) - fixed
        fixed -= per_block
        caps.append(math.floor((cluster.profile(g.kind).capacity_bytes - fixed) / per_block))
    return caps


def _balanced(
    costs: TrainCosts,
    cluster: ClusterSpec,
    replicas: list[list[Group]],
    microbatch: int,
    microbatches: int,
    recompute: bool,
    zero: int,
) -> list[Slot] | None:
    layers_of, slowest = [], []
    for stages in replicas:
        links = [cluster.nodes[g.node].intra_link for g in stages]
        per_layer = [
            costs.layer_seconds(g.kind, g.tp, microbatch, recompute, link, g.cp, link, zero)
            for g, link in zip(stages, links, strict=True)
        ]
        last, first = stages[-1], stages[0]
        head = [0.0] * len(stages)
        head[-1] += costs.head_seconds(last.kind, last.tp, microbatch, last.cp, links[-1], zero, links[-1])
        head[0] += costs.embed_seconds(first.tp, first.cp, links[0], zero, links[0])
        caps = _memory_caps(costs, cluster, stages, microbatch, microbatches, recompute, zero)
        layers = _minmax_split(costs.model.num_layers, per_layer, head, caps)
        if layers is None:
            return None
        layers_of.append(layers)
        slowest.append(max(n * t + h for n, t, h in zip(layers, per_layer, head, strict=True)))
    counts = _split(microbatches, [1 / t for t in slowest])
    if counts is None:
        return None
    return [
        ([(g, n, recompute, zero) for g, n in zip(stages, layers, strict=True)], count)
        for stages, layers, count in zip(replicas, layers_of, counts, strict=True)
    ]
