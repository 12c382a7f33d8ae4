"""Length-bucketed training (`data.length_buckets`): batches of one bucket each, a plan per bucket on `emulated8`
switched per batch with the state moved between layouts; the same loss as one device at every step (float32,
relative 1e-5: the plans only reorder sums), each plan's programs compiled once, and resume exact."""

import collections
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxhet.data import BucketedBatches, DataConfig
from jaxhet.data.buckets import bucket_index
from jaxhet.models import ConfigError
from jaxhet.parallel import llama_params
from jaxhet.tokenizers import ByteTokenizer
from jaxhet.train import TrainConfig, load_trained, train
from planners.errors import PlanningError
from tests.compile_events import compiled_programs
from tests.multiprocess.launch import environment

JAXHET = shutil.which("jaxhet") or str(Path(sys.executable).parent / "jaxhet")
RTOL = 1e-5
# The embedded corpus in buckets of rows of 256 and 512 tokens, 1024 tokens a batch (4 x 256 or 2 x 512); data.seed
# 64 draws the buckets 256, 512, 256, 512, 512 for the first five batches, so the run switches back to each plan.
BUCKETED = {
    "num_layers": "2",
    "hidden_size": "32",
    "intermediate_size": "64",
    "data.seq_len": "256",
    "data.batch_size": "4",
    "data.length_buckets": "[256, 512]",
    "data.seed": "64",
    "data.max_documents": "null",
    "optim.warmup_steps": "2",
    "log_every": "1",
    "steps": "5",
    "save_every": "3",
}
BUCKETS_DRAWN = [256, 512, 256, 512, 512]


def bucketed_config(directory: Path, **overrides: str) -> TrainConfig:
    return TrainConfig.load(None, {**BUCKETED, "checkpoint_dir": str(directory), **overrides})


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(run_dir: Path, plan: str) -> str:
    """`jaxhet train` with the bucketed config; its standard output."""
    args = ["train", "--plan", plan, "--checkpoint-dir", str(run_dir)]
    for key, value in BUCKETED.items():
        args += ["--set", f"{key}={value}"]
    # LLVM at -O0 (`launch.COMPILER_FLAGS`) halves the compiling that is most of this process's time; it moves
    # gradients by ~5e-7 relative, well inside RTOL.
    result = subprocess.run([JAXHET, *args], capture_output=True, text=True, timeout=600, env=environment())
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The bucketed run on `emulated8` (with the programs compiled during each step), and on one device from the
    command line."""
    root = tmp_path_factory.mktemp("buckets")
    per_step: list[collections.Counter] = []
    with compiled_programs() as names:
        seen = 0

        def step_done(record: dict) -> None:  # log_every 1: each step is read back before the next is dispatched
            nonlocal seen
            per_step.append(collections.Counter(names[seen:]))
            seen = len(names)

        auto = train(bucketed_config(root / "auto", plan="auto"), progress=step_done)
    single_output = run_cli(root / "single", "single")
    return {"auto": auto, "single_output": single_output, "compiled": per_step, "root": root}


def stage_groups(plan: dict) -> int:
    return sum(len(replica["stages"]) for replica in plan["replicas"])


def test_a_plan_per_bucket_gives_the_single_device_loss_at_every_step(runs):
    auto_dir = runs["root"] / "auto"
    plans = {b: json.loads((auto_dir / f"plan-bucket{b}.json").read_text()) for b in (256, 512)}
    assert (plans[256]["global_batch"], plans[256]["seq_len"]) == (4, 256)
    assert (plans[512]["global_batch"], plans[512]["seq_len"]) == (2, 512)
    assert max(r["cp"] for r in plans[512]["replicas"]) > 1, "the long bucket is planned with context parallelism"
    assert max(r["cp"] for r in plans[256]["replicas"]) == 1
    logged = records(auto_dir)
    assert [r["bucket"] for r in logged] == BUCKETS_DRAWN
    labels = {r["bucket"]: r["plan"] for r in logged}
    assert len(set(labels.values())) == 2 and all(f"bucket {b}: {p}" in runs["auto"].plan for b, p in labels.items())
    assert " cp 2" in labels[512] and " cp " not in labels[256], labels
    assert set(runs["auto"].bucket_tokens_per_s) == {256, 512}
    single = records(runs["root"] / "single")
    assert [r["bucket"] for r in single] == BUCKETS_DRAWN
    np.testing.assert_allclose(runs["auto"].losses, [r["loss"] for r in single], rtol=RTOL)


def test_each_plan_is_compiled_once_however_often_the_run_switches_to_it(runs):
    """Each stage's forward and backward program and each device group's update is compiled on the bucket's first
    step and never again; switching back to a plan compiles none of its programs."""
    compiled = runs["compiled"]
    total = sum(compiled, collections.Counter())
    plans = [json.loads((runs["root"] / "auto" / f"plan-bucket{b}.json").read_text()) for b in (256, 512)]
    groups = sum(stage_groups(p) for p in plans)
    assert (total["jit(forward)"], total["jit(backward)"], total["jit(_group_update)"]) == (groups, groups, groups)
    first_steps = {BUCKETS_DRAWN.index(b) for b in (256, 512)}
    for step, names in enumerate(compiled):
        plan_programs = {"jit(forward)", "jit(backward)", "jit(_group_update)"} & set(names)
        assert bool(plan_programs) == (step in first_steps), (step, names)
    assert not compiled[3] and not compiled[4], "every plan and every move between them was compiled by step 3"


def test_resuming_mid_run_continues_the_same_batches_and_state_exactly(runs, tmp_path):
    """Saved at step 3 (after a batch of the 256 bucket), resumed: the run starts in the layout of the first bucket,
    moves the restored state to the 512 bucket's, and continues each bucket's data where it stood."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs["root"] / "auto", run_dir)
    shutil.rmtree(run_dir / "5")  # as if the run had died after step 3's checkpoint
    resumed = train(bucketed_config(run_dir, plan="auto"), resume=True)
    assert (resumed.start_step, resumed.end_step) == (3, 5)
    assert resumed.losses == runs["auto"].losses[3:]
    full, again = load_trained(runs["root"] / "auto"), load_trained(run_dir)
    assert again.meta["data"] == full.meta["data"]
    assert set(again.meta["plan"]) == {"256", "512"}
    jax.tree.map(np.testing.assert_array_equal, llama_params(again.model), llama_params(full.model))


def test_documents_go_to_the_shortest_bucket_that_holds_them(tmp_path):
    # A document of n bytes is n + 2 tokens (BOS, EOS): n + 1 next-token pairs, so rows of 16 hold n <= 15.
    assert bucket_index(np.array([2, 17, 18, 33, 34, 500]), (16, 32)).tolist() == [0, 0, 1, 1, 1, 1]
    short, long = {"a": 3, "b": 10, "c": 15, "d": 12}, {"w": 16, "x": 31, "y": 90, "z": 25}
    documents = [letter * n for letter, n in {**short, **long}.items()]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    config = DataConfig(source=str(tmp_path / "docs.jsonl"), seq_len=16, batch_size=4, length_buckets=(16, 32))
    batches = BucketedBatches(config)
    assert batches.documents_per_bucket.tolist() == [4, 4]
    drawn = set()
    for _ in range(12):
        length = batches.upcoming
        batch = next(batches)
        assert batch["input_ids"].shape == (64 // length, length)
        specials = {ByteTokenizer.bos_id, ByteTokenizer.eos_id}
        letters = {chr(t) for t in batch["input_ids"].ravel().tolist() if t not in specials}
        assert letters <= set(short if length == 16 else long), (length, letters)
        drawn.add(length)
    assert drawn == {16, 32}


def test_bucketed_batches_resume_where_they_stood():
    config = DataConfig(seq_len=64, batch_size=2, length_buckets=(64, 128), max_documents=200, seed=1)
    batches = BucketedBatches(config)
    for _ in range(5):
        next(batches)
    state = json.loads(json.dumps(batches.state()))
    expected = [(batches.upcoming, next(batches)) for _ in range(6)]
    restored = BucketedBatches(config)
    restored.restore(state)
    for length, batch in expected:
        assert restored.upcoming == length
        jax.tree.map(np.testing.assert_array_equal, next(restored), batch)
    other = BucketedBatches(DataConfig(seq_len=64, batch_size=2, length_buckets=(32, 128), max_documents=200, seed=1))
    with pytest.raises(ValueError, match="other length buckets"):
        other.restore(state)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("[64, 32]", "length_buckets must be a non-empty list of strictly increasing integers >= 1"),
        ("[32, 32]", "strictly increasing"),
        ("[]", "non-empty list"),
        ("[0, 16]", "integers >= 1"),
        ("[16, 32.5]", "integers >= 1"),
        ("[true]", "integers >= 1"),
        ("64", "length_buckets must be a non-empty list"),
        ("[16, 4096]", "length_buckets: a row of 4096 tokens is longer than a batch's token budget"),
    ],
)
def test_bad_length_buckets_are_named(value, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        TrainConfig.load(None, {"data.seq_len": "32", "data.batch_size": "8", "data.length_buckets": value})


def test_length_buckets_need_a_plan_made_per_bucket(tmp_path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text("{}")
    with pytest.raises(ConfigError, match=r"plan must be one of auto, single with data.length_buckets"):
        TrainConfig.load(None, {"data.length_buckets": "[64, 128]", "plan": str(plan_file)})


def test_length_buckets_round_trip_through_the_run_config_and_must_be_kept_on_resume(tmp_path):
    config = TrainConfig.load(None, {"data.length_buckets": "[64, 128]"})
    (tmp_path / "config.yaml").write_text(config.to_yaml())
    assert TrainConfig.load(tmp_path / "config.yaml") == config
    from jaxhet.train.config import check_resume

    with pytest.raises(ConfigError, match="--resume cannot change data.length_buckets"):
        check_resume(config, TrainConfig.load(None, {"data.length_buckets": "[64]"}))


def test_the_cli_names_the_buckets_and_their_throughput(runs):
    out = " ".join(runs["single_output"].split())
    assert "batches of 1024 tokens in length buckets 256, 512" in out
    assert re.search(r"tok/s per bucket │ 256: [\d,]+, 512: [\d,]+", out), out


def test_a_bucket_without_documents_is_never_drawn(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": "a" * n}) + "\n" for n in (3, 9, 14)))
    config = DataConfig(source=str(tmp_path / "docs.jsonl"), seq_len=16, batch_size=4, length_buckets=(16, 32))
    batches = BucketedBatches(config)
    assert batches.drawn == [16]
    assert all(batches.upcoming == 16 and next(batches)["input_ids"].shape == (4, 16) for _ in range(20))


def test_every_bucket_is_planned_before_the_first_step(tmp_path):
    """A bucket the planner cannot place (one row of 512 tokens cannot keep 8 devices busy) fails the run before
    any step, whichever bucket comes first."""
    config = bucketed_config(tmp_path / "run", plan="auto", **{"data.seq_len": "128"})
    with pytest.raises(PlanningError, match="seq_len 512"):
        train(config)
    assert (tmp_path / "run" / "plan-bucket256.json").is_file()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
