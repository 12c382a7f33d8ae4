"""An analytical cost model of serving a decoder with continuous batching on one TP group.

Per request: a prefill of `input_len` tokens (roofline over the prompt, causal attention), then `output_len`
decode steps shared with the other requests of the batch. A decode step over a batch of `B` requests reads the
weights once and each request's KV cache (at its average context `input_len + output_len / 2`), and computes
`2 * params` FLOPs per request. Weights are bf16; the KV cache bf16, sharded by TP; what is left of usable memory
after the weights bounds the batch (`B * (input_len + output_len)` tokens of KV cache).

The largest batch whose decode step meets the time-per-output-token SLO and whose KV cache fits sets a replica's
throughput: one request costs its prefill plus `output_len` steps divided among `B` requests. A configuration whose
prefill alone misses the time-to-first-token SLO, or that cannot hold one request, cannot serve. With
prefill/decode disaggregation a prefill replica's throughput is one prompt per prefill time (its TTFT includes
shipping the KV cache over the inter-node link) and a decode replica's `B` requests per `output_len` steps.
Queueing is not modelled (the planner keeps each replica's load at or below its throughput).
"""

from __future__ import annotations

import dataclasses

from planners.cluster import ClusterSpec, Link
from planners.cost_model import ring_allreduce_seconds
from planners.model import ModelSpec
from planners.workload import ServeWorkload

WEIGHT_BYTES = 2
KV_BYTES = 2
MAX_BATCH = 512


ROLES = ("both", "prefill", "decode")


@dataclasses.dataclass(frozen=True)
class ReplicaPerf:
    """What one replica of `model` on `tp` devices of `kind` achieves in `role` under the workload's SLOs.

    `role` "both" serves whole requests; "prefill" only prompts (its KV cache then crosses the inter-node link to a
    "decode" replica, which only generates). `requests_per_s` is the rate of requests the replica completes its
    part of; `latency_s` is the time one request spends in that part at the planned batch, queueing aside (prefill
    plus the KV cache's transfer for "prefill", `output_len` decode steps for "decode", both for "both").
    """

    model: str
    kind: str
    tp: int
    role: str
    max_batch: int
    prefill_s: float
    step_s: float
    requests_per_s: float
    price_per_hour: float
    latency_s: float


@dataclasses.dataclass(frozen=True)
class ServingCosts:
    """Serving costs of one model on one cluster for one workload."""

    cluster: ClusterSpec
    model: ModelSpec
    workload: ServeWorkload

    @property
    def _matmul_params(self) -> int:
        m = self.model
        return m.num_layers * (m.layer_params - 2 * m.hidden_size) + m.vocab_size * m.hidden_size

    def weight_bytes(self, tp: int) -> float:
        return WEIGHT_BYTES * self.model.num_params / tp

    def kv_bytes_per_token(self, tp: int) -> float:
        m = self.model
        return 2 * m.num_layers * m.num_kv_heads * m.head_dim * KV_BYTES / tp

    def kv_capacity_tokens(self, kind: str, tp: int) -> int:
        free = self.cluster.profile(kind).capacity_bytes - self.weight_bytes(tp)
        return max(0, int(free // self.kv_bytes_per_token(tp)))

    def prefill_seconds(self, kind: str, tp: int, link: Link) -> float:
        prof, m, n = self.cluster.profile(kind), self.model, self.workload.input_len
        flops = (2 * self._matmul_params * n + 2 * n * n * m.hidden_size * m.num_layers) / tp
        compute = max(flops / prof.flops_per_s_at(m.hidden_size // tp), self.weight_bytes(tp) / prof.bytes_per_s)
        comm = 2 * m.num_layers * ring_allreduce_seconds(WEIGHT_BYTES * n * m.hidden_size, tp, link)
        return compute + comm + m.num_layers * prof.layer_overhead_us * 1e-6

    def step_seconds(self, kind: str, tp: int, batch: int, link: Link) -> float:
        """One decode step of `batch` requests of the workload's lengths (each at its average context)."""
        context = self.workload.input_len + self.workload.output_len / 2
        return self.batch_step_seconds(kind, tp, batch, batch * context, link)

    def batch_step_seconds(self, kind: str, tp: int, batch: int, context_tokens: float, link: Link) -> float:
        """One decode step of `batch` requests whose KV caches hold `context_tokens` tokens together."""
        prof, m = self.cluster.profile(kind), self.model
        flops = 2 * self._matmul_params * batch / tp
        moved = self.weight_bytes(tp) + context_tokens * self.kv_bytes_per_token(tp)
        compute = max(flops / prof.flops_per_s_at(m.hidden_size // tp), moved / prof.bytes_per_s)
        comm = 2 * m.num_layers * ring_allreduce_seconds(WEIGHT_BYTES * batch * m.hidden_size, tp, link)
        return compute + comm + m.num_layers * prof.layer_overhead_us * 1e-6

    def kv_transfer_seconds(self) -> float:
        """Moving one prompt's KV cache from a prefill replica to a decode replica over the inter-node link."""
        return self.cluster.inter_link.seconds(self.workload.input_len * self.kv_bytes_per_token(1))

    def _decode_batch(self, kind: str, tp: int, link: Link, per_request: int) -> int:
        """The largest batch whose KV cache fits and whose decode step meets the TPOT SLO (0 if none)."""
        lo, hi = 0, min(MAX_BATCH, self.kv_capacity_tokens(kind, tp) // per_request)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.step_seconds(kind, tp, mid, link) <= self.workload.tpot_slo_s:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def replica(self, kind: str, tp: int, link: Link, role: str = "both") -> ReplicaPerf | None:
        """The replica's performance in `role` under the SLOs, or None if it cannot meet them."""
        w = self.workload
        price = tp * self.cluster.profile(kind).price_per_hour
        prefill = self.prefill_seconds(kind, tp, link)
        if role == "prefill":
            if self.kv_capacity_tokens(kind, tp) < w.input_len or prefill + self.kv_transfer_seconds() > w.ttft_slo_s:
                return None
            latency = prefill + self.kv_transfer_seconds()
            return ReplicaPerf(self.model.name, kind, tp, role, 1, prefill, 0.0, 1.0 / prefill, price, latency)
        if role == "both" and prefill > w.ttft_slo_s:
            return None
        batch = self._decode_batch(kind, tp, link, w.input_len + w.output_len)
        if batch == 0:
            return None
        step = self.step_seconds(kind, tp, batch, link)
        own_prefill = prefill if role == "both" else 0.0
        busy = w.output_len * step / batch + own_prefill
        latency = own_prefill + w.output_len * step
        return ReplicaPerf(self.model.name, kind, tp, role, batch, prefill, step, 1.0 / busy, price, latency)
