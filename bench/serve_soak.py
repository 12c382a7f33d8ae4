"""Serving soak: a real server on 127.0.0.1 under mixed valid and hostile HTTP traffic for a while.

Worker threads loop until the time is up, each request drawn at random: greedy completions (whose text must equal
the one measured before the soak), streamed chats, clients that leave mid-stream, and hostile requests (a huge
top_k, lone surrogates, deep nesting, NaN, unimplemented fields, wrong keys, random paths, half-sent bodies). It
reports responses by kind and status, p50/p99 latency of the valid kinds, responses >= 500, requests that hung
(no answer within the client timeout), greedy answers that changed, the process RSS over time (server and clients
share the process, so this is an upper bound on the server's growth) and the number of request series /metrics
ends with.

    python bench/serve.py --soak 600           # ten minutes, the issue's CPU soak
    python bench/serve_soak.py --seconds 30    # directly
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import random
import socket
import statistics
import threading
import time
from collections.abc import Callable

import httpx
import jax
from flax import nnx
from record import provenance, save

from jaxhet.chat_template import TRANSCRIPT, load_chat_template
from jaxhet.loading import LoadedModel
from jaxhet.models import Llama, LlamaConfig
from jaxhet.serve import BackgroundServer, EngineConfig, ServerConfig, build_deployments, create_app
from jaxhet.tokenizers import ByteTokenizer

KEY = "soak-key"
AUTH = {"authorization": f"Bearer {KEY}"}
GREEDY = {"model": "tiny", "prompt": "def main():\n", "max_tokens": 8, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "stream": True}
CLIENT_TIMEOUT_S = 60.0


def _rss_bytes() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _hostile_posts() -> list[tuple[str, str, bytes]]:
    """(kind, path, body) of hostile POSTs, each of which must get a 4xx."""
    base = json.dumps(GREEDY)[:-1]
    return [
        ("huge top_k", "/v1/completions", json.dumps({**GREEDY, "top_k": 2**31}).encode()),
        ("lone surrogate", "/v1/completions", b'{"model": "tiny", "prompt": "\\ud800"}'),
        ("nested 2000 deep", "/v1/completions", (base + ', "x": ' + "[" * 2000 + "]" * 2000 + "}").encode()),
        ("NaN", "/v1/completions", (base + ', "temperature": NaN}').encode()),
        ("logit_bias", "/v1/completions", json.dumps({**GREEDY, "logit_bias": {"1": 5}}).encode()),
        ("bad json", "/v1/completions", b'{"model": '),
        ("too long", "/v1/completions", json.dumps({**GREEDY, "max_tokens": 10**6}).encode()),
    ]


class Soak:
    """The traffic and what it observed."""

    def __init__(self, url: str, host: str, port: int, reference: str):
        self.url, self.host, self.port, self.reference = url, host, port, reference
        self.statuses: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.hangs = 0
        self.changed = 0
        self._lock = threading.Lock()
        self._hostile = _hostile_posts()

    def _note(self, kind: str, status: int, seconds: float) -> None:
        with self._lock:
            self.statuses[(kind, status)] += 1
            self.latencies[kind].append(seconds)

    def one(self, http: httpx.Client, rng: random.Random) -> None:
        actions: list[tuple[float, Callable[[httpx.Client, random.Random], None]]] = [
            (0.35, self._greedy),
            (0.2, self._chat_stream),
            (0.05, self._leave_mid_stream),
            (0.3, self._hostile_post),
            (0.08, self._probe),
            (0.02, self._half_sent),
        ]
        action = rng.choices([a for _, a in actions], weights=[w for w, _ in actions])[0]
        try:
            action(http, rng)
        except httpx.TimeoutException:
            with self._lock:
                self.hangs += 1

    def _greedy(self, http: httpx.Client, rng: random.Random) -> None:
        started = time.monotonic()
        response = http.post("/v1/completions", json=GREEDY, headers=AUTH)
        self._note("greedy", response.status_code, time.monotonic() - started)
        if response.status_code == 200 and response.json()["choices"][0]["text"] != self.reference:
            with self._lock:
                self.changed += 1

    def _chat_stream(self, http: httpx.Client, rng: random.Random) -> None:
        started = time.monotonic()
        with http.stream("POST", "/v1/chat/completions", json=CHAT, headers=AUTH) as stream:
            for _ in stream.iter_lines():
                pass
        self._note("chat stream", stream.status_code, time.monotonic() - started)

    def _leave_mid_stream(self, http: httpx.Client, rng: random.Random) -> None:
        started = time.monotonic()
        body = {**GREEDY, "max_tokens": 100, "stream": True}
        with http.stream("POST", "/v1/completions", json=body, headers=AUTH) as stream:
            next(stream.iter_lines(), None)
        self._note("left mid-stream", stream.status_code, time.monotonic() - started)

    def _hostile_post(self, http: httpx.Client, rng: random.Random) -> None:
        kind, path, body = rng.choice(self._hostile)
        started = time.monotonic()
        response = http.post(path, content=body, headers={**AUTH, "content-type": "application/json"})
        self._note(kind, response.status_code, time.monotonic() - started)

    def _probe(self, http: httpx.Client, rng: random.Random) -> None:
        label, path = rng.choice(
            [(p, p) for p in ("/metrics", "/docs", "/openapi.json", "/v1/models")]
            + [("random path", f"/{rng.getrandbits(64):x}")]
        )
        headers = rng.choice([{}, {"authorization": "Bearer wrong"}, {"authorization": "bearer " + KEY}])
        started = time.monotonic()
        response = http.get(path, headers=headers)
        self._note(f"GET {label}", response.status_code, time.monotonic() - started)

    def _half_sent(self, http: httpx.Client, rng: random.Random) -> None:
        started = time.monotonic()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 500\r\n\r\n"
        with socket.create_connection((self.host, self.port), timeout=CLIENT_TIMEOUT_S) as sock:
            sock.sendall(head.encode() + b'{"model": ')
            answer = sock.recv(4096)
        status = int(answer.split()[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        self._note("half-sent body", status, time.monotonic() - started)


def soak(seconds: float, out: pathlib.Path, *, workers: int = 8) -> dict:
    """Serve a tiny model, run the traffic for `seconds`, print a summary and save the report under `out`."""
    tokenizer = ByteTokenizer()
    config = LlamaConfig.tiny(vocab_size=tokenizer.vocab_size, num_layers=2, dtype="float32")
    model = Llama(config, rngs=nnx.Rngs(params=jax.random.key(0)))
    loaded = LoadedModel(model, tokenizer, "tiny", chat_template=load_chat_template(None, TRANSCRIPT))
    engine = EngineConfig(max_running=8, page_size=16, num_pages=64, kv_format="float32", max_model_len=256)
    app = create_app(build_deployments({"tiny": loaded}, engine), ServerConfig(api_key=KEY, read_timeout_s=2.0))
    with BackgroundServer(app, header_timeout_s=2.0) as server:
        reference = httpx.post(f"{server.url}/v1/completions", json=GREEDY, headers=AUTH, timeout=60).json()
        traffic = Soak(server.url, server.host, server.port, reference["choices"][0]["text"])
        rss = [(0.0, _rss_bytes())]
        started = time.monotonic()
        deadline = started + seconds

        def work(index: int) -> None:
            rng = random.Random(index)
            with httpx.Client(base_url=server.url, timeout=CLIENT_TIMEOUT_S) as http:
                while time.monotonic() < deadline:
                    traffic.one(http, rng)

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            time.sleep(min(10.0, max(deadline - time.monotonic(), 0.5)))
            rss.append((round(time.monotonic() - started, 1), _rss_bytes()))
        metrics = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=60).text
    series = sum(1 for line in metrics.splitlines() if line.startswith("jaxhet_requests_total{"))
    report = _report(traffic, rss, series, seconds, workers, engine)
    save(report, out)
    return report


def _report(
    traffic: Soak, rss: list[tuple[float, int]], series: int, seconds: float, workers: int, engine: EngineConfig
) -> dict:
    by_kind: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (kind, status), count in sorted(traffic.statuses.items()):
        by_kind[kind][str(status)] = count
    latency = {
        kind: {"p50_ms": 1e3 * statistics.median(v), "p99_ms": 1e3 * _p99(v), "count": len(v)}
        for kind, v in traffic.latencies.items()
        if kind in ("greedy", "chat stream")
    }
    errors = sum(c for (_, status), c in traffic.statuses.items() if status >= 500 or status == 0)
    report = {
        **provenance("serve_soak"),
        "settings": {"seconds": seconds, "workers": workers, "engine": dataclasses.asdict(engine)},
        "requests": sum(traffic.statuses.values()),
        "responses_5xx_or_none": errors,
        "hangs": traffic.hangs,
        "greedy_changed": traffic.changed,
        "by_kind_and_status": by_kind,
        "latency": latency,
        "rss_mb": [(t, round(b / 2**20, 1)) for t, b in rss],
        "rss_growth_mb": round((rss[-1][1] - rss[1 if len(rss) > 2 else 0][1]) / 2**20, 1),
        "request_series": series,
    }
    print(
        f"{report['requests']} requests in {seconds:.0f} s: {errors} answered >= 500 or not at all, "
        f"{traffic.hangs} hung, {traffic.changed} greedy answers changed; RSS growth after the first sample "
        f"{report['rss_growth_mb']} MB; {series} request series in /metrics"
    )
    for kind, row in latency.items():
        print(f"  {kind:12s} p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  ({row['count']} requests)")
    return report


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()
    soak(args.seconds, args.out, workers=args.workers)


if __name__ == "__main__":
    main()
