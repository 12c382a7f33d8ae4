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
  `g` and `h` share a node, over the inter-node link otherwise);
- the longest zero-1 gather of its stages.
A replica's time is `sum t_i + sum hops + (m - 1) * max t_i + max gather` (a product at its first stage); the
gradient all-reduce follows the widest stage over the replica count.

ZeRO: each active group takes one allowed stage (`zero[g][z]`), its memory and time constraints enforced by that
literal. Whether a piece's moments are split across its holders depends on the other replicas, so each block gets
`hold[g]` literals (g runs it: `L - left[g] <= block < L - left[g] + n[g]`), and each piece (every block, the
embedding, the head) a holder count, a split literal (at least two holders, none with zero 0), and the smallest
holder size (sizes are powers of two, so it is the gcd): its split moments on every holder's first device are
`8 P / (H L)`, exactly `planners.cost_model.moment_splits`. Times are integers in units of 1/10000 of the fastest
block's time (rounding costs at most ~1e-4 relative); memory is in units of 2^-20 of the smallest device's usable
memory, rounded up (plans are never over memory).
"""

from __future__ import annotations

import dataclasses
import math
import time

from ortools.sat.python import cp_model

from planners.cluster import ClusterSpec, Link
from planners.cost_model import (
    GRAD_BYTES_PER_PARAM,
    MOMENT_BYTES_PER_PARAM,
    PARAM_BYTES_PER_PARAM,
    STATE_BYTES_PER_PARAM,
    TrainCosts,
    piece_params,
    ring_allgather_seconds,
)
from planners.groups import Group, Slot, candidate_groups
from planners.model import ModelSpec
from planners.plan import ZERO_STAGES

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
    zero_stages: tuple[int, ...] = ZERO_STAGES


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
        self.zeros = problem.zero_stages
        self.c0 = [self._layer_seconds(g, False) for g in groups]
        self.c1 = [self._layer_seconds(g, True) for g in groups]
        self.unit = min(self.c0) / RESOLUTION
        self.memory_unit = min(p.capacity_bytes for p in cluster.profiles.values()) / MEMORY_RESOLUTION
        self.m = cp_model.CpModel()
        self._layout()
        self._routes()
        self._layers()
        self._zero()
        self._splits()
        self._microbatches()
        self._memory()
        self._times()
        self._throughput_bound()
        self._grad_sync()
        # One tick per recomputed block, and per ZeRO level of a stage (3 with zero 3), breaks ties towards the less
        # memory-saving machinery where it does not pay; with a topology, one tick per level of spread
        # (`planners.spread`) breaks them towards the less spread placement.
        machinery = sum(z * lit for g in self._range for z, lit in self.zero[g].items() if z)
        self.m.minimize(self.z + self.sync + sum(self.n1) + machinery + self._spread())

    def _layer_seconds(self, g: Group, recompute: bool, zero: int = 0) -> float:
        link = self.cluster.nodes[g.node].intra_link
        return self.costs.layer_seconds(g.kind, g.tp, self.b, recompute, link, g.cp, link, zero)

    def units(self, nbytes: float) -> int:
        """`nbytes` in memory units, rounded up."""
        return math.ceil(nbytes / self.memory_unit)

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
        # A replica holds every parameter with its gradient, and (zero 0) its moments too.
        per_param = STATE_BYTES_PER_PARAM if self.zeros == (0,) else PARAM_BYTES_PER_PARAM + GRAD_BYTES_PER_PARAM
        state = per_param * self.p.model.num_params
        min_devices = max(1, math.ceil(state / max(p.capacity_bytes for p in self.cluster.profiles.values())))
        self.max_replicas = R = max(1, min(self.cluster.num_devices // min_devices, self.M))
        self.replicas = sum(self.start)
        self.count_is = [m.new_bool_var(f"R{k}") for k in range(R + 1)]
        m.add_exactly_one(self.count_is)
        m.add(sum(k * self.count_is[k] for k in range(R + 1)) == self.replicas)
        m.add(self.replicas >= 1)
        m.add(self.replicas <= R)
        tied = self.p.model.tied_embeddings
        self.he = [self.start[g] if not tied else m.new_bool_var(f"he{g}") for g in self._range]
        for g in self._range:
            if tied:  # the embedding is held by a first stage and, tied, by a last one (once if both)
                m.add_max_equality(self.he[g], [self.start[g], self.end[g]])

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
        self.left = left
        for g, twin in self._twins():
            m.add(self.n[g] >= self.n[twin]).only_enforce_if([self.on[g], self.on[twin]])

    def _zero(self) -> None:
        """`zero[g][z]`: group g runs with ZeRO stage z, one of the allowed when active; `zp[g]`: zero >= 1."""
        m = self.m
        self.zero = [{z: m.new_bool_var(f"zero{z}_{g}") for z in self.zeros} for g in self._range]
        for g in self._range:
            m.add(sum(self.zero[g].values()) == self.on[g])
        self.zp = [sum(lit for z, lit in self.zero[g].items() if z) for g in self._range]

    def _splits(self) -> None:
        """Pieces whose moments are split across their holders (`planners.cost_model.moment_splits`): per group,
        the blocks (`cb`), embedding (`ce`) and head (`ch`) it holds so, and their moments on its first device in
        memory units (`ysum`). Built where some piece can have two holders with zero >= 1; else all zero."""
        self.cb: list = [0] * len(self.groups)
        self.ce: list = [0] * len(self.groups)
        self.ch: list = [0] * len(self.groups)
        self.ysum: list = [0] * len(self.groups)
        several = self.max_replicas >= 2
        if self.zeros == (0,) or not (several or self.p.model.tied_embeddings):
            return
        R = self.max_replicas
        if several:
            holds = [self._holds_block(layer) for layer in range(self.L)]
            for g in self._range:  # a group holds as many blocks as it runs (implied; helps the search)
                self.m.add(sum(hold[g] for hold in holds) == self.n[g])
            for layer, hold in enumerate(holds):
                crossed = self._piece(f"block{layer}", "block", hold, R)
                self.cb = [a + b for a, b in zip(self.cb, crossed, strict=True)]
            self.ch = self._piece("head", "head", self.end, R)
        self.ce = self._piece("embedding", "embedding", self.he, 2 * R if self.p.model.tied_embeddings else R)

    def _holds_block(self, layer: int) -> list[cp_model.IntVar]:
        """`hold[g]`: group g holds block `layer` (its blocks are `L - left[g] .. L - left[g] + n[g] - 1`)."""
        m, L = self.m, self.L
        hold = [m.new_bool_var(f"hold{g}_{layer}") for g in self._range]
        for g in self._range:
            m.add(self.left[g] >= L - layer).only_enforce_if(hold[g])
            m.add(self.left[g] - self.n[g] <= L - 1 - layer).only_enforce_if(hold[g])
        m.add(sum(hold) == self.replicas)
        return hold

    def _piece(self, name: str, piece: str, hold: list, most: int) -> list[cp_model.IntVar]:
        """One piece held by the groups `hold[g]` (at most `most` of them): whether its moments are split across
        them (every holder zero >= 1, at least two holders), `1 / (H L)` of them on each holder's first device
        (`H` holders, `L` the smallest holder size: sizes are powers of two), added to `ysum`; returns, per group,
        whether it holds the piece so (`name` labels the variables)."""
        m = self.m
        count = [m.new_bool_var(f"H{k}_{name}") for k in range(most + 1)]
        m.add_exactly_one(count)
        m.add(sum(k * lit for k, lit in enumerate(count)) == sum(hold))
        cross = m.new_bool_var(f"cross_{name}")
        bad = []
        for g in self._range:
            b = m.new_bool_var(f"bad{g}_{name}")  # holds the piece with zero 0
            m.add(b <= hold[g])
            m.add(b <= 1 - self.zp[g])
            m.add(b >= hold[g] - self.zp[g])
            m.add(cross <= 1 - b)
            bad.append(b)
        m.add(cross <= 1 - count[0] - count[1])
        m.add(cross >= 1 - count[0] - count[1] - sum(bad))
        sizes = sorted({grp.size for grp in self.groups})
        lanes = {s: m.new_bool_var(f"L{s}_{name}") for s in sizes}
        m.add_exactly_one(lanes.values())
        for g, grp in enumerate(self.groups):
            for s in sizes:
                if s > grp.size:
                    m.add(lanes[s] + hold[g] <= 1)
        moments = MOMENT_BYTES_PER_PARAM * piece_params(self.p.model, piece)
        top = self.units(moments / 2)
        share = m.new_int_var(0, top, f"mom_{name}")
        for k in range(2, most + 1):
            for s in sizes:
                m.add(share >= self.units(moments / (k * s))).only_enforce_if([count[k], lanes[s]])
        crossed = []
        for g in self._range:
            both = m.new_bool_var(f"crossed{g}_{name}")
            m.add(both <= hold[g])
            m.add(both <= cross)
            m.add(both >= hold[g] + cross - 1)
            y = m.new_int_var(0, top, f"y{g}_{name}")
            m.add(y >= share).only_enforce_if(both)
            self.ysum[g] = self.ysum[g] + y
            crossed.append(both)
        return crossed

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
        """Every stage within its devices' usable memory under its ZeRO stage, with `min(distance from the end,
        micro-batches)` micro-batches in flight (a lower bound on `q` suffices: more in flight only costs memory)."""
        m, costs, b, D, mb = self.m, self.costs, self.b, self.depth, self.units
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
            cap = math.floor(self.cluster.profile(grp.kind).capacity_bytes / self.memory_unit)
            tp, cp = grp.tp, grp.cp
            acts = (
                mb(costs.layer_act_bytes(tp, b, False, cp)) * (p0 + self.rc[g])
                + mb(costs.layer_act_bytes(tp, b, True, cp)) * p1
                + mb(costs.logits_bytes(tp, b, cp)) * self.end[g]
            )
            for z, lit in self.zero[g].items():
                m.add(self._state_units(g, z) + acts <= cap).only_enforce_if(lit)

    def _held(self, g: int) -> list[tuple[str, cp_model.LinearExprT, cp_model.LinearExprT]]:
        """(piece, how many group g holds, how many of them it holds with moments split across holders)."""
        return [
            ("block", self.n[g], self.cb[g]),
            ("embedding", self.he[g], self.ce[g]),
            ("head", self.end[g], self.ch[g]),
        ]

    def _state_units(self, g: int, zero: int) -> cp_model.LinearExprT:
        """Parameter, gradient and moment memory units of group g's first device under ZeRO stage `zero`
        (`TrainCosts.stage_memory_bytes` without activations): moments of the pieces split across holders in
        `ysum`, the rest by `TrainCosts.piece_moment_bytes`; zero 3 adds the largest piece's working set."""
        costs, mb, (tp, cp) = self.costs, self.units, (self.groups[g].tp, self.groups[g].cp)
        if zero == 0:
            return sum(mb(costs.piece_state_bytes(p, tp, cp, 0)) * held for p, held, _ in self._held(g))
        total = self.ysum[g]
        for p, held, crossed in self._held(g):
            moments = costs.piece_moment_bytes(p, tp, cp, zero)
            total += mb(costs.piece_state_bytes(p, tp, cp, zero) - moments) * held + mb(moments) * (held - crossed)
        if zero == 3:
            live = self.m.new_int_var(0, mb(costs.fsdp_live_bytes(tp, costs.stage_pieces(1, True, True))), f"live{g}")
            holds = {"block": self.on[g], "embedding": self.he[g], "head": self.end[g]}
            for p, lit in holds.items():
                self.m.add(live >= mb(costs.fsdp_live_bytes(tp, {p: 1})) * lit)
            total += live
        return total

    def _hop_ticks(self, g: int, h: int) -> int:
        """One micro-batch's activations and gradients across the boundary g -> h."""
        link = self.cluster.link_of((self.groups[g].node, self.groups[h].node))
        return self.ticks(self.costs.p2p_seconds(link, self.b))

    def _times(self) -> None:
        """Stage times (zero 3's collectives included); along each route the slowest stage (`slow`), the time from
        this stage to the end (`rest`, stages plus hops) and the longest zero-1 gather (`gathers`); `z` is at least
        every replica's `rest + (m - 1) * slow + gathers` at its first stage."""
        m, groups, M = self.m, self.groups, self.M
        pairs = list(zip(groups, self.intra, strict=True))
        head = [self.ticks(self.costs.head_seconds(g.kind, g.tp, self.b, g.cp, link)) for g, link in pairs]
        embed = [self.ticks(self.costs.embed_seconds(g.tp, g.cp, link)) for g, link in pairs]
        fsdp, fsdp_hi = self._zero3_ticks()
        gather, gather_hi = self._gather_ticks()
        t_hi = self.L * max(self.ticks(c) for c in self.c1 + self.c0) + max(head) + max(embed) + fsdp_hi
        hop_hi = max((self._hop_ticks(g, h) for g, h in self.nxt), default=0)
        rest_hi = self.depth * (t_hi + hop_hi)
        self.t_hi = t_hi
        self.stage_t = [
            self.n0[g] * self.ticks(self.c0[g])
            + self.n1[g] * self.ticks(self.c1[g])
            + head[g] * self.end[g]
            + embed[g] * self.start[g]
            + fsdp[g]
            for g in self._range
        ]
        self.z = m.new_int_var(0, rest_hi + t_hi * M + gather_hi, "z")
        slow = [m.new_int_var(0, t_hi, f"slow{g}") for g in self._range]
        rest = [m.new_int_var(0, rest_hi, f"rest{g}") for g in self._range]
        gathers = [m.new_int_var(0, gather_hi, f"gathers{g}") for g in self._range]
        for g in self._range:
            m.add(slow[g] >= self.stage_t[g])
            m.add(rest[g] >= self.stage_t[g])
            m.add(gathers[g] >= gather[g])
            for h, lit in self.out[g]:
                m.add(slow[g] >= slow[h]).only_enforce_if(lit)
                m.add(rest[g] >= self.stage_t[g] + self._hop_ticks(g, h) + rest[h]).only_enforce_if(lit)
                m.add(gathers[g] >= gathers[h]).only_enforce_if(lit)
            waits = m.new_int_var(0, M - 1, f"waits{g}")
            m.add(waits >= self.mb[g] - 1)
            steady = m.new_int_var(0, t_hi * (M - 1), f"steady{g}")
            m.add_multiplication_equality(steady, [waits, slow[g]])
            m.add(self.z >= rest[g] + steady + gathers[g]).only_enforce_if(self.start[g])

    def _zero3_ticks(self) -> tuple[list[cp_model.LinearExprT], int]:
        """Per group, what zero 3 adds to its stage time (`fsdp_seconds` in place of the CP all-reduces, every
        micro-batch), and an upper bound on it."""
        if 3 not in self.zeros:
            return [0] * len(self.groups), 0
        m, costs, out, most = self.m, self.costs, [], 0
        for g, (grp, link) in enumerate(zip(self.groups, self.intra, strict=True)):
            tp, cp = grp.tp, grp.cp
            per_part = {
                part: self.ticks(
                    costs.grad_collective_seconds(tp, cp, part, 3, link, link)
                    - costs.grad_collective_seconds(tp, cp, part, 0, link, link)
                )
                for part in ("block", "embedding", "head")
            }
            hi = self.L * per_part["block"] + per_part["embedding"] + per_part["head"]
            extra = m.new_int_var(0, hi, f"fsdp{g}")
            parts = (("block", self.n[g]), ("embedding", self.start[g]), ("head", self.end[g]))
            m.add(extra >= sum(per_part[p] * k for p, k in parts)).only_enforce_if(self.zero[g][3])
            out.append(extra)
            most = max(most, hi)
        return out, most

    def _gather_ticks(self) -> tuple[list[cp_model.LinearExprT], int]:
        """Per group, its zero-1 gather once a step (`TrainCosts.zero1_gather_seconds`: the fp32 parameters of the
        pieces whose moments it splits inside the group, over its devices), and an upper bound on it."""
        if 1 not in self.zeros:
            return [0] * len(self.groups), 0
        m, out, most = self.m, [], 0
        for g, (grp, link) in enumerate(zip(self.groups, self.intra, strict=True)):
            latency = self.ticks(ring_allgather_seconds(0, grp.size, link))
            held = self._held(g)
            per_piece = [
                self.ticks(
                    ring_allgather_seconds(PARAM_BYTES_PER_PARAM * piece_params(self.p.model, p), grp.size, link)
                )
                - latency
                for p, _, _ in held
            ]
            hi = latency + self.L * per_piece[0] + per_piece[1] + per_piece[2]
            gather, any_held = m.new_int_var(0, hi, f"gather{g}"), m.new_bool_var(f"gathered{g}")
            inside = [count - crossed for _, count, crossed in held]
            m.add((self.L + 2) * any_held >= sum(inside))
            m.add(
                gather >= latency * any_held + sum(t * k for t, k in zip(per_piece, inside, strict=True))
            ).only_enforce_if(self.zero[g][1])
            out.append(gather)
            most = max(most, hi)
        return out, most

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
        count_is = self.count_is
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
                    pieces = sum(
                        self._sync_ticks(GRAD_BYTES_PER_PARAM * costs.held_params(p, grp.tp), total, link) * held
                        for p, held, _ in self._held(g)
                    )
                    m.add(self.sync >= pieces + self.ticks(costs.grad_sync_seconds(total, 0, link))).only_enforce_if(
                        [count_is[k], when]
                    )

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
        the slots use a group or a ZeRO stage this model lacks."""
        index = {g: i for i, g in enumerate(self.groups)}
        if any(g not in index or z not in self.zeros for stages, _ in slots for g, _, _, z in stages):
            return False
        slots = canonical_twins(slots)
        arcs, role = set(), {}
        for stages, count in slots:
            path = [index[g] for g, _, _, _ in stages]
            arcs |= {("start", path[0]), ("end", path[-1])} | {(a, b) for a, b in zip(path, path[1:], strict=False)}
            role |= {index[g]: (n, rc, z, count) for g, n, rc, z in stages}
        for g in self._range:
            layers, recompute, zero, count = role.get(g, (0, False, None, 0))
            self.m.add_hint(self.on[g], g in role)
            self.m.add_hint(self.start[g], ("start", g) in arcs)
            self.m.add_hint(self.end[g], ("end", g) in arcs)
            self.m.add_hint(self.n0[g], 0 if recompute else layers)
            self.m.add_hint(self.n1[g], layers if recompute else 0)
            self.m.add_hint(self.rc[g], recompute)
            self.m.add_hint(self.mb[g], count)
            for z, lit in self.zero[g].items():
                self.m.add_hint(lit, z == zero)
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
                zero = next(z for z, lit in self.zero[g].items() if solver.value(lit))
                stages.append((self.groups[g], layers, bool(solver.value(self.n1[g])), zero))
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
        for g, _, _, _ in stages:
            roles.setdefault((g.node, g.size, g.cp), []).append(g)
    layers = {g: n for stages, _ in slots for g, n, _, _ in stages}
    rename = {}
    for members in roles.values():
        by_address = sorted(members, key=lambda g: g.devices[0])
        by_layers = sorted(members, key=lambda g: (-layers[g], g.devices[0]))
        rename |= dict(zip(by_layers, by_address, strict=True))
    return [([(rename[g], n, rc, z) for g, n, rc, z in stages], count) for stages, count in slots]
