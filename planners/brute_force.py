"""Exhaustive enumeration of the planners' search spaces, for checking them on small instances.

Training: every plan of the space described in `planners.train` (node layouts, partitions of groups into
replicas, every CP degree each replica's groups allow, every stage order of each replica, layer splits,
recomputation flags and ZeRO stages per stage, micro-batch counts, micro-batch sizes) is built as a `TrainPlan` and
scored with `planners.cost_model` directly, sharing nothing with the CP-SAT encoding but the cost model itself.
Serving: every vector of replica counts per configuration that fits the nodes and the budget; for `min_latency`
the traffic of each count vector is routed fastest-replica-first, trying every split between colocated and
disaggregated traffic at the kinks of the (convex, piecewise-linear) latency. With several request classes, every
vector of replica counts per shape, each routed by a linear program (SciPy's HiGHS, not the planner's solver).
Cascades: every threshold vector of the grid, each deployed by that enumeration.
Exponential: meant for clusters of a handful of devices and models of a handful of blocks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from scipy.optimize import linprog

from planners.cascade import CascadePoint
from planners.cascade_profile import CascadeProfile
from planners.cluster import ClusterSpec
from planners.cost_model import evaluate_train_plan, memory_excess
from planners.groups import shapes
from planners.model import ModelSpec
from planners.plan import Replica, Stage, TrainPlan
from planners.serve import Config, Shape, candidate_configs, packing_fits, served_rate, shapes_of
from planners.serving_cost import ROLES
from planners.workload import ServeWorkload, TrainWorkload


def _node_layouts(count: int, model: ModelSpec, seq_len: int) -> list[tuple[int, ...]]:
    """Non-increasing tuples of powers of two with sum <= count (the groups a node may run, largest first), each a
    size `model` can run in some (tp, cp) shape."""
    sizes = [1 << k for k in range(count.bit_length()) if 1 << k <= count and shapes(1 << k, model, seq_len)]
    out = [()]
    for n in range(1, count + 1):
        out += [c for c in itertools.combinations_with_replacement(sorted(sizes, reverse=True), n) if sum(c) <= count]
    return out


def _set_partitions(items: list[int]) -> Iterator[list[list[int]]]:
    if not items:
        yield []
        return
    head, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        yield [[head], *part]
        for i in range(len(part)):
            yield part[:i] + [[head, *part[i]]] + part[i + 1 :]


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Tuples of `parts` positive integers summing to `total`."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield tuple(bounds[i + 1] - bounds[i] for i in range(parts))


Group = tuple[tuple[int, ...], str]  # devices, kind


def _layout_groups(cluster: ClusterSpec, choice: tuple[tuple[int, ...], ...]) -> list[Group]:
    """The groups of one layout per node, each node's laid out from its first device."""
    groups = []
    for n, (sizes, start) in enumerate(zip(choice, cluster.node_offsets(), strict=True)):
        for t in sizes:
            groups.append((tuple(range(start, start + t)), cluster.nodes[n].kind))
            start += t
    return groups


def _replicas(
    groups: list[Group], members: list[int], model: ModelSpec, workload: TrainWorkload, b: int, m: int
) -> Iterator[Replica]:
    """Every replica over the groups `members` with `m` micro-batches of `b`: each CP degree they all allow,
    stage order, layer split, and per stage recomputation flag and ZeRO stage (of those `workload` allows)."""
    L = model.num_layers
    flags = [False, True] if workload.recompute else [False]
    options = list(itertools.product(flags, workload.zero_stages))
    cps = set.intersection(*(set(shapes(len(groups[g][0]), model, workload.seq_len)) for g in members))
    for cp in sorted(cps):
        for order in itertools.permutations(members):
            for split in _compositions(L, len(members)):
                for choice in itertools.product(options, repeat=len(members)):
                    stages, start = [], 0
                    for g, n_layers, (flag, zero) in zip(order, split, choice, strict=True):
                        devices, kind = groups[g]
                        layers = (start, start + n_layers)
                        stages.append(Stage(devices, kind, len(devices) // cp, layers, flag, zero))
                        start += n_layers
                    yield Replica(tuple(stages), m, b, cp)


def all_plans(cluster: ClusterSpec, model: ModelSpec, workload: TrainWorkload) -> Iterator[TrainPlan]:
    """Every plan of the search space (memory not checked)."""
    kinds = tuple(d.kind for d in cluster.devices)
    layouts = [_node_layouts(node.count, model, workload.seq_len) for node in cluster.nodes]
    for choice in itertools.product(*layouts):
        groups = _layout_groups(cluster, choice)
        if not groups:
            continue
        for partition in _set_partitions(list(range(len(groups)))):
            for b in workload.microbatch_sizes:
                total = workload.global_batch // b
                if len(partition) > total:
                    continue
                for counts in _compositions(total, len(partition)):
                    options = [
                        list(_replicas(groups, members, model, workload, b, m))
                        for members, m in zip(partition, counts, strict=True)
                    ]
                    for replicas in itertools.product(*options):
                        yield TrainPlan(
                            replicas, model.num_layers, workload.global_batch, workload.seq_len, device_kinds=kinds
                        )


def best_plan(
    cluster: ClusterSpec,
    model: ModelSpec,
    workload: TrainWorkload,
    use_all_devices: bool = False,
    where: Callable[[TrainPlan], bool] | None = None,
) -> tuple[float, TrainPlan] | None:
    """The lowest predicted iteration time over all plans that fit in memory (and satisfy `where`, if given), or
    None if none fits."""
    best: tuple[float, TrainPlan] | None = None
    for plan in all_plans(cluster, model, workload):
        if use_all_devices and len(plan.devices) < cluster.num_devices or (where and not where(plan)):
            continue
        estimate = evaluate_train_plan(plan, cluster, model)
        if (best is None or estimate.iteration_s < best[0]) and not memory_excess(plan, cluster, estimate):
            best = (estimate.iteration_s, plan)
    return best


def best_serving(
    cluster: ClusterSpec,
    models: list[ModelSpec],
    workload: ServeWorkload,
    objective: str,
    rates: list[float],
    disaggregate: bool = True,
    utilization: float = 1.0,
) -> float | None:
    """The best objective value (throughput scale, hourly price, or latency summed over the requests of a second)
    over all replica counts, None if none serves."""
    configs = candidate_configs(cluster, models, workload, disaggregate)
    if len(workload.request_classes) > 1:
        return _best_routed(cluster, models, workload, configs, objective, rates, utilization)
    best: float | None = None
    for x in _counts(cluster, [(c.node_class, c.perf.tp) for c in configs], 0, {}):
        price = sum(n * c.perf.price_per_hour for c, n in zip(configs, x, strict=True))
        if workload.budget_per_hour is not None and price > workload.budget_per_hour + 1e-9:
            continue
        served = []
        for m in models:
            capacity: dict[str, float] = {}
            for c, n in zip(configs, x, strict=True):
                if c.perf.model == m.name:
                    capacity[c.perf.role] = capacity.get(c.perf.role, 0.0) + n * utilization * c.perf.requests_per_s
            served.append(served_rate(capacity))
        if objective == "min_latency":
            if all(s >= rate * (1 - 1e-9) for s, rate in zip(served, rates, strict=True)):
                total = sum(
                    _routed_latency(
                        [
                            (n * utilization * c.perf.requests_per_s, c)
                            for c, n in zip(configs, x, strict=True)
                            if n and c.perf.model == m.name
                        ],
                        rate,
                    )
                    for m, rate in zip(models, rates, strict=True)
                )
                if best is None or total < best:
                    best = total
        elif objective == "max_throughput":
            value = min(s / rate for s, rate in zip(served, rates, strict=True))
            if value > 0 and (best is None or value > best):
                best = value
        elif all(s >= rate * (1 - 1e-9) for s, rate in zip(served, rates, strict=True)) and (
            best is None or price < best
        ):
            best = price
    return best


def _fill(offers: list[tuple[float, float]], amount: float) -> float:
    """Least latency-weighted traffic for `amount` requests/s over (capacity, latency) offers, fastest first."""
    total = 0.0
    for capacity, latency in sorted(offers, key=lambda o: o[1]):
        take = min(capacity, amount)
        total, amount = total + take * latency, amount - take
    return total if amount <= 1e-9 else float("inf")


def _routed_latency(offers: list[tuple[float, Config]], rate: float) -> float:
    """Least `sum y * latency` serving `rate` of one model: colocated share `b`, the rest through prefill and decode
    replicas; the cost is convex and piecewise linear in `b`, so its minimum lies at a kink or an end."""
    by_role = {role: [(cap, c.perf.latency_s) for cap, c in offers if c.perf.role == role] for role in ROLES}
    kinks = {0.0, rate}
    for role, sign in (("both", 1), ("prefill", -1), ("decode", -1)):
        at = 0.0
        for cap, _ in sorted(by_role[role], key=lambda o: o[1]):
            at += cap
            kinks.add(at if sign > 0 else rate - at)
    return min(
        _fill(by_role["both"], b) + _fill(by_role["prefill"], rate - b) + _fill(by_role["decode"], rate - b)
        for b in kinks
        if 0.0 <= b <= rate
    )


def _best_routed(
    cluster: ClusterSpec,
    models: list[ModelSpec],
    workload: ServeWorkload,
    configs: list[Config],
    objective: str,
    rates: list[float],
    utilization: float,
) -> float | None:
    """`best_serving` over several request classes: every count vector per shape, each routed by an LP."""
    shapes = shapes_of(configs)
    unit_price = {c.shape: c.perf.price_per_hour for c in configs}
    best: float | None = None
    for x in _counts(cluster, [(s[0], s[2]) for s in shapes], 0, {}):
        price = sum(n * unit_price[s] for s, n in zip(shapes, x, strict=True))
        if workload.budget_per_hour is not None and price > workload.budget_per_hour + 1e-9:
            continue
        value = _route(models, workload, configs, dict(zip(shapes, x, strict=True)), objective, rates, utilization)
        if value is None:
            continue
        value = price if objective == "min_cost" else value
        if best is None or (value > best if objective == "max_throughput" else value < best):
            best = value
    return best


def _route(
    models: Sequence[ModelSpec],
    workload: ServeWorkload,
    configs: list[Config],
    counts: dict[Shape, int],
    objective: str,
    rates: Sequence[float],
    utilization: float,
) -> float | None:
    """The routing LP over `counts` replicas per shape: variables `y` per configuration, then `alpha`; None if
    infeasible. Returns the throughput scale, the latency sum, or 0 (feasible) for `min_cost`."""
    n = len(configs) + 1
    a_ub, b_ub, a_eq = [], [], []
    for s, count in counts.items():
        row = np.zeros(n)
        for i, c in enumerate(configs):
            if c.shape == s:
                row[i] = 1 / c.perf.requests_per_s
        a_ub.append(row)
        b_ub.append(utilization * count)
    scaled = objective == "max_throughput"
    b_eq = []
    for model, rate in zip(models, rates, strict=True):
        for klass in workload.request_classes:
            demand = rate * klass.rate / workload.arrival_rate
            for role in ("prefill", "decode"):
                row = np.zeros(n)
                for i, c in enumerate(configs):
                    if c.perf.model == model.name and c.request_class == klass.name and c.perf.role in ("both", role):
                        row[i] = 1.0
                row[-1] = -demand if scaled else 0.0
                a_eq.append(row)
                b_eq.append(0.0 if scaled else demand)
    cost = np.zeros(n)
    if scaled:
        cost[-1] = -1.0
    elif objective == "min_latency":
        cost[:-1] = [c.perf.latency_s for c in configs]
    result = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if result.status != 0 or (scaled and result.x[-1] <= 0):
        return None
    return -result.fun if scaled else result.fun


def _counts(
    cluster: ClusterSpec, keys: list[tuple[int, int]], start: int, used: dict[tuple[int, int], int]
) -> Iterator[tuple[int, ...]]:
    """Every vector of replica counts for the groups `keys[start:]` ((node class, tp) each) that still packs."""
    if start == len(keys):
        yield ()
        return
    key = keys[start]
    n = 0
    while True:
        trial = dict(used)
        trial[key] = trial.get(key, 0) + n
        if not packing_fits(cluster, trial):
            return
        for rest in _counts(cluster, keys, start + 1, trial):
            yield (n, *rest)
        n += 1


def cascade_points(
    cluster: ClusterSpec,
    models: list[ModelSpec],
    workload: ServeWorkload,
    profile: CascadeProfile,
    grid: int,
    utilization: float,
    disaggregate: bool = True,
) -> list[CascadePoint]:
    """Every deployable threshold vector of the grid with its quality and its least mean latency, each deployment
    found by enumerating replica counts (`best_serving`)."""
    out = []
    total = len(profile.samples)
    for thresholds in itertools.product(*(profile.candidates(i, grid) for i in range(len(models) - 1))):
        stops = profile.stops(thresholds)
        counts = profile.reach_counts(stops)
        used = [(m, workload.arrival_rate * n / total) for m, n in zip(models, counts, strict=True) if n]
        total_latency = best_serving(
            cluster, [m for m, _ in used], workload, "min_latency", [r for _, r in used], disaggregate, utilization
        )
        if total_latency is not None:
            reach = tuple(n / total for n in counts)
            latency = total_latency / workload.arrival_rate
            out.append(CascadePoint(thresholds, reach, profile.quality(stops), latency, 0.0))
    return out
