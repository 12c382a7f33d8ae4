"""`jaxhet serve` as a user runs it: a subprocess bound to 127.0.0.1, queried, then stopped with SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai


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


def test_serve_with_no_model_serves_a_fresh_tiny_model_and_drains_on_sigterm(tmp_path):
    port = _free_port()
    process = _jaxhet("serve", "--port", str(port), "--max-model-len", "128", "--num-pages", "32", cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        (model,) = client.models.list()
        assert model.id == "jaxhet-tiny"
        response = client.completions.create(model=model.id, prompt="print(", max_tokens=5, temperature=0)
        assert response.usage.completion_tokens == 5
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "serving jaxhet-tiny" in output


def test_serve_refuses_a_bad_option_in_one_line(tmp_path):
    process = _jaxhet("serve", "--kv-format", "int3", cwd=tmp_path)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "kv_format must be one of" in output and "Traceback" not in output
