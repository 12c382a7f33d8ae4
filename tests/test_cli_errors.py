"""User mistakes on the command line: each is one line on stderr and exit status 2, found before any slow work."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxhet.models import ConfigError
from jaxhet.train import TrainConfig, load_trained
from jaxhet.train.config import check_resume
from jaxhet.train.step import learning_rate_schedule, schedule_change
from tests.multiprocess.launch import environment

JAXHET = shutil.which("jaxhet") or str(Path(sys.executable).parent / "jaxhet")


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    env = {**os.environ, "XLA_FLAGS": ""} if env is None else env
    result = subprocess.run([JAXHET, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    return result, time.monotonic() - started


# What the dev extra's CUDA plugin logs when JAX imports it on a machine without a CUDA driver, before jaxhet runs.
PLUGIN_IMPORT_LOG = ("WARNING: All log messages before absl::InitializeLog()", "Could not find cuda drivers")


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [
        line for line in result.stderr.splitlines() if line.strip() and not any(p in line for p in PLUGIN_IMPORT_LOG)
    ]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("config", "overrides", "needle"),
    [
        (None, {"steps": "[1"}, "--set steps:1:3: not valid YAML"),
        ("bad.yaml", {}, "bad.yaml:2:5: not valid YAML"),
        (None, {"steps": "5", "steps.x": "1"}, "--set steps.x conflicts with steps=5"),
        (None, {"data.seq_len": "8", "data": "3"}, "--set data=3 conflicts with the fields already set under data"),
        (None, {"checkpoint_dir": "a_file/run"}, "checkpoint_dir: a_file is a file"),
        (None, {"data..seq_len": "3"}, "every part of a dotted key must be non-empty"),
    ],
)
def test_train_config_mistakes_name_the_place(tmp_path, monkeypatch, config, overrides, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("steps: [1\nseed: 2\n")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        TrainConfig.load(config, overrides)


def test_train_with_malformed_yaml_is_one_line_and_exit_2(tmp_path):
    result, _ = _run("train", "--set", "steps=5", "--set", "steps.x=1", cwd=tmp_path)
    assert "--set steps.x conflicts with steps=5" in _one_line_error(result)
    (tmp_path / "bad.yaml").write_text("steps: [1\n")
    result, _ = _run("train", "--config", "bad.yaml", cwd=tmp_path)
    assert "bad.yaml:2:1: not valid YAML" in _one_line_error(result)


def test_plan_output_into_a_missing_folder_is_refused_before_the_solve(tmp_path):
    result, seconds = _run("plan", "train", "--time-limit", "60", "-o", "nowhere/plan.json", cwd=tmp_path)
    assert "--output nowhere/plan.json: the folder nowhere does not exist" in _one_line_error(result)
    assert seconds < 60


def test_serve_on_a_busy_port_or_a_foreign_host_is_refused_before_loading(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result, _ = _run("serve", "--port", str(port), cwd=tmp_path)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in _one_line_error(result)
    assert "compiling" not in result.stdout
    result, _ = _run("serve", "--host", "no-such-host.invalid", cwd=tmp_path)
    assert "cannot listen on no-such-host.invalid:8000" in _one_line_error(result)


def test_serve_refuses_a_kv_cache_smaller_than_one_sequence(tmp_path):
    result, _ = _run("serve", "--num-pages", "8", "--page-size", "16", "--max-model-len", "256", cwd=tmp_path)
    line = _one_line_error(result)
    assert "num_pages=8" in line and "max_model_len=256" in line


@pytest.mark.parametrize(
    ("changed", "needle"),
    [
        ({"data.seq_len": "64"}, "--resume cannot change data.seq_len (the run was saved with 32, now 64)"),
        ({"hidden_size": "96"}, "--resume cannot change hidden_size"),
    ],
)
def test_resuming_with_a_changed_shape_is_refused_naming_the_field(changed, needle):
    saved = TrainConfig.load(None, {"data.seq_len": "32", "hidden_size": "64"})
    with pytest.raises(ConfigError, match=re.escape(needle)):
        check_resume(saved, TrainConfig.load(None, {"data.seq_len": "32", "hidden_size": "64", **changed}))


def test_resuming_with_more_steps_says_how_the_learning_rate_changes_at_the_resumed_step():
    saved = TrainConfig.load(None, {"steps": "100"})
    longer = TrainConfig.load(None, {"steps": "300"})
    assert check_resume(saved, longer) is None  # allowed: the schedule is rebuilt, and said so
    assert schedule_change(saved, TrainConfig.load(None, {"steps": "100", "log_every": "5"}), 100) is None
    assert schedule_change(saved, longer, 0) is None  # nothing restored: the run simply starts on the new schedule
    note = schedule_change(saved, longer, 100)
    old_rate, new_rate = (float(learning_rate_schedule(c)(100)) for c in (saved, longer))
    assert old_rate == pytest.approx(3e-4) and new_rate > 2e-3  # the 100-step decay had ended; the 300-step one not
    assert note == (
        "steps 100 → 300: the learning-rate schedule is rebuilt (warm-up, then cosine decay to step 300); "
        f"at the resumed step 100 the rate is {new_rate:.3g}, the saved schedule had {old_rate:.3g}"
    )
    assert "optim.learning_rate 0.003 → 0.001" in schedule_change(
        saved, TrainConfig.load(None, {"steps": "100", "optim.learning_rate": "0.001"}), 50
    )


TINY = [
    "--plan",
    "single",
    "--set",
    "num_layers=1",
    "--set",
    "hidden_size=32",
    "--set",
    "intermediate_size=64",
    "--set",
    "data.seq_len=16",
    "--set",
    "data.batch_size=2",
    "--set",
    "data.max_documents=20",
]


def test_resuming_with_a_changed_data_shape_is_refused_and_a_second_trainer_is_locked_out(tmp_path):
    run = str(tmp_path / "run")
    # The trainers run the same programs: compiled once, by the first, into a persistent cache the others load.
    env = environment(tmp_path / "compilation-cache")
    first, _ = _run("train", "--steps", "1", "--checkpoint-dir", run, *TINY, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    changed, _ = _run(
        "train",
        "--steps",
        "2",
        "--resume",
        "--checkpoint-dir",
        run,
        *TINY,
        "--set",
        "data.seq_len=32",
        cwd=tmp_path,
        env=env,
    )
    assert "--resume cannot change data.seq_len" in _one_line_error(changed)
    assert "seq_len: 16" in (tmp_path / "run" / "config.yaml").read_text()  # the refused run wrote nothing
    longer, _ = _run("train", "--steps", "2", "--resume", "--checkpoint-dir", run, *TINY, cwd=tmp_path, env=env)
    assert longer.returncode == 0, longer.stderr
    notes = [line for line in longer.stderr.splitlines() if "learning-rate schedule" in line]
    assert len(notes) == 1 and "steps 1 → 2" in notes[0] and "at the resumed step 1 the rate is" in notes[0]
    holder = subprocess.Popen(
        [JAXHET, "train", "--steps", "100000", "--resume", "--checkpoint-dir", run, *TINY],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 120
        lock = tmp_path / "run" / ".lock"
        while not (lock.is_file() and lock.read_text().strip() == str(holder.pid)):
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.2)
        second, _ = _run("train", "--steps", "2", "--resume", "--checkpoint-dir", run, *TINY, cwd=tmp_path, env=env)
        assert f"in use by another trainer (process {holder.pid})" in _one_line_error(second)
    finally:
        holder.kill()
        holder.wait(timeout=30)


def _in_own_filesystem(tmp_path: Path, options: str, command: str) -> subprocess.CompletedProcess:
    """Run the shell `command` with a fresh tmpfs (`options`, e.g. size=700k) on `$DISK`, in a mount namespace of
    its own (so the mount vanishes with it): a real full or read-only file system. Skips where this machine does
    not allow mounting (no root, no unshare)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = f"mount -t tmpfs -o {options} tmpfs {disk}"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True, text=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}")
    env = {**os.environ, "XLA_FLAGS": "", "DISK": str(disk), "JAXHET": JAXHET}
    script = f"{mount} && {command}"
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300, env=env)


def test_a_full_disk_is_one_line_naming_the_path_and_the_last_checkpoint_stays(tmp_path):
    # A 700 KiB file system holds two of this model's checkpoints (about 320 KiB each) and fails the third mid-write.
    tiny = " ".join(TINY)
    train = f'"$JAXHET" train --steps 20 --set save_every=1 --set keep=20 --checkpoint-dir "$DISK/run" {tiny}'
    result = _in_own_filesystem(
        tmp_path, "size=700k", f'{train}; status=$?; cp -a "$DISK/run" {tmp_path}/run; exit $status'
    )
    line = _one_line_error(result)
    assert f"{tmp_path}/disk/run" in line and "No space left on device" in line, line
    run = tmp_path / "run"
    finished = sorted(int(p.name) for p in run.iterdir() if p.name.isdigit())
    assert finished and not list(run.glob("*.orbax-checkpoint-tmp*")), sorted(p.name for p in run.iterdir())
    assert load_trained(run).meta["step"] == finished[-1] < 20


def test_a_read_only_checkpoint_dir_is_refused_before_any_work(tmp_path):
    started = time.monotonic()
    result = _in_own_filesystem(tmp_path, "ro,size=64k", '"$JAXHET" train --checkpoint-dir "$DISK/run"')
    line = _one_line_error(result)
    assert f"checkpoint_dir: {tmp_path}/disk is not writable, so {tmp_path}/disk/run cannot be written" in line
    assert "training" not in result.stdout and time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        (["plan", "serve", "--time-limit", "60", "--png", "nowhere/serve.png"], "--png nowhere/serve.png"),
        (["profile", "--scale", "tiny", "-o", "nowhere/profile.json"], "--output nowhere/profile.json"),
    ],
)
def test_outputs_into_a_missing_folder_are_refused_before_the_work(tmp_path, command, needle):
    result, seconds = _run(*command, cwd=tmp_path)
    assert f"{needle}: the folder nowhere does not exist" in _one_line_error(result)
    assert seconds < 60
