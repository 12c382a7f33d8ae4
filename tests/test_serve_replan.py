"""Live re-planning of a real server on 127.0.0.1, spoken to over sockets with the official `openai` client: new plans
applied through `POST /admin/plan` while 16 clients stream greedy requests, and through SIGHUP to `jaxhet serve`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jax
import openai
import pytest
from flax import nnx
from prometheus_client.parser import text_string_to_metric_families

import planners
from jaxhet.generate import SamplingConfig, generate
from jaxhet.loading import LoadedModel
from jaxhet.models import Llama, LlamaConfig
from jaxhet.serve import BackgroundServer, EngineConfig, ReplicaSource, ServerConfig, build_deployments, create_app
from jaxhet.tokenizers import ByteTokenizer

ENGINE = EngineConfig(
    max_running=4, page_size=16, num_pages=24, kv_format="float32", max_model_len=48, prefill_chunk=16
)
KEY = "admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLIENTS = 16
MAX_TOKENS = 6
PROMPTS = [f"prompt {i:02d}:" for i in range(CLIENTS)]  # one length, so one batched generate gives every solo run


def _plan(*replicas: tuple[tuple[int, ...], str]) -> dict:
    """A serving plan's JSON for model "tiny" with a replica per (device indices, role)."""
    common = dict(model="tiny", kind="cpu", max_batch=4, capacity_rps=1.0, routed_rps=1.0)
    plan = planners.ServePlan(
        replicas=tuple(planners.ServeReplica(tp=len(d), devices=d, role=role, **common) for d, role in replicas),
        objective="max_throughput",
        throughput_scale=1.0,
        price_per_hour=0.0,
        rates={"tiny": 1.0},
    )
    return json.loads(plan.to_json())


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    config = LlamaConfig.tiny(vocab_size=ByteTokenizer.vocab_size, num_layers=2, dtype="float32")
    return LoadedModel(Llama(config, rngs=nnx.Rngs(params=jax.random.key(5))), ByteTokenizer(), "tiny")


@pytest.fixture(scope="module")
def solo(tiny) -> dict[str, str]:
    """Each prompt's greedy completion by the plain generator."""
    ids = [[tiny.tokenizer.bos_id, *tiny.tokenizer.encode(p)] for p in PROMPTS]
    outputs = generate(tiny.model, ids, SamplingConfig(max_new_tokens=MAX_TOKENS), jax.random.key(0))
    return {p: tiny.tokenizer.decode(o) for p, o in zip(PROMPTS, outputs, strict=True)}


@pytest.fixture(scope="module")
def served(tiny):
    """A server with an API key running "tiny" whole on devices 0 and 1, able to build replicas from `tiny`."""
    plan = planners.ServePlan.from_json(json.dumps(_plan(((0,), "both"), ((1,), "both"))))
    deployments = build_deployments({"tiny": tiny}, ENGINE, plan=plan)
    app = create_app(deployments, ServerConfig(api_key=KEY), replicas=ReplicaSource({"tiny": tiny}, ENGINE))
    with BackgroundServer(app) as server:
        yield server, app.state.fleet


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _by_device(fleet) -> dict[int, object]:
    """Device id -> the engine running there."""
    return {e.engine.devices[0].id: e for engines in fleet.engines().values() for e in engines}


async def _replan_under_load(url: str, plan: dict) -> tuple[httpx.Response, list[tuple[str, str]]]:
    """Apply `plan` while CLIENTS clients stream greedy completions one after another; each client goes on until
    the re-plan has answered, then runs one more request. Returns the answer and every (prompt, streamed text)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    results: list[tuple[str, str]] = []
    replanned = asyncio.Event()

    async def complete(prompt: str) -> None:
        stream = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        results.append((prompt, "".join([chunk.choices[0].text async for chunk in stream])))

    async def one_client(index: int) -> None:
        sent = 0
        while not replanned.is_set():
            await complete(PROMPTS[(index + sent) % CLIENTS])
            sent += 1
        await complete(PROMPTS[(index + sent) % CLIENTS])

    load = asyncio.gather(*(one_client(i) for i in range(CLIENTS)))
    while len(results) < CLIENTS:  # every client is streaming by now
        await asyncio.sleep(0.05)
    async with httpx.AsyncClient(timeout=300) as http:
        answer = await http.post(f"{url}/admin/plan", json=plan, headers=AUTH)
    replanned.set()
    await load
    await client.close()
    return answer, results


def test_replans_under_load_keep_every_output_and_the_weights_of_replicas_that_stay(served, solo):
    server, fleet = served
    before = _by_device(fleet)

    # Remove the replica on device 1, add one on device 2.
    answer, results = asyncio.run(_replan_under_load(server.url, _plan(((0,), "both"), ((2,), "both"))))
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report | {"drained_requests": 0} == {
        "kept": 1,
        "role_changes": 0,
        "started": 1,
        "removed": 1,
        "drained_requests": 0,
        "replicas": {"tiny": {"both": 2}},
    }
    assert report["drained_requests"] > 0  # the removed replica was serving at the switch, and finished
    assert len(results) >= 2 * CLIENTS and all(text == solo[prompt] for prompt, text in results)
    after = _by_device(fleet)
    assert after[0] is before[0] and after[2] is not before[1]  # device 0's engine, weights and all, stayed
    assert before[1].closed  # the removed replica was drained and stopped
    metrics = _metrics(server.url)
    assert metrics[("jaxhet_replicas", (("model", "tiny"), ("role", "both")))] == 2
    assert metrics[("jaxhet_replicas_started_total", ())] == 1
    assert (
        metrics[("jaxhet_generation_tokens_total", (("model", "tiny"), ("node", "local"), ("replica", "tiny-1")))] > 0
    )  # device 2
    assert httpx.get(f"{server.url}/health").json()["replicas"] == {"tiny": {"both": 2}}

    # Flip both replicas' roles: device 0 prefills, device 2 decodes; no replica is built.
    answer, results = asyncio.run(_replan_under_load(server.url, _plan(((0,), "prefill"), ((2,), "decode"))))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "kept": 2,
        "role_changes": 2,
        "started": 0,
        "removed": 0,
        "drained_requests": 0,
        "replicas": {"tiny": {"prefill": 1, "decode": 1}},
    }
    assert all(text == solo[prompt] for prompt, text in results)
    flipped = _by_device(fleet)
    assert flipped[0] is after[0] and flipped[2] is after[2]
    metrics = _metrics(server.url)
    assert metrics[("jaxhet_replicas", (("model", "tiny"), ("role", "prefill")))] == 1
    assert metrics[("jaxhet_replicas", (("model", "tiny"), ("role", "decode")))] == 1
    assert metrics[("jaxhet_replicas_started_total", ())] == 1
    assert httpx.get(f"{server.url}/health").json()["replicas"] == {"tiny": {"prefill": 1, "decode": 1}}


BAD_PLANS = [
    ("cascade", lambda p: p | {"format": "jaxhet.cascade_plan"}, "format"),
    ("no replicas", lambda p: p | {"replicas": []}, "replicas"),
    ("unknown model", lambda p: _replace(p, 0, model="nope"), "replicas[0].model"),
    ("device out of range", lambda p: _replace(p, 0, devices=[99]), "replicas[0].devices"),
    ("tp against devices", lambda p: _replace(p, 0, tp=2), "replicas[0].tp"),
    ("unknown role", lambda p: _replace(p, 0, role="sideways"), "replicas[0]"),
    ("prefill without decode", lambda p: _replace(p, 0, role="prefill"), "replicas"),
    ("repeated replica", lambda p: p | {"replicas": [p["replicas"][0]] * 2}, "replicas[1]"),
]


def _replace(plan: dict, index: int, **fields) -> dict:
    replicas = [dict(r) for r in plan["replicas"]]
    replicas[index].update(fields)
    return plan | {"replicas": replicas}


@pytest.mark.parametrize(("case", "spoil", "param"), BAD_PLANS, ids=[b[0] for b in BAD_PLANS])
def test_a_bad_plan_is_a_400_naming_the_field_and_changes_nothing(served, case, spoil, param):
    server, fleet = served
    running = _by_device(fleet)
    health = httpx.get(f"{server.url}/health").json()
    plan = spoil(_plan(*(((device,), "both") for device in running)))
    answer = httpx.post(f"{server.url}/admin/plan", json=plan, headers=AUTH, timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param and param.split(".")[0] in answer.json()["error"]["message"]
    assert _by_device(fleet) == running and httpx.get(f"{server.url}/health").json() == health


def test_admin_plan_needs_the_api_key_and_a_server_with_one(served, tiny):
    server, _ = served
    plan = _plan(((0,), "both"))
    answer = httpx.post(f"{server.url}/admin/plan", json=plan, timeout=60)
    assert answer.status_code == 401 and "API key" in answer.json()["error"]["message"]
    deployments = build_deployments({"tiny": tiny}, ENGINE)
    app = create_app(deployments, ServerConfig(), replicas=ReplicaSource({"tiny": tiny}, ENGINE))
    with BackgroundServer(app) as open_server:
        answer = httpx.post(f"{open_server.url}/admin/plan", json=plan, timeout=60)
        assert answer.status_code == 403 and "needs the server started with an API key" in answer.text
        assert httpx.get(f"{open_server.url}/health").json()["replicas"] == {"tiny": {"both": 1}}


def test_jaxhet_serve_takes_a_replan_from_plan_serve_current_and_rereads_its_plan_on_sighup(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("name: two\nnodes:\n  - {name: a, gpu: H100, count: 1}\n  - {name: b, gpu: L4, count: 1}\n")
    planned = tmp_path / "planned.json"
    plan_args = ("plan", "serve", "--cluster", str(cluster), "--model", "tiny", "--time-limit", "2")
    _run(*plan_args, "-o", str(planned), cwd=tmp_path)
    port = _free_port()
    serve_args = ("serve", "--port", str(port), "--plan", str(planned), "--api-key", KEY, "--max-model-len", "32")
    process = _jaxhet(*serve_args, "--num-pages", "8", "--max-running", "2", cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(process, url, _roles(planned))
        replanned = tmp_path / "replanned.json"
        _run(*plan_args, "--current", str(planned), "--rate", "7", "-o", str(replanned), cwd=tmp_path)
        answer = httpx.post(f"{url}/admin/plan", content=replanned.read_bytes(), headers=AUTH, timeout=300)
        assert answer.status_code == 200, answer.text
        assert answer.json()["replicas"] == _roles(replanned)
        planned.write_text(json.dumps(_plan(((1,), "both"))))
        process.send_signal(signal.SIGHUP)
        _wait_for(process, url, {"tiny": {"both": 1}})
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        assert client.completions.create(model="tiny", prompt="x", max_tokens=3).usage.completion_tokens == 3
    finally:
        output = _stop(process)
    assert "SIGHUP: applied" in output


JAXHET = shutil.which("jaxhet") or str(Path(sys.executable).parent / "jaxhet")


def _jaxhet(*args: str, cwd: Path) -> subprocess.Popen:
    """`jaxhet ARGS` on two emulated devices, output captured."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.Popen(
        [JAXHET, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    return output


def _roles(path: Path) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for replica in json.loads(path.read_text())["replicas"]:
        roles = counts.setdefault(replica["model"], {})
        roles[replica["role"]] = roles.get(replica["role"], 0) + 1
    return counts


def _run(*args: str, cwd: Path) -> None:
    process = _jaxhet(*args, cwd=cwd)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output


def _wait_for(process: subprocess.Popen, url: str, replicas: dict, timeout_s: float = 240) -> None:
    """Wait until the server's /health reports `replicas`."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(f"{url}/health", timeout=1).json().get("replicas") == replicas:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the server did not come to run {replicas}"
        time.sleep(0.5)
