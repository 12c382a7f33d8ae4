"""An analytical cost model of training a decoder on heterogeneous devices.

Compute: a roofline per transformer block, `max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth)`, with the
device's efficiency factors (`DeviceProfile`; FLOP/s at the size of the block's matmuls on one device, `hidden / tp`,
where the profile measured how throughput falls for small matmuls), plus a fixed per-block overhead (kernel
launches). FLOPs per token and block are `2 * matmul params + 4 * hidden * (keys attended)` forward (causal: a
query at position `p` attends `p` keys, `seq / 2` on average), twice that backward, once more with recomputation.

Context parallelism (`cp`, as `meshes.executor` runs it): every sequence is split into `cp` consecutive slices, one
per CP rank, each rank a TP group of `tp` devices. A block's matmuls and activations cover `seq / cp` tokens per
device; attention needs every earlier key, so the keys and values are all-gathered across the CP ranks (forward,
once more when recomputing) and their gradients reduce-scattered (backward), `2 * seq * kv_width / tp` bf16
elements per sequence in each, ring collectives over the link the CP group spans. The slices are consecutive, so
the last rank attends the most keys (`seq * (2 cp - 1) / (2 cp)` on average per query) and paces the stage. The
parameters are replicated across the CP ranks, so every micro-batch's backward all-reduces the stage's parameter
gradients over them (`cp_grad_bytes`). The gathered keys and values of the whole sequence stay in memory for the
backward. Packed documents' segment ids are gathered too (4 bytes per token and block); they are not priced.

Communication: alpha-beta per link class (`Link.seconds`). Tensor parallelism costs two ring all-reduces of the
block's activations forward and two backward (two more when recomputing) over the TP group's link; pipeline stages
exchange activations forward and their gradients backward over the link joining them (inside a node or between
nodes); data-parallel replicas all-reduce gradients (fp32) across the plan with a ring, over the inter-node link
when the plan spans several nodes. A group spanning several nodes communicates over the inter-node link. With a
topology (`planners.topology`), "the inter-node link" is that of the highest level the nodes concerned span: the
link of their common rack, of their common pod, or `inter_node_link` when they share none. A stage
whose `compress` is not "none" sends the packed form across its outgoing edge (both ways), and pays for encoding
and decoding it as memory-bound passes at the two ends (`planners.compression`).

Memory per device: parameters with mixed-precision Adam state, 16 bytes per parameter a device holds: 4 of fp32
parameters, 4 of fp32 gradients, 8 of Adam's two fp32 moments; a block's parameters split over TP, the embedding,
the final norm and the LM head whole (`jaxhet.parallel.megatron_specs`); a stage holding both the embedding and a
tied LM head holds the one matrix once. Plus bf16 activations of the micro-batches in flight (`in_flight`: GPipe
keeps all of a replica's micro-batches, 1F1B on a stage `k` stages from the end at most `min(k, m)`) — without
recomputation every block keeps its inputs to every matmul, norm and activation, with recomputation only its input
plus one block's worth of working space; the last stage also holds the logits.

ZeRO (`Stage.zero`, as the runtime runs it). A *piece* is one block, the embedding, or the head (the final norm
and, untied, the head matrix; tied, the last stage's copy of the embedding counts as the embedding); its *holders*
are the stages holding it, over all replicas (the embedding: every first stage and, tied, every last stage of a
pipeline). With `n = tp * cp` devices on a stage:
- zero 1: the piece's moments split over the stage's `n` devices (`8 P / n` bytes each) and its updated fp32
  parameters all-gathered over them once a step (`zero1_gather_seconds`). Where all `H >= 2` holders of a piece
  have zero >= 1, its moments are split across the holders instead (`moment_splits`): with `L` the gcd of the
  holders' device counts, each holder's devices form `L` rows and the first device of each row holds `1 / (H L)`
  of them (the others none; the peak is on the stage's first device), the gradients are reduce-scattered and the
  parameters all-gathered over the holders, which moves the bytes of the all-reduce it replaces (no extra time).
- zero 3 (FSDP inside the group): parameters, gradients and moments split over the stage's devices (`P / n` of
  each a device), plus one piece's gathered weights (bf16) and its gradient (fp32) live at a time; per
  micro-batch each piece's weights are all-gathered for the forward, again for the backward, and its gradients
  reduce-scattered, in place of the CP gradient all-reduce (`fsdp_seconds`): the TP-split matrices over the CP
  ranks, the weights Megatron replicates (norms, embedding, head) over all `n` devices. Moments across holders as
  zero 1. The gradient all-reduce across replicas is priced as under zero 0.

Pipeline time of a replica with stage times `t_i` (forward+backward of one micro-batch), boundary transfer times
`c_j` and `m` micro-batches: `sum t_i + sum c_j + (m - 1) * max t_i` (GPipe and 1F1B alike). Iteration time: the
slowest replica plus the gradient all-reduce. The optimizer step and overlap of communication with compute are
not modelled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from planners.cluster import ClusterSpec, Link
from planners.compression import codec_seconds, edge_bytes_per_token
from planners.model import ModelSpec
from planners.plan import PlanEstimate, Stage, TrainPlan
from planners.profile import DeviceProfile

PARAM_BYTES_PER_PARAM = 4  # fp32 parameters, which ZeRO-1 gathers back after each device's update
GRAD_BYTES_PER_PARAM = 4
MOMENT_BYTES_PER_PARAM = 8  # Adam's two float32 moments
STATE_BYTES_PER_PARAM = PARAM_BYTES_PER_PARAM + GRAD_BYTES_PER_PARAM + MOMENT_BYTES_PER_PARAM
ACT_BYTES = 2
LOGIT_BYTES = 6
PIECES = ("block", "embedding", "head")
MomentSplit = tuple[str, float]
"""A piece whose moments are split across its holders, and the share of them a stage's first device holds."""


def ring_allreduce_seconds(nbytes: float, ranks: int, link: Link) -> float:
    """Ring all-reduce of `nbytes` among `ranks` peers: 2(n-1) steps of nbytes/n each."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * link.latency_us * 1e-6 + 2 * (ranks - 1) / ranks * nbytes / (link.gb_s * 1e9)


def ring_allgather_seconds(nbytes: float, ranks: int, link: Link) -> float:
    """Ring all-gather (or reduce-scatter) of a `nbytes` whole among `ranks` peers: n-1 steps of nbytes/n each."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) * link.latency_us * 1e-6 + (ranks - 1) / ranks * nbytes / (link.gb_s * 1e9)


def _cp_allreduce_seconds(nbytes: float, cp: int, cp_link: Link | None) -> float:
    """All-reduce of `nbytes` over `cp` CP ranks joined by `cp_link` (needed when `cp` > 1)."""
    if cp == 1:
        return 0.0
    if cp_link is None:
        raise ValueError(f"cp = {cp} needs the CP group's link (cp_link)")
    return ring_allreduce_seconds(nbytes, cp, cp_link)


def _group_link(link: Link | None, cp_link: Link | None) -> Link:
    """The link a ring over all of a stage's devices is paced by: the slower of its TP and CP groups' links."""
    links = [x for x in (link, cp_link) if x is not None]
    if not links:
        raise ValueError("zero 3 on a stage of several devices needs its TP link (link) or CP link (cp_link)")
    return min(links, key=lambda x: (x.gb_s, -x.latency_us))


def piece_params(model: ModelSpec, piece: str) -> int:
    """Parameters of one piece (`PIECES`): a block; the embedding; the head: the final norm and, untied, the head
    matrix (tied, the matrix is the embedding piece, of which the last stage of a pipeline holds a copy)."""
    if piece == "block":
        return model.layer_params
    if piece == "embedding":
        return model.embedding_params
    return model.hidden_size if model.tied_embeddings else model.head_params


def in_flight(schedule: str, depth: int, stage: int, microbatches: int) -> int:
    """Micro-batches whose activations stage `stage` of a `depth`-stage pipeline holds at once under `schedule`."""
    return microbatches if schedule == "gpipe" else min(depth - stage, microbatches)


@dataclasses.dataclass(frozen=True)
class TrainCosts:
    """Per-component costs for one model and sequence length on one cluster. `cp` is the context-parallel degree
    (ranks of `tp` devices each, the sequence split between them); `cp_link` the link the CP ranks share (by
    default the TP group's `link`); `zero` a stage's ZeRO stage (`planners.plan.ZERO_STAGES`)."""

    cluster: ClusterSpec
    model: ModelSpec
    seq_len: int

    def _profile(self, kind: str) -> DeviceProfile:
        return self.cluster.profile(kind)

    @property
    def _matmul_params(self) -> int:
        return self.model.layer_params - 2 * self.model.hidden_size

    @property
    def _kv_width(self) -> int:
        return self.model.num_kv_heads * self.model.head_dim

    def attended_keys(self, cp: int = 1) -> float:
        """Keys a query of the last CP rank attends on average (causal, consecutive slices): `seq / 2` at cp 1."""
        return self.seq_len * (2 * cp - 1) / (2 * cp)

    def layer_flops(self, tokens: int, cp: int = 1) -> float:
        """Forward FLOPs of one block over `tokens` tokens of `seq_len`-long sequences, those of the last CP rank's
        slice when `tokens` is its share (`cp` > 1)."""
        return tokens * (2 * self._matmul_params + 4 * self.attended_keys(cp) * self.model.hidden_size)

    def _act_elems_per_token(self, tp: int, cp: int = 1) -> float:
        """Activation elements one block keeps per local token for its backward pass (flash attention: no s^2
        term); the gathered keys and values cover the whole sequence, `cp` times the local tokens."""
        m = self.model
        sharded = 2 * m.hidden_size + 2 * cp * self._kv_width + (3 if m.gated_mlp else 2) * m.ffn_size
        return 4 * m.hidden_size + sharded / tp

    def kv_gather_bytes(self, tp: int, microbatch: int) -> float:
        """Bytes of one block's keys and values of a micro-batch's whole sequences on one TP rank: what a CP
        all-gather assembles on every device (and a reduce-scatter of their gradients takes apart)."""
        return 2 * ACT_BYTES * microbatch * self.seq_len * self._kv_width / tp

    def kv_seconds(self, tp: int, cp: int, microbatch: int, recompute: bool, cp_link: Link) -> float:
        """One block's key/value collectives over the CP ranks per micro-batch: the all-gathers (forward, again
        when recomputing) and their gradients' reduce-scatter."""
        gathers = 3 if recompute else 2
        return gathers * ring_allgather_seconds(self.kv_gather_bytes(tp, microbatch), cp, cp_link)

    def _grad_bytes(self, tp: int, part: str) -> tuple[float, float]:
        """Bytes of one `part`'s ("block", "embedding" or "head") parameter gradients on one device, as (matrices
        split over TP, weights replicated over TP): weights in the compute dtype (their gradients are summed where
        the replicated weights are cast), the matmuls' sharded over TP, the embedding and the head matrix
        replicated as `jaxhet.parallel.megatron_specs` lays them out; norms in fp32."""
        h = self.model.hidden_size
        if part == "block":
            return ACT_BYTES * self._matmul_params / tp, GRAD_BYTES_PER_PARAM * 2 * h
        if part == "embedding":
            return 0.0, ACT_BYTES * self.model.embedding_params
        return 0.0, ACT_BYTES * (self.model.head_params - h) + GRAD_BYTES_PER_PARAM * h

    def cp_grad_bytes(self, tp: int, part: str = "block") -> float:
        """Bytes of parameter gradients one device all-reduces over the CP ranks per micro-batch, for one `part`
        ("block", "embedding" or "head"); see `_grad_bytes`."""
        return sum(self._grad_bytes(tp, part))

    def fsdp_gather_bytes(self, tp: int, part: str) -> tuple[float, float]:
        """Bytes one device's zero-3 gather of one `part`'s parameters yields, as (matrices split over TP, weights
        replicated over TP): the stored fp32 parameters are gathered, then cast where they are used."""
        h = self.model.hidden_size
        if part == "block":
            return PARAM_BYTES_PER_PARAM * self._matmul_params / tp, PARAM_BYTES_PER_PARAM * 2 * h
        if part == "embedding":
            return 0.0, PARAM_BYTES_PER_PARAM * self.model.embedding_params
        return 0.0, PARAM_BYTES_PER_PARAM * self.model.head_params

    def fsdp_seconds(self, tp: int, cp: int, part: str, link: Link | None, cp_link: Link | None) -> float:
        """Zero 3's collectives of one `part` per micro-batch: its weights all-gathered for the forward and again
        for the backward, its gradients reduce-scattered, each of the bytes of `fsdp_gather_bytes`: the matrices
        split over TP over the `cp` ranks (`cp_link`), the replicated weights over all `tp * cp` devices
        (`_group_link`; gathered axis by axis, the same ring time)."""
        split, replicated = self.fsdp_gather_bytes(tp, part)
        seconds = 0.0
        if split and cp > 1:
            seconds += ring_allgather_seconds(split, cp, _group_link(cp_link, None))
        if replicated and tp * cp > 1:
            seconds += ring_allgather_seconds(replicated, tp * cp, _group_link(link, cp_link))
        return 3 * seconds

    def grad_collective_seconds(
        self, tp: int, cp: int, part: str, zero: int, link: Link | None, cp_link: Link | None
    ) -> float:
        """One `part`'s gradient collectives inside its stage per micro-batch: zero 3's gathers and reduce-scatter
        (`fsdp_seconds`), otherwise the all-reduce over the CP ranks."""
        if zero == 3:
            return self.fsdp_seconds(tp, cp, part, link, cp_link)
        return _cp_allreduce_seconds(self.cp_grad_bytes(tp, part), cp, cp_link)

    def layer_seconds(
        self,
        kind: str,
        tp: int,
        microbatch: int,
        recompute: bool,
        link: Link,
        cp: int = 1,
        cp_link: Link | None = None,
        zero: int = 0,
    ) -> float:
        """Forward+backward of one block on one micro-batch, on a stage of `cp` ranks of `tp` devices of `kind`
        (TP over `link`, CP over `cp_link`) under ZeRO stage `zero`."""
        prof = self._profile(kind)
        tokens = microbatch * self.seq_len / cp
        passes = 4 if recompute else 3
        flops = passes * self.layer_flops(tokens, cp) / tp
        weight_bytes = ACT_BYTES * self._matmul_params / tp
        act_bytes = self.layer_act_bytes(tp, microbatch, False, cp)
        moved = passes * weight_bytes + (passes + 1) * act_bytes
        achievable = prof.flops_per_s_at(self.model.hidden_size // tp)
        compute = max(flops / achievable, moved / prof.bytes_per_s) + prof.layer_overhead_us * 1e-6
        allreduces = 6 if recompute else 4
        comm = allreduces * ring_allreduce_seconds(ACT_BYTES * tokens * self.model.hidden_size, tp, link)
        cp_link = cp_link or link
        kv = self.kv_seconds(tp, cp, microbatch, recompute, cp_link)
        return compute + comm + kv + self.grad_collective_seconds(tp, cp, "block", zero, link, cp_link)

    def head_seconds(
        self,
        kind: str,
        tp: int,
        microbatch: int,
        cp: int = 1,
        cp_link: Link | None = None,
        zero: int = 0,
        link: Link | None = None,
    ) -> float:
        """Forward+backward of the final norm and the LM head on one micro-batch, with its gradient collectives
        (`grad_collective_seconds`; `link`: the TP group's, needed by zero 3). The head is replicated over TP
        (`jaxhet.parallel.megatron_specs`): every TP device computes all the logits, so `tp` does not divide this
        time."""
        prof = self._profile(kind)
        tokens = microbatch * self.seq_len / cp
        flops = 3 * 2 * tokens * self.model.vocab_size * self.model.hidden_size
        moved = 3 * ACT_BYTES * self.model.head_params + LOGIT_BYTES * tokens * self.model.vocab_size
        compute = max(flops / prof.flops_per_s_at(self.model.hidden_size), moved / prof.bytes_per_s)
        return compute + self.grad_collective_seconds(tp, cp, "head", zero, link, cp_link)

    def embed_seconds(
        self, tp: int, cp: int = 1, cp_link: Link | None = None, zero: int = 0, link: Link | None = None
    ) -> float:
        """The first stage's per-micro-batch extra: the embedding's gradient collectives (`grad_collective_seconds`;
        the lookup itself is not timed)."""
        return self.grad_collective_seconds(tp, cp, "embedding", zero, link, cp_link)

    def stage_seconds(
        self,
        kind: str,
        tp: int,
        layers: int,
        microbatch: int,
        recompute: bool,
        first: bool,
        last: bool,
        link: Link,
        cp: int = 1,
        cp_link: Link | None = None,
        zero: int = 0,
    ) -> float:
        """Forward+backward of one stage on one micro-batch: its blocks, the LM head if last, and the embedding's
        gradient collectives if first."""
        cp_link = cp_link or link
        t = layers * self.layer_seconds(kind, tp, microbatch, recompute, link, cp, cp_link, zero)
        if last:
            t += self.head_seconds(kind, tp, microbatch, cp, cp_link, zero, link)
        if first:
            t += self.embed_seconds(tp, cp, cp_link, zero, link)
        return t

    def edge_bytes(self, microbatch: int, compress: str = "none") -> float:
        """Bytes one micro-batch's activations (or their gradients) put on a stage edge under codec `compress`."""
        return microbatch * self.seq_len * edge_bytes_per_token(compress, self.model.hidden_size, ACT_BYTES)

    def p2p_seconds(
        self, link: Link, microbatch: int, compress: str = "none", kinds: tuple[str, str] | None = None
    ) -> float:
        """Activations forward plus their gradients backward across one stage boundary, one micro-batch; compressed
        (`compress` not "none"), the packed bytes plus encoding and decoding on the two ends' device `kinds`."""
        packed = self.edge_bytes(microbatch, compress)
        if compress == "none":
            return 2 * link.seconds(packed)
        if kinds is None:
            raise ValueError(f"compress = {compress!r} needs the device kinds of the edge's two ends (kinds)")
        bandwidths = (self._profile(kinds[0]).bytes_per_s, self._profile(kinds[1]).bytes_per_s)
        return 2 * (link.seconds(packed) + codec_seconds(self.edge_bytes(microbatch), packed, bandwidths))

    def held_params(self, piece: str, tp: int) -> float:
        """Parameters of one piece on one device of a stage under zero 0: a block's split over TP, the embedding
        and the head whole (replicated over TP, as `jaxhet.parallel.megatron_specs` lays them out)."""
        params = piece_params(self.model, piece)
        return params / tp if piece == "block" else params

    def stage_pieces(self, layers: int, first: bool, last: bool) -> dict[str, int]:
        """How many of each piece a stage holds: its blocks, the embedding if first (tied: or last, once if both),
        the head if last."""
        embedding = first or (last and self.model.tied_embeddings)
        return {"block": layers, "embedding": int(embedding), "head": int(last)}

    def piece_moment_bytes(self, piece: str, tp: int, cp: int, zero: int) -> float:
        """Moment bytes of one piece on one device of a stage of `tp * cp` devices, split inside the stage only:
        laid out like the parameter under zero 0, split over all the stage's devices under zero 1 and 3."""
        if zero == 0:
            return MOMENT_BYTES_PER_PARAM * self.held_params(piece, tp)
        return MOMENT_BYTES_PER_PARAM * piece_params(self.model, piece) / (tp * cp)

    def piece_state_bytes(self, piece: str, tp: int, cp: int, zero: int) -> float:
        """Parameter, gradient and moment bytes of one piece on one device (moments split inside the stage only):
        parameters and gradients laid out like the parameter under zero 0 and 1, split over the `tp * cp` devices
        under zero 3."""
        held = self.held_params(piece, tp) if zero < 3 else piece_params(self.model, piece) / (tp * cp)
        return (PARAM_BYTES_PER_PARAM + GRAD_BYTES_PER_PARAM) * held + self.piece_moment_bytes(piece, tp, cp, zero)

    def fsdp_live_bytes(self, tp: int, pieces: dict[str, int]) -> float:
        """Zero 3's working set: the largest held piece's fp32 weights gathered plus its fp32 gradient (one piece at
        a time)."""
        largest = max((self.held_params(p, tp) for p, count in pieces.items() if count), default=0.0)
        return (PARAM_BYTES_PER_PARAM + GRAD_BYTES_PER_PARAM) * largest

    def logits_bytes(self, tp: int, microbatch: int, cp: int = 1) -> float:
        return LOGIT_BYTES * microbatch * self.seq_len / cp * self.model.vocab_size

    def layer_act_bytes(self, tp: int, microbatch: int, recompute: bool, cp: int = 1) -> float:
        """Activation bytes one block keeps per in-flight micro-batch on one device."""
        tokens = microbatch * self.seq_len / cp
        if recompute:
            return ACT_BYTES * self.model.hidden_size * tokens
        return ACT_BYTES * self._act_elems_per_token(tp, cp) * tokens

    def stage_memory_bytes(
        self,
        tp: int,
        layers: int,
        microbatch: int,
        recompute: bool,
        in_flight: int,
        first: bool,
        last: bool,
        cp: int = 1,
        zero: int = 0,
        splits: Sequence[MomentSplit] = (),
    ) -> float:
        """Peak bytes on the first device of a stage under ZeRO stage `zero`, the moments of the pieces in `splits`
        split across their holders (`moment_splits`), the rest inside the stage."""
        pieces = self.stage_pieces(layers, first, last)
        total = sum(count * self.piece_state_bytes(p, tp, cp, zero) for p, count in pieces.items())
        if zero == 3:
            total += self.fsdp_live_bytes(tp, pieces)
        for piece, share in splits:
            total += MOMENT_BYTES_PER_PARAM * piece_params(self.model, piece) * share
            total -= self.piece_moment_bytes(piece, tp, cp, zero)
        total += layers * in_flight * self.layer_act_bytes(tp, microbatch, recompute, cp)
        if recompute:
            total += self.layer_act_bytes(tp, microbatch, False, cp)
        if last:
            total += self.logits_bytes(tp, microbatch, cp)
        return total

    def zero1_gather_seconds(
        self, stage: Stage, cp: int, link: Link, first: bool, last: bool, splits: Sequence[MomentSplit] = ()
    ) -> float:
        """ZeRO-1's gathering, once a step, of a stage's updated fp32 parameters over its `tp * cp` devices
        (`link`: the slowest link the stage spans), for the pieces whose moments it splits inside the stage (not
        those of `splits`, gathered back across the holders in place of the gradient all-reduce's second half)."""
        if stage.zero != 1:
            return 0.0
        pieces = self.stage_pieces(stage.num_layers, first, last)
        params = sum(count * piece_params(self.model, p) for p, count in pieces.items())
        params -= sum(piece_params(self.model, p) for p, _ in splits)
        return ring_allgather_seconds(PARAM_BYTES_PER_PARAM * params, stage.tp * cp, link) if params else 0.0

    def stage_grad_bytes(self, tp: int, layers: int, first: bool, last: bool) -> float:
        """Gradient bytes one device of a stage all-reduces with the other replicas (laid out as under zero 0)."""
        pieces = self.stage_pieces(layers, first, last)
        return GRAD_BYTES_PER_PARAM * sum(count * self.held_params(p, tp) for p, count in pieces.items())

    def dp_link(self, nodes: Sequence[int]) -> Link:
        """The link the gradient all-reduce over the plan's `nodes` crosses: inside the node if there is one, else
        that of the topology level they span (the inter-node link without a topology)."""
        return self.cluster.link_of(nodes)

    def grad_sync_seconds(self, replicas: int, max_grad_bytes: float, link: Link) -> float:
        return ring_allreduce_seconds(max_grad_bytes, replicas, link)


def piece_holders(plan: TrainPlan, model: ModelSpec) -> list[tuple[str, list[tuple[int, int]]]]:
    """Every piece of the model (each block, the embedding, the head) with the stages of `plan` holding it, as
    `(replica, stage)` indices: a block's its stage in every replica, the embedding every first stage and, with
    tied embeddings, every last stage of a pipeline too, the head every last stage."""
    pieces: list[tuple[str, list[tuple[int, int]]]] = []
    for layer in range(plan.num_layers):
        holders = [
            (r, s)
            for r, replica in enumerate(plan.replicas)
            for s, stage in enumerate(replica.stages)
            if stage.layers[0] <= layer < stage.layers[1]
        ]
        pieces.append(("block", holders))
    lasts = [(r, len(replica.stages) - 1) for r, replica in enumerate(plan.replicas)]
    embedding = [(r, 0) for r in range(len(plan.replicas))]
    if model.tied_embeddings:
        embedding += [(r, s) for r, s in lasts if s > 0]
    return [*pieces, ("embedding", embedding), ("head", lasts)]


def moment_splits(plan: TrainPlan, model: ModelSpec) -> dict[tuple[int, int], list[MomentSplit]]:
    """For every stage `(replica, stage)` of `plan`, the pieces whose moments are split across their holders, with
    the share its first device holds: those of `H >= 2` holders that all have zero >= 1, `1 / (H L)` with `L` the
    gcd of the holders' device counts (each holder's devices in `L` rows, the first of each row holding a part)."""
    out: dict[tuple[int, int], list[MomentSplit]] = {
        (r, s): [] for r, replica in enumerate(plan.replicas) for s in range(len(replica.stages))
    }
    for piece, holders in piece_holders(plan, model):
        stages = [plan.replicas[r].stages[s] for r, s in holders]
        if len(holders) < 2 or any(stage.zero == 0 for stage in stages):
            continue
        lanes = math.gcd(*(len(stage.devices) for stage in stages))
        for key in holders:
            out[key].append((piece, 1 / (len(holders) * lanes)))
    return out


def span_link(cluster: ClusterSpec, groups: list[tuple[int, ...]]) -> Link:
    """The link collectives inside each of `groups` (device indices) cross: that of the highest topology level one
    spans (`ClusterSpec.level_link`; without a topology the inter-node link if one spans several nodes), else the
    first device's node's own link."""
    devices = cluster.devices
    level = max(cluster.level_of(devices[d].node for d in group) for group in groups)
    return cluster.level_link(level, devices[groups[0][0]].node)


def stage_links(cluster: ClusterSpec, stage: Stage, cp: int) -> tuple[Link, Link]:
    """The links of a stage's TP groups (`devices[c * tp : (c + 1) * tp]`) and of its CP groups
    (`devices[t::tp]`)."""
    d, tp = stage.devices, stage.tp
    return span_link(cluster, [d[c * tp : (c + 1) * tp] for c in range(cp)]), span_link(
        cluster, [d[t::tp] for t in range(tp)]
    )


def evaluate_train_plan(plan: TrainPlan, cluster: ClusterSpec, model: ModelSpec) -> PlanEstimate:
    """Predicted iteration time and per-stage peak memory of `plan` (no feasibility check; see `memory_excess`)."""
    costs = TrainCosts(cluster, model, plan.seq_len)
    devices = cluster.devices
    splits = moment_splits(plan, model)
    replica_s, memory, max_grad = [], [], 0.0
    for r, replica in enumerate(plan.replicas):
        b, depth, cp = replica.microbatch_size, len(replica.stages), replica.cp
        times, mems, comm, gathers = [], [], 0.0, 0.0
        for i, stage in enumerate(replica.stages):
            first, last = i == 0, i == depth - 1
            link, cp_link = stage_links(cluster, stage, cp)
            shape = (stage.kind, stage.tp, stage.num_layers, b, stage.recompute, first, last)
            times.append(costs.stage_seconds(*shape, link, cp, cp_link, stage.zero))
            held = in_flight(plan.schedule, depth, i, replica.num_microbatches)
            nbytes = costs.stage_memory_bytes(
                stage.tp, stage.num_layers, b, stage.recompute, held, first, last, cp, stage.zero, splits[r, i]
            )
            group = span_link(cluster, [stage.devices])
            gathers = max(gathers, costs.zero1_gather_seconds(stage, cp, group, first, last, splits[r, i]))
            mems.append(nbytes / 1e9)
            max_grad = max(max_grad, costs.stage_grad_bytes(stage.tp, stage.num_layers, first, last))
            if not last:
                following = replica.stages[i + 1]
                link = boundary_link(cluster, stage, following)
                comm += costs.p2p_seconds(link, b, stage.compress, (stage.kind, following.kind))
        replica_s.append(sum(times) + comm + (replica.num_microbatches - 1) * max(times) + gathers)
        memory.append(tuple(mems))
    nodes = sorted({devices[d].node for d in plan.devices})
    sync = costs.grad_sync_seconds(len(plan.replicas), max_grad, costs.dp_link(nodes))
    return PlanEstimate(max(replica_s) + sync, tuple(replica_s), sync, tuple(memory))


def boundary_link(cluster: ClusterSpec, stage: Stage, following: Stage) -> Link:
    """The link between two consecutive stages: inside the first one's node if the next starts there too, else
    that of the topology level their first devices' nodes span."""
    devices = cluster.devices
    return cluster.link_of((devices[stage.devices[0]].node, devices[following.devices[0]].node))


def memory_excess(plan: TrainPlan, cluster: ClusterSpec, estimate: PlanEstimate) -> list[str]:
    """One line per stage whose predicted peak memory exceeds its devices' usable memory."""
    out = []
    for r, (replica, mems) in enumerate(zip(plan.replicas, estimate.peak_memory_gb, strict=True)):
        for s, (stage, gb) in enumerate(zip(replica.stages, mems, strict=True)):
            cap = cluster.profile(stage.kind).capacity_bytes / 1e9
            if gb > cap:
                out.append(f"replicas[{r}].stages[{s}] needs {gb:.2f} GB per {stage.kind}, usable {cap:.2f} GB")
    return out
