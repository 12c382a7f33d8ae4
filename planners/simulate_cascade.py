"""Discrete-event simulation of a cascade plan under a request trace, one model after the other.

Every request of the trace is given a sample of the quality profile (drawn at random): the sample decides where the
request stops under the plan's thresholds and whether its answer is right. The requests of model `i` are simulated
on that model's replicas with `simulate_serving` (continuous batching, KV budget); those that escalate arrive at
model `i + 1` when model `i` has finished them. A request's latency runs from its arrival to the end of its
last model's answer.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from planners.cascade import CascadePlan
from planners.cascade_profile import CascadeProfile
from planners.cluster import ClusterSpec
from planners.model import ModelSpec
from planners.simulate_serving import simulate_serving
from planners.workload import Request, ServeWorkload


@dataclasses.dataclass(frozen=True)
class CascadeStats:
    """Per-request end-to-end latencies (trace order), the share answered right, and the share reaching each model."""

    latency_s: tuple[float, ...]
    quality: float
    reach: tuple[float, ...]

    @property
    def mean_latency_s(self) -> float:
        return sum(self.latency_s) / len(self.latency_s)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latency_s)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def simulate_cascade(
    plan: CascadePlan,
    cluster: ClusterSpec,
    models: Sequence[ModelSpec],
    workload: ServeWorkload,
    profile: CascadeProfile,
    trace: Sequence[Request],
    seed: int = 0,
) -> CascadeStats:
    """Simulate `trace` (sorted by arrival) through the cascade `plan`; `profile` is the one it was planned with."""
    rng = random.Random(seed)
    trace = sorted(trace, key=lambda r: r.arrival_s)
    samples = [rng.choice(profile.samples) for _ in trace]
    stops = [s.stop(plan.thresholds) for s in samples]
    by_name = {m.name: m for m in models}
    ready = [r.arrival_s for r in trace]
    for i, name in enumerate(plan.models):
        here = sorted((k for k in range(len(trace)) if stops[k] >= i), key=lambda k: ready[k])
        if not here:
            continue
        arrivals = [dataclasses.replace(trace[k], arrival_s=ready[k]) for k in here]
        rate = plan.arrival_rate * plan.reach[i]
        stage = dataclasses.replace(plan.deployment, rates={name: rate})
        stats = simulate_serving(stage, cluster, [by_name[name]], workload, arrivals, seed=seed + i)
        for k, request, ttft, tpot in zip(here, arrivals, stats.ttft_s, stats.tpot_s, strict=True):
            ready[k] = request.arrival_s + ttft + tpot * max(request.output_len - 1, 1)
    n = len(trace)
    return CascadeStats(
        tuple(ready[k] - trace[k].arrival_s for k in range(n)),
        sum(s.correct[stop] for s, stop in zip(samples, stops, strict=True)) / n,
        tuple(sum(1 for s in stops if s >= i) / n for i in range(len(plan.models))),
    )
