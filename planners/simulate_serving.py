"""Discrete-event simulation of a serving plan under a request trace: continuous batching with a KV-cache budget.

Each request belongs to its nearest request class (`ServeWorkload.class_of`) and is sent, at random in proportion
to the plan's traffic for that class, to a colocated replica or through a prefill replica (whose prompts then go
to decode replicas the same way). A colocated replica loops: admit waiting requests while the batch, the KV cache
and every admitted request's time-per-output-token SLO leave room (each admission runs its prefill, stalling
decoding), then run one decode step for the whole batch. A prefill replica serves prompts first come first served
and ships their KV cache over the inter-node link; a decode replica only admits and decodes. Prefill times, KV
transfers and decode steps come from `ServingCosts` at each request's own lengths (a step reads every batched
request's KV cache at its average context), so the simulation checks the planner's steady-state capacity against
queueing, batching and the mixing of classes.
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
from planners.workload import Request, RequestClass, ServeWorkload


@dataclasses.dataclass(frozen=True)
class ServeStats:
    """Per-request latencies (seconds) of a simulated run, in arrival order, the share of requests meeting both
    SLOs of their class, and that share per request class."""

    ttft_s: tuple[float, ...]
    tpot_s: tuple[float, ...]
    slo_attainment: float
    makespan_s: float
    class_attainment: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Job:
    """A request on its way through the simulation: when it is ready at a replica, its class and its costs."""

    ready_s: float
    request: Request
    rid: int
    klass: RequestClass
    costs: ServingCosts

    @property
    def context(self) -> float:
        return self.request.input_len + self.request.output_len / 2


def poisson_trace(rate: float, count: int, input_len: int, output_len: int, seed: int = 0) -> tuple[Request, ...]:
    """`count` requests with exponential inter-arrival times at `rate` per second and fixed lengths."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(Request(t, input_len, output_len))
    return tuple(out)


def _admits(replica: ServeReplica, link: Link, running: list[list], job: _Job, capacity: int) -> bool:
    """Whether `job` joins the batch: batch size, KV cache and every batched request's TPOT SLO allow it."""
    if len(running) >= replica.max_batch:
        return False
    if sum(r[2] for r in running) + job.request.input_len + job.request.output_len > capacity:
        return False
    batch = [r[3] for r in running] + [job]
    step = job.costs.batch_step_seconds(replica.kind, replica.tp, len(batch), sum(j.context for j in batch), link)
    return step <= min(j.klass.tpot_slo_s for j in batch) * (1 + 1e-9)


def _decode_loop(replica: ServeReplica, link: Link, jobs: list[_Job], prefill: bool) -> dict[int, tuple[float, float]]:
    """Run one colocated (`prefill`) or decode-only replica over its jobs; returns each request's (first token
    time, last token time)."""
    capacity = jobs[0].costs.kv_capacity_tokens(replica.kind, replica.tp)
    pending = deque(sorted(jobs, key=lambda j: j.ready_s))
    running: list[list] = []  # [request id, tokens left, tokens held, job]
    done: dict[int, tuple[float, float]] = {}
    first: dict[int, float] = {}
    t = 0.0
    while pending or running:
        if not running and pending and pending[0].ready_s > t:
            t = pending[0].ready_s
        while (
            pending
            and pending[0].ready_s <= t
            and (not running or _admits(replica, link, running, pending[0], capacity))
        ):
            job = pending.popleft()
            if prefill:
                t += job.costs.prefill_seconds(replica.kind, replica.tp, link)
            first[job.rid] = t if prefill else job.ready_s
            running.append([job.rid, job.request.output_len - 1, job.request.input_len + job.request.output_len, job])
        if running:
            context = sum(r[3].context for r in running)
            t += running[0][3].costs.batch_step_seconds(replica.kind, replica.tp, len(running), context, link)
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
    """Simulate `trace` (all requests for the plan's first model when several are served) on `plan`; `workload`
    gives the request classes (those the plan was made for) and their SLOs."""
    rng = random.Random(seed)
    model = next(m for m in models if m.name == next(iter(plan.rates)))
    replicas = [r for r in plan.replicas if r.model == model.name]
    base = ServingCosts(cluster, model, workload)

    def link(replica: ServeReplica) -> Link:
        return cluster.nodes[cluster.devices[replica.devices[0]].node].intra_link

    def routed(i: int, klass: str) -> float:
        return (
            sum(s.routed_rps for s in replicas[i].classes if s.name == klass)
            if replicas[i].classes
            else replicas[i].routed_rps
        )

    def pick(role: str, klass: str) -> int:
        options = [i for i, r in enumerate(replicas) if r.role == role]
        return rng.choices(options, weights=[routed(i, klass) for i in options])[0]

    queues: dict[int, list[_Job]] = {i: [] for i in range(len(replicas))}
    prefill_free: dict[int, float] = {}
    arrivals = sorted(trace, key=lambda r: r.arrival_s)
    for rid, request in enumerate(arrivals):
        klass = workload.class_of(request)
        own = workload.for_class(klass)
        costs = dataclasses.replace(
            base, workload=dataclasses.replace(own, input_len=request.input_len, output_len=request.output_len)
        )
        both = sum(routed(i, klass.name) for i, r in enumerate(replicas) if r.role == "both")
        split = sum(routed(i, klass.name) for i, r in enumerate(replicas) if r.role == "prefill")
        if rng.random() < both / (both + split):
            queues[pick("both", klass.name)].append(_Job(request.arrival_s, request, rid, klass, costs))
            continue
        p = pick("prefill", klass.name)
        start = max(request.arrival_s, prefill_free.get(p, 0.0))
        prefill_free[p] = start + costs.prefill_seconds(replicas[p].kind, replicas[p].tp, link(replicas[p]))
        ready = prefill_free[p] + costs.kv_transfer_seconds()
        queues[pick("decode", klass.name)].append(_Job(ready, request, rid, klass, costs))
    times: dict[int, tuple[float, float]] = {}
    for i, jobs in queues.items():
        if jobs:
            times.update(_decode_loop(replicas[i], link(replicas[i]), jobs, replicas[i].role == "both"))
    return _stats(arrivals, times, workload)


def _stats(arrivals: list[Request], times: dict[int, tuple[float, float]], workload: ServeWorkload) -> ServeStats:
    ttft = tuple(times[rid][0] - arrivals[rid].arrival_s for rid in sorted(times))
    tpot = tuple((times[rid][1] - times[rid][0]) / max(arrivals[rid].output_len - 1, 1) for rid in sorted(times))
    met: dict[str, list[bool]] = {}
    for rid, a, b in zip(sorted(times), ttft, tpot, strict=True):
        klass = workload.class_of(arrivals[rid])
        met.setdefault(klass.name, []).append(a <= klass.ttft_slo_s and b <= klass.tpot_slo_s)
    share = {name: sum(ok) / len(ok) for name, ok in met.items()}
    overall = sum(sum(ok) for ok in met.values()) / len(ttft)
    return ServeStats(ttft, tpot, overall, max(end for _, end in times.values()), share)
