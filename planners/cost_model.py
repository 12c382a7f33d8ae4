"""An analytical cost model of training a decoder on heterogeneous devices.

Compute: a roofline per transformer block, `max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth)`, with the
device's efficiency factors (`DeviceProfile`; FLOP/s at the size of the block's matmuls on one device, `hidden / tp`,
where the profile measured how throughput falls for small matmuls), plus a fixed per-block overhead (kernel
launches). FLOPs per token
and block are `2 * matmul params + 2 * seq * hidden` (causal attention) forward, twice that backward, once more
with recomputation.

Communication: alpha-beta per link class (`Link.seconds`). Tensor parallelism costs two ring all-reduces of the
block's activations forward and two backward (two more when recomputing) over the node's link; pipeline stages
exchange activations forward and their gradients backward over the link joining them (inside a node or between
nodes); data-parallel replicas all-reduce gradients (fp32) across the plan with a ring, over the inter-node link
when the plan spans several nodes.

Memory per device: parameters with mixed-precision Adam state (16 bytes per parameter: bf16 weights, fp32 master,
two fp32 moments; gradients accumulate into the fp32 master buffer's twin counted in the 16), divided by TP;
bf16 activations of the micro-batches in flight (1F1B: a stage `k` stages from the end holds `min(k, m)`) —
without recomputation every block keeps its inputs to every matmul, norm and activation, with recomputation
only its input plus one block's worth of working space; the last stage also holds the logits.

Pipeline time of a replica with stage times `t_i` (forward+backward of one micro-batch), boundary transfer times
`c_j` and `m` micro-batches: `sum t_i + sum c_j + (m - 1) * max t_i`. Iteration time: the slowest replica plus the
gradient all-reduce. The optimizer step and overlap of communication with compute are not modelled.
"""

from __future__ import annotations

import dataclasses

from planners.cluster import ClusterSpec, Link
from planners.model import ModelSpec
from planners.plan import PlanEstimate, TrainPlan
from planners.profile import DeviceProfile

STATE_BYTES_PER_PARAM = 16
GRAD_BYTES_PER_PARAM = 4
ACT_BYTES = 2
LOGIT_BYTES = 6


def ring_allreduce_seconds(nbytes: float, ranks: int, link: Link) -> float:
    """Ring all-reduce of `nbytes` among `ranks` peers: 2(n-1) steps of nbytes/n each."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * link.latency_us * 1e-6 + 2 * (ranks - 1) / ranks * nbytes / (link.gb_s * 1e9)


@dataclasses.dataclass(frozen=True)
class TrainCosts:
    """Per-component costs for one model and sequence length on one cluster."""

    cluster: ClusterSpec
    model: ModelSpec
    seq_len: int

    def _profile(self, kind: str) -> DeviceProfile:
        return self.cluster.profile(kind)

    @property
    def _matmul_params(self) -> int:
        return self.model.layer_params - 2 * self.model.hidden_size

    def layer_flops(self, tokens: int) -> float:
        """Forward FLOPs of one block over `tokens` tokens of `seq_len`-long sequences."""
        return tokens * (2 * self._matmul_params + 2 * self.seq_len * self.model.hidden_size)

    def _act_elems_per_token(self, tp: int) -> float:
        """Activation elements one block keeps per token for its backward pass (flash attention: no s^2 term)."""
        m = self.model
        kv = m.num_kv_heads * m.head_dim
        sharded = 2 * m.hidden_size + 2 * kv + (3 if m.gated_mlp else 2) * m.ffn_size
        return 4 * m.hidden_size + sharded / tp

    def layer_seconds(self, kind: str, tp: int, microbatch: int, recompute: bool, link: Link) -> float:
        """Forward+backward of one block on one micro-batch, on a TP group of `tp` devices of `kind` over `link`."""
        prof = self._profile(kind)
        tokens = microbatch * self.seq_len
        passes = 4 if recompute else 3
        flops = passes * self.layer_flops(tokens) / tp
        weight_bytes = ACT_BYTES * self._matmul_params / tp
        act_bytes = ACT_BYTES * self._act_elems_per_token(tp) * tokens
        moved = passes * weight_bytes + (passes + 1) * act_bytes
        achievable = prof.flops_per_s_at(self.model.hidden_size // tp)
        compute = max(flops / achievable, moved / prof.bytes_per_s) + prof.layer_overhead_us * 1e-6
        allreduces = 6 if recompute else 4
        comm = allreduces * ring_allreduce_seconds(ACT_BYTES * tokens * self.model.hidden_size, tp, link)
        return compute + comm

    def head_seconds(self, kind: str, tp: int, microbatch: int) -> float:
        """Forward+backward of the final norm and the (vocabulary-parallel) LM head on one micro-batch."""
        prof = self._profile(kind)
        tokens = microbatch * self.seq_len
        flops = 3 * 2 * tokens * self.model.vocab_size * self.model.hidden_size / tp
        moved = 3 * ACT_BYTES * self.model.head_params / tp + LOGIT_BYTES * tokens * self.model.vocab_size / tp
        return max(flops / prof.flops_per_s_at(self.model.hidden_size), moved / prof.bytes_per_s)

    def p2p_seconds(self, link: Link, microbatch: int) -> float:
        """Activations forward plus their gradients backward across one stage boundary, one micro-batch."""
        nbytes = ACT_BYTES * microbatch * self.seq_len * self.model.hidden_size
        return 2 * link.seconds(nbytes)

    def layer_state_bytes(self, tp: int) -> float:
        return STATE_BYTES_PER_PARAM * self.model.layer_params / tp

    def first_state_bytes(self, tp: int) -> float:
        return STATE_BYTES_PER_PARAM * self.model.embedding_params / tp

    def last_state_bytes(self, tp: int) -> float:
        return STATE_BYTES_PER_PARAM * self.model.head_params / tp

    def logits_bytes(self, tp: int, microbatch: int) -> float:
        return LOGIT_BYTES * microbatch * self.seq_len * self.model.vocab_size / tp

    def layer_act_bytes(self, tp: int, microbatch: int, recompute: bool) -> float:
        """Activation bytes one block keeps per in-flight micro-batch."""
        tokens = microbatch * self.seq_len
        if recompute:
            return ACT_BYTES * self.model.hidden_size * tokens
        return ACT_BYTES * self._act_elems_per_token(tp) * tokens

    def stage_memory_bytes(
        self, tp: int, layers: int, microbatch: int, recompute: bool, in_flight: int, first: bool, last: bool
    ) -> float:
        """Peak bytes on one device of a stage."""
        total = layers * (self.layer_state_bytes(tp) + in_flight * self.layer_act_bytes(tp, microbatch, recompute))
        if recompute:
            total += self.layer_act_bytes(tp, microbatch, False)
        if first:
            total += self.first_state_bytes(tp)
        if last:
            total += self.last_state_bytes(tp) + self.logits_bytes(tp, microbatch)
        return total

    def stage_grad_bytes(self, tp: int, layers: int, first: bool, last: bool) -> float:
        """Gradient bytes one device of a stage all-reduces with the other replicas."""
        params = layers * self.model.layer_params
        params += self.model.embedding_params if first else 0
        params += self.model.head_params if last else 0
        return GRAD_BYTES_PER_PARAM * params / tp

    def dp_link(self, nodes_used: int, single_node: int) -> Link:
        """The link the gradient all-reduce crosses: inside `single_node` if the plan uses only one node."""
        return self.cluster.inter_link if nodes_used > 1 else self.cluster.nodes[single_node].intra_link

    def grad_sync_seconds(self, replicas: int, max_grad_bytes: float, link: Link) -> float:
        return ring_allreduce_seconds(max_grad_bytes, replicas, link)


def evaluate_train_plan(plan: TrainPlan, cluster: ClusterSpec, model: ModelSpec) -> PlanEstimate:
    """Predicted iteration time and per-stage peak memory of `plan` (no feasibility check; see `memory_excess`)."""
    costs = TrainCosts(cluster, model, plan.seq_len)
    devices = cluster.devices
    replica_s, memory, max_grad = [], [], 0.0
    for replica in plan.replicas:
        b, depth = replica.microbatch_size, len(replica.stages)
        times, mems, comm = [], [], 0.0
        for i, stage in enumerate(replica.stages):
            first, last = i == 0, i == depth - 1
            in_flight = min(depth - i, replica.num_microbatches)
            node = devices[stage.devices[0]].node
            link = cluster.nodes[node].intra_link
            t = stage.num_layers * costs.layer_seconds(stage.kind, stage.tp, b, stage.recompute, link)
            if last:
                t += costs.head_seconds(stage.kind, stage.tp, b)
            times.append(t)
            mems.append(
                costs.stage_memory_bytes(stage.tp, stage.num_layers, b, stage.recompute, in_flight, first, last) / 1e9
            )
            max_grad = max(max_grad, costs.stage_grad_bytes(stage.tp, stage.num_layers, first, last))
            if not last:
                same_node = devices[replica.stages[i + 1].devices[0]].node == node
                comm += costs.p2p_seconds(link if same_node else cluster.inter_link, b)
        replica_s.append(sum(times) + comm + (replica.num_microbatches - 1) * max(times))
        memory.append(tuple(mems))
    nodes = sorted({devices[d].node for d in plan.devices})
    sync = costs.grad_sync_seconds(len(plan.replicas), max_grad, costs.dp_link(len(nodes), nodes[0]))
    return PlanEstimate(max(replica_s) + sync, tuple(replica_s), sync, tuple(memory))


def memory_excess(plan: TrainPlan, cluster: ClusterSpec, estimate: PlanEstimate) -> list[str]:
    """One line per stage whose predicted peak memory exceeds its devices' usable memory."""
    out = []
    for r, (replica, mems) in enumerate(zip(plan.replicas, estimate.peak_memory_gb, strict=True)):
        for s, (stage, gb) in enumerate(zip(replica.stages, mems, strict=True)):
            cap = cluster.profile(stage.kind).capacity_bytes / 1e9
            if gb > cap:
                out.append(f"replicas[{r}].stages[{s}] needs {gb:.2f} GB per {stage.kind}, usable {cap:.2f} GB")
    return out
