"""The OpenAI-compatible server, started for real on 127.0.0.1 and spoken to over sockets with the official
`openai` client and with raw HTTP for the malformed requests a client library would refuse to send."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import socket
import string
import time

import httpx
import jax
import openai
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

import planners
from jaxhet.generate import SamplingConfig, generate
from jaxhet.serve import (
    BackgroundServer,
    CascadeDeployment,
    EngineConfig,
    ServerConfig,
    build_deployments,
    create_app,
)
from jaxhet.serve.hostile import hostile_requests, malformed_http
from jaxhet.serve.middleware import RequestGuard
from tests.tiny_models import tiny_loaded

ENGINE = EngineConfig(max_running=8, page_size=16, num_pages=96, kv_format="float32", max_model_len=192)


@pytest.fixture(scope="module")
def served():
    small, large = tiny_loaded(1), tiny_loaded(2, layers=3)
    deployments = build_deployments({"small": small, "large": large}, ENGINE)
    deployments["always-small"] = CascadeDeployment(
        "always-small", [deployments["small"], deployments["large"]], [-1e9]
    )
    deployments["always-large"] = CascadeDeployment("always-large", [deployments["small"], deployments["large"]], [1e9])
    with BackgroundServer(create_app(deployments, ServerConfig(max_body_bytes=4096))) as server:
        yield server, small


@pytest.fixture(scope="module")
def client(served):
    server, _ = served
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _metric(url: str, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in _metrics(url).items() if n == name and all((k, labels[k]) in ls for k in labels))


def test_completion_equals_offline_greedy_generation(served, client):
    _, small = served
    prompt = "def add(a, b):\n"
    response = client.completions.create(model="small", prompt=prompt, max_tokens=12, temperature=0)
    ids = [small.tokenizer.bos_id, *small.tokenizer.encode(prompt)]
    (expected,) = generate(small.model, [ids], SamplingConfig(max_new_tokens=12), jax.random.key(0))
    choice = response.choices[0]
    assert choice.text == small.tokenizer.decode(expected)
    assert choice.finish_reason == "length"
    assert response.model == "small"
    assert response.usage.prompt_tokens == len(ids) and response.usage.completion_tokens == 12


def test_models_lists_every_served_name(client):
    assert sorted(m.id for m in client.models.list()) == ["always-large", "always-small", "large", "small"]


def test_streamed_chat_equals_the_unstreamed_answer(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    whole = client.chat.completions.create(model="small", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="small", messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content
    assert whole.usage.completion_tokens <= 10


def test_streamed_completion_reassembles(client):
    whole = client.completions.create(model="large", prompt="import os\n", max_tokens=9, temperature=0)
    parts = client.completions.create(model="large", prompt="import os\n", max_tokens=9, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text


def test_logprobs_are_reported_per_token(client):
    response = client.completions.create(model="small", prompt="x = ", max_tokens=5, temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == 5
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    for chosen, alternatives in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert 1 <= len(alternatives) <= 3
        assert max(alternatives.values()) == pytest.approx(chosen, abs=1e-5)  # greedy picks the most likely


def test_64_concurrent_greedy_requests_each_equal_their_solo_run(served):
    server, _ = served
    prompts = [f"# request {i}\n" + "x" * (i % 23) for i in range(64)]

    def body(prompt: str) -> dict:
        return {"model": "small", "prompt": prompt, "max_tokens": 6 + len(prompt) % 5, "temperature": 0}

    solo = {}
    with httpx.Client(base_url=server.url, timeout=300) as http:
        for prompt in prompts[:8]:
            solo[prompt] = http.post("/v1/completions", json=body(prompt)).json()["choices"][0]["text"]

    async def all_at_once() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            responses = await asyncio.gather(*(http.post("/v1/completions", json=body(p)) for p in prompts))
        return [r.json() for r in responses]

    together = asyncio.run(all_at_once())
    assert all("choices" in r for r in together)
    with httpx.Client(base_url=server.url, timeout=300) as http:
        for prompt in prompts[8:]:
            solo[prompt] = http.post("/v1/completions", json=body(prompt)).json()["choices"][0]["text"]
    assert [r["choices"][0]["text"] for r in together] == [solo[p] for p in prompts]


MALFORMED = [
    ("bad json", b'{"model": "small", "prompt": ', 400, "not valid JSON"),
    ("invalid utf-8", b'{"model": "small", "prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("wrong type", json.dumps({"model": "small", "prompt": 5}).encode(), 400, "prompt"),
    ("string max_tokens", json.dumps({"model": "small", "prompt": "a", "max_tokens": "9"}).encode(), 400, "max_tokens"),
    (
        "negative max_tokens",
        json.dumps({"model": "small", "prompt": "a", "max_tokens": -1}).encode(),
        400,
        "max_tokens",
    ),
    ("huge max_tokens", json.dumps({"model": "small", "prompt": "a", "max_tokens": 10**9}).encode(), 400, "max"),
    ("empty prompt", json.dumps({"model": "small", "prompt": ""}).encode(), 400, "empty"),
    ("token outside vocab", json.dumps({"model": "small", "prompt": [1, 99999]}).encode(), 400, "token ids"),
    ("unknown model", json.dumps({"model": "gpt-9", "prompt": "a"}).encode(), 404, "gpt-9"),
    ("n above 16", json.dumps({"model": "small", "prompt": "a", "n": 17}).encode(), 400, "n"),
    ("too many stops", json.dumps({"model": "small", "prompt": "a", "stop": list("abcde")}).encode(), 400, "stop"),
    ("oversized body", json.dumps({"model": "small", "prompt": "a" * 5000}).encode(), 413, "larger than"),
]


def test_n_choices_are_the_seeded_single_requests(client):
    request = dict(model="small", prompt="for i in", max_tokens=6, temperature=1.0, seed=5)
    several = client.completions.create(n=3, **request)
    singles = [client.completions.create(**{**request, "seed": 5 + i}).choices[0].text for i in range(3)]
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert [c.text for c in several.choices] == singles
    assert several.usage.completion_tokens == 18


def test_streamed_chat_with_two_choices_reassembles_each(client):
    request = dict(model="small", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, seed=3, n=2)
    whole = client.chat.completions.create(**request)
    texts = ["", ""]
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in whole.choices]


@pytest.mark.parametrize(("case", "raw", "status", "needle"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_a_4xx_naming_the_problem(served, case, raw, status, needle):
    server, _ = served
    headers = {"content-type": "application/json"}
    response = httpx.post(f"{server.url}/v1/completions", content=raw, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_chat_refuses_an_unknown_role_and_an_empty_conversation(served):
    server, _ = served
    for messages in ([], [{"role": "robot", "content": "hi"}]):
        response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "small", "messages": messages})
        assert response.status_code == 400 and "messages" in response.json()["error"]["message"]


def test_a_client_leaving_mid_stream_frees_its_kv_pages(served):
    server, _ = served
    body = {"model": "large", "prompt": "while True:\n", "max_tokens": 150, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert _metric(server.url, "jaxhet_kv_pages_used", model="large") > 0
    for _ in range(200):
        if _metric(server.url, "jaxhet_kv_pages_used", model="large") == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert _metric(server.url, "jaxhet_kv_pages_used", model="large") == 0
    assert _metric(server.url, "jaxhet_requests_running", model="large") == 0


def test_cascade_answers_with_the_small_model_or_escalates(served, client):
    server, _ = served
    kept = client.completions.create(model="always-small", prompt="a", max_tokens=4, temperature=0)
    assert kept.model == "small"
    before = _metric(server.url, "jaxhet_cascade_escalations_total", cascade="always-large")
    escalated = client.completions.create(model="always-large", prompt="a", max_tokens=4, temperature=0)
    direct = client.completions.create(model="large", prompt="a", max_tokens=4, temperature=0)
    assert escalated.model == "large" and escalated.choices[0].text == direct.choices[0].text
    assert _metric(server.url, "jaxhet_cascade_escalations_total", cascade="always-large") == before + 1


def test_metrics_report_latency_histograms_and_request_counts(served, client):
    server, _ = served
    client.completions.create(model="small", prompt="b", max_tokens=3, temperature=0)
    assert _metric(server.url, "jaxhet_time_to_first_token_seconds_count", model="small") >= 1
    assert _metric(server.url, "jaxhet_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert _metric(server.url, "jaxhet_requests_total", status="404") >= 0
    assert _metric(server.url, "jaxhet_kv_pages_total", model="small") == ENGINE.num_pages


def test_metrics_report_prefix_cache_hits(served, client):
    server, _ = served
    names = ("jaxhet_prefix_cache_queries_total", "jaxhet_prefix_cache_hits_total")
    before = [_metric(server.url, name, model="small") for name in names]
    prefix = "".join(random.Random(18).choices(string.ascii_letters, k=100))  # with BOS: 101 tokens, 6 full pages
    for suffix in "xy":
        client.completions.create(model="small", prompt=prefix + suffix, max_tokens=2, temperature=0)
    queries, hits = (_metric(server.url, name, model="small") - b for name, b in zip(names, before, strict=True))
    assert (queries, hits) == (2 * 102, 6 * ENGINE.page_size)  # the second request found the first's 6 pages
    ratio = _metric(server.url, "jaxhet_prefix_cache_hit_ratio", model="small")
    assert ratio == pytest.approx(
        _metric(server.url, names[1], model="small") / _metric(server.url, names[0], model="small")
    )


@pytest.fixture(scope="module")
def keyed():
    """A server with an API key and short time limits for request headers (1 s) and bodies (1 s)."""
    deployments = build_deployments({"small": tiny_loaded(1)}, ENGINE)
    app = create_app(deployments, ServerConfig(api_key="s3cret", read_timeout_s=1.0))
    with BackgroundServer(app, header_timeout_s=1.0) as server:
        yield server


def test_api_key_is_required_when_set(keyed):
    server = keyed
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    ok = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
    assert [m.id for m in ok.models.list()] == ["small"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_every_path_but_health_needs_the_key(keyed):
    server = keyed
    for path in ("/metrics", "/docs", "/openapi.json", "/v1/models", "/no/such/path"):
        refused = httpx.get(f"{server.url}{path}", headers={"authorization": "Bearer s3cre"})
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error", path
    assert httpx.get(f"{server.url}/health").status_code == 200
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert httpx.get(f"{server.url}/metrics", headers={"authorization": f"{scheme} s3cret"}).status_code == 200
    assert httpx.get(f"{server.url}/openapi.json", headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_a_half_sent_body_gets_a_408_and_half_sent_headers_are_dropped(keyed):
    server = keyed
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"model": "small", ')
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"within 1 s" in answer
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert _read_all(sock) == b""  # closed without an answer
        assert time.monotonic() - started < 5


def test_a_body_nested_100000_deep_gets_a_json_400(keyed):
    server = keyed
    body = b'{"model": "small", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    headers = {"authorization": "Bearer s3cret", "content-type": "application/json"}
    response = httpx.post(f"{server.url}/v1/completions", content=body, headers=headers, timeout=30)
    assert response.status_code == 400 and "nested more than 32 levels" in response.json()["error"]["message"]


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        if b"\r\n\r\n" in data and b'"error"' in data:
            break
    return data


def test_a_plan_with_tensor_parallel_prefill_and_decode_replicas_hands_the_cache_over(served):
    _, small = served
    replica = dict(model="small", kind="cpu", max_batch=8, capacity_rps=1.0, routed_rps=1.0)
    plan = planners.ServePlan(
        replicas=(  # prefill tensor-parallel over two devices, decode on a third
            planners.ServeReplica(tp=2, devices=(2, 3), role="prefill", **replica),
            planners.ServeReplica(tp=1, devices=(4,), role="decode", **replica),
        ),
        objective="max_throughput",
        throughput_scale=1.0,
        price_per_hour=0.0,
        rates={"small": 1.0},
    )
    deployments = build_deployments({"small": small}, ENGINE, plan=plan)
    with BackgroundServer(create_app(deployments)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        prompt = "def add(a, b):\n"
        whole = client.completions.create(model="small", prompt=prompt, max_tokens=12, temperature=0)
        parts = client.completions.create(model="small", prompt=prompt, max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text
        prefill_pages = _metric(server.url, "jaxhet_kv_pages_used", replica="small-prefill-0")
    ids = [small.tokenizer.bos_id, *small.tokenizer.encode(prompt)]
    (expected,) = generate(small.model, [ids], SamplingConfig(max_new_tokens=12), jax.random.key(0))
    assert whole.choices[0].text == small.tokenizer.decode(expected)
    assert whole.choices[0].finish_reason == "length" and prefill_pages == 0


def test_background_server_starts_and_stops_without_a_with_block():
    app = FastAPI()
    app.get("/ping")(lambda: {"pong": True})
    server = BackgroundServer(app).start()
    assert httpx.get(f"{server.url}/ping").json() == {"pong": True}
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/ping")


def test_a_victim_stream_is_unchanged_while_another_request_sends_a_huge_top_k(served, client):
    server, _ = served
    victim = {"model": "large", "prompt": "class Stack:\n", "max_tokens": 40, "temperature": 0}
    expected = client.completions.create(**victim).choices[0].text
    poisoned = {"model": "large", "prompt": "x", "max_tokens": 40, "top_k": 2**31, "stream": True}
    with httpx.Client(base_url=server.url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json={**victim, "stream": True}) as stream:
            lines = (line for line in stream.iter_lines() if line.startswith("data: "))
            parts = [json.loads(next(lines)[6:])["choices"][0]["text"]]
            refused = http.post("/v1/completions", json=poisoned)
            parts += [json.loads(line[6:])["choices"][0]["text"] for line in lines if line != "data: [DONE]"]
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_k"
    assert "at most the vocabulary size 259" in refused.json()["error"]["message"]
    assert "".join(parts) == expected


def _exchange(server, raw: bytes) -> bytes:
    """Send `raw` on a fresh connection and read until the server closes it (a hang fails on the socket timeout)."""
    with socket.create_connection((server.host, server.port), timeout=15) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_hostile_requests_get_json_4xx_and_leave_greedy_output_unchanged(served, client):
    server, _ = served
    reference = dict(model="small", prompt="def f(x):\n", max_tokens=12, temperature=0)
    before = client.completions.create(**reference).choices[0].text
    cases = hostile_requests("small")
    statuses: collections.Counter[int] = collections.Counter()
    with httpx.Client(base_url=server.url, timeout=30) as http:  # a hang is a timeout, which fails the test
        for case in cases:
            response = http.request(
                case.method, case.path, content=case.body, headers={"content-type": "application/json"}
            )
            statuses[response.status_code] += 1
            assert response.status_code < 500, (case.label, response.text)
            if response.status_code >= 400:
                assert response.json()["error"]["message"], case.label
    for label, raw in malformed_http():
        head, _, body = _exchange(server, raw).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), (label, head)
        assert b"content-type: application/json" in head.lower(), (label, head)
        assert "not valid HTTP/1.1" in json.loads(body)["error"]["message"], label
    assert len(cases) >= 200 and statuses[400] >= 150 and statuses[200] > 0, statuses
    assert client.completions.create(**reference).choices[0].text == before


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logit_bias", {"50": 100}),
        ("stream_options", {"include_usage": True}),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("response_format", {"type": "json_object"}),
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("reasoning_effort", "high"),
        ("web_search_options", {}),
    ],
)
def test_unimplemented_fields_are_refused_by_name(served, field, value):
    server, _ = served
    body = {"model": "small", "messages": [{"role": "user", "content": "hi"}], field: value}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == field
    assert "not supported" in response.json()["error"]["message"]


def test_500_requests_to_random_paths_leave_the_request_series_bounded(served):
    server, _ = served
    rng = random.Random(0)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for _ in range(500):
            path = "/" + "/".join("".join(rng.choices(string.ascii_letters, k=8)) for _ in range(rng.randint(1, 3)))
            assert http.get(path).status_code == 404
    series = [key for key in _metrics(server.url) if key[0] == "jaxhet_requests_total"]
    assert len(series) < 30, series
    assert _metric(server.url, "jaxhet_requests_total", endpoint="unmatched", status="404") >= 500


def test_a_client_leaving_a_non_streamed_request_aborts_it(served):
    server, _ = served
    body = json.dumps({"model": "large", "prompt": "while True:\n", "max_tokens": 170, "temperature": 0}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    generated = _metric(server.url, "jaxhet_generation_tokens_total", model="large")
    left = _metric(server.url, "jaxhet_requests_total", endpoint="/v1/completions", status="499")
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        while _metric(server.url, "jaxhet_kv_pages_used", model="large") == 0:
            time.sleep(0.01)
    deadline = time.monotonic() + 30
    while _metric(server.url, "jaxhet_kv_pages_used", model="large") > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _metric(server.url, "jaxhet_kv_pages_used", model="large") == 0
    assert _metric(server.url, "jaxhet_generation_tokens_total", model="large") - generated < 170
    assert _metric(server.url, "jaxhet_requests_total", endpoint="/v1/completions", status="499") == left + 1


def test_an_exception_a_route_lets_escape_is_a_json_500_counted_under_its_route():
    counter = Counter("requests", "", ["endpoint", "status"], registry=CollectorRegistry())
    app = FastAPI()

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    app.add_middleware(RequestGuard, api_key=None, requests=counter, routes=lambda: [r.path for r in app.routes])
    with BackgroundServer(app) as server:
        response = httpx.get(f"{server.url}/boom")
        assert httpx.get(f"{server.url}/health-or-not").status_code == 404
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert counter.labels("/boom", "500")._value.get() == 1
    assert counter.labels("unmatched", "404")._value.get() == 1


def test_a_request_that_could_never_fit_is_refused_and_the_one_behind_it_completes(served):
    # max_model_len 192: two prompt tokens and 191 new ones could never be held; refused at once, never queued.
    server, _ = served
    never = {"model": "large", "prompt": "a", "max_tokens": ENGINE.max_model_len - 1, "temperature": 0}
    small = {"model": "large", "prompt": "a", "max_tokens": 4, "temperature": 0}
    chat = {"model": "large", "messages": [{"role": "user", "content": "x" * ENGINE.max_model_len}]}

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            paths = ["/v1/completions", "/v1/chat/completions", "/v1/completions"]
            return await asyncio.gather(
                *(http.post(p, json=b) for p, b in zip(paths, [never, chat, small], strict=True))
            )

    refused, too_long, completed = asyncio.run(together())
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    assert "max_model_len" in refused.json()["error"]["message"] and "at most 190" in refused.json()["error"]["message"]
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "messages"
    assert completed.status_code == 200 and completed.json()["usage"]["completion_tokens"] == 4
    assert _metric(server.url, "jaxhet_requests_waiting", model="large") == 0


def test_a_client_hanging_up_mid_body_is_a_499_not_a_server_error(served):
    server, _ = served
    failed = _metric(server.url, "jaxhet_requests_total", status="500")
    left = _metric(server.url, "jaxhet_requests_total", endpoint="/v1/completions", status="499")
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(head + b'{"model": "small", ')
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while _metric(server.url, "jaxhet_requests_total", endpoint="/v1/completions", status="499") == left:
        assert time.monotonic() < deadline, "the hang-up was never answered"
        time.sleep(0.05)
    assert _metric(server.url, "jaxhet_requests_total", status="500") == failed


def test_any_integer_seed_is_accepted_and_repeatable(client):
    request = dict(model="small", prompt="seed:", max_tokens=5, temperature=1.0)
    for seed in (-1, -(2**63), 2**63, 10**30):
        first, again = (client.completions.create(seed=seed, **request).choices[0].text for _ in range(2))
        assert first == again, seed
