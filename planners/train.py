"""The training planner: CP-SAT chooses device groups, replicas, stage order, layer splits, batch shares,
recomputation and ZeRO stages.

Search space (the same one `planners.brute_force` enumerates):
- a stage is a group of `t` devices inside one node, `t` a power of two, run as `cp` context-parallel ranks of
  `t / cp` tensor-parallel devices (`cp` a power of two dividing `seq_len`, `t / cp` a TP degree the model
  supports); inside each node the groups in use are laid out largest first from the node's first device (every
  multiset of power-of-two sizes that fits packs this way, aligned), and the node's remaining devices stay idle;
- a replica is a pipeline of such groups of one CP degree, in any order, under the 1F1B schedule (GPipe takes the
  same time under the cost model and more memory);
- every replica gets at least one micro-batch; all micro-batches have one size `b`, chosen from the workload's
  candidates by solving once per candidate;
- each stage gets at least one block, may recompute its activations (`TrainWorkload.recompute`) and runs one of
  the ZeRO stages the workload allows (`TrainWorkload.zero_stages`), priced as `planners.cost_model` describes
  (moments split across the holders of a piece where all of them have zero >= 1); among plans of equal time the
  one with less of this machinery wins (CP-SAT charges one tick per recomputed block and per ZeRO level of a
  stage).
With a topology (`planners.topology`), links between nodes are those of the levels they span, and the objective
is lexicographic in effect: the iteration time first, then the plan's spread (`planners.spread`: `max + pp`, the
level all its nodes span plus the highest level a pipeline spans). Inside CP-SAT the spread weighs one tick per
level (a tick is 1e-4 of the fastest block's time, the resolution of its times: the term decides between
placements of equal time and trades at most a few ticks of time for spread); between the plans of
several solves, times within `SPREAD_TIE` (relative) count as equal and the less spread plan wins. Without a
topology there is no spread term: placements are as they always were.
The model: `planners.cost_model`; its CP-SAT encoding: `planners.train_model`. The search prices stage edges
uncompressed; where the workload allows compression (`TrainWorkload.compress`), the best plan found then gets, on
each stage edge, the allowed codec that makes that edge fastest (`compress_edges`: an edge's time adds to its
replica's alone, so this can only lower the iteration time). The search's bound does not cover such plans, so a
plan with a compressed edge is reported FEASIBLE with the compute-only `throughput_bound_s` as its bound.

Large clusters may be split into `K` identical cells (each with `len(nodes) // K` nodes of every node class, the
nodes left over idle, and each able to hold the model's state; `planners.cells`); one cell is planned and its
plan repeated `K` times, with the gradient all-reduce counted over all `K` cells. Tried (`cell_splits`): the
splits into cells of at most `max_cell_devices` devices that leave the fewest devices idle, and the whole cluster
when it has at most `WHOLE_CLUSTER_DEVICES` devices; coarser splits when those leave no plan. Cell plans are
whole-cluster plans too, so only the whole-cluster solves prove optimality and bound the iteration time; without
them the bound is the throughput bound of `throughput_bound_s`. Each sub-problem is solved over coarse groups
only (TP of at least half a node, fast), then over all groups starting from that plan (a CP-SAT hint); where ZeRO is
allowed, those two solves are without it and a third, over all groups with it, starts from their plan (`_phases`;
on cells too large for that model, ZeRO comes from the seeds only, and the plan is not proven optimal).
All start from the fastest plan known so far: the best regular seed plan (`planners.seeds`), or a plan of finer cells
or of a subset of the nodes. Clusters of at least `SUBSET_MIN_DEVICES` devices first get quick solves of their
subsets (without one node of a class, or without a whole class), renumbered onto the cluster: warm starts that
keep the plan no worse than theirs. The time limit holds for the whole call, model building included.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

from planners.cells import cell_splits, coarser_splits, split_cell, state_bytes, subsets, usable_bytes
from planners.cluster import ClusterSpec
from planners.cost_model import TrainCosts, boundary_link, evaluate_train_plan, memory_excess
from planners.errors import PlanningError
from planners.groups import Group, Slot, candidate_groups, shapes
from planners.model import ModelSpec
from planners.plan import COMPRESSIONS, Replica, SolveInfo, Stage, TrainPlan
from planners.seeds import seed_slots
from planners.spread import plan_spread
from planners.train_model import Cell, CellModel, CellProblem, CellResult
from planners.workload import TrainWorkload

COARSE_SHARE = 0.25
PLAIN_SHARE = 0.5  # of the time left after the coarse solve, for the full solve without ZeRO
ZERO_SEARCH_BLOCKS = 2048  # candidate groups x blocks beyond which CP-SAT leaves ZeRO to the seeds
RESERVE_SHARE = 0.05  # of the time limit, kept for turning solutions into plans
SUBSET_MIN_DEVICES = 17  # smaller clusters are solved to optimality, which needs no warm start from subsets
SUBSET_SHARE = 0.3  # of the time limit, for the subsets' quick solves
MIN_SOLVE_S = 0.1  # a CP-SAT model is built only with at least this long left for its sub-problem
SPREAD_TIE = 1e-9  # iteration times this close (relative) are equal, and the less spread plan wins


def throughput_bound_s(cluster: ClusterSpec, model: ModelSpec, workload: TrainWorkload) -> float:
    """A lower bound on every plan's iteration time: all blocks of all micro-batches on every device at once, each
    device at its best rate over the (tp, cp) shapes (seconds per block and device: `size * layer_seconds`)."""
    costs = TrainCosts(cluster, model, workload.seq_len)
    best = math.inf
    for b in workload.microbatch_sizes:
        rate = 0.0
        for node in cluster.nodes:
            link = node.intra_link
            groups = candidate_groups(dataclasses.replace(cluster, nodes=(node,)), model, workload.seq_len)
            seconds = min(g.size * costs.layer_seconds(node.kind, g.tp, b, False, link, g.cp, link) for g in groups)
            rate += node.count / seconds
        best = min(best, model.num_layers * workload.global_batch / b / rate)
    return best


def _seeds(problem: CellProblem) -> list[list[Slot]]:
    """The regular seed plans of a cell that fit in memory, fastest first (scored on one copy, all-reduce over
    all copies)."""
    cell, model = problem.cell, problem.model
    costs = TrainCosts(cell.cluster, model, problem.seq_len)
    scored = []
    for slots in seed_slots(
        cell.cluster,
        model,
        problem.seq_len,
        problem.microbatch,
        problem.microbatches,
        problem.recompute,
        problem.zero_stages,
    ):
        plan = _plan_from_slots(slots, Cell(cell.cluster, 1, (tuple(range(cell.cluster.num_devices)),)), problem)
        estimate = plan.estimate
        assert estimate is not None
        grad = max(
            costs.stage_grad_bytes(st.tp, st.num_layers, i == 0, i == len(r.stages) - 1)
            for r in plan.replicas
            for i, st in enumerate(r.stages)
        )
        link = cell.cluster.level_link(cell.copies_level, 0) if cell.copies > 1 else None
        score = (
            estimate.iteration_s
            if link is None
            else max(estimate.replica_s) + costs.grad_sync_seconds(len(plan.replicas) * cell.copies, grad, link)
        )
        idle = problem.use_all_devices and len(plan.devices) < cell.cluster.num_devices
        if not idle and not memory_excess(plan, cell.cluster, estimate):
            scored.append((score, slots))
    return [slots for _, slots in sorted(scored, key=lambda x: x[0])]


def _plan_from_slots(
    slots: list[Slot], cell: Cell, problem: CellProblem, cluster: ClusterSpec | None = None, batch: int = 0
) -> TrainPlan:
    """The plan that repeats `slots` on every copy of `cell`, over `cluster` (the cell's own by default)."""
    cluster = cluster or cell.cluster
    replicas = []
    for device_map in cell.device_maps:
        for stages, count in slots:
            start, built = 0, []
            for group, layers, recompute, zero in stages:
                devices = tuple(device_map[d] for d in group.devices)
                built.append(Stage(devices, group.kind, group.tp, (start, start + layers), recompute, zero))
                start += layers
            replicas.append(Replica(tuple(built), count, problem.microbatch, stages[0][0].cp))
    plan = TrainPlan(
        replicas=tuple(replicas),
        num_layers=problem.model.num_layers,
        global_batch=batch or problem.microbatch * problem.microbatches * cell.copies,
        seq_len=problem.seq_len,
        device_kinds=tuple(d.kind for d in cluster.devices),
        model=problem.model.name,
        cluster=cluster.name,
    )
    return dataclasses.replace(plan, estimate=evaluate_train_plan(plan, cluster, problem.model))


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """One sub-problem's result: the plans it yielded (cells, micro-batch size), CP-SAT's status and bound
    (seconds) on its full model, and whether that bound holds for every plan of the micro-batch size (a solve of
    the whole cluster, not of cells or of a subset of nodes, with ZeRO in its model where the workload allows it)."""

    cells: int
    microbatch: int
    plans: list[TrainPlan]
    status: str
    bound_s: float
    proves: bool


def _cell_slots(plan: TrainPlan | None, problem: CellProblem) -> list[Slot] | None:
    """The replicas of `plan` (over the whole cluster) that lie in the first copy of `problem`'s cell, in cell
    coordinates; None unless they make a plan of that cell (its micro-batch size and count). A plan of finer cells
    is one of every coarser cell that contains them: the warm start of the coarser solve."""
    if plan is None:
        return None
    cell = problem.cell
    local = {d: i for i, d in enumerate(cell.device_maps[0])}
    devices = cell.cluster.devices
    slots: list[Slot] = []
    for r in plan.replicas:
        if r.microbatch_size != problem.microbatch or not all(d in local for d in r.devices):
            continue
        groups = [
            Group(devices[local[st.devices[0]]].node, tuple(local[d] for d in st.devices), st.kind, r.cp)
            for st in r.stages
        ]
        stages = [(g, st.num_layers, st.recompute, st.zero) for g, st in zip(groups, r.stages, strict=True)]
        slots.append((stages, r.num_microbatches))
    return slots if slots and sum(count for _, count in slots) == problem.microbatches else None


def _phases(problem: CellProblem) -> list[tuple[CellProblem, bool, float]]:
    """The CP-SAT solves of one sub-problem, in turn: (problem, coarse groups only, share of the time left). Coarse,
    then full; where ZeRO >= 1 is allowed beside zero 0, those two without it (a much smaller model that finds
    good plans fast) and a last full solve with it, which starts from their plan and decides; but where the model
    with ZeRO would exceed `ZERO_SEARCH_BLOCKS` (too large to build and solve within a limit of seconds), ZeRO is
    left to the seeds, which try each allowed stage on all stages."""
    zeros = problem.zero_stages
    if zeros == (0,) or 0 not in zeros:
        return [(problem, True, COARSE_SHARE), (problem, False, 1.0)]
    plain = dataclasses.replace(problem, zero_stages=(0,))
    groups = candidate_groups(problem.cell.cluster, problem.model, problem.seq_len)
    if len(groups) * problem.model.num_layers > ZERO_SEARCH_BLOCKS:
        return [(plain, True, COARSE_SHARE), (plain, False, 1.0)]
    return [(plain, True, COARSE_SHARE), (plain, False, PLAIN_SHARE), (problem, False, 1.0)]


def _solve(
    problem: CellProblem, cluster: ClusterSpec, batch: int, end: float, workers: int, warm: TrainPlan | None
) -> _Outcome:
    """The CP-SAT solves of one sub-problem (`_phases`) before the wall-clock time `end`, each starting from the
    fastest plan known so far: the best seed or `warm` (a plan of finer cells with the same micro-batch size)."""

    def plan_of(slots: list[Slot]) -> TrainPlan:
        return _plan_from_slots(slots, problem.cell, problem, cluster, batch)

    def fastest(options: list[list[Slot] | None]) -> list[Slot] | None:
        found = [s for s in options if s is not None]
        return min(found, key=lambda s: plan_of(s).estimate.iteration_s) if found else None  # type: ignore[union-attr]

    def cp_sat(sub: CellProblem, coarse: bool, share: float, hint: list[Slot] | None) -> CellResult:
        left = end - time.perf_counter()
        if left < MIN_SOLVE_S:  # no time to build the model: its building would overrun the limit
            return CellResult("UNKNOWN", None, 0.0)
        return CellModel(sub, coarse=coarse).solve(share * left, workers, hint=hint)

    seeds = _seeds(problem)
    best = start = fastest([seeds[0] if seeds else None, _cell_slots(warm, problem)])
    results, phases = [], _phases(problem)
    for sub, coarse, share in phases:
        results.append(cp_sat(sub, coarse, share, best))
        best = fastest([results[-1].slots, best])
    full = results[-1]
    plans = [plan_of(s) for s in (start, *(r.slots for r in results)) if s is not None]
    for plan in plans:
        assert plan.estimate is not None
        excess = memory_excess(plan, cluster, plan.estimate)
        if excess:
            raise AssertionError(f"planner produced a plan over memory: {excess}")
    copies = problem.cell.copies
    searched = phases[-1][0] == problem  # the last solve covered the whole space (ZeRO included)
    return _Outcome(copies, problem.microbatch, plans, full.status, full.bound_s, copies == 1 and searched)


def _problems(
    cluster: ClusterSpec, model: ModelSpec, workload: TrainWorkload, ks: list[int], use_all: bool
) -> Iterator[CellProblem]:
    """The sub-problems of the splits `ks`: one per split and micro-batch size that divides the batch evenly."""
    for k in ks:
        cell = split_cell(cluster, k)
        assert cell is not None
        for b in workload.microbatch_sizes:
            if workload.global_batch % (k * b) == 0:
                microbatches = workload.global_batch // (k * b)
                yield CellProblem(
                    cell, model, workload.seq_len, b, microbatches, workload.recompute, use_all, workload.zero_stages
                )


def _fastest(
    outcomes: list[_Outcome], microbatch: int | None = None, cluster: ClusterSpec | None = None
) -> tuple[TrainPlan, _Outcome] | None:
    """The fastest plan of `outcomes` (of one micro-batch size if given) and the outcome it came from; if `cluster`
    has a topology, the least spread (`Spread.score`) of those within `SPREAD_TIE` of the fastest."""
    found = [(p, o) for o in outcomes for p in o.plans if microbatch in (None, o.microbatch)]
    if not found:
        return None
    best = min(found, key=lambda x: x[0].estimate.iteration_s)  # type: ignore[union-attr]
    if cluster is None or not cluster.topology.levels:
        return best
    limit = best[0].estimate.iteration_s * (1 + SPREAD_TIE)  # type: ignore[union-attr]
    ties = [x for x in found if x[0].estimate.iteration_s <= limit]  # type: ignore[union-attr]
    return min(ties, key=lambda x: plan_spread(x[0], cluster).score)


def _run(
    problems: list[CellProblem],
    cluster: ClusterSpec,
    workload: TrainWorkload,
    deadline: float,
    workers: int,
    outcomes: list[_Outcome],
) -> list[_Outcome]:
    """`outcomes` followed by those of `problems`, solved in turn, each with a share of the time left before
    `deadline` in proportion to its cell's devices, each warm-started from the fastest plan so far (same size)."""
    outcomes = list(outcomes)
    for i, problem in enumerate(problems):
        weight = problem.cell.cluster.num_devices / sum(p.cell.cluster.num_devices for p in problems[i:])
        end = time.perf_counter() + max(deadline - time.perf_counter(), 0.0) * weight
        warm = _fastest(outcomes, problem.microbatch)
        outcomes.append(_solve(problem, cluster, workload.global_batch, end, workers, warm and warm[0]))
    return outcomes


def _summary(
    outcomes: list[_Outcome],
    cluster: ClusterSpec,
    model: ModelSpec,
    workload: TrainWorkload,
    elapsed: float,
    time_limit_s: float,
) -> tuple[TrainPlan, SolveInfo]:
    """The fastest plan found, with its status, bound and gap."""
    fastest = _fastest(outcomes, cluster=cluster)
    assert fastest is not None
    best, source = fastest
    best = compress_edges(best, cluster, model, workload.compress)
    assert best.estimate is not None
    compressed = any(s.compress != "none" for r in best.replicas for s in r.stages)
    whole = [o for o in outcomes if o.proves]
    sizes = {o.microbatch for o in whole}
    searched = sizes == set(workload.microbatch_sizes) and not compressed
    proven = searched and all(o.status in ("OPTIMAL", "INFEASIBLE") for o in whole)
    bound = throughput_bound_s(cluster, model, workload)
    if searched:
        bound = max(bound, min(o.bound_s for o in whole))
    iteration = best.estimate.iteration_s
    bound = min(bound, iteration)
    info = SolveInfo(
        status="OPTIMAL" if proven else "FEASIBLE",
        lower_bound_s=bound,
        gap=(iteration - bound) / iteration,
        solve_s=elapsed,
        time_limit_s=time_limit_s,
        cells=source.cells,
        microbatch_size=source.microbatch,
        solves=len(outcomes),
    )
    return dataclasses.replace(best, solve=info), info


def compress_edges(plan: TrainPlan, cluster: ClusterSpec, model: ModelSpec, lossiest: str = "none") -> TrainPlan:
    """`plan` with every stage edge in the codec, among `COMPRESSIONS` up to `lossiest`, that moves its activations
    and gradients fastest under the cost model (packed bytes over the edge's link plus encoding and decoding; the
    less lossy on a tie), re-estimated. With `lossiest` "none", every edge uncompressed."""
    allowed = COMPRESSIONS[: COMPRESSIONS.index(lossiest) + 1]
    costs = TrainCosts(cluster, model, plan.seq_len)
    replicas = []
    for replica in plan.replicas:
        stages = list(replica.stages)
        for i, (sender, receiver) in enumerate(zip(replica.stages, replica.stages[1:], strict=False)):
            link, kinds = boundary_link(cluster, sender, receiver), (sender.kind, receiver.kind)
            best = min(allowed, key=lambda c: costs.p2p_seconds(link, replica.microbatch_size, c, kinds))
            stages[i] = dataclasses.replace(sender, compress=best)
        replicas.append(dataclasses.replace(replica, stages=tuple(stages)))
    chosen = dataclasses.replace(plan, replicas=tuple(replicas))
    return dataclasses.replace(chosen, estimate=evaluate_train_plan(chosen, cluster, model))


def _no_plan(
    outcomes: list[_Outcome],
    cluster: ClusterSpec,
    model: ModelSpec,
    workload: TrainWorkload,
    time_limit_s: float,
    use_all: bool,
) -> PlanningError:
    """Why no plan came out: memory (explained) when every sub-problem is infeasible, else the time limit."""
    statuses = [o.status for o in outcomes]
    if all(s == "INFEASIBLE" for s in statuses):
        reason = explain_infeasible(cluster, model, workload)
        if use_all:
            reason += (
                "; or use_all_devices: every device must run a stage (each stage at least one block, each "
                "replica at least one micro-batch)"
            )
        return PlanningError(reason)
    return PlanningError(f"no plan found within the time limit of {time_limit_s:.1f} s (CP-SAT: {statuses})")


def _search(
    cluster: ClusterSpec,
    model: ModelSpec,
    workload: TrainWorkload,
    deadline: float,
    options: _Options,
    outcomes: list[_Outcome],
) -> list[_Outcome]:
    """`outcomes` (warm starts) followed by the solves of `cluster`'s cell splits, and of coarser splits while
    none has yielded a plan and time is left."""
    ks = cell_splits(cluster, model, workload, options.max_cell_devices, options.use_all_devices)
    problems = list(_problems(cluster, model, workload, ks, options.use_all_devices))
    if not problems:
        raise PlanningError(
            f"global_batch {workload.global_batch} cannot be split into equal micro-batches of the sizes "
            f"{list(workload.microbatch_sizes)} over {ks[-1]} identical cells"
        )
    start = len(outcomes)
    outcomes = _run(problems, cluster, workload, deadline, options.workers, outcomes)
    fallback = coarser_splits(cluster, model, workload, ks, options.use_all_devices)
    while fallback and not any(o.plans for o in outcomes[start:]) and time.perf_counter() < deadline:
        more = list(_problems(cluster, model, workload, [fallback.pop(0)], options.use_all_devices))
        outcomes = _run(more, cluster, workload, deadline, options.workers, outcomes)
    return outcomes


def _subset_outcomes(
    cluster: ClusterSpec, model: ModelSpec, workload: TrainWorkload, deadline: float, options: _Options
) -> list[_Outcome]:
    """Quick solves of the subsets (`planners.cells.subsets`) before `deadline`, their plans renumbered onto
    `cluster`: warm starts that keep its plan no worse than its subsets' (adding a node never makes it worse)."""
    out = []
    kinds = [d.kind for d in cluster.devices]
    parts = subsets(cluster)
    for i, (sub, original) in enumerate(parts):
        end = time.perf_counter() + max(deadline - time.perf_counter(), 0.0) / (len(parts) - i)
        if state_bytes(model) > usable_bytes(sub):
            continue
        try:
            found = _search(sub, model, workload, end, options, [])
        except PlanningError:
            continue
        for o in found:
            if not o.plans:
                continue
            plans = [p.with_devices(original, kinds, cluster.name) for p in o.plans]
            plans = [dataclasses.replace(p, estimate=evaluate_train_plan(p, cluster, model)) for p in plans]
            out.append(_Outcome(o.cells, o.microbatch, plans, o.status, 0.0, False))
    return out


def _current_outcome(
    plan: TrainPlan, cluster: ClusterSpec, model: ModelSpec, workload: TrainWorkload, use_all_devices: bool
) -> _Outcome:
    """The plan running now (`current`), checked against `cluster`, `model` and `workload` and re-estimated: a warm
    start that the result is never slower than under the cost model."""
    wanted = {
        "num_layers": ("model", model.num_layers),
        "global_batch": ("workload", workload.global_batch),
        "seq_len": ("workload", workload.seq_len),
    }
    for field, (source, value) in wanted.items():
        if getattr(plan, field) != value:
            raise PlanningError(f"current plan: {field} is {getattr(plan, field)}, the {source}'s is {value}")
    kinds = [d.kind for d in cluster.devices]
    for r, replica in enumerate(plan.replicas):
        for s, stage in enumerate(replica.stages):
            at = f"current plan: replicas[{r}].stages[{s}]"
            if any(d >= len(kinds) or kinds[d] != stage.kind for d in stage.devices):
                raise PlanningError(
                    f"{at}: devices {list(stage.devices)} are not {stage.kind} devices of {cluster.name!r}"
                )
            if stage.zero not in workload.zero_stages or (stage.recompute and not workload.recompute):
                raise PlanningError(f"{at}: zero {stage.zero}, recompute {stage.recompute} not allowed by the workload")
        if replica.microbatch_size not in workload.microbatch_sizes:
            allowed = list(workload.microbatch_sizes)
            raise PlanningError(f"current plan: replicas[{r}].microbatch_size must be one of {allowed}")
    plan = dataclasses.replace(plan, device_kinds=tuple(kinds), cluster=cluster.name, solve=None)
    plan = dataclasses.replace(plan, estimate=evaluate_train_plan(plan, cluster, model))
    excess = memory_excess(plan, cluster, plan.estimate)
    if excess:
        raise PlanningError(f"current plan does not fit {cluster.name}: " + "; ".join(excess))
    if use_all_devices and len(set(plan.devices)) < len(kinds):
        raise PlanningError("current plan leaves devices idle, which use_all_devices forbids")
    return _Outcome(1, plan.replicas[0].microbatch_size, [plan], "FEASIBLE", 0.0, False)


@dataclasses.dataclass(frozen=True)
class _Options:
    """The caller's options that every sub-search shares."""

    workers: int
    max_cell_devices: int
    use_all_devices: bool


def plan_training_with_info(
    cluster: ClusterSpec,
    model: ModelSpec,
    workload: TrainWorkload,
    *,
    time_limit_s: float = 20.0,
    num_workers: int = 2,
    max_cell_devices: int = 16,
    use_all_devices: bool = False,
    current: TrainPlan | None = None,
) -> tuple[TrainPlan, SolveInfo]:
    """`plan_training`, also returning how the plan was found (also in `plan.solve`)."""
    start = time.perf_counter()
    deadline = start + (1 - RESERVE_SHARE) * time_limit_s
    if state_bytes(model) > usable_bytes(cluster):
        raise PlanningError(explain_infeasible(cluster, model, workload))
    options = _Options(num_workers, max_cell_devices, use_all_devices)
    outcomes = [] if current is None else [_current_outcome(current, cluster, model, workload, use_all_devices)]
    if cluster.num_devices >= SUBSET_MIN_DEVICES and not use_all_devices:
        outcomes += _subset_outcomes(cluster, model, workload, start + SUBSET_SHARE * time_limit_s, options)
    outcomes = _search(cluster, model, workload, deadline, options, outcomes)
    if not any(o.plans for o in outcomes):
        raise _no_plan(outcomes, cluster, model, workload, time_limit_s, use_all_devices)
    return _summary(outcomes, cluster, model, workload, time.perf_counter() - start, time_limit_s)


def plan_training(
    cluster: ClusterSpec,
    model: ModelSpec,
    workload: TrainWorkload,
    *,
    time_limit_s: float = 20.0,
    num_workers: int = 2,
    max_cell_devices: int = 16,
    use_all_devices: bool = False,
    current: TrainPlan | None = None,
) -> TrainPlan:
    """The fastest training plan under the cost model (best found within `time_limit_s` if not proven optimal;
    `plan.solve` says which, with the bound and gap).

    `use_all_devices` forbids idle devices (e.g. to exercise every emulated device). Large clusters are planned
    as identical cells of at most `max_cell_devices` devices (see the module docstring). `current`, a plan that
    runs on `cluster` now (e.g. before a node was added), is a warm start the result is never slower than.
    Raises `PlanningError` naming the binding constraint when no plan fits.
    """
    plan, _ = plan_training_with_info(
        cluster,
        model,
        workload,
        time_limit_s=time_limit_s,
        num_workers=num_workers,
        max_cell_devices=max_cell_devices,
        use_all_devices=use_all_devices,
        current=current,
    )
    return plan


def replan_training(
    cluster: ClusterSpec,
    failed: Sequence[int],
    model: ModelSpec,
    workload: TrainWorkload,
    **options: Any,
) -> TrainPlan:
    """A new plan after losing the `failed` devices, numbered as in `cluster` (the survivors keep their indices).

    `options` are those of `plan_training`.
    """
    survivors, original = cluster.without_devices(failed)
    plan = plan_training(survivors, model, workload, **options)
    return plan.with_devices(original, [d.kind for d in cluster.devices], cluster.name)


def explain_infeasible(cluster: ClusterSpec, model: ModelSpec, workload: TrainWorkload) -> str:
    """Name the constraint that rules out every plan (memory, in the usual case); the per-stage figures are those
    of the most memory-saving allowed ZeRO stage inside a stage (moments split across replicas can save more)."""
    costs = TrainCosts(cluster, model, workload.seq_len)
    b = min(workload.microbatch_sizes)
    state, usable = state_bytes(model), usable_bytes(cluster)
    if state > usable:
        return (
            f"memory: {model.name} needs {state / 1e9:.1f} GB for weights, gradients and Adam state "
            f"({model.num_params / 1e9:.2f} B parameters x 16 bytes) but the cluster's usable memory is "
            f"{usable / 1e9:.1f} GB in total"
        )
    lines = []
    for members in cluster.node_classes():
        node = cluster.nodes[members[0]]
        size = 1 << (node.count.bit_length() - 1)
        cap = cluster.profile(node.kind).capacity_bytes
        for cp in shapes(size, model, workload.seq_len):
            tp = size // cp

            def need(first: bool, last: bool, tp: int = tp, cp: int = cp) -> float:
                return min(
                    costs.stage_memory_bytes(tp, 1, b, workload.recompute, 1, first, last, cp, zero)
                    for zero in workload.zero_stages
                )

            at = f"TP={tp}" + (f" CP={cp}" if cp > 1 else "")
            block = need(False, False)
            lines.append(f"{node.kind}: one block at {at} needs {block / 1e9:.2f} GB of {cap / 1e9:.2f} GB usable")
            for what, gb in (("embedding", need(True, False)), ("LM head", need(False, True))):
                if gb > cap:
                    held = f"a stage holding one block and the {what} at {at}"
                    lines.append(f"{node.kind}: {held} needs {gb / 1e9:.2f} GB")
    return (
        f"memory: no placement of {model.name} ({model.num_layers} blocks, micro-batch >= {b}, seq_len "
        f"{workload.seq_len}) keeps every stage within its devices' usable memory; " + "; ".join(lines)
    )
