"""The training planner: CP-SAT chooses device groups, replicas, layer splits, batch shares and recomputation.

Search space (the same one `planners.brute_force` enumerates):
- a stage is a TP group of `t` devices inside one node, `t` a power of two; inside each node the groups in use
  are laid out largest first from the node's first device (every multiset of power-of-two sizes that fits packs
  this way, aligned), and the node's remaining devices stay idle;
- a replica is a pipeline of such groups, ordered by device index: it visits each node once, and inside a node
  goes from larger TP degree to smaller;
- every replica gets at least one micro-batch; all micro-batches have one size `b`, chosen from the workload's
  candidates by solving once per candidate;
- each stage gets at least one block, and may recompute its activations.
The model: `planners.cost_model` (iteration time = slowest replica's 1F1B time + gradient all-reduce; every stage
within its devices' usable memory).

Large clusters are split into `K` identical cells (each with the same number of nodes of every node class); one
cell is planned and its plan repeated `K` times, with the gradient all-reduce counted over all `K` cells. Several
`K` are tried (cells of at most `max_cell_devices` devices, and the whole cluster when it is that small) and the
best plan is kept. Each cell is solved twice: first over coarse groups only (TP of at least half a node, fast),
then over all groups starting from that plan (a CP-SAT hint), keeping the better one when the time limit is hit;
both start from a simple feasible pipeline when there is one. The CP-SAT model per cell:
- booleans `a[g, r]`: candidate group `g` is a stage of replica slot `r` (slot symmetry broken by first member);
- integers `n0[g]`, `n1[g]`: blocks without / with recomputation (one of them zero), `m[r]`: micro-batches;
- stage time `t[g]` linear in those; replica time `S[r] + P2P[r] + (m[r] - 1) * M[r]` with `M[r]` the slowest
  stage (a product constraint); memory `n * (state + in_flight * activations)` with `in_flight` a product too.
Times are integers in units of 1/10000 of the fastest block's time, so rounding costs at most ~1e-4 relative;
memory is in units of 2^-20 of the smallest device's usable memory, rounded up (plans are never over memory).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

from ortools.sat.python import cp_model

from planners.cluster import ClusterSpec, Link
from planners.cost_model import TrainCosts, evaluate_train_plan, memory_excess
from planners.errors import PlanningError
from planners.groups import Group, Slot, candidate_groups
from planners.model import ModelSpec
from planners.plan import Replica, Stage, TrainPlan
from planners.seeds import seed_slots
from planners.workload import TrainWorkload

RESOLUTION = 10_000
COARSE_SHARE = 0.25
HINT_SHARE = 0.1
RESERVE_SHARE = 0.03  # of the time limit, kept for turning solutions into plans
MEMORY_RESOLUTION = 1 << 20


@dataclasses.dataclass(frozen=True)
class SolveInfo:
    """How the plan was found: cells, micro-batch size, CP-SAT status, wall time, and a proven lower bound."""

    cells: int
    microbatch_size: int
    status: str
    solve_s: float
    solves: int  # (cell split, micro-batch size) sub-problems, each solved coarse then full
    lower_bound_s: float  # no plan of the searched space is faster (CP-SAT's bound, to ~1e-4)


@dataclasses.dataclass(frozen=True)
class _Cell:
    """A sub-cluster of whole nodes, repeated `copies` times; `device_maps[c][i]` is cell device i in copy c."""

    cluster: ClusterSpec
    copies: int
    device_maps: tuple[tuple[int, ...], ...]


def _cells(cluster: ClusterSpec, max_cell_devices: int, batch: int) -> list[_Cell]:
    """The ways to split `cluster` into identical cells worth trying, largest cell first: every split into cells
    of at most `max_cell_devices` devices, or else the finest split; the number of cells must divide `batch`."""
    classes = cluster.node_classes()
    g = math.gcd(*(len(nodes) for nodes in classes))
    splits = [k for k in range(1, g + 1) if g % k == 0 and batch % k == 0]
    ks = [k for k in splits if cluster.num_devices // k <= max_cell_devices] or [splits[-1]]
    offsets = cluster.node_offsets()
    cells = []
    for k in ks:
        chosen = [
            sorted(n for nodes in classes for n in nodes[c * len(nodes) // k : (c + 1) * len(nodes) // k])
            for c in range(k)
        ]
        maps = tuple(tuple(offsets[n] + i for n in nodes for i in range(cluster.nodes[n].count)) for nodes in chosen)
        sub = dataclasses.replace(cluster, nodes=tuple(cluster.nodes[n] for n in chosen[0]))
        cells.append(_Cell(sub, k, maps))
    return cells


class _CellModel:
    """The CP-SAT model of one cell for one micro-batch size."""

    def __init__(
        self,
        cell: _Cell,
        model: ModelSpec,
        seq_len: int,
        microbatch: int,
        microbatches: int,
        recompute: bool,
        coarse: bool = False,
        use_all_devices: bool = False,
    ) -> None:
        cluster = cell.cluster
        costs = TrainCosts(cluster, model, seq_len)
        groups = candidate_groups(cluster, model)
        if coarse:
            groups = [g for g in groups if 2 * g.tp >= cluster.nodes[g.node].count]
        self.groups = groups
        G, L = len(groups), model.num_layers
        state = L * costs.layer_state_bytes(1) + costs.first_state_bytes(1) + costs.last_state_bytes(1)
        min_devices = math.ceil(state / max(p.capacity_bytes for p in cluster.profiles.values()))
        R = max(1, min(cluster.num_devices // max(min_devices, 1), microbatches))
        intra = [cluster.nodes[g.node].intra_link for g in groups]
        c0 = [costs.layer_seconds(g.kind, g.tp, microbatch, False, intra[i]) for i, g in enumerate(groups)]
        c1 = [costs.layer_seconds(g.kind, g.tp, microbatch, True, intra[i]) for i, g in enumerate(groups)]
        unit = self.unit = min(c0) / RESOLUTION

        def ticks(seconds: float) -> int:
            return round(seconds / unit)

        m = self.m = cp_model.CpModel()
        a = self.a = [[m.new_bool_var(f"a{g}_{r}") for r in range(min(g + 1, R))] for g in range(G)]
        slots = [[g for g in range(G) if r < len(a[g])] for r in range(R)]
        used = self.used = [m.new_bool_var(f"used{r}") for r in range(R)]
        on = [m.new_bool_var(f"on{g}") for g in range(G)]
        for g in range(G):
            m.add(on[g] == sum(a[g]))
        # Canonical layout inside a node: active groups pack from the node's first device, largest first.
        cover = [sum(on[g] for g in range(G) if d in groups[g].devices) for d in range(cluster.num_devices)]
        for d in range(cluster.num_devices):
            m.add(cover[d] == 1 if use_all_devices else cover[d] <= 1)
        for n, offset in enumerate(cluster.node_offsets()):
            for d in range(offset + 1, offset + cluster.nodes[n].count):
                m.add(cover[d] <= cover[d - 1])
        for g, grp in enumerate(groups):
            before = grp.devices[0] - 1
            if before >= 0 and cluster.devices[before].node == grp.node:
                bigger = [on[h] for h in range(G) if before in groups[h].devices and groups[h].tp >= grp.tp]
                m.add(sum(bigger) >= on[g])
        # Same-size groups of a node are interchangeable: their replica slots ascend with the address.
        slot_of = [sum(r * a[g][r] for r in range(len(a[g]))) for g in range(G)]
        for g in range(G):
            twins = [k for k in range(g + 1, G) if groups[k].node == groups[g].node and groups[k].tp == groups[g].tp]
            if twins:
                m.add(slot_of[twins[0]] >= slot_of[g]).only_enforce_if([on[g], on[twins[0]]])
        for r in range(R):
            for g in slots[r]:
                m.add_implication(a[g][r], used[r])
                if r > 0:
                    m.add(sum(a[h][r - 1] for h in slots[r - 1] if h < g) >= 1).only_enforce_if(a[g][r])
            m.add(sum(a[g][r] for g in slots[r]) >= used[r])
        for r in range(1, R):
            m.add_implication(used[r], used[r - 1])

        # Layers and recomputation.
        self.n0 = n0 = [m.new_int_var(0, L, f"n0_{g}") for g in range(G)]
        self.n1 = n1 = [m.new_int_var(0, L if recompute else 0, f"n1_{g}") for g in range(G)]
        rc = [m.new_bool_var(f"rc{g}") for g in range(G)]
        nl = [[m.new_int_var(0, L, f"nl{g}_{r}") for r in range(len(a[g]))] for g in range(G)]
        for g in range(G):
            m.add(n0[g] == 0).only_enforce_if(rc[g])
            m.add(n1[g] == 0).only_enforce_if(rc[g].negated())
            m.add(n0[g] + n1[g] == sum(nl[g]))
            m.add(n0[g] + n1[g] >= on[g])
            for r in range(len(a[g])):
                m.add(nl[g][r] == 0).only_enforce_if(a[g][r].negated())
        for r in range(R):
            m.add(sum(nl[g][r] for g in slots[r]) == L * used[r])

        # First and last stage of each replica (canonical order = candidate order).
        def suffix(g: int, r: int) -> cp_model.LinearExpr:
            return sum(a[h][r] for h in slots[r] if h >= g)

        first = [[m.new_bool_var(f"first{g}_{r}") for r in range(len(a[g]))] for g in range(G)]
        last = [[m.new_bool_var(f"last{g}_{r}") for r in range(len(a[g]))] for g in range(G)]
        for r in range(R):
            for g in slots[r]:
                m.add_implication(first[g][r], a[g][r])
                m.add_implication(last[g][r], a[g][r])
                m.add(sum(a[h][r] for h in slots[r] if h < g) == 0).only_enforce_if(first[g][r])
                m.add(suffix(g + 1, r) == 0).only_enforce_if(last[g][r])
            m.add(sum(first[g][r] for g in slots[r]) == used[r])
            m.add(sum(last[g][r] for g in slots[r]) == used[r])
        is_first = [sum(first[g]) for g in range(G)]
        is_last = [sum(last[g]) for g in range(G)]

        mvars = self.mvars = [m.new_int_var(0, microbatches, f"m{r}") for r in range(R)]
        m.add(sum(mvars) == microbatches)

        # Memory: 1F1B keeps min(distance from the end of the pipeline, micro-batches) micro-batches in flight.
        memory_unit = min(p.capacity_bytes for p in cluster.profiles.values()) / MEMORY_RESOLUTION

        def mb(nbytes: float) -> int:
            return math.ceil(nbytes / memory_unit)

        q = [m.new_int_var(0, G, f"q{g}") for g in range(G)]
        for g in range(G):
            by_count = m.new_bool_var(f"short{g}")
            for r in range(len(a[g])):
                m.add(q[g] >= suffix(g, r)).only_enforce_if([a[g][r], by_count.negated()])
                m.add(q[g] >= mvars[r]).only_enforce_if([a[g][r], by_count])
            grp = groups[g]
            p0, p1 = m.new_int_var(0, L * G, f"p0_{g}"), m.new_int_var(0, L * G, f"p1_{g}")
            m.add_multiplication_equality(p0, [n0[g], q[g]])
            m.add_multiplication_equality(p1, [n1[g], q[g]])
            cap = math.floor(cluster.profile(grp.kind).capacity_bytes / memory_unit)
            m.add(
                mb(costs.layer_state_bytes(grp.tp)) * (n0[g] + n1[g])
                + mb(costs.layer_act_bytes(grp.tp, microbatch, False)) * (p0 + rc[g])
                + mb(costs.layer_act_bytes(grp.tp, microbatch, True)) * p1
                + mb(costs.first_state_bytes(grp.tp)) * is_first[g]
                + mb(costs.last_state_bytes(grp.tp) + costs.logits_bytes(grp.tp, microbatch)) * is_last[g]
                <= cap
            )

        # Stage and replica times.
        head = [ticks(costs.head_seconds(gr.kind, gr.tp, microbatch)) for gr in groups]
        t_hi = L * max(ticks(c) for c in c1 + c0) + max(head)
        stage_t = [n0[g] * ticks(c0[g]) + n1[g] * ticks(c1[g]) + head[g] * is_last[g] for g in range(G)]
        nodes = range(len(cluster.nodes))
        p2p_intra = [ticks(costs.p2p_seconds(cluster.nodes[n].intra_link, microbatch)) for n in nodes]
        p2p_inter = ticks(costs.p2p_seconds(cluster.inter_link, microbatch))
        z = m.new_int_var(0, t_hi * (microbatches + G) + p2p_inter * G + max(p2p_intra) * G, "z")
        node_used = [m.new_bool_var(f"node{n}") for n in nodes]
        for r in range(R):
            m.add(mvars[r] >= used[r])
            m.add(mvars[r] <= microbatches * used[r])
            slow = m.new_int_var(0, t_hi, f"M{r}")
            share = []
            for g in slots[r]:
                m.add(slow >= stage_t[g]).only_enforce_if(a[g][r])
                s = m.new_int_var(0, t_hi, f"ts{g}_{r}")
                m.add(s >= stage_t[g]).only_enforce_if(a[g][r])
                share.append(s)
            nu = [m.new_bool_var(f"nu{n}_{r}") for n in nodes]
            count = [sum(a[g][r] for g in slots[r] if groups[g].node == n) for n in nodes]
            for n in nodes:
                m.add(count[n] <= G * nu[n])
                m.add(nu[n] <= count[n])
                m.add_implication(nu[n], node_used[n])
            p2p = sum((count[n] - nu[n]) * p2p_intra[n] for n in nodes) + (sum(nu) - used[r]) * p2p_inter
            steady = m.new_int_var(0, t_hi * microbatches, f"mM{r}")
            m.add_multiplication_equality(steady, [mvars[r], slow])
            m.add(z >= sum(share) + p2p + steady - slow)

        # A relaxation that gives the LP a throughput bound: a group's busy time (its blocks times its replica's
        # micro-batches, `work`) never exceeds the iteration, and the work of all groups adds up to L * micro-batches.
        work = [m.new_int_var(0, L * microbatches, f"w{g}") for g in range(G)]
        m.add(sum(work) == L * microbatches)
        for g in range(G):
            m.add(work[g] <= L * microbatches * on[g])
            m.add(z >= ticks(c0[g]) * work[g])

        # Gradient all-reduce across all replicas of all cells.
        count_is = [m.new_bool_var(f"R{k}") for k in range(R + 1)]
        m.add_exactly_one(count_is)
        m.add(sum(k * count_is[k] for k in range(R + 1)) == sum(used))
        multi = m.new_bool_var("multi")
        if cell.copies > 1:
            m.add(multi == 1)
        else:
            m.add(sum(node_used) <= 1 + len(cluster.nodes) * multi)
        for g in range(G):
            m.add(node_used[groups[g].node] >= on[g])

        def sync_ticks(nbytes: float, total: int, link: Link) -> int:
            return ticks(costs.grad_sync_seconds(total, nbytes, link) - costs.grad_sync_seconds(total, 0, link))

        links = [cluster.inter_link, *intra]
        widest = R * cell.copies
        full = max(costs.stage_grad_bytes(gr.tp, L, True, True) for gr in groups)
        slowest = min(links, key=lambda link: link.gb_s)
        laggiest = max(links, key=lambda link: link.latency_us)
        rounding = L + 3
        sync_hi = sync_ticks(full, widest, slowest) + ticks(costs.grad_sync_seconds(widest, 0, laggiest)) + rounding
        sync = m.new_int_var(0, sync_hi, "sync")
        for k in range(1, R + 1):
            total = k * cell.copies
            if total == 1:
                continue
            for links, when in ((intra, multi.negated()), ([cluster.inter_link] * G, multi)):
                for g, grp in enumerate(groups):
                    link = links[g]
                    m.add(
                        sync
                        >= sync_ticks(costs.stage_grad_bytes(grp.tp, 1, False, False), total, link) * (n0[g] + n1[g])
                        + sync_ticks(costs.stage_grad_bytes(grp.tp, 0, True, False), total, link) * is_first[g]
                        + sync_ticks(costs.stage_grad_bytes(grp.tp, 0, False, True), total, link) * is_last[g]
                        + ticks(costs.grad_sync_seconds(total, 0, link))
                    ).only_enforce_if([count_is[k], when])
        # One tick per recomputed block breaks ties towards not recomputing where it does not pay.
        m.minimize(z + sync + sum(n1))
        self.rc = rc

    def solve(
        self, time_limit_s: float, workers: int, hint: list[Slot] | None = None
    ) -> tuple[str, list[Slot] | None, float]:
        """Solve within the time limit, starting from `hint` (a plan of the same space) when given; returns the
        status, the solution, and CP-SAT's lower bound on the iteration time in seconds."""
        start = time.perf_counter()
        if hint and self._hint(hint):
            self._complete_hint(min(HINT_SHARE * time_limit_s, 2.0))
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = max(time_limit_s - (time.perf_counter() - start), 0.05)
        solver.parameters.num_workers = workers
        solver.parameters.linearization_level = 2  # the LP relaxation of the enforced constraints proves bounds
        status = solver.solve(self.m)
        name = solver.status_name(status)
        bound = math.inf if status == cp_model.INFEASIBLE else solver.best_objective_bound * self.unit
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return name, None, bound
        return name, self._extract(solver), bound

    def _complete_hint(self, time_limit_s: float) -> None:
        """Extend the hint on the decision variables to every variable, so the search starts from a solution."""
        solver = cp_model.CpSolver()
        solver.parameters.fix_variables_to_their_hinted_value = True
        solver.parameters.max_time_in_seconds = max(time_limit_s, 0.05)
        solver.parameters.num_workers = 1
        if solver.solve(self.m) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return
        self.m.clear_hints()
        for i in range(len(self.m.proto.variables)):
            var = self.m.get_int_var_from_proto_index(i)
            self.m.add_hint(var, solver.value(var))

    def _hint(self, slots: list[Slot]) -> bool:
        """Hint the decision variables with `slots`, relabelled to satisfy the symmetry breaking; False if the
        slots do not fit this model."""
        index = {g: i for i, g in enumerate(self.groups)}
        if len(slots) > len(self.used) or any(g not in index for stages, _ in slots for g, _, _ in stages):
            return False
        slots = _canonical_slots(slots, index)
        member = {index[g]: (r, n, rc) for r, (stages, _) in enumerate(slots) for g, n, rc in stages}
        for g, row in enumerate(self.a):
            r, layers, recompute = member.get(g, (-1, 0, False))
            for k, var in enumerate(row):
                self.m.add_hint(var, k == r)
            self.m.add_hint(self.n0[g], 0 if recompute else layers)
            self.m.add_hint(self.n1[g], layers if recompute else 0)
            self.m.add_hint(self.rc[g], recompute)
        for r, used in enumerate(self.used):
            self.m.add_hint(used, r < len(slots))
            self.m.add_hint(self.mvars[r], slots[r][1] if r < len(slots) else 0)
        return True

    def _extract(self, solver: cp_model.CpSolver) -> list[Slot]:
        out = []
        for r, used in enumerate(self.used):
            if not solver.value(used):
                continue
            stages = []
            for g, row in enumerate(self.a):
                if r < len(row) and solver.value(row[r]):
                    layers = solver.value(self.n0[g]) + solver.value(self.n1[g])
                    stages.append((self.groups[g], layers, bool(solver.value(self.n1[g]))))
            out.append((stages, solver.value(self.mvars[r])))
        return out


def _canonical_slots(slots: list[Slot], index: dict[Group, int]) -> list[Slot]:
    """Relabel an equivalent solution into the form the symmetry breaking admits: slots ordered by first group,
    and same-size groups of a node handed to slots in address order (their blocks and flags move with the slot)."""
    slots = [(sorted(stages, key=lambda st: index[st[0]]), count) for stages, count in slots]
    for _ in range(len(slots) + 1):
        slots.sort(key=lambda slot: index[slot[0][0][0]])
        classes: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for r, (stages, _) in enumerate(slots):
            for k, (g, _, _) in enumerate(stages):
                classes.setdefault((g.node, g.tp), []).append((r, k))
        changed = False
        for positions in classes.values():
            groups = sorted((slots[r][0][k][0] for r, k in positions), key=index.__getitem__)
            for (r, k), g in zip(
                sorted(positions, key=lambda p: (p[0], index[slots[p[0]][0][p[1]][0]])), groups, strict=True
            ):
                old, n, rc = slots[r][0][k]
                if old != g:
                    slots[r][0][k] = (g, n, rc)
                    changed = True
        slots = [(sorted(stages, key=lambda st: index[st[0]]), count) for stages, count in slots]
        if not changed:
            break
    return slots


def _best_seed(
    cell: _Cell, model: ModelSpec, workload: TrainWorkload, microbatch: int, use_all_devices: bool
) -> list[Slot] | None:
    """The fastest seed plan that fits, scored on one copy of the cell with the all-reduce over all copies."""
    one = _Cell(cell.cluster, 1, (tuple(range(cell.cluster.num_devices)),))
    share = dataclasses.replace(
        workload, global_batch=workload.global_batch // cell.copies, microbatch_sizes=(microbatch,)
    )
    total = share.global_batch // microbatch
    costs = TrainCosts(cell.cluster, model, workload.seq_len)
    best, best_s = None, math.inf
    for slots in seed_slots(cell.cluster, model, workload.seq_len, microbatch, total, workload.recompute):
        plan = _plan_from_slots(slots, one, cell.cluster, model, share, microbatch)
        estimate = plan.estimate
        assert estimate is not None
        if cell.copies > 1:
            grad = max(
                costs.stage_grad_bytes(st.tp, st.num_layers, i == 0, i == len(r.stages) - 1)
                for r in plan.replicas
                for i, st in enumerate(r.stages)
            )
            replicas = len(plan.replicas) * cell.copies
            score = max(estimate.replica_s) + costs.grad_sync_seconds(replicas, grad, cell.cluster.inter_link)
        else:
            score = estimate.iteration_s
        idle = use_all_devices and len(plan.devices) < cell.cluster.num_devices
        if score < best_s and not idle and not memory_excess(plan, cell.cluster, estimate):
            best, best_s = slots, score
    return best


def _plan_from_slots(
    slots: list[Slot],
    cell: _Cell,
    cluster: ClusterSpec,
    model: ModelSpec,
    workload: TrainWorkload,
    microbatch: int,
) -> TrainPlan:
    replicas = []
    for device_map in cell.device_maps:
        for stages, count in slots:
            start, built = 0, []
            for group, layers, recompute in stages:
                devices = tuple(device_map[d] for d in group.devices)
                built.append(Stage(devices, group.kind, group.tp, (start, start + layers), recompute))
                start += layers
            replicas.append(Replica(tuple(built), count, microbatch))
    plan = TrainPlan(
        replicas=tuple(replicas),
        num_layers=model.num_layers,
        global_batch=workload.global_batch,
        seq_len=workload.seq_len,
        device_kinds=tuple(d.kind for d in cluster.devices),
        model=model.name,
        cluster=cluster.name,
    )
    return dataclasses.replace(plan, estimate=evaluate_train_plan(plan, cluster, model))


def plan_training_with_info(
    cluster: ClusterSpec,
    model: ModelSpec,
    workload: TrainWorkload,
    *,
    time_limit_s: float = 20.0,
    num_workers: int = 2,
    max_cell_devices: int = 16,
    use_all_devices: bool = False,
) -> tuple[TrainPlan, SolveInfo]:
    """`plan_training`, also returning how the plan was found."""
    cells = _cells(cluster, max_cell_devices, workload.global_batch)
    jobs = [
        (cell, b) for cell in cells for b in workload.microbatch_sizes if workload.global_batch % (cell.copies * b) == 0
    ]
    if not jobs:
        raise PlanningError(
            f"global_batch {workload.global_batch} cannot be split into equal micro-batches of the sizes "
            f"{list(workload.microbatch_sizes)} over {cells[-1].copies} identical cells"
        )
    best: tuple[float, TrainPlan, SolveInfo] | None = None
    statuses = []
    lower_bound = math.inf
    start = time.perf_counter()
    deadline = start + (1 - RESERVE_SHARE) * time_limit_s
    for i, (cell, b) in enumerate(jobs):
        job_end = time.perf_counter() + (deadline - time.perf_counter()) / (len(jobs) - i)
        total = workload.global_batch // (cell.copies * b)
        args = (cell, model, workload.seq_len, b, total, workload.recompute)
        seed = _best_seed(cell, model, workload, b, use_all_devices)
        coarse_model = _CellModel(*args, coarse=True, use_all_devices=use_all_devices)
        _, coarse, _ = coarse_model.solve(COARSE_SHARE * (job_end - time.perf_counter()), num_workers, hint=seed)
        fine_model = _CellModel(*args, use_all_devices=use_all_devices)
        status, fine, bound = fine_model.solve(job_end - time.perf_counter(), num_workers, hint=coarse or seed)
        lower_bound = min(lower_bound, bound)
        statuses.append(status)
        for slots in (seed, coarse, fine):
            if slots is None:
                continue
            plan = _plan_from_slots(slots, cell, cluster, model, workload, b)
            assert plan.estimate is not None
            excess = memory_excess(plan, cluster, plan.estimate)
            if excess:
                raise AssertionError(f"planner produced a plan over memory: {excess}")
            if best is None or plan.estimate.iteration_s < best[0]:
                best = (plan.estimate.iteration_s, plan, SolveInfo(cell.copies, b, status, 0.0, len(jobs), 0.0))
    elapsed = time.perf_counter() - start
    if best is None:
        if all(s == "INFEASIBLE" for s in statuses):
            reason = explain_infeasible(cluster, model, workload)
            if use_all_devices:
                reason += (
                    "; or use_all_devices: every device must run a stage (each stage at least one block, each "
                    "replica at least one micro-batch)"
                )
            raise PlanningError(reason)
        raise PlanningError(f"no plan found within the time limit of {time_limit_s:.1f} s (CP-SAT: {statuses})")
    all_optimal = all(s in ("OPTIMAL", "INFEASIBLE") for s in statuses)
    info = dataclasses.replace(
        best[2], status="OPTIMAL" if all_optimal else "FEASIBLE", solve_s=elapsed, lower_bound_s=lower_bound
    )
    return best[1], info


def plan_training(
    cluster: ClusterSpec,
    model: ModelSpec,
    workload: TrainWorkload,
    *,
    time_limit_s: float = 20.0,
    num_workers: int = 2,
    max_cell_devices: int = 16,
    use_all_devices: bool = False,
) -> TrainPlan:
    """The fastest training plan under the cost model (best found within `time_limit_s` if not proven optimal).

    `use_all_devices` forbids idle devices (e.g. to exercise every emulated device). Large clusters are planned
    as `max_cell_devices`-sized identical cells (see the module docstring). Raises `PlanningError` naming the
    binding constraint when no plan fits.
    """
    plan, _ = plan_training_with_info(
        cluster,
        model,
        workload,
        time_limit_s=time_limit_s,
        num_workers=num_workers,
        max_cell_devices=max_cell_devices,
        use_all_devices=use_all_devices,
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
    """Name the constraint that rules out every plan (memory, in the usual case)."""
    costs = TrainCosts(cluster, model, workload.seq_len)
    b = min(workload.microbatch_sizes)
    state = costs.layer_state_bytes(1) * model.num_layers + costs.first_state_bytes(1) + costs.last_state_bytes(1)
    usable = sum(n.count * cluster.profile(n.kind).capacity_bytes for n in cluster.nodes)
    if state > usable:
        return (
            f"memory: {model.name} needs {state / 1e9:.1f} GB for weights, gradients and Adam state "
            f"({model.num_params / 1e9:.2f} B parameters x 16 bytes) but the cluster's usable memory is "
            f"{usable / 1e9:.1f} GB in total"
        )
    lines = []
    for members in cluster.node_classes():
        node = cluster.nodes[members[0]]
        tp = 1 << (node.count.bit_length() - 1)
        need = costs.stage_memory_bytes(tp, 1, b, workload.recompute, 1, False, False)
        cap = cluster.profile(node.kind).capacity_bytes
        lines.append(f"{node.kind}: one block at TP={tp} needs {need / 1e9:.2f} GB of {cap / 1e9:.2f} GB usable")
        head = costs.last_state_bytes(tp) + costs.logits_bytes(tp, b)
        for what, extra in (("embedding", costs.first_state_bytes(tp)), ("LM head", head)):
            if need + extra > cap:
                gb = (need + extra) / 1e9
                lines.append(f"{node.kind}: a stage holding one block and the {what} at TP={tp} needs {gb:.2f} GB")
    return (
        f"memory: no placement of {model.name} ({model.num_layers} blocks, micro-batch >= {b}, seq_len "
        f"{workload.seq_len}) keeps every stage within its devices' usable memory; " + "; ".join(lines)
    )
