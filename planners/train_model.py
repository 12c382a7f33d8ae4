"""The CP-SAT model of one training cell: replicas as routes through candidate groups, in any stage order.

Every active candidate group (`planners.groups`) is one pipeline stage. A replica is a route of the multiple-
circuit (vehicle-routing) constraint: it leaves the depot to its first stage, visits its stages in pipeline order
and returns from its last stage; an inactive group takes its self-loop. Stage order is therefore free (any order
the plan format can express), replicas are unlabelled (no slot symmetry), and nothing depends on the order in
which nodes are listed. A candidate group exists in each of its (tp, cp) shapes, at most one of them active; a
route joins only groups of one CP degree, the replica's. Along each arc `g -> h` the route carries, as enforced
linear constraints:
- the micro-batch count (equal along a route; the first stages' counts sum to the cell's micro-batches);
- the blocks still to come (`left[g] = blocks[g] + left[h]`, the whole model at the first stage);
- the distance from the end (1F1B keeps `min(distance, micro-batches)` micro-batches in flight on a stage);
- the slowest stage and the time of the rest of the pipeline (its stages, and its hops: inside the node's link when
  `g` and `h` share a node, over the inter-node link otherwise).
A replica's time is `sum t_i + sum hops + (m - 1) * max t_i` (a product at its first stage); the gradient
all-reduce follows the widest stage over the replica count. Times are integers in units of 1/10000 of the fastest
block's time (rounding costs at most ~1e-4 relative); memory is in units of 2^-20 of the smallest device's usable
memory, rounded up (plans are never over memory).
"""

from __future__ import annotations

import dataclasses
import math
import time

from ortools.sat.python import cp_model

from planners.cluster import ClusterSpec, Link
from planners.cost_model import TrainCosts
from planners.groups import Group, Slot, candidate_groups
from planners.model import ModelSpec

RESOLUTION = 10_000
MEMORY_RESOLUTION = 1 << 20
HINT_SHARE = 0.1
SPREAD_TICKS = 1  # per level of spread: the resolution of times, so it decides between equal ones


@dataclasses.dataclass(frozen=True)
class Cell:
    """A sub-cluster of whole nodes, repeated `copies` times; `device_maps[c][i]` is cell device i in copy c."""

    cluster: ClusterSpec
    copies: int
    device_maps: tuple[tuple[int, ...], ...]
    copies_level: int = 1  # the topology level all copies' nodes span together (their gradient sync's link)


@dataclasses.dataclass(frozen=True)
class CellProblem:
    """What one CP-SAT model solves: a cell, the model, and the cell's share of the iteration."""

    cell: Cell
    model: ModelSpec
    seq_len: int
    microbatch: int
    microbatches: int  # micro-batches of the cell (one copy)
    recompute: bool
    use_all_devices: bool = False


@dataclasses.dataclass(frozen=True)
class CellResult:
    """One solve: CP-SAT's status, the solution (None if none), and its bound on the objective in seconds."""

    status: str
    slots: list[Slot] | None
    bound_s: float


class CellModel:
    """The CP-SAT model of one `CellProblem` over `groups` (all candidate groups, or only coarse ones)."""

    def __init__(self, problem: CellProblem, coarse: bool = False) -> None:
        self.p = problem
        cluster = self.cluster = problem.cell.cluster
        self.costs = TrainCosts(cluster, problem.model, problem.seq_len)
        groups = candidate_groups(cluster, problem.model, problem.seq_len)
        if coarse:
            groups = [g for g in groups if 2 * g.size >= cluster.nodes[g.node].count]
        self.groups = groups
        self.L, self.M, self.b = problem.model.num_layers, problem.microbatches, problem.microbatch
        self.depth = min(self.L, len(groups))
        self.intra = [cluster.nodes[g.node].intra_link for g in groups]
        self.c0 = [self._layer_seconds(g, False) for g in groups]
        self.c1 = [self._layer_seconds(g, True) for g in groups]
        self.unit = min(self.c0) / RESOLUTION
        self.m = cp_model.CpModel()
        self._layout()
        self._routes()
        self._layers()
        self._microbatches()
        self._memory()
        self._times()
        self._throughput_bound()
        self._grad_sync()
        # One tick per recomputed block breaks ties towards not recomputing where it does not pay; with a topology,
        # one tick per level of spread (`planners.spread`) breaks them towards the less spread placement.
        self.m.minimize(self.z + self.sync + sum(self.n1) + self._spread())

    def _layer_seconds(self, g: Group, recompute: bool) -> float:
        link = self.cluster.nodes[g.node].intra_link
        return self.costs.layer_seconds(g.kind, g.tp, self.b, recompute, link, g.cp, link)

    def ticks(self, seconds: float) -> int:
        return round(seconds / self.unit)

    @property
    def _range(self) -> range:
        return range(len(self.groups))

    def _layout(self) -> None:
        """`on[g]`: group g runs a stage. Inside a node, active groups pack from its first device, largest first
        (every multiset of aligned power-of-two groups that fits packs this way); devices stay idle or not."""
        m, groups, cluster = self.m, self.groups, self.cluster
        self.on = [m.new_bool_var(f"on{g}") for g in self._range]
        cover = [sum(self.on[g] for g in self._range if d in groups[g].devices) for d in range(cluster.num_devices)]
        for d in range(cluster.num_devices):
            m.add(cover[d] == 1 if self.p.use_all_devices else cover[d] <= 1)
        for n, offset in enumerate(cluster.node_offsets()):
            for d in range(offset + 1, offset + cluster.nodes[n].count):
                m.add(cover[d] <= cover[d - 1])
        for g, grp in enumerate(groups):
            before = grp.devices[0] - 1
            if before >= 0 and cluster.devices[before].node == grp.node:
                bigger = [self.on[h] for h in self._range if before in groups[h].devices and groups[h].size >= grp.size]
                m.add(sum(bigger) >= self.on[g])

    def _routes(self) -> None:
        """Arc literals: `start[g]` (g is a first stage), `end[g]` (a last stage), `nxt[g, h]` (h follows g); one
        route per replica through the depot, at most as many replicas as memory and micro-batches allow; a route's
        stages share one CP degree (the replica's), so arcs join only groups of equal `cp`."""
        m, groups = self.m, self.groups
        self.start = [m.new_bool_var(f"start{g}") for g in self._range]
        self.end = [m.new_bool_var(f"end{g}") for g in self._range]
        self.nxt: dict[tuple[int, int], cp_model.IntVar] = {}
        arcs = []
        for g in self._range:
            arcs += [(0, g + 1, self.start[g]), (g + 1, 0, self.end[g]), (g + 1, g + 1, self.on[g].negated())]
            for h in self._range:
                shared = set(groups[g].devices) & set(groups[h].devices)
                if h != g and not shared and groups[g].cp == groups[h].cp:
                    self.nxt[g, h] = m.new_bool_var(f"nxt{g}_{h}")
                    arcs.append((g + 1, h + 1, self.nxt[g, h]))
        m.add_multiple_circuit(arcs)
        self.out = {g: [(h, lit) for (a, h), lit in self.nxt.items() if a == g] for g in self._range}
        costs, model = self.costs, self.p.model
        state = model.num_layers * costs.layer_state_bytes(1) + costs.first_state_bytes(1) + costs.last_state_bytes(1)
        min_devices = max(1, math.ceil(state / max(p.capacity_bytes for p in self.cluster.profiles.values())))
        self.max_replicas = max(1, min(self.cluster.num_devices // min_devices, self.M))
        self.replicas = sum(self.start)
        m.add(self.replicas >= 1)
        m.add(self.replicas <= self.max_replicas)

    def _layers(self) -> None:
        """Blocks per stage without (`n0`) / with (`n1`) recomputation, one of them zero; each active stage at
        least one block, each route the whole model (`left`: blocks from this stage to the end)."""
        m, L = self.m, self.L
        n1_hi = L if self.p.recompute else 0
        self.n0 = [m.new_int_var(0, L, f"n0_{g}") for g in self._range]
        self.n1 = [m.new_int_var(0, n1_hi, f"n1_{g}") for g in self._range]
        self.rc = [m.new_bool_var(f"rc{g}") for g in self._range]
        self.n = [self.n0[g] + self.n1[g] for g in self._range]
        left = [m.new_int_var(0, L, f"left{g}") for g in self._range]
        for g in self._range:
            m.add(self.n0[g] == 0).only_enforce_if(self.rc[g])
            m.add(self.n1[g] == 0).only_enforce_if(self.rc[g].negated())
            m.add(self.n[g] >= self.on[g])
            m.add(self.n[g] <= L * self.on[g])
            m.add(left[g] == L).only_enforce_if(self.start[g])
            m.add(left[g] == self.n[g]).only_enforce_if(self.end[g])
            for h, lit in self.out[g]:
                m.add(left[g] == self.n[g] + left[h]).only_enforce_if(lit)
        for g, twin in self._twins():
            m.add(self.n[g] >= self.n[twin]).only_enforce_if([self.on[g], self.on[twin]])

    def _twins(self) -> list[tuple[int, int]]:
        """Pairs (g, next group of the same node, size and CP degree): interchangeable, so their block counts
        descend."""
        pairs = []
        key = [(grp.node, grp.size, grp.cp) for grp in self.groups]
        for g in self._range:
            later = [h for h in range(g + 1, len(self.groups)) if key[h] == key[g]]
            if later:
                pairs.append((g, later[0]))
        return pairs

    def _microbatches(self) -> None:
        """`mb[g]`: micro-batches of g's replica (equal along a route); first stages' counts sum to the cell's."""
        m, M = self.m, self.M
        self.mb = [m.new_int_var(0, M, f"mb{g}") for g in self._range]
        self.share = [m.new_int_var(0, M, f"share{g}") for g in self._range]
        for g in self._range:
            m.add(self.mb[g] >= self.on[g])
            m.add(self.mb[g] <= M * self.on[g])
            m.add(self.share[g] == self.mb[g]).only_enforce_if(self.start[g])
            m.add(self.share[g] == 0).only_enforce_if(self.start[g].negated())
            for h, lit in self.out[g]:
                m.add(self.mb[g] == self.mb[h]).only_enforce_if(lit)
        m.add(sum(self.share) == M)

    def _memory(self) -> None:
        """Every stage within its devices' usable memory, with `min(distance from the end, micro-batches)`
        micro-batches in flight (a lower bound on `q` suffices: more in flight only costs memory)."""
        m, costs, b, D = self.m, self.costs, self.b, self.depth
        memory_unit = min(p.capacity_bytes for p in self.cluster.profiles.values()) / MEMORY_RESOLUTION

        def mb(nbytes: float) -> int:
            return math.ceil(nbytes / memory_unit)

        to_end = [m.new_int_var(0, D, f"e{g}") for g in self._range]
        for g, grp in enumerate(self.groups):
            m.add(to_end[g] == 1).only_enforce_if(self.end[g])
            for h, lit in self.out[g]:
                m.add(to_end[g] == to_end[h] + 1).only_enforce_if(lit)
            q, by_count = m.new_int_var(0, D, f"q{g}"), m.new_bool_var(f"short{g}")
            m.add(q >= to_end[g]).only_enforce_if(by_count.negated())
            m.add(q >= self.mb[g]).only_enforce_if(by_count)
            p0, p1 = m.new_int_var(0, self.L * D, f"p0_{g}"), m.new_int_var(0, self.L * D, f"p1_{g}")
            m.add_multiplication_equality(p0, [self.n0[g], q])
            m.add_multiplication_equality(p1, [self.n1[g], q])
            cap = math.floor(self.cluster.profile(grp.kind).capacity_bytes / memory_unit)
            tp, cp = grp.tp, grp.cp
            m.add(
                mb(costs.layer_state_bytes(tp)) * self.n[g]
                + mb(costs.layer_act_bytes(tp, b, False, cp)) * (p0 + self.rc[g])
                + mb(costs.layer_act_bytes(tp, b, True, cp)) * p1
                + mb(costs.first_state_bytes(tp)) * self.start[g]
                + mb(costs.last_state_bytes(tp) + costs.logits_bytes(tp, b, cp)) * self.end[g]
                <= cap
            )

    def _hop_ticks(self, g: int, h: int) -> int:
        """One micro-batch's activations and gradients across the boundary g -> h."""
        link = self.cluster.link_of((self.groups[g].node, self.groups[h].node))
        return self.ticks(self.costs.p2p_seconds(link, self.b))

    def _times(self) -> None:
        """Stage times; along each route the slowest stage (`slow`) and the time from this stage to the end
        (`rest`, stages plus hops); `z` is at least every replica's `rest + (m - 1) * slow` at its first stage."""
        m, groups, M = self.m, self.groups, self.M
        pairs = list(zip(groups, self.intra, strict=True))
        head = [self.ticks(self.costs.head_seconds(g.kind, g.tp, self.b, g.cp, link)) for g, link in pairs]
        embed = [self.ticks(self.costs.embed_seconds(g.tp, g.cp, link)) for g, link in pairs]
        t_hi = self.L * max(self.ticks(c) for c in self.c1 + self.c0) + max(head) + max(embed)
        hop_hi = max((self._hop_ticks(g, h) for g, h in self.nxt), default=0)
        rest_hi = self.depth * (t_hi + hop_hi)
        self.t_hi = t_hi
        self.stage_t = [
            self.n0[g] * self.ticks(self.c0[g])
            + self.n1[g] * self.ticks(self.c1[g])
            + head[g] * self.end[g]
            + embed[g] * self.start[g]
            for g in self._range
        ]
        self.z = m.new_int_var(0, rest_hi + t_hi * M, "z")
        slow = [m.new_int_var(0, t_hi, f"slow{g}") for g in self._range]
        rest = [m.new_int_var(0, rest_hi, f"rest{g}") for g in self._range]
        for g in self._range:
            m.add(slow[g] >= self.stage_t[g])
            m.add(rest[g] >= self.stage_t[g])
            for h, lit in self.out[g]:
                m.add(slow[g] >= slow[h]).only_enforce_if(lit)
                m.add(rest[g] >= self.stage_t[g] + self._hop_ticks(g, h) + rest[h]).only_enforce_if(lit)
            waits = m.new_int_var(0, M - 1, f"waits{g}")
            m.add(waits >= self.mb[g] - 1)
            steady = m.new_int_var(0, t_hi * (M - 1), f"steady{g}")
            m.add_multiplication_equality(steady, [waits, slow[g]])
            m.add(self.z >= rest[g] + steady).only_enforce_if(self.start[g])

    def _throughput_bound(self) -> None:
        """A relaxation that gives the LP a throughput bound: a group's busy time (its blocks times its replica's
        micro-batches, `work`) never exceeds the iteration, and the work of all groups adds up to L * M."""
        m, L, M = self.m, self.L, self.M
        work = [m.new_int_var(0, L * M, f"w{g}") for g in self._range]
        m.add(sum(work) == L * M)
        for g in self._range:
            m.add(work[g] <= L * M * self.on[g])
            m.add(self.z >= self.ticks(self.c0[g]) * work[g])

    def _sync_ticks(self, nbytes: float, total: int, link: Link) -> int:
        costs = self.costs
        return self.ticks(costs.grad_sync_seconds(total, nbytes, link) - costs.grad_sync_seconds(total, 0, link))

    def _span_levels(self) -> list[cp_model.IntVar]:
        """`at[j]`: the nodes in use (of all copies) span topology level `j` (`ClusterSpec.level_of`), exactly one
        of them. A level is at least what the nodes span; with a topology, also at most (without one, a single
        node may still take the inter-node link, as it always could)."""
        m, cluster, groups = self.m, self.cluster, self.groups
        top = cluster.topology.top
        at = [m.new_bool_var(f"level{j}") for j in range(top + 1)]
        m.add_exactly_one(at)
        if self.p.cell.copies > 1:
            m.add(at[self.p.cell.copies_level] == 1)
            return at
        members = [[n] for n in range(len(cluster.nodes))]
        for j in range(1, top + 1):
            used = [m.new_bool_var(f"used{j}_{i}") for i in range(len(members))]
            for u, nodes in zip(used, members, strict=True):
                active = [self.on[g] for g in self._range if groups[g].node in nodes]
                m.add_max_equality(u, active or [0])
            m.add(sum(used) <= 1 + len(members) * sum(at[j:]))
            if cluster.topology.levels:
                m.add(sum(used) >= 2).only_enforce_if(at[j])
            if j <= len(cluster.topology.levels):
                paths = [cluster.topology.paths[node.name] for node in cluster.nodes]
                names = list(dict.fromkeys(p[j - 1] for p in paths))
                members = [[n for n, p in enumerate(paths) if p[j - 1] == name] for name in names]
        return at

    def _spread(self) -> cp_model.LinearExprT:
        """With a topology, the spread term in ticks: the level the nodes in use span (`planners.spread`'s `max`)
        plus the highest level a replica's pipeline spans (its `pp`: the highest level of a hop along a route);
        0 without a topology, whose placements it leaves as they were."""
        cluster, top = self.cluster, self.cluster.topology.top
        if not cluster.topology.levels:
            return 0
        pp = self.m.new_int_var(0, top, "pp")
        for (g, h), lit in self.nxt.items():
            level = cluster.level_of((self.groups[g].node, self.groups[h].node))
            if level:
                self.m.add(pp >= level).only_enforce_if(lit)
        return SPREAD_TICKS * (pp + sum(j * lit for j, lit in enumerate(self.at)))

    def _grad_sync(self) -> None:
        """`sync`: the ring all-reduce of the widest stage's gradients over all replicas of all copies, inside
        the one node in use or else over the link of the topology level the nodes in use span."""
        m, groups, cluster, costs = self.m, self.groups, self.cluster, self.costs
        R, copies, L = self.max_replicas, self.p.cell.copies, self.L
        count_is = [m.new_bool_var(f"R{k}") for k in range(R + 1)]
        m.add_exactly_one(count_is)
        m.add(sum(k * count_is[k] for k in range(R + 1)) == self.replicas)
        self.at = self._span_levels()
        level_links = [[cluster.level_link(j, g.node) for g in groups] for j in range(cluster.topology.top + 1)]
        links = [link for row in level_links for link in row]
        widest = R * copies
        full = max(costs.stage_grad_bytes(gr.tp, L, True, True) for gr in groups)
        slowest = min(links, key=lambda link: link.gb_s)
        laggiest = max(links, key=lambda link: link.latency_us)
        sync_hi = self._sync_ticks(full, widest, slowest) + self.ticks(costs.grad_sync_seconds(widest, 0, laggiest))
        self.sync = m.new_int_var(0, sync_hi + L + 3, "sync")
        for k in range(1, R + 1):
            total = k * copies
            if total == 1:
                continue
            for link_of, when in zip(level_links, self.at, strict=True):
                for g, grp in enumerate(groups):
                    link = link_of[g]
                    m.add(
                        self.sync
                        >= self._sync_ticks(costs.stage_grad_bytes(grp.tp, 1, False, False), total, link) * self.n[g]
                        + self._sync_ticks(costs.stage_grad_bytes(grp.tp, 0, True, False), total, link) * self.start[g]
                        + self._sync_ticks(costs.stage_grad_bytes(grp.tp, 0, False, True), total, link) * self.end[g]
                        + self.ticks(costs.grad_sync_seconds(total, 0, link))
                    ).only_enforce_if([count_is[k], when])

    def solve(self, time_limit_s: float, workers: int, hint: list[Slot] | None = None) -> CellResult:
        """Solve within the time limit, starting from `hint` (a plan of the same space) when given."""
        start = time.perf_counter()
        if hint and self._hint(hint):
            self._complete_hint(min(HINT_SHARE * time_limit_s, 2.0))
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = max(time_limit_s - (time.perf_counter() - start), 0.01)
        solver.parameters.num_workers = workers
        solver.parameters.linearization_level = 2  # the LP relaxation of the enforced constraints proves bounds
        solver.parameters.cp_model_probing_level = 0  # probing the arc literals of large cells outlasts the limit
        status = solver.solve(self.m)
        name = solver.status_name(status)
        if status == cp_model.INFEASIBLE:
            return CellResult(name, None, math.inf)
        bound = max(solver.best_objective_bound, 0.0) * self.unit
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return CellResult(name, None, bound)
        return CellResult(name, self._extract(solver), bound)

    def _complete_hint(self, time_limit_s: float) -> None:
        """Extend the hint on the decision variables to every variable, so the search starts from a solution."""
        solver = cp_model.CpSolver()
        solver.parameters.fix_variables_to_their_hinted_value = True
        solver.parameters.max_time_in_seconds = max(time_limit_s, 0.01)
        solver.parameters.num_workers = 1
        if solver.solve(self.m) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return
        self.m.clear_hints()
        for i in range(len(self.m.proto.variables)):
            var = self.m.get_int_var_from_proto_index(i)
            self.m.add_hint(var, solver.value(var))

    def _hint(self, slots: list[Slot]) -> bool:
        """Hint the decision variables with `slots` (twins relabelled to satisfy the symmetry breaking); False if
        the slots use a group this model lacks."""
        index = {g: i for i, g in enumerate(self.groups)}
        if any(g not in index for stages, _ in slots for g, _, _ in stages):
            return False
        slots = canonical_twins(slots)
        arcs, role = set(), {}
        for stages, count in slots:
            path = [index[g] for g, _, _ in stages]
            arcs |= {("start", path[0]), ("end", path[-1])} | {(a, b) for a, b in zip(path, path[1:], strict=False)}
            role |= {index[g]: (n, rc, count) for g, n, rc in stages}
        for g in self._range:
            layers, recompute, count = role.get(g, (0, False, 0))
            self.m.add_hint(self.on[g], g in role)
            self.m.add_hint(self.start[g], ("start", g) in arcs)
            self.m.add_hint(self.end[g], ("end", g) in arcs)
            self.m.add_hint(self.n0[g], 0 if recompute else layers)
            self.m.add_hint(self.n1[g], layers if recompute else 0)
            self.m.add_hint(self.rc[g], recompute)
            self.m.add_hint(self.mb[g], count)
        for arc, lit in self.nxt.items():
            self.m.add_hint(lit, arc in arcs)
        return True

    def _extract(self, solver: cp_model.CpSolver) -> list[Slot]:
        """The routes of the solution, each from its first stage to its last."""
        following = {g: h for (g, h), lit in self.nxt.items() if solver.value(lit)}
        out = []
        for first in (g for g in self._range if solver.value(self.start[g])):
            stages, g = [], first
            while True:
                layers = solver.value(self.n0[g]) + solver.value(self.n1[g])
                stages.append((self.groups[g], layers, bool(solver.value(self.n1[g]))))
                if g not in following:
                    break
                g = following[g]
            out.append((stages, solver.value(self.mb[first])))
        return out


def canonical_twins(slots: list[Slot]) -> list[Slot]:
    """The same plan with interchangeable groups (same node and size) handed out so that their block counts
    descend with the address, as `CellModel` requires; each group takes over the whole role of another (of the
    same node, size and CP degree)."""
    roles: dict[tuple[int, int], list[Group]] = {}
    for stages, _ in slots:
        for g, _, _ in stages:
            roles.setdefault((g.node, g.size, g.cp), []).append(g)
    layers = {g: n for stages, _ in slots for g, n, _ in stages}
    rename = {}
    for members in roles.values():
        by_address = sorted(members, key=lambda g: g.devices[0])
        by_layers = sorted(members, key=lambda g: (-layers[g], g.devices[0]))
        rename |= dict(zip(by_layers, by_address, strict=True))
    return [([(rename[g], n, rc) for g, n, rc in stages], count) for stages, count in slots]
