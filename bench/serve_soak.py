"""The soak mode of `bench/serve.py --soak SECONDS`: a real `jaxhet serve` process on 127.0.0.1 under mixed valid
and hostile HTTP traffic for a while.

The server is its own process (a fresh tiny model, an API key, short read timeouts), so the memory measured is the
server's alone. Worker threads loop until the time is up, each request drawn at random: greedy completions (whose
text must equal the one measured before the soak), streamed chats, clients that leave mid-stream or before a
non-streamed answer, the hostile corpus of `jaxhet.serve.hostile` (out-of-range and wrong-typed fields, lone
surrogates, deep nesting, NaN, unimplemented fields, damaged bodies, bytes that are not HTTP), probes with wrong
keys and random paths, and half-sent bodies. It reports responses by kind and status (0: the server closed the
connection without an answer), p50/p99 latency of the valid kinds, responses >= 500, requests that hung (no answer
within the client timeout), greedy answers that changed, the server's RSS over time, and what /metrics says once
the traffic is over: request series, KV pages and sequences still held (a leak would leave some).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families
from record import provenance, save

from jaxhet.models import LlamaConfig
from jaxhet.serve import EngineConfig
from jaxhet.serve.hostile import hostile_requests, malformed_http
from jaxhet.tokenizers import ByteTokenizer

KEY = "soak-key"
AUTH = {"authorization": f"Bearer {KEY}"}
MODEL = "jaxhet-tiny"  # what `jaxhet serve` calls the fresh tiny model it serves without a checkpoint
GREEDY = {"model": MODEL, "prompt": "def main():\n", "max_tokens": 8, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "stream": True}
ENGINE = EngineConfig(max_running=8, page_size=16, num_pages=64, kv_format="float32", max_model_len=256)
SMOKE_ENGINE = dataclasses.replace(ENGINE, max_running=2)  # fewer batch shapes to compile before the server is up
READ_TIMEOUT_S = 2.0
CLIENT_TIMEOUT_S = 60.0
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _rss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(port: int, workdir: str, engine: EngineConfig) -> subprocess.Popen:
    """`jaxhet serve` of a fresh tiny model on `port` with `engine`'s settings, answering /health."""
    args = ["--port", str(port), "--api-key", KEY, "--read-timeout", str(READ_TIMEOUT_S), "--chat-template"]
    args += ["transcript", "--kv-format", engine.kv_format, "--max-running", str(engine.max_running)]
    args += ["--num-pages", str(engine.num_pages), "--max-model-len", str(engine.max_model_len)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxhet", "serve", *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"jaxhet serve did not come up on port {port} (exit status {process.poll()})")


class Soak:
    """The traffic and what it observed."""

    def __init__(self, host: str, port: int, reference: str):
        self.host, self.port, self.reference = host, port, reference
        self.statuses: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.hangs = 0
        self.changed = 0
        self.left_early = 0
        self._lock = threading.Lock()
        self._hostile = hostile_requests(MODEL, variations=300)
        self._malformed = malformed_http()

    def _note(self, kind: str, status: int, seconds: float) -> None:
        with self._lock:
            self.statuses[(kind, status)] += 1
            self.latencies[kind].append(seconds)

    def one(self, http: httpx.Client, rng: random.Random) -> None:
        actions: list[tuple[float, Callable[[httpx.Client, random.Random], None]]] = [
            (0.33, self._greedy),
            (0.2, self._chat_stream),
            (0.04, self._leave_mid_stream),
            (0.03, self._leave_before_the_answer),
            (0.28, self._hostile_request),
            (0.02, self._not_http),
            (0.08, self._probe),
            (0.02, self._half_sent),
        ]
        action = rng.choices([a for _, a in actions], weights=[w for w, _ in actions])[0]
        try:
            action(http, rng)
        except (httpx.TimeoutException, TimeoutError):
            with self._lock:
                self.hangs += 1
        except (httpx.TransportError, OSError) as err:  # the server dropped a connection it should have answered
            self._note(f"{action.__name__.strip('_')}: {type(err).__name__}", 0, 0.0)

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

    def _raw(self, data: bytes, *, wait_for_answer: bool = True) -> int:
        """Send raw bytes on a new connection; the answer's status (0: none before the server closed)."""
        with socket.create_connection((self.host, self.port), timeout=CLIENT_TIMEOUT_S) as sock:
            sock.sendall(data)
            answer = sock.recv(4096) if wait_for_answer else b""
        return int(answer.split()[1]) if answer.startswith(b"HTTP/1.1 ") else 0

    def _leave_before_the_answer(self, http: httpx.Client, rng: random.Random) -> None:
        body = httpx.Request("POST", "/", json={**GREEDY, "max_tokens": 100}).content
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        with socket.create_connection((self.host, self.port), timeout=CLIENT_TIMEOUT_S) as sock:
            sock.sendall(head.encode() + body)
            time.sleep(rng.uniform(0.01, 0.3))
        with self._lock:
            self.left_early += 1

    def _hostile_request(self, http: httpx.Client, rng: random.Random) -> None:
        case = rng.choice(self._hostile)
        started = time.monotonic()
        headers = {**AUTH, "content-type": "application/json"}
        response = http.request(case.method, case.path, content=case.body, headers=headers)
        self._note("hostile", response.status_code, time.monotonic() - started)
        if response.status_code >= 400 and not _is_json_error(response):
            self._note("hostile: error without a JSON error body", response.status_code, 0.0)

    def _not_http(self, http: httpx.Client, rng: random.Random) -> None:
        _, raw = rng.choice(self._malformed)
        started = time.monotonic()
        self._note("not HTTP", self._raw(raw), time.monotonic() - started)

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
        self._note("half-sent body", self._raw(head.encode() + b'{"model": '), time.monotonic() - started)


def _is_json_error(response: httpx.Response) -> bool:
    try:
        return isinstance(response.json()["error"]["message"], str)
    except (ValueError, KeyError, TypeError):
        return False


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=CLIENT_TIMEOUT_S).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _settled(url: str, timeout_s: float = 60.0) -> dict[tuple[str, tuple], float]:
    """/metrics once no sequence is running or waiting (or after `timeout_s`: then what is still held shows)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = _metrics(url)
        held = sum(
            v for (name, _), v in metrics.items() if name in ("jaxhet_requests_running", "jaxhet_requests_waiting")
        )
        if held == 0 or time.monotonic() > deadline:
            return metrics
        time.sleep(0.5)


def soak(seconds: float, out: pathlib.Path, *, workers: int = 8, smoke: bool = False) -> dict:
    """Start the server, run the traffic for `seconds`, print a summary and save the report under `out`."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    engine = SMOKE_ENGINE if smoke else ENGINE
    with tempfile.TemporaryDirectory() as workdir:
        server = _start_server(port, workdir, engine)
        try:
            reference = httpx.post(f"{url}/v1/completions", json=GREEDY, headers=AUTH, timeout=CLIENT_TIMEOUT_S)
            traffic = Soak("127.0.0.1", port, reference.json()["choices"][0]["text"])
            rss = [(0.0, _rss_bytes(server.pid))]
            started = time.monotonic()
            deadline = started + seconds

            def work(index: int) -> None:
                rng = random.Random(index)
                with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S) as http:
                    while time.monotonic() < deadline:
                        traffic.one(http, rng)

            threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads):
                time.sleep(min(10.0, max(deadline - time.monotonic(), 0.5)))
                rss.append((round(time.monotonic() - started, 1), _rss_bytes(server.pid)))
            metrics = _settled(url)
        finally:
            server.terminate()
            server.wait(timeout=120)
    report = _report(traffic, rss, metrics, seconds, workers, engine)
    report["server_exit_status"] = server.returncode
    save(report, out, smoke=smoke)
    return report


def _total(metrics: dict[tuple[str, tuple], float], name: str) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)


def _report(
    traffic: Soak,
    rss: list[tuple[float, int]],
    metrics: dict[tuple[str, tuple], float],
    seconds: float,
    workers: int,
    engine: EngineConfig,
) -> dict:
    by_kind: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (kind, status), count in sorted(traffic.statuses.items()):
        by_kind[kind][str(status)] = count
    by_status = collections.Counter()
    for (_, status), count in traffic.statuses.items():
        by_status[str(status)] += count
    latency = {
        kind: {"p50_ms": 1e3 * statistics.median(v), "p99_ms": 1e3 * _p99(v), "count": len(v)}
        for kind, v in traffic.latencies.items()
        if kind in ("greedy", "chat stream")
    }
    errors = sum(c for (_, status), c in traffic.statuses.items() if status >= 500)
    model = LlamaConfig.tiny(vocab_size=ByteTokenizer.vocab_size)  # what `jaxhet serve` builds without a checkpoint
    first = rss[1 if len(rss) > 2 else 0][1]  # after the first requests have compiled what they need
    report = {
        **provenance("serve_soak"),
        "settings": {
            "seconds": seconds,
            "workers": workers,
            "read_timeout_s": READ_TIMEOUT_S,
            "client_timeout_s": CLIENT_TIMEOUT_S,
        },
        "shapes": {"model": {k: getattr(model, k) for k in ("hidden_size", "num_layers", "vocab_size")}}
        | {"engine": {k: getattr(engine, k) for k in ("max_running", "page_size", "num_pages", "max_model_len")}},
        "requests": sum(traffic.statuses.values()),
        "responses_5xx": errors,
        "hangs": traffic.hangs,
        "greedy_changed": traffic.changed,
        "left_before_the_answer": traffic.left_early,
        "by_status": dict(sorted(by_status.items())),
        "by_kind_and_status": by_kind,
        "latency": latency,
        "server_rss_mb": [(t, round(b / 2**20, 1)) for t, b in rss],
        "server_rss_growth_mb": round((rss[-1][1] - first) / 2**20, 1),
        "after": {
            "request_series": sum(1 for (name, _) in metrics if name == "jaxhet_requests_total"),
            "kv_pages_used": _total(metrics, "jaxhet_kv_pages_used"),
            "running": _total(metrics, "jaxhet_requests_running"),
            "waiting": _total(metrics, "jaxhet_requests_waiting"),
        },
    }
    print(
        f"{report['requests']} requests in {seconds:.0f} s: {errors} answered >= 500, {traffic.hangs} hung, "
        f"{traffic.changed} greedy answers changed; server RSS growth after the first sample "
        f"{report['server_rss_growth_mb']} MB; after the soak {report['after']}"
    )
    print(f"  by status: {report['by_status']}")
    for kind, row in latency.items():
        print(f"  {kind:12s} p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  ({row['count']} requests)")
    return report


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
