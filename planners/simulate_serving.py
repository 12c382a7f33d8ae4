"""Discrete-event simulation of a serving plan under a request trace: continuous batching with a KV-cache budget.

Requests are split among a model's replicas at random in proportion to their planned traffic (prefill replicas
for disaggregated traffic, whose prompts then go to decode replicas the same way). A colocated replica loops:
admit waiting requests while the batch and the KV cache have room (each admission runs its prefill, stalling
decoding), then run one decode step for the whole batch. A prefill replica serves prompts first come first served
and ships their KV cache over the inter-node link; a decode replica only admits and decodes. Step and prefill
times come from `ServingCosts`, so the simulation checks the planner's steady-state capacity against queueing
and batching dynamics.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from collections.abc import Sequence

from planners.cluster import ClusterSpec, Link
from planners.model import ModelSpec
from planners.serve import ServePlan, ServeReplica
from planners.serving_cost import ServingCosts
from planners.workload import Request, ServeWorkload


@dataclasses.dataclass(frozen=True)
class ServeStats:
    """Per-request latencies (seconds) of a simulated run and the share of requests meeting both SLOs."""

    ttft_s: tuple[float, ...]
    tpot_s: tuple[float, ...]
    slo_attainment: float
    makespan_s: float


def poisson_trace(rate: float, count: int, input_len: int, output_len: int, seed: int = 0) -> tuple[Request, ...]:
    """`count` requests with exponential inter-arrival times at `rate` per second and fixed lengths."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(Request(t, input_len, output_len))
    return tuple(out)


def _decode_loop(
    costs: ServingCosts, replica: ServeReplica, link: Link, ready: list[tuple[float, Request, int]], prefill: bool
) -> dict[int, tuple[float, float]]:
    """Run one colocated (`prefill`) or decode-only replica over requests ready at the given times; returns each
    request's (first token time, last token time)."""
    capacity = costs.kv_capacity_tokens(replica.kind, replica.tp)
    prefill_s = costs.prefill_seconds(replica.kind, replica.tp, link)
    pending = deque(sorted(ready, key=lambda x: x[0]))
    running: list[list] = []  # [request id, tokens left, tokens held]
    done: dict[int, tuple[float, float]] = {}
    first: dict[int, float] = {}
    t = 0.0
    while pending or running:
        if not running and pending and pending[0][0] > t:
            t = pending[0][0]
        held = sum(r[2] for r in running)
        while pending and pending[0][0] <= t and len(running) < replica.max_batch:
            ready_at, request, rid = pending[0]
            need = request.input_len + request.output_len
            if held + need > capacity:
                break
            pending.popleft()
            if prefill:
                t += prefill_s
            first[rid] = t if prefill else ready_at
            held += need
            running.append([rid, request.output_len - 1, need])
        if running:
            t += costs.step_seconds(replica.kind, replica.tp, len(running), link)
            for r in running:
                r[1] -= 1
            for r in [r for r in running if r[1] < 0]:
                done[r[0]] = (first[r[0]], t)
                running.remove(r)
    return done


def simulate_serving(
    plan: ServePlan,
    cluster: ClusterSpec,
    models: Sequence[ModelSpec],
    workload: ServeWorkload,
    trace: Sequence[Request],
    seed: int = 0,
) -> ServeStats:
    """Simulate `trace` (all requests for the plan's first model when several are served) on `plan`."""
    rng = random.Random(seed)
    model = next(m for m in models if m.name == next(iter(plan.rates)))
    costs = ServingCosts(cluster, model, workload)
    replicas = [r for r in plan.replicas if r.model == model.name]

    def link(replica: ServeReplica) -> Link:
        return cluster.nodes[cluster.devices[replica.devices[0]].node].intra_link

    def pick(role: str) -> int:
        options = [i for i, r in enumerate(replicas) if r.role == role]
        return rng.choices(options, weights=[replicas[i].routed_rps for i in options])[0]

    both = sum(r.routed_rps for r in replicas if r.role == "both")
    split = sum(r.routed_rps for r in replicas if r.role == "prefill")
    queues: dict[int, list[tuple[float, Request, int]]] = {i: [] for i in range(len(replicas))}
    prefill_free: dict[int, float] = {}
    for rid, request in enumerate(sorted(trace, key=lambda r: r.arrival_s)):
        if rng.random() < both / (both + split):
            queues[pick("both")].append((request.arrival_s, request, rid))
            continue
        p = pick("prefill")
        start = max(request.arrival_s, prefill_free.get(p, 0.0))
        prefill_free[p] = start + costs.prefill_seconds(replicas[p].kind, replicas[p].tp, link(replicas[p]))
        queues[pick("decode")].append((prefill_free[p] + costs.kv_transfer_seconds(), request, rid))
    times: dict[int, tuple[float, float]] = {}
    for i, ready in queues.items():
        if ready:
            times.update(_decode_loop(costs, replicas[i], link(replicas[i]), ready, replicas[i].role == "both"))
    arrivals = {rid: r for rid, r in enumerate(sorted(trace, key=lambda r: r.arrival_s))}
    ttft = tuple(times[rid][0] - arrivals[rid].arrival_s for rid in sorted(times))
    tpot = tuple((times[rid][1] - times[rid][0]) / max(arrivals[rid].output_len - 1, 1) for rid in sorted(times))
    met = sum(1 for a, b in zip(ttft, tpot, strict=True) if a <= workload.ttft_slo_s and b <= workload.tpot_slo_s)
    return ServeStats(ttft, tpot, met / len(ttft), max(end for _, end in times.values()))
