"""`jaxhet serve` as two real processes on 127.0.0.1, one per node of a two-node cluster, queried with the official
`openai` client through process 0's endpoint: prefill on one node hands exactly the used KV pages to decode on the
other, outputs equal the plain generator's, and a process killed with SIGKILL leaves the endpoint serving.

Float32 weights and KV cache, greedy sampling: outputs are compared token for token (as text) with `generate`."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jax
import openai
import pytest
from flax import nnx
from prometheus_client.parser import text_string_to_metric_families

import planners
from jaxhet.generate import SamplingConfig, generate
from jaxhet.models.config import LlamaConfig
from jaxhet.models.hf import save_pretrained
from jaxhet.models.llama import Llama
from jaxhet.tokenizers import ByteTokenizer
from tests.multiprocess.launch import free_port, log_text, processes, wait_all

pytestmark = pytest.mark.slow

CLUSTER = """name: two_nodes
nodes:
  - {name: h100, gpu: H100, count: 2}
  - {name: l4, gpu: L4, count: 1}
"""
PAGE = 16
ENGINE = ["--num-pages", "64", "--page-size", str(PAGE), "--max-running", "8", "--max-model-len", "256"]
ENGINE += ["--kv-format", "float32", "--no-prefix-caching"]
SHORT = [f"prompt {i:02d}:" for i in range(16)]  # 11 tokens with BOS: one page
LONG = [f"a longer prompt, number {i:02d}, spanning pages:" for i in range(16)]  # 42 tokens: three pages
MAX_TOKENS = 6
KEY = "serving-key"
START_TIMEOUT_S = 300


def _saved(tmp_path_factory, name: str, seed: int, layers: int) -> tuple[Path, Llama]:
    """A tiny float32 Llama saved as a Hugging Face directory (every process loads it from there)."""
    config = LlamaConfig.tiny(vocab_size=ByteTokenizer.vocab_size, num_layers=layers, dtype="float32")
    model = Llama(config, rngs=nnx.Rngs(params=jax.random.key(seed)))
    directory = tmp_path_factory.mktemp(name)
    save_pretrained(model, directory)
    return directory, model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Llama]:
    return _saved(tmp_path_factory, "tiny", 5, 2)


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> tuple[Path, Llama]:
    """The cascade's second model: another seed and one block more."""
    return _saved(tmp_path_factory, "large", 7, 3)


def _ids(prompt: str) -> list[int]:
    tokenizer = ByteTokenizer()
    return [tokenizer.bos_id, *tokenizer.encode(prompt)]


def _solo(model: Llama, prompts: list[str], max_tokens: int) -> dict[str, str]:
    """Each prompt's greedy completion by the plain generator (prompts of one length per call)."""
    outputs = generate(model, [_ids(p) for p in prompts], SamplingConfig(max_new_tokens=max_tokens), jax.random.key(0))
    return {p: ByteTokenizer().decode(o) for p, o in zip(prompts, outputs, strict=True)}


def _serve_plan(directory: Path, replicas: list[tuple[int, str, str]]) -> planners.ServePlan:
    """A serving plan with a replica per (device, role, model) on the two-node cluster (written beside it)."""
    (directory / "cluster.yaml").write_text(CLUSTER)
    common = dict(kind="cpu", max_batch=8, capacity_rps=1.0, routed_rps=1.0)
    return planners.ServePlan(
        replicas=tuple(
            planners.ServeReplica(model=model, tp=1, devices=(d,), role=role, **common) for d, role, model in replicas
        ),
        objective="max_throughput",
        throughput_scale=1.0,
        price_per_hour=0.0,
        rates={model: 1.0 for _, _, model in replicas},
        cluster=str(directory / "cluster.yaml"),
    )


def _write_plan(directory: Path, name: str, replicas: list[tuple[int, str]]) -> Path:
    path = directory / f"{name}.json"
    path.write_text(_serve_plan(directory, [(d, role, "tiny") for d, role in replicas]).to_json())
    return path


def _write_cascade(directory: Path, replicas: list[tuple[int, str, str]], threshold: float) -> Path:
    """A cascade plan "tiny" -> "large" (escalating below `threshold`) over `replicas`."""
    deployment = _serve_plan(directory, replicas)
    plan = planners.CascadePlan(
        models=("tiny", "large"),
        thresholds=(threshold,),
        deployment=deployment,
        latency_s=1.0,
        quality=1.0,
        reach=(1.0, 1.0),
        arrival_rate=1.0,
        weight=1.0,
        min_quality=None,
        front=(),
        single=(),
        cluster=deployment.cluster,
    )
    path = directory / "cascade.json"
    path.write_text(plan.to_json())
    return path


def _commands(plan: Path, models: dict[str, Path], port: int, *extra: str) -> list[list[str]]:
    """`jaxhet serve` of both processes: the same flags but the process id."""
    coordinator = free_port()
    weights = [arg for name, path in models.items() for arg in ("--model", f"{name}={path}")]
    return [
        [sys.executable, "-m", "jaxhet", "serve", "--plan", str(plan), *weights, *ENGINE, "--port", str(port), *extra]
        + ["--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", "2", "--process-id", str(i)]
        for i in range(2)
    ]


@contextlib.contextmanager
def _server(tmp_path: Path, plan: Path, models: dict[str, Path], *extra: str) -> Iterator[tuple[str, list]]:
    """Both processes of `jaxhet serve --plan` started for real; yields the endpoint's URL once /health answers."""
    port = free_port()
    commands = _commands(plan, models, port, *extra)
    logs = tmp_path / "logs"
    with processes(commands, logs, tmp_path.parent / "compile-cache") as started:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            dead = [i for i, p in enumerate(started) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                tails = "\n".join(f"--- process {i}\n{log_text(logs, i)[-3000:]}" for i in range(2))
                raise AssertionError(f"the server did not start (exited: {dead})\n{tails}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url, started


def _metric(url: str, name: str, key: str = "", **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


def _complete(client: openai.OpenAI, prompt: str, max_tokens: int = MAX_TOKENS, model: str = "tiny") -> str:
    response = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return response.choices[0].text


def _stream(client: openai.OpenAI, prompt: str, max_tokens: int = MAX_TOKENS, first=None, model: str = "tiny") -> str:
    text = ""
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
    for chunk in stream:
        text += chunk.choices[0].text
        if first is not None and text:
            first.set()
    return text


def _abandon_a_stream(client: openai.OpenAI, url: str) -> None:
    """A client leaving mid-stream aborts its request on the decode process: its pages there are freed long before
    its 200 tokens could have been generated."""
    time.sleep(1.0)  # the endpoint's view of process 1 is at most one probe (0.5 s) old
    before = _metric(url, "jaxhet_generation_tokens_total", replica="tiny-decode-0")
    stream = client.completions.create(model="tiny", prompt=SHORT[2], max_tokens=200, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    time.sleep(1.5)  # three probes: the endpoint's view of process 1 is at most 0.5 s old
    deadline = time.monotonic() + 30
    while _metric(url, "jaxhet_kv_pages_used", replica="tiny-decode-0") > 0:
        assert time.monotonic() < deadline, "the abandoned request still holds pages on process 1"
        time.sleep(0.2)
    assert _metric(url, "jaxhet_generation_tokens_total", replica="tiny-decode-0") - before < 150


def _stop(started: list) -> list[int]:
    """SIGINT to the endpoint: it drains, tells the other process to stop, and both exit."""
    os.kill(started[0].pid, signal.SIGINT)
    return wait_all(started, timeout=120)


def test_prefill_on_one_node_hands_used_pages_to_decode_on_the_other(tmp_path, tiny, large):
    """A cascade plan: "tiny" prefills on node h100 and decodes on node l4 (process 1), "large" runs on node h100;
    "tiny" is served by name too. The cascade's threshold 0 escalates every answer (no mean log-probability
    reaches 0), so the cascade answers as "large" does."""
    (tiny_dir, model), (large_dir, large_model) = tiny, large
    replicas = [(0, "prefill", "tiny"), (2, "decode", "tiny"), (1, "both", "large")]
    plan = _write_cascade(tmp_path, replicas, threshold=0.0)
    solo = {**_solo(model, SHORT, MAX_TOKENS), **_solo(model, LONG, MAX_TOKENS)}
    with _server(tmp_path, plan, {"tiny": tiny_dir, "large": large_dir}) as (url, started):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        prompts = [*SHORT, *LONG]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            texts = dict(zip(prompts, pool.map(lambda p: _complete(client, p), prompts), strict=True))
        assert texts == {p: solo[p] for p in prompts}
        config = model.config
        page_bytes = config.num_layers * 2 * PAGE * config.num_kv_heads * config.head_dim * 4
        used_pages = sum(math.ceil(len(_ids(p)) / PAGE) for p in prompts)
        assert (used_pages, len(prompts)) == (16 * 1 + 16 * 3, 32)
        assert _metric(url, "jaxhet_kv_handoff_bytes_total", process="1", direction="sent") == used_pages * page_bytes
        for prompt in (SHORT[0], LONG[0]):
            assert _stream(client, prompt) == _complete(client, prompt) == solo[prompt]
        both = client.completions.create(model="tiny", prompt=SHORT[1], max_tokens=MAX_TOKENS, temperature=0, n=2)
        assert [c.text for c in both.choices] == [solo[SHORT[1]]] * 2
        _abandon_a_stream(client, url)
        escalated = _solo(large_model, SHORT[:1], MAX_TOKENS)[SHORT[0]]
        assert _stream(client, SHORT[0], model="cascade") == _complete(client, SHORT[0], model="cascade") == escalated
        assert _metric(url, "jaxhet_cascade_escalations_total", cascade="cascade") == 2
        assert _metric(url, "jaxhet_generation_tokens_total", replica="tiny-decode-0", node="l4") > 0
        assert _metric(url, "jaxhet_prompt_tokens_total", replica="tiny-prefill-0", node="h100") > 0
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["processes"] == [
            {"process": 1, "nodes": ["l4"], "up": True, "reason": None}
        ]
        assert _stop(started) == [0, 0]


def test_a_killed_serving_process_fails_its_requests_clearly_and_the_endpoint_serves_on(tmp_path, tiny):
    model_dir, model = tiny
    plan = _write_plan(tmp_path, "two-decoders", [(0, "prefill"), (1, "decode"), (2, "decode")])
    long_tokens = 150
    solo = _solo(model, SHORT, long_tokens)
    with _server(tmp_path, plan, {"tiny": model_dir}, "--api-key", KEY) as (url, started):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        firsts = [threading.Event() for _ in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(_stream, client, SHORT[i], long_tokens, firsts[i]) for i in range(8)]
            assert all(first.wait(timeout=120) for first in firsts)
            os.kill(started[1].pid, signal.SIGKILL)
            outcomes = [f.exception(timeout=120) or f.result() for f in futures]
        failed = [o for o in outcomes if isinstance(o, Exception)]
        finished = {SHORT[i]: o for i, o in enumerate(outcomes) if isinstance(o, str)}
        assert failed and finished, outcomes  # decoding was split over both decode replicas
        for error in failed:
            assert isinstance(error, openai.APIError) and "process 1 (node l4) is down" in str(error), error
        assert finished == {p: solo[p] for p in finished}
        assert _complete(client, SHORT[8], long_tokens) == solo[SHORT[8]]  # the survivors serve on
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "degraded" and health["processes"][0]["up"] is False
        assert _metric(url, "jaxhet_process_up", KEY, process="1") == 0
        assert _metric(url, "jaxhet_replica_up", KEY, replica="tiny-decode-1", node="l4") == 0
        assert _metric(url, "jaxhet_replica_up", KEY, replica="tiny-decode-0", node="h100") == 1
        replan = httpx.post(f"{url}/admin/plan", content=plan.read_text(), headers={"Authorization": f"Bearer {KEY}"})
        assert replan.status_code == 409 and "several processes" in replan.json()["error"]["message"]
        assert started[1].wait(timeout=10) == -signal.SIGKILL
        os.kill(started[0].pid, signal.SIGINT)
        assert started[0].wait(timeout=120) == 0, log_text(tmp_path / "logs", 0)[-3000:]


def test_a_replica_spanning_processes_is_refused_naming_the_field(tmp_path, tiny):
    """Each process checks the plan before loading: a tensor-parallel replica over both nodes cannot run."""
    model_dir, _ = tiny
    plan = _write_plan(tmp_path, "span", [(0, "both")])
    data = json.loads(plan.read_text())
    data["replicas"][0].update(devices=[1, 2], tp=2)
    plan.write_text(json.dumps(data))
    commands = _commands(plan, {"tiny": model_dir}, free_port())
    with processes(commands, tmp_path / "logs") as started:
        codes = wait_all(started, timeout=120)
    for i, code in enumerate(codes):
        text = log_text(tmp_path / "logs", i)
        assert code == 2 and "replicas[0].devices span processes [0, 1]" in text and "Traceback" not in text, text
