"""The serving planner: a MILP (OR-Tools, SCIP) choosing GPU composition, replicas and routing under a budget.

Replica shapes are (model, node class, TP degree, role) with TP a power of two inside one node and role
colocated, prefill-only or decode-only (disaggregation). Traffic comes in request classes (`RequestClass`: rate,
lengths, SLOs); `ServingCosts` at a class's lengths and SLOs gives a shape's throughput for that class alone
(`throughput[s, k]`; none if the shape misses the class's SLOs) and the shape's hourly price. Integer `x[s]` counts
the replicas of shape `s`, continuous `y[s, k]` the requests/s of class `k` routed to them; a replica's time is
shared among the classes it serves (`sum_k y[s, k] / throughput[s, k] <= x[s]`); per model and class, colocated
plus prefill traffic and colocated plus decode traffic both equal the class's demand (the model's rate times the
class's share of the workload's). GPU availability per node
class is the exact packing condition for power-of-two groups into nodes (for every size `t`: the GPUs in groups
of size >= t fit in the nodes' `t`-aligned slots), so the replicas are then placed on devices first-fit.

Objectives: `max_throughput` maximises the factor `alpha` by which every model's arrival rate can be scaled and
still be served (`sum_c y[c] = alpha * rate[m]`), within the budget if one is given; `min_cost` minimises the
hourly price of serving the rates as given; `min_latency` serves the rates as given with the least mean time per
request (`sum_c y[c] * latency[c]`, queueing aside; ties go to the cheaper deployment), within the budget. Every
objective may keep headroom for queueing: `utilization` caps each replica's load at that fraction of its capacity.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

from ortools.linear_solver import pywraplp

from planners import fields
from planners.cluster import ClusterSpec
from planners.errors import PlanningError, SpecError
from planners.model import ModelSpec
from planners.serving_cost import ROLES, ReplicaPerf, ServingCosts
from planners.workload import RequestClass, ServeWorkload

OBJECTIVES = ("max_throughput", "min_cost", "min_latency")
TIE_BREAK_PER_PRICE = 1e-6


@dataclasses.dataclass(frozen=True)
class ClassShare:
    """One replica's part in serving one request class: its capacity for that class alone, the requests/s of the
    class routed to it, the time one of them spends in it and the batch it runs them at."""

    name: str
    capacity_rps: float
    routed_rps: float
    latency_s: float
    max_batch: int


@dataclasses.dataclass(frozen=True)
class ServeReplica:
    """One serving replica: a TP group of `devices` (indices into the cluster's device list) running `model`;
    `classes` says what it does for each request class it can serve. The totals: `routed_rps` over the classes,
    `capacity_rps` at that mix of classes, `latency_s` the mean time a routed request spends in it at its planned
    batch (queueing aside), `max_batch` the largest of its classes' batches."""

    model: str
    kind: str
    tp: int
    devices: tuple[int, ...]
    max_batch: int
    capacity_rps: float
    routed_rps: float
    role: str = "both"
    latency_s: float = 0.0
    classes: tuple[ClassShare, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.role not in ROLES:
            raise SpecError(f"role must be one of {list(ROLES)}, got {self.role!r}")


@dataclasses.dataclass(frozen=True)
class ServePlan:
    """A serving deployment: replicas, the traffic each one takes, and what the cost model predicts; `kept` counts
    the replicas left in place from the deployment it replaced. `status` is the MILP solver's ("OPTIMAL", or
    "FEASIBLE": the best found within the time limit; empty in plans written before it was recorded) and
    `objective_bound` its proven bound on the objective (throughput scale, price per hour, or latency);
    `classes` the request classes it was planned for (empty in plans written before they were recorded)."""

    replicas: tuple[ServeReplica, ...]
    objective: str
    throughput_scale: float
    price_per_hour: float
    rates: dict[str, float]
    cluster: str = ""
    kept: int = 0
    status: str = ""
    objective_bound: float | None = None
    classes: tuple[RequestClass, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "replicas", tuple(self.replicas))
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.objective not in OBJECTIVES:
            raise SpecError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")

    def to_json(self, indent: int | None = 2) -> str:
        data = dataclasses.asdict(self)
        data["format"] = "jaxhet.serve_plan"
        return json.dumps(data, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> ServePlan:
        data: dict[str, Any] = json.loads(text)
        if data.pop("format", None) != "jaxhet.serve_plan":
            raise SpecError("format must be 'jaxhet.serve_plan'")
        replicas = tuple(
            ServeReplica(**{**r, "classes": tuple(ClassShare(**c) for c in r.get("classes", ()))})
            for r in data.pop("replicas")
        )
        classes = tuple(RequestClass(**c) for c in data.pop("classes", ()))
        return cls(replicas=replicas, classes=classes, **data)


Shape = tuple[int, str, int, str]  # (node class, model, tp, role)


@dataclasses.dataclass(frozen=True)
class Config:
    """A candidate replica shape serving one request class, and its performance for that class;
    `node_class` indexes `ClusterSpec.node_classes()`."""

    node_class: int
    perf: ReplicaPerf
    request_class: str = "all"

    @property
    def shape(self) -> Shape:
        return (self.node_class, self.perf.model, self.perf.tp, self.perf.role)


def candidate_configs(
    cluster: ClusterSpec, models: Sequence[ModelSpec], workload: ServeWorkload, disaggregate: bool = True
) -> list[Config]:
    """Every (model, node class, power-of-two TP, role, request class) that can meet the class's SLOs."""
    out = []
    roles = ROLES if disaggregate else ("both",)
    for model in models:
        for request_class in workload.request_classes:
            costs = ServingCosts(cluster, model, workload.for_class(request_class))
            for k, members in enumerate(cluster.node_classes()):
                node = cluster.nodes[members[0]]
                tp = 1
                while tp <= node.count and model.supports_tp(tp):
                    for role in roles:
                        perf = costs.replica(node.kind, tp, node.intra_link, role)
                        if perf is not None:
                            out.append(Config(k, perf, request_class.name))
                    tp *= 2
    return out


def shapes_of(configs: Sequence[Config]) -> list[Shape]:
    """The distinct replica shapes of `configs`, in order of first appearance."""
    return list(dict.fromkeys(c.shape for c in configs))


def served_rate(capacity: dict[str, float]) -> float:
    """Requests/s a model's replicas can complete: colocated ones, plus disaggregated pairs of stages."""
    return capacity.get("both", 0.0) + min(capacity.get("prefill", 0.0), capacity.get("decode", 0.0))


def packing_limits(cluster: ClusterSpec) -> list[tuple[int, int, int]]:
    """Rows `(node_class, t, limit)`: GPUs in groups of size >= t of that class must not exceed `limit` (the
    class's `t`-aligned slots); for power-of-two group sizes these rows are exactly the condition to pack."""
    rows = []
    for k, members in enumerate(cluster.node_classes()):
        per_node = cluster.nodes[members[0]].count
        t = 1
        while t <= per_node:
            rows.append((k, t, len(members) * t * (per_node // t)))
            t *= 2
    return rows


def packing_fits(cluster: ClusterSpec, counts: dict[tuple[int, int], int]) -> bool:
    """Whether `counts[(node_class, tp)]` groups fit in the class's nodes."""
    return all(
        sum(n * tp for (kk, tp), n in counts.items() if kk == k and tp >= t) <= limit
        for k, t, limit in packing_limits(cluster)
    )


def _place(
    cluster: ClusterSpec, groups: list[tuple[int, int]], fixed: dict[int, tuple[int, ...]]
) -> list[tuple[int, ...]] | None:
    """Devices for each (node_class, tp) group: the `fixed` ones keep theirs, the others go largest first into the
    first free aligned slot of their class; None if they do not fit around the fixed ones (never without)."""
    classes = cluster.node_classes()
    offsets = cluster.node_offsets()
    taken = {d for devices in fixed.values() for d in devices}
    placed = dict(fixed)
    for i in sorted((i for i in range(len(groups)) if i not in fixed), key=lambda i: -groups[i][1]):
        k, tp = groups[i]
        slots = (
            tuple(range(offsets[n] + s, offsets[n] + s + tp))
            for n in classes[k]
            for s in range(0, cluster.nodes[n].count - tp + 1, tp)
        )
        devices = next((slot for slot in slots if taken.isdisjoint(slot)), None)
        if devices is None:
            return None
        taken.update(devices)
        placed[i] = devices
    return [placed[i] for i in range(len(groups))]


def _config_key(cluster: ClusterSpec, replica: ServeReplica) -> Shape | None:
    """The shape of a running replica, or None if its devices are not one node of `cluster`."""
    if not replica.devices or any(not 0 <= d < cluster.num_devices for d in replica.devices):
        return None
    nodes = {cluster.devices[d].node for d in replica.devices}
    if len(nodes) != 1 or any(cluster.devices[d].kind != replica.kind for d in replica.devices):
        return None
    node = nodes.pop()
    k = next(k for k, members in enumerate(cluster.node_classes()) if node in members)
    return (k, replica.model, replica.tp, replica.role)


def _check_slos(configs: list[Config], models: Sequence[ModelSpec], workload: ServeWorkload) -> None:
    """Every model and request class has a replica shape meeting the class's SLOs, or the error says which not."""
    classes = workload.request_classes
    for model in models:
        for c in classes:
            roles = {x.perf.role: 1.0 for x in configs if x.perf.model == model.name and x.request_class == c.name}
            if not served_rate(roles):
                who = model.name if len(classes) == 1 else f"{model.name}, request class {c.name!r}"
                raise PlanningError(
                    f"{who}: no GPU group in the cluster meets TTFT <= {c.ttft_slo_s} s and "
                    f"TPOT <= {c.tpot_slo_s} s with room for one request's KV cache "
                    f"({c.input_len} + {c.output_len} tokens)"
                )


@dataclasses.dataclass
class _Milp:
    """The serving MILP's solver and variables: `x[shape]` replicas, `y[i]` requests/s of `configs[i]`'s class."""

    solver: pywraplp.Solver
    configs: list[Config]
    x: dict[Shape, Any]
    y: list[Any]
    alpha: Any
    price: Any
    goal: Any


def _build_milp(
    cluster: ClusterSpec,
    models: Sequence[ModelSpec],
    workload: ServeWorkload,
    configs: list[Config],
    objective: str,
    rates: Sequence[float],
    utilization: float,
    route_by_class: bool,
) -> _Milp:
    solver = pywraplp.Solver.CreateSolver("SCIP")
    shapes = shapes_of(configs)
    x = {s: solver.IntVar(0, cluster.num_devices // s[2], f"x{i}") for i, s in enumerate(shapes)}
    y = [solver.NumVar(0, solver.infinity(), f"y{i}") for i in range(len(configs))]
    alpha = solver.NumVar(0, solver.infinity(), "alpha")
    for s in shapes:
        busy = sum(y[i] / c.perf.requests_per_s for i, c in enumerate(configs) if c.shape == s)
        solver.Add(busy <= utilization * x[s])
        if not route_by_class:
            _same_mix(solver, workload, x[s], [(c.request_class, y[i]) for i, c in enumerate(configs) if c.shape == s])
    for model, rate in zip(models, rates, strict=True):
        for klass in workload.request_classes:
            demand = (alpha if objective == "max_throughput" else 1.0) * rate * klass.rate / workload.arrival_rate
            ours = [i for i, c in enumerate(configs) if c.perf.model == model.name and c.request_class == klass.name]
            both = sum(y[i] for i in ours if configs[i].perf.role == "both")
            for role in ("prefill", "decode"):
                solver.Add(both + sum(y[i] for i in ours if configs[i].perf.role == role) == demand)
    for k, t, limit in packing_limits(cluster):
        solver.Add(sum(x[s] * s[2] for s in shapes if s[0] == k and s[2] >= t) <= limit)
    unit_price = {c.shape: c.perf.price_per_hour for c in configs}
    price = sum(x[s] * unit_price[s] for s in shapes)
    if workload.budget_per_hour is not None:
        solver.Add(price <= workload.budget_per_hour)
    latency = sum(y[i] * c.perf.latency_s for i, c in enumerate(configs))
    goal = {"max_throughput": alpha, "min_cost": price, "min_latency": latency + TIE_BREAK_PER_PRICE * price}[objective]
    if objective == "max_throughput":
        solver.Maximize(goal)
    else:
        solver.Minimize(goal)
    return _Milp(solver, configs, x, y, alpha, price, goal)


def _same_mix(solver: pywraplp.Solver, workload: ServeWorkload, x: Any, routed: list[tuple[str, Any]]) -> None:
    """A shape's traffic in the workload's mix of classes; a shape missing a class's SLOs takes none."""
    total = sum(y for _, y in routed)
    served = dict(routed)
    for klass in workload.request_classes:
        if klass.name not in served:
            solver.Add(x == 0)
            return
        solver.Add(served[klass.name] == klass.rate / workload.arrival_rate * total)


def plan_serving(
    cluster: ClusterSpec,
    models: Sequence[ModelSpec],
    workload: ServeWorkload,
    *,
    objective: str = "max_throughput",
    rates: Sequence[float] | None = None,
    disaggregate: bool = True,
    current: ServePlan | None = None,
    utilization: float = 1.0,
    time_limit_s: float = 20.0,
    route_by_class: bool = True,
) -> ServePlan:
    """The best deployment of `models` on `cluster` (arrival rate per model: `rates`, default the workload's; each
    model sees the workload's mix of request classes).

    With `disaggregate`, replicas may specialise in prefill or decode where that pays. With `current` (a running
    deployment on this cluster), among the optimal deployments the one keeping most of its GPUs' replicas in
    place is chosen (a second, lexicographic solve), and kept replicas stay on their devices. Replicas are loaded
    to at most `utilization` (in (0, 1]) of their capacity. With `route_by_class` False, every replica takes the
    workload's mix of request classes (a router blind to lengths), so only shapes meeting every class's SLOs serve.
    """
    fields.one_of(objective, OBJECTIVES, "objective")
    fields.fraction(utilization, "utilization")
    if not models:
        raise SpecError("models must list at least one model")
    rates = list(rates) if rates is not None else [workload.arrival_rate] * len(models)
    if len(rates) != len(models):
        raise SpecError(f"rates has {len(rates)} entries for {len(models)} models")
    deadline = time.perf_counter() + time_limit_s
    configs = candidate_configs(cluster, models, workload, disaggregate)
    _check_slos(configs, models, workload)
    milp = _build_milp(cluster, models, workload, configs, objective, rates, utilization, route_by_class)
    milp.solver.SetTimeLimit(max(1, int((deadline - time.perf_counter()) * 1000)))
    status = milp.solver.Solve()
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE) or (
        objective == "max_throughput" and milp.alpha.solution_value() <= 0
    ):
        raise PlanningError(_explain(cluster, configs, workload, objective, rates))
    status_name = "OPTIMAL" if status == pywraplp.Solver.OPTIMAL else "FEASIBLE"
    bound = milp.solver.Objective().BestBound()
    running: dict[Shape, list[tuple[int, ...]]] = {}
    for replica in current.replicas if current is not None else ():
        key = _config_key(cluster, replica)
        if key is not None:
            running.setdefault(key, []).append(replica.devices)
    if running:
        milp.solver.SetTimeLimit(max(1, int((deadline - time.perf_counter()) * 1000)))
        _keep_most(milp, running, objective)
    replicas = _replicas(cluster, milp, running)
    return ServePlan(
        replicas=tuple(replicas),
        objective=objective,
        throughput_scale=milp.alpha.solution_value() if objective == "max_throughput" else 1.0,
        price_per_hour=sum(r.tp * cluster.profile(r.kind).price_per_hour for r in replicas),
        rates={m.name: r for m, r in zip(models, rates, strict=True)},
        cluster=cluster.name,
        kept=len({_identity(r) for r in replicas} & {_identity(r) for r in (current.replicas if current else ())}),
        status=status_name,
        objective_bound=bound,
        classes=workload.request_classes,
    )


def _replicas(cluster: ClusterSpec, milp: _Milp, running: dict[Shape, list[tuple[int, ...]]]) -> list[ServeReplica]:
    """The solution's replicas on devices, running ones kept on theirs where the solution still has them."""
    groups, shapes, fixed = [], [], {}
    for s, var in milp.x.items():
        reuse = running.get(s, [])
        for n in range(round(var.solution_value())):
            if n < len(reuse):
                fixed[len(groups)] = reuse[n]
            groups.append((s[0], s[2]))
            shapes.append(s)
    devices = _place(cluster, groups, fixed) or _place(cluster, groups, {})
    assert devices is not None, "the packing rows admitted groups that do not fit"
    return [_replica(milp, s, devs) for s, devs in zip(shapes, devices, strict=True)]


def _replica(milp: _Milp, shape: Shape, devices: tuple[int, ...]) -> ServeReplica:
    """One replica of `shape`: an equal part of the traffic its shape's replicas take, class by class."""
    n = round(milp.x[shape].solution_value())
    mine = [(i, c) for i, c in enumerate(milp.configs) if c.shape == shape]
    shares = tuple(
        ClassShare(
            c.request_class, c.perf.requests_per_s, milp.y[i].solution_value() / n, c.perf.latency_s, c.perf.max_batch
        )
        for i, c in mine
    )
    routed = sum(s.routed_rps for s in shares)
    active = [s for s in shares if s.routed_rps > 0] or list(shares[:1])
    busy = sum(s.routed_rps / s.capacity_rps for s in active)
    capacity = active[0].capacity_rps if len(active) == 1 else routed / busy
    latency = active[0].latency_s if len(active) == 1 else sum(s.routed_rps * s.latency_s for s in active) / routed
    perf = mine[0][1].perf
    return ServeReplica(
        perf.model,
        perf.kind,
        perf.tp,
        devices,
        max(s.max_batch for s in shares),
        capacity,
        routed,
        perf.role,
        latency,
        shares,
    )


def _identity(replica: ServeReplica) -> tuple[str, str, int, str, tuple[int, ...]]:
    return (replica.model, replica.kind, replica.tp, replica.role, replica.devices)


def _keep_most(milp: _Milp, running: dict[Shape, list[tuple[int, ...]]], objective: str) -> None:
    """Re-solve keeping the optimum of the first objective, maximising the GPUs of running replicas kept."""
    solver = milp.solver
    best = solver.Objective().Value()
    if objective == "max_throughput":
        solver.Add(milp.goal >= best * (1 - 1e-7))
    else:
        solver.Add(milp.goal <= best * (1 + 1e-7) + 1e-9)
    kept = []
    for i, (s, var) in enumerate(milp.x.items()):
        have = len(running.get(s, []))
        if have:
            keep = solver.IntVar(0, have, f"keep{i}")
            solver.Add(keep <= var)
            kept.append(keep * s[2])
    solver.Maximize(sum(kept))
    if solver.Solve() not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        raise AssertionError("the re-solve lost the first solve's optimum")


def replan_serving(
    cluster: ClusterSpec,
    failed: Sequence[int],
    models: Sequence[ModelSpec],
    workload: ServeWorkload,
    current: ServePlan,
    **options: Any,
) -> ServePlan:
    """A new deployment after losing the `failed` devices (or, with none, after a workload shift) that keeps as
    much of `current` as the optimum allows; devices are numbered as in `cluster`. `options` go to `plan_serving`."""
    survivors, original = cluster.without_devices(failed)
    renumber = {old: new for new, old in enumerate(original)}
    alive = tuple(
        dataclasses.replace(r, devices=tuple(renumber[d] for d in r.devices))
        for r in current.replicas
        if all(d in renumber for d in r.devices)
    )
    plan = plan_serving(survivors, models, workload, current=dataclasses.replace(current, replicas=alive), **options)
    replicas = tuple(dataclasses.replace(r, devices=tuple(original[d] for d in r.devices)) for r in plan.replicas)
    return dataclasses.replace(plan, replicas=replicas, cluster=cluster.name)


def _explain(
    cluster: ClusterSpec, configs: list[Config], workload: ServeWorkload, objective: str, rates: Sequence[float]
) -> str:
    cheapest = min(c.perf.price_per_hour for c in configs)
    if workload.budget_per_hour is not None and workload.budget_per_hour < cheapest:
        return (
            f"budget: {workload.budget_per_hour:.2f}/h is below the cheapest replica that meets the SLOs "
            f"({cheapest:.2f}/h)"
        )
    if objective != "max_throughput":
        return (
            f"capacity: the cluster ({cluster.kinds_summary()}) cannot serve {list(rates)} requests/s within the SLOs"
            + (f" and a budget of {workload.budget_per_hour:.2f}/h" if workload.budget_per_hour is not None else "")
        )
    return (
        f"budget: {workload.budget_per_hour}/h cannot buy a replica of every model that meets the SLOs"
        if workload.budget_per_hour is not None
        else "availability: the cluster cannot hold a replica of every model that meets the SLOs"
    )
