"""The serving planner: a MILP (OR-Tools, SCIP) choosing GPU composition, replicas and routing under a budget.

Configurations are (model, node class, TP degree, role) with TP a power of two inside one node and role
colocated, prefill-only or decode-only (disaggregation); `ServingCosts` gives each one's throughput under the SLOs
and its hourly price. Integer `x[c]` counts the replicas of configuration `c`, continuous `y[c]` the requests/s
routed to them (`y[c] <= x[c] * throughput[c]`); per model, colocated plus prefill traffic and colocated plus
decode traffic both equal the model's demand. GPU availability per node
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
from planners.workload import ServeWorkload

OBJECTIVES = ("max_throughput", "min_cost", "min_latency")
TIE_BREAK_PER_PRICE = 1e-6


@dataclasses.dataclass(frozen=True)
class ServeReplica:
    """One serving replica: a TP group of `devices` (indices into the cluster's device list) running `model`;
    `latency_s` is the time a request spends in it at its planned batch, queueing aside."""

    model: str
    kind: str
    tp: int
    devices: tuple[int, ...]
    max_batch: int
    capacity_rps: float
    routed_rps: float
    role: str = "both"
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        if self.role not in ROLES:
            raise SpecError(f"role must be one of {list(ROLES)}, got {self.role!r}")


@dataclasses.dataclass(frozen=True)
class ServePlan:
    """A serving deployment: replicas, the traffic each one takes, and what the cost model predicts; `kept` counts
    the replicas left in place from the deployment it replaced. `status` is the MILP solver's ("OPTIMAL", or
    "FEASIBLE": the best found within the time limit; empty in plans written before it was recorded) and
    `objective_bound` its proven bound on the objective (throughput scale, price per hour, or latency)."""

    replicas: tuple[ServeReplica, ...]
    objective: str
    throughput_scale: float
    price_per_hour: float
    rates: dict[str, float]
    cluster: str = ""
    kept: int = 0
    status: str = ""
    objective_bound: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "replicas", tuple(self.replicas))
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
        replicas = tuple(ServeReplica(**r) for r in data.pop("replicas"))
        return cls(replicas=replicas, **data)


@dataclasses.dataclass(frozen=True)
class Config:
    """A candidate replica shape and its performance; `node_class` indexes `ClusterSpec.node_classes()`."""

    node_class: int
    perf: ReplicaPerf


def candidate_configs(
    cluster: ClusterSpec, models: Sequence[ModelSpec], workload: ServeWorkload, disaggregate: bool = True
) -> list[Config]:
    """Every (model, node class, power-of-two TP, role) that can meet the SLOs."""
    out = []
    roles = ROLES if disaggregate else ("both",)
    for model in models:
        costs = ServingCosts(cluster, model, workload)
        for k, members in enumerate(cluster.node_classes()):
            node = cluster.nodes[members[0]]
            tp = 1
            while tp <= node.count and model.supports_tp(tp):
                for role in roles:
                    perf = costs.replica(node.kind, tp, node.intra_link, role)
                    if perf is not None:
                        out.append(Config(k, perf))
                tp *= 2
    return out


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


def _config_key(cluster: ClusterSpec, replica: ServeReplica) -> tuple[int, str, int, str] | None:
    """(node class, model, tp, role) of a running replica, or None if its devices are not one node of `cluster`."""
    if not replica.devices or any(not 0 <= d < cluster.num_devices for d in replica.devices):
        return None
    nodes = {cluster.devices[d].node for d in replica.devices}
    if len(nodes) != 1 or any(cluster.devices[d].kind != replica.kind for d in replica.devices):
        return None
    node = nodes.pop()
    k = next(k for k, members in enumerate(cluster.node_classes()) if node in members)
    return (k, replica.model, replica.tp, replica.role)


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
) -> ServePlan:
    """The best deployment of `models` on `cluster` (arrival rate per model: `rates`, default the workload's).

    With `disaggregate`, replicas may specialise in prefill or decode where that pays. With `current` (a running
    deployment on this cluster), among the optimal deployments the one keeping most of its GPUs' replicas in
    place is chosen (a second, lexicographic solve), and kept replicas stay on their devices. Replicas are loaded
    to at most `utilization` (in (0, 1]) of their capacity.
    """
    if objective not in OBJECTIVES:
        raise SpecError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    fields.fraction(utilization, "utilization")
    if not models:
        raise SpecError("models must list at least one model")
    rates = list(rates) if rates is not None else [workload.arrival_rate] * len(models)
    if len(rates) != len(models):
        raise SpecError(f"rates has {len(rates)} entries for {len(models)} models")
    deadline = time.perf_counter() + time_limit_s
    configs = candidate_configs(cluster, models, workload, disaggregate)
    for model in models:
        if not served_rate({c.perf.role: 1.0 for c in configs if c.perf.model == model.name}):
            raise PlanningError(
                f"{model.name}: no GPU group in the cluster meets TTFT <= {workload.ttft_slo_s} s and "
                f"TPOT <= {workload.tpot_slo_s} s with room for one request's KV cache "
                f"({workload.input_len} + {workload.output_len} tokens)"
            )
    solver = pywraplp.Solver.CreateSolver("SCIP")
    solver.SetTimeLimit(max(1, int((deadline - time.perf_counter()) * 1000)))
    x = [solver.IntVar(0, cluster.num_devices // c.perf.tp, f"x{i}") for i, c in enumerate(configs)]
    y = [solver.NumVar(0, solver.infinity(), f"y{i}") for i in range(len(configs))]
    alpha = solver.NumVar(0, solver.infinity(), "alpha")
    for i, c in enumerate(configs):
        solver.Add(y[i] <= utilization * c.perf.requests_per_s * x[i])
    for model, rate in zip(models, rates, strict=True):
        demand = (alpha if objective == "max_throughput" else 1.0) * rate
        both = sum(y[i] for i, c in enumerate(configs) if c.perf.model == model.name and c.perf.role == "both")
        for role in ("prefill", "decode"):
            split = sum(y[i] for i, c in enumerate(configs) if c.perf.model == model.name and c.perf.role == role)
            solver.Add(both + split == demand)
    for k, t, limit in packing_limits(cluster):
        members = [i for i, c in enumerate(configs) if c.node_class == k and c.perf.tp >= t]
        solver.Add(sum(x[i] * configs[i].perf.tp for i in members) <= limit)
    price = sum(x[i] * c.perf.price_per_hour for i, c in enumerate(configs))
    if workload.budget_per_hour is not None:
        solver.Add(price <= workload.budget_per_hour)
    latency = sum(y[i] * c.perf.latency_s for i, c in enumerate(configs))
    goal = {"max_throughput": alpha, "min_cost": price, "min_latency": latency + TIE_BREAK_PER_PRICE * price}[objective]
    if objective == "max_throughput":
        solver.Maximize(goal)
    else:
        solver.Minimize(goal)
    status = solver.Solve()
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE) or (
        objective == "max_throughput" and alpha.solution_value() <= 0
    ):
        raise PlanningError(_explain(cluster, configs, workload, objective, rates))
    status_name = "OPTIMAL" if status == pywraplp.Solver.OPTIMAL else "FEASIBLE"
    bound = solver.Objective().BestBound()
    running: dict[tuple[int, str, int, str], list[tuple[int, ...]]] = {}
    for replica in current.replicas if current is not None else ():
        key = _config_key(cluster, replica)
        if key is not None:
            running.setdefault(key, []).append(replica.devices)
    if running:
        solver.SetTimeLimit(max(1, int((deadline - time.perf_counter()) * 1000)))
        _keep_most(solver, configs, x, running, goal, objective)
    groups, replicas_of, fixed = [], [], {}
    for i, c in enumerate(configs):
        reuse = running.get((c.node_class, c.perf.model, c.perf.tp, c.perf.role), [])
        for n in range(round(x[i].solution_value())):
            if n < len(reuse):
                fixed[len(groups)] = reuse[n]
            groups.append((c.node_class, c.perf.tp))
            replicas_of.append(i)
    devices = _place(cluster, groups, fixed) or _place(cluster, groups, {})
    assert devices is not None, "the packing rows admitted groups that do not fit"
    replicas = []
    for i, devs in zip(replicas_of, devices, strict=True):
        c, n = configs[i], round(x[i].solution_value())
        replicas.append(
            ServeReplica(
                c.perf.model,
                c.perf.kind,
                c.perf.tp,
                devs,
                c.perf.max_batch,
                c.perf.requests_per_s,
                y[i].solution_value() / n,
                c.perf.role,
                c.perf.latency_s,
            )
        )
    return ServePlan(
        replicas=tuple(replicas),
        objective=objective,
        throughput_scale=alpha.solution_value() if objective == "max_throughput" else 1.0,
        price_per_hour=sum(r.tp * cluster.profile(r.kind).price_per_hour for r in replicas),
        rates={m.name: r for m, r in zip(models, rates, strict=True)},
        cluster=cluster.name,
        kept=len({_identity(r) for r in replicas} & {_identity(r) for r in (current.replicas if current else ())}),
        status=status_name,
        objective_bound=bound,
    )


def _identity(replica: ServeReplica) -> tuple[str, str, int, str, tuple[int, ...]]:
    return (replica.model, replica.kind, replica.tp, replica.role, replica.devices)


def _keep_most(
    solver: pywraplp.Solver,
    configs: list[Config],
    x: list[pywraplp.Variable],
    running: dict[tuple[int, str, int, str], list[tuple[int, ...]]],
    objective_var: Any,
    objective: str,
) -> None:
    """Re-solve keeping the optimum of the first objective, maximising the GPUs of running replicas kept."""
    best = solver.Objective().Value()
    if objective == "max_throughput":
        solver.Add(objective_var >= best * (1 - 1e-7))
    else:
        solver.Add(objective_var <= best * (1 + 1e-7) + 1e-9)
    kept = []
    for i, c in enumerate(configs):
        have = len(running.get((c.node_class, c.perf.model, c.perf.tp, c.perf.role), []))
        if have:
            keep = solver.IntVar(0, have, f"keep{i}")
            solver.Add(keep <= x[i])
            kept.append(keep * c.perf.tp)
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
