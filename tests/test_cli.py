"""The installed `jaxhet` console script, run as a user would run it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from jaxhet import Llama, LlamaConfig, save_pretrained

JAXHET = shutil.which("jaxhet") or str(Path(sys.executable).parent / "jaxhet")


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": ""}
    return subprocess.run([JAXHET, *args], capture_output=True, text=True, timeout=300, env=env)


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0
    assert "generate" in result.stdout


def test_generate_with_a_fresh_tiny_model():
    result = run("generate", "--prompt", "import os\n", "--max-new-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("model: a fresh tiny model")
    assert "import os" in result.stdout


def test_generate_from_a_saved_checkpoint(tmp_path):
    config = LlamaConfig.tiny(vocab_size=259, num_layers=1)
    save_pretrained(Llama(config, rngs=nnx.Rngs(0)), tmp_path)
    result = run("generate", "--model", str(tmp_path), "--max-new-tokens", "4", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert f"model: {tmp_path}" in result.stdout.replace("\n", "")


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "--model", "/no/such/dir"], "checkpoint directory /no/such/dir does not exist"),
        (["generate", "--dtype", "int3"], "dtype must be one of float32, bfloat16, float16"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_python_dash_m_jaxhet_is_the_command_line():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-m", "jaxhet", "--version"], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("jaxhet ")
