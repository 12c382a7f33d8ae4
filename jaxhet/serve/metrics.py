"""Prometheus metrics of one server: engine gauges read at scrape time, request latency histograms, counters.

Each server owns its registry (no process-global state), so several servers in one process stay apart.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jaxhet.serve.replan import Fleet

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _EngineCollector(Collector):
    """Queue depth, KV usage, prefix-cache hits, token counters and the recent generation rate of every replica the
    fleet routes to, and the replica count of every model and role, per scrape (so a re-plan shows at once)."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["model", "replica", "node"]
        gauges = {
            "up": GaugeMetricFamily(
                "jaxhet_replica_up", "1 while the replica takes requests (0: its process is down).", labels=labels
            ),
            "waiting": GaugeMetricFamily("jaxhet_requests_waiting", "Requests queued for admission.", labels=labels),
            "running": GaugeMetricFamily("jaxhet_requests_running", "Requests being generated.", labels=labels),
            "kv_used": GaugeMetricFamily("jaxhet_kv_pages_used", "KV-cache pages in use.", labels=labels),
            "kv_total": GaugeMetricFamily("jaxhet_kv_pages_total", "KV-cache pages in the pool.", labels=labels),
            "kv_usage": GaugeMetricFamily("jaxhet_kv_usage_ratio", "Fraction of KV pages in use.", labels=labels),
            "kv_cached": GaugeMetricFamily(
                "jaxhet_kv_pages_cached", "Free KV pages still holding a cached prefix.", labels=labels
            ),
            "hit_rate": GaugeMetricFamily(
                "jaxhet_prefix_cache_hit_ratio",
                "Prefix cache hits over queries, in tokens, since the start (0 before any query).",
                labels=labels,
            ),
            "rate": GaugeMetricFamily(
                "jaxhet_generation_tokens_per_second", "Tokens generated per second, recent window.", labels=labels
            ),
        }
        counters = {
            "prompt": CounterMetricFamily(
                "jaxhet_prompt_tokens",
                "Prompt tokens of admitted requests (prefix-cache hits included).",
                labels=labels,
            ),
            "queries": CounterMetricFamily(
                "jaxhet_prefix_cache_queries", "Tokens looked up in the prefix cache at admission.", labels=labels
            ),
            "hits": CounterMetricFamily(
                "jaxhet_prefix_cache_hits", "Tokens found in the prefix cache, not prefilled.", labels=labels
            ),
            "generated": CounterMetricFamily("jaxhet_generation_tokens", "Tokens generated.", labels=labels),
            "preemptions": CounterMetricFamily(
                "jaxhet_preemptions", "Sequences preempted for lack of KV pages.", labels=labels
            ),
        }
        for model, engines in self.fleet.engines().items():
            for engine in engines:
                snap, key = engine.snapshot, [model, engine.name, engine.node]
                stats = snap.stats
                gauges["up"].add_metric(key, 1 if engine.available else 0)
                gauges["waiting"].add_metric(key, stats.waiting)
                gauges["running"].add_metric(key, stats.running)
                gauges["kv_used"].add_metric(key, stats.kv_pages_used)
                gauges["kv_total"].add_metric(key, stats.kv_pages_total)
                gauges["kv_usage"].add_metric(key, stats.kv_pages_used / max(stats.kv_pages_total, 1))
                gauges["rate"].add_metric(key, snap.tokens_per_second())
                gauges["kv_cached"].add_metric(key, stats.kv_pages_cached)
                gauges["hit_rate"].add_metric(key, stats.prefix_cache_hits / max(stats.prefix_cache_queries, 1))
                counters["prompt"].add_metric(key, stats.prompt_tokens)
                counters["generated"].add_metric(key, stats.generated_tokens)
                counters["preemptions"].add_metric(key, stats.preemptions)
                counters["queries"].add_metric(key, stats.prefix_cache_queries)
                counters["hits"].add_metric(key, stats.prefix_cache_hits)
        escalations = CounterMetricFamily(
            "jaxhet_cascade_escalations", "Requests a cascade stage passed on.", labels=["cascade", "stage"]
        )
        for cascade in self.fleet.cascades():
            for stage, count in zip(cascade.stages, cascade.escalations, strict=False):
                escalations.add_metric([cascade.name, stage.name], count)
        replicas = GaugeMetricFamily("jaxhet_replicas", "Replicas serving, by role.", labels=["model", "role"])
        for model, roles in self.fleet.replica_counts().items():
            for role, count in roles.items():
                replicas.add_metric([model, role], count)
        started = CounterMetricFamily(
            "jaxhet_replicas_started",
            "Replicas live re-plans built (weights loaded, warmed up).",
            value=self.fleet.started,
        )
        yield from gauges.values()
        yield from counters.values()
        yield escalations
        yield replicas
        yield started
        yield from _process_metrics(self.fleet)


def _process_metrics(fleet: Fleet) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Per other process of a multi-process server: whether it answers, and the KV handoff bytes to and from it."""
    up = GaugeMetricFamily("jaxhet_process_up", "1 while a serving process answers.", labels=["process", "node"])
    handoff = CounterMetricFamily(
        "jaxhet_kv_handoff_bytes",
        "KV cache bytes handed over to (sent) or from (received) another process's replicas.",
        labels=["process", "node", "direction"],
    )
    for link in fleet.links:
        key = [str(link.process), link.node]
        up.add_metric(key, 1 if link.up else 0)
        for direction, count in link.handoff_bytes.items():
            handoff.add_metric([*key, direction], count)
    yield up
    yield handoff


class ServerMetrics:
    """The server's registry and the per-request observations the HTTP layer records."""

    def __init__(self, fleet: Fleet):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(fleet))
        self.requests = Counter(
            "jaxhet_requests",
            'Requests answered, by route ("unmatched" for paths no route serves) and HTTP status.',
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "jaxhet_time_to_first_token_seconds",
            "Arrival to first generated token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "jaxhet_time_per_output_token_seconds",
            "Mean time between generated tokens after the first, per request.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "jaxhet_request_latency_seconds",
            "Arrival to last token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_request(self, model: str, arrival: float, first_token: float, done: float, tokens: int) -> None:
        """Record one finished generation's latencies (monotonic seconds)."""
        self.time_to_first_token.labels(model).observe(first_token - arrival)
        self.request_latency.labels(model).observe(done - arrival)
        if tokens > 1:
            self.time_per_output_token.labels(model).observe((done - first_token) / (tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
