"""`CheckpointStore` on real Orbax checkpoints damaged on disk: a damaged newest one is moved aside so that later
saves land, a save Orbax declines is an error, and a write that fails (a full disk) is one error naming the run
directory with the last good checkpoint kept."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxhet.models import CheckpointError
from jaxhet.train import TrainConfig, load_trained, train
from jaxhet.train.checkpoints import CheckpointStore

ABSTRACT = {"w": jnp.zeros(8)}


def _state(step: int) -> dict:
    return {"w": jnp.full(8, float(step))}


def _store_with(directory: Path, steps: tuple[int, ...]) -> None:
    store = CheckpointStore(directory, keep=5)
    for step in steps:
        store.save(step, _state(step), {"step": step})
    store.close()


def _overwrite_files(step_dir: Path) -> None:
    for file in step_dir.rglob("*"):
        if file.is_file():
            file.write_bytes(b"garbage")


def _delete_arrays(step_dir: Path) -> None:
    for file in (step_dir / "state").rglob("*"):
        if file.is_file() and "ocdbt" in str(file):
            file.unlink()


def _truncate_meta(step_dir: Path) -> None:
    for file in (step_dir / "meta").rglob("*"):
        if file.is_file():
            file.write_text('{"step": ')


@pytest.mark.parametrize("damage", [_overwrite_files, _delete_arrays, _truncate_meta])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_later_saves_land(tmp_path, caplog, damage):
    _store_with(tmp_path, (10, 20, 30))
    damage(tmp_path / "30")
    store = CheckpointStore(tmp_path, keep=5)
    with caplog.at_level(logging.WARNING, logger="jaxhet.train.checkpoints"):
        step, state, meta = store.restore_latest(ABSTRACT)
    assert (step, meta) == (20, {"step": 20}) and float(state["w"][0]) == 20
    assert (tmp_path / "30.corrupt").is_dir() and not (tmp_path / "30").exists()
    assert "to 30.corrupt" in caplog.text
    store.save(25, _state(25), {"step": 25})  # Orbax skipped this while the damaged step 30 was still "newest"
    store.close()
    step, state, _ = CheckpointStore(tmp_path, keep=5).restore_latest(ABSTRACT)
    assert step == 25 and float(state["w"][0]) == 25


def test_with_every_checkpoint_damaged_all_are_moved_aside_and_saving_starts_over(tmp_path):
    _store_with(tmp_path, (1, 2))
    _overwrite_files(tmp_path / "1")
    _overwrite_files(tmp_path / "2")
    (tmp_path / "2.corrupt").mkdir()  # left by an earlier fall-back
    store = CheckpointStore(tmp_path, keep=5)
    assert store.restore_latest(ABSTRACT) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.corrupt", "2.corrupt", "2.corrupt-2"]
    store.save(1, _state(1), {"step": 1})
    store.close()
    assert CheckpointStore(tmp_path, keep=5).restore_latest(ABSTRACT)[0] == 1


def test_a_save_at_or_before_the_newest_step_supersedes_the_later_ones(tmp_path, caplog):
    # What a resumed run meets when checkpoints newer than the one it resumed from exist (in a multi-process run:
    # steps some processes finalised and others did not): Orbax would skip the save.
    _store_with(tmp_path, (5, 10, 15))
    store = CheckpointStore(tmp_path, keep=5)
    with caplog.at_level(logging.WARNING, logger="jaxhet.train.checkpoints"):
        store.save(10, _state(11), {"step": 10})
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "10.superseded", "15.superseded", "5"]
    assert "a save at step 10 supersedes it" in caplog.text
    step, state, _ = CheckpointStore(tmp_path, keep=5).restore_latest(ABSTRACT)
    assert step == 10 and float(state["w"][0]) == 11


def test_a_save_orbax_declines_is_an_error(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep=5)
    monkeypatch.setattr(store._manager, "save", lambda *args, **kwargs: False)  # as Orbax answers a skipped save
    with pytest.raises(CheckpointError, match=f"did not save step 5 in {tmp_path}"):
        store.save(5, _state(5), {"step": 5})
    store.close()


def test_a_full_disk_is_one_error_naming_the_run_and_keeps_the_last_checkpoint(tmp_path):
    # RLIMIT_FSIZE makes every write past 64 KiB fail with EFBIG, as a full disk fails them with ENOSPC.
    script = textwrap.dedent(
        f"""
        import resource, signal
        import jax.numpy as jnp
        from jaxhet.models import CheckpointError
        from jaxhet.train.checkpoints import CheckpointStore

        store = CheckpointStore({str(tmp_path)!r}, keep=5)
        store.save(1, {{"w": jnp.zeros(8)}}, {{"step": 1}})
        store.wait()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        try:
            store.save(2, {{"w": jnp.arange(1 << 18, dtype=jnp.float32)}}, {{"step": 2}})
            store.close()
        except CheckpointError as err:
            print("CheckpointError:", err)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"CheckpointError: saving step 2 in {tmp_path} failed:")
    assert "File too large (writing " in result.stdout and "tensorstore_spec" not in result.stdout
    assert len(result.stdout.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # the unfinished step 2 is gone
    step, _, meta = CheckpointStore(tmp_path, keep=5).restore_latest(ABSTRACT)
    assert (step, meta) == (1, {"step": 1})


def _tiny_run(tmp_path: Path, steps: int) -> TrainConfig:
    fields = {"num_layers": "1", "hidden_size": "32", "intermediate_size": "64", "num_heads": "2", "num_kv_heads": "1"}
    fields |= {"data.seq_len": "16", "data.batch_size": "2", "data.max_documents": "10", "plan": "single"}
    return TrainConfig.load(None, {**fields, "steps": str(steps), "save_every": "2", "checkpoint_dir": str(tmp_path)})


def test_resuming_past_a_damaged_newest_checkpoint_saves_again_at_its_step(tmp_path):
    train(_tiny_run(tmp_path / "run", steps=4))
    _overwrite_files(tmp_path / "run" / "4")
    # A reader (serving, generating) falls back too, but leaves the run directory as it is: a trainer may own it.
    assert load_trained(tmp_path / "run").meta["step"] == 2 and (tmp_path / "run" / "4").is_dir()
    resumed = train(_tiny_run(tmp_path / "run", steps=6), resume=True)
    assert resumed.start_step == 2
    steps = CheckpointStore(tmp_path / "run", keep=3).steps()
    assert steps[-2:] == [4, 6] and (tmp_path / "run" / "4.corrupt").is_dir()
    assert load_trained(tmp_path / "run").meta["step"] == 6
    assert np.isfinite(resumed.losses).all()


def test_a_second_trainer_on_a_run_directory_is_refused_naming_the_first(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fcntl, os, time\n"
            f"fd = os.open({str(tmp_path / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()}\\n'.encode()); print('held', flush=True)\n"
            "time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(CheckpointError, match=f"in use by another trainer \\(process {holder.pid}\\)"):
            CheckpointStore(tmp_path, keep=2).lock()
    finally:
        holder.kill()
        holder.wait()
    store = CheckpointStore(tmp_path, keep=2)
    store.lock()  # the lock died with its holder, even killed
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    store.close()
    CheckpointStore(tmp_path, keep=2).lock()


def test_resuming_with_every_checkpoint_damaged_starts_again_from_step_0_and_saves(tmp_path, caplog):
    train(_tiny_run(tmp_path / "run", steps=4))
    for step in (2, 4):
        _overwrite_files(tmp_path / "run" / str(step))
    with caplog.at_level(logging.WARNING, logger="jaxhet.train"):
        resumed = train(_tiny_run(tmp_path / "run", steps=4), resume=True)
    assert "restores (steps 2, 4); starting again from step 0" in caplog.text
    assert (resumed.start_step, resumed.end_step) == (0, 4)
    assert (tmp_path / "run" / "2.corrupt").is_dir() and (tmp_path / "run" / "4.corrupt").is_dir()
    assert CheckpointStore(tmp_path / "run", keep=3).steps() == [2, 4]
    assert load_trained(tmp_path / "run").meta["step"] == 4
