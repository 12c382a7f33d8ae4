"""`jaxhet serve` as a user runs it: a subprocess bound to 127.0.0.1, queried, then stopped with SIGTERM."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from flax import nnx

import planners
from jaxhet.models import Llama, LlamaConfig, save_pretrained
from jaxhet.tokenizers import ByteTokenizer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


JAXHET = shutil.which("jaxhet") or str(Path(sys.executable).parent / "jaxhet")


def _jaxhet(*args: str, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [JAXHET, *args],
        cwd=cwd,
        env={**os.environ, "XLA_FLAGS": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _serve(*args: str, cwd) -> tuple[subprocess.Popen, str]:
    """Start `jaxhet serve ARGS` on a free port and wait until it answers /health."""
    port = _free_port()
    process = _jaxhet("serve", "--port", str(port), "--max-model-len", "128", "--num-pages", "32", *args, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the server did not come up")
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    return output


def _half_sent_answer(url: str) -> tuple[bytes, float]:
    """What a request whose body stops half-way gets, and after how many seconds."""
    host, port = url.removeprefix("http://").split(":")
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(head + b'{"model": ')
        answer = sock.recv(4096)
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _content_length(answer):
            more = sock.recv(4096)
            if not more:
                break
            answer += more
        return answer, time.monotonic() - started


def _content_length(answer: bytes) -> int:
    """The Content-Length an HTTP response's head declares (0 while the head is incomplete)."""
    match = re.search(rb"(?im)^content-length:\s*(\d+)", answer)
    return int(match.group(1)) if match else 0


def test_serve_with_no_model_serves_a_fresh_tiny_model_and_drains_on_sigterm(tmp_path):
    process, url = _serve("--read-timeout", "1", cwd=tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        (model,) = client.models.list()
        assert model.id == "jaxhet-tiny"
        response = client.completions.create(model=model.id, prompt="print(", max_tokens=5, temperature=0)
        assert response.usage.completion_tokens == 5
        answer, seconds = _half_sent_answer(url)
        assert answer.startswith(b"HTTP/1.1 408") and b"within 1 s" in answer and seconds < 5
    finally:
        output = _stop(process)
    assert "serving jaxhet-tiny" in output


def test_serve_a_cascade_plan_over_two_hugging_face_checkpoints(tmp_path):
    for name, layers in (("small", 1), ("large", 2)):
        config = LlamaConfig.tiny(vocab_size=ByteTokenizer.vocab_size, num_layers=layers, dtype="float32")
        save_pretrained(Llama(config, rngs=nnx.Rngs(layers)), tmp_path / name)
    replica = dict(kind="H100", tp=1, max_batch=8, capacity_rps=1.0, routed_rps=1.0)
    deployment = planners.ServePlan(
        replicas=(
            planners.ServeReplica(model="small", devices=(0,), **replica),
            planners.ServeReplica(model="large", devices=(1,), **replica),
        ),
        objective="min_latency",
        throughput_scale=1.0,
        price_per_hour=0.0,
        rates={"small": 1.0, "large": 0.5},
    )
    plan = planners.CascadePlan(
        models=("small", "large"),
        thresholds=(-1e9,),  # the small model's answer is always kept
        deployment=deployment,
        latency_s=1.0,
        quality=0.9,
        reach=(1.0, 0.0),
        arrival_rate=1.0,
        weight=0.5,
        min_quality=None,
        front=(),
        single=(),
    )
    (tmp_path / "cascade.json").write_text(plan.to_json())
    args = ["--plan", "cascade.json", "--model", "small=small", "--model", "large=large", "--name", "fast"]
    process, url = _serve(*args, "--kv-format", "int8", "--no-prefix-caching", cwd=tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert sorted(m.id for m in client.models.list()) == ["fast", "large", "small"]
        response = client.completions.create(model="fast", prompt="x", max_tokens=4, temperature=0)
        assert response.model == "small"
    finally:
        _stop(process)


def test_serve_names_a_cascade_model_without_weights(tmp_path):
    process = _jaxhet("serve", "--plan", "missing.json", cwd=tmp_path)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2 and "missing.json" in output and "Traceback" not in output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--kv-format", "int3"], "kv_format must be one of"),
        (["--num-pages", "8", "--max-model-len", "256"], "fewer than one sequence of max_model_len=256"),
    ],
)
def test_serve_refuses_a_bad_option_in_one_line(tmp_path, args, needle):
    process = _jaxhet("serve", *args, cwd=tmp_path)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    (line,) = [line for line in output.splitlines() if line.startswith("error:")]
    assert needle in line and "Traceback" not in output
