"""`jaxhet train`: plans match one device, checkpoints resume exactly after kill -9, stops save first."""

import json
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxhet.parallel import llama_params
from jaxhet.train import TrainConfig, load_trained, loop, train
from meshes.transfer import host_values
from tests.multiprocess.launch import environment

JAXHET = shutil.which("jaxhet") or str(Path(sys.executable).parent / "jaxhet")
SMALL = {
    "num_layers": "2",
    "hidden_size": "64",
    "intermediate_size": "160",
    "data.seq_len": "32",
    "data.batch_size": "8",
    "data.max_documents": "60",
    "optim.warmup_steps": "2",
}


def small_config(tmp_path: Path, **overrides: str) -> TrainConfig:
    return TrainConfig.load(None, {**SMALL, "checkpoint_dir": str(tmp_path / "run"), **overrides})


def run_cli(*args: str, compilation_cache: Path | None = None) -> subprocess.Popen:
    """`jaxhet train` in `launch.environment` (LLVM at -O0; with `compilation_cache`, JAX's persistent cache there,
    so that later processes of one test load what the first compiled instead of compiling it again)."""
    return subprocess.Popen(
        [JAXHET, "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(compilation_cache),
    )


def cli_args(run_dir: Path, steps: int) -> list[str]:
    args = ["--plan", "single", "--steps", str(steps), "--checkpoint-dir", str(run_dir)]
    for key, value in {**SMALL, "save_every": "3"}.items():
        args += ["--set", f"{key}={value}"]
    return args


# Steps of the shared reference runs, saved every `SAVE_EVERY` (a resume restarts half way); `warmup_steps` 2 makes
# the learning rate rise and then decay within them.
STEPS, SAVE_EVERY = 4, 2


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache in a fresh directory while this module's tests run, for every program:
    a resumed run builds the plan's programs anew, the same as the run it resumes, and loads them instead of
    compiling them again (compiling is most of a run's time on CPU). Reset on both sides, since JAX sets the cache
    up once, at a process's first compile."""
    from jax._src import compilation_cache as cache

    options = {
        "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("compilation-cache")),
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    before = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    cache.reset_cache()
    yield
    for name, value in before.items():
        jax.config.update(name, value)
    cache.reset_cache()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compilation_cache):
    """The small model trained on one device and with the auto plan (float32, same config), shared by the tests that
    compare against them: planning and compiling the plan's programs is most of a run's time on CPU."""
    root = tmp_path_factory.mktemp("reference")
    overrides = {"steps": str(STEPS), "save_every": str(SAVE_EVERY)}
    single = train(small_config(root / "single", plan="single", **overrides))
    auto = train(small_config(root / "auto", plan="auto", **overrides))
    return {"root": root, "single": single, "auto": auto, "plan": root / "auto" / "run" / "plan.json"}


def devices_used(plan_file: Path) -> int:
    plan = json.loads(plan_file.read_text())
    return sum(len(stage["devices"]) for replica in plan["replicas"] for stage in replica["stages"])


def test_auto_plan_gives_the_single_device_loss_at_every_step(reference):
    single, auto, root = reference["single"], reference["auto"], reference["root"]
    assert devices_used(reference["plan"]) > 1
    assert (root / "auto" / "run" / "plan.png").is_file()
    assert len(auto.losses) == len(single.losses) == STEPS
    # float32 on both paths; the plan only reorders sums (micro-batches, replicas, TP partial sums).
    np.testing.assert_allclose(auto.losses, single.losses, rtol=1e-5)
    # Saved from the plan's copies (each leaf from its first holder), restored onto one device.
    auto_params = llama_params(load_trained(root / "auto" / "run").model)
    single_params = llama_params(load_trained(root / "single" / "run").model)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), auto_params, single_params)


def test_resuming_a_plan_restores_into_its_copies_and_continues_identically(reference, tmp_path):
    shutil.copytree(reference["root"] / "auto" / "run", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / str(STEPS))  # as if the run had died after the half-way checkpoint
    config = small_config(tmp_path, steps=str(STEPS), save_every=str(SAVE_EVERY), plan="auto")
    resumed = train(config, resume=True)
    assert (resumed.start_step, resumed.end_step) == (SAVE_EVERY, STEPS)
    assert resumed.losses == reference["auto"].losses[SAVE_EVERY:]
    assert resumed.plan == reference["auto"].plan  # the saved plan, not a new one


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps = 9
    cache = tmp_path / "compilation-cache"  # the four processes run the same programs: compiled once
    reference = run_cli(*cli_args(tmp_path / "reference", steps), compilation_cache=cache)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()

    victim = run_cli(*cli_args(tmp_path / "victim", steps), compilation_cache=cache)
    deadline = time.time() + 300
    while not (tmp_path / "victim" / "3").is_dir():  # Orbax renames a step's directory into place once complete
        assert victim.poll() is None, victim.stderr.read()
        assert time.time() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL  # killed mid-run, not finished first
    saved = max(int(p.name) for p in (tmp_path / "victim").iterdir() if p.name.isdigit())
    assert saved < steps  # so the resumed run has steps to do (the victim loads its programs from the cache: fast)
    resumed = run_cli(*cli_args(tmp_path / "victim", steps), "--resume", compilation_cache=cache)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"{saved} → {steps}" in " ".join(out.split())  # resumed from the last checkpoint the victim completed

    reference_run, run = load_trained(tmp_path / "reference"), load_trained(tmp_path / "victim")
    ref_model, ref_meta, model, meta = reference_run.model, reference_run.meta, run.model, run.meta
    assert meta["step"] == ref_meta["step"] == steps
    assert meta["data"] == ref_meta["data"]
    jax.tree.map(np.testing.assert_array_equal, llama_params(model), llama_params(ref_model))
    losses = {}
    for name in ("reference", "victim"):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in records]
    assert losses["victim"] == losses["reference"] and len(losses["victim"]) == steps

    generated = subprocess.run(
        [JAXHET, "generate", "--run", str(tmp_path / "victim"), "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment(cache),
    )
    assert generated.returncode == 0, generated.stderr
    assert f"(step {steps})" in " ".join(generated.stdout.split())


def test_sigterm_saves_then_exits(tmp_path):
    run_dir = tmp_path / "run"
    process = run_cli(*cli_args(run_dir, 10_000))
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130
    assert 1 <= load_trained(run_dir).meta["step"] < 10_000


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `directory`, by tag (records: length, crc, event, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            length = struct.unpack("<Q", data[offset : offset + 8])[0]
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_metrics_go_to_jsonl_and_tensorboard_read_back_every_log_every_steps(tmp_path, monkeypatch):
    read_backs = []

    def counted(arrays):
        read_backs.append(len(arrays))
        return host_values(arrays)

    monkeypatch.setattr(loop, "host_values", counted)
    result = train(small_config(tmp_path, steps="5", log_every="2", plan="single"))
    assert read_backs == [4, 4, 2]  # a loss and a norm per step, after steps 2, 4 and 5 (the end)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["tokens_per_s"] > 0 and r["model_tflops"] > 0 and r["grad_norm"] > 0 for r in records)
    assert records[0]["lr"] == 0.0 < records[1]["lr"]  # warm-up from 0
    assert records[0]["mfu"] is None and result.mfu is None  # CPU: no catalogued peak
    scalars = tensorboard_scalars(result.tensorboard_dir)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], result.losses, rtol=1e-6)
    assert {"train/learning_rate", "train/grad_norm", "perf/tokens_per_s", "perf/model_tflops"} <= set(scalars)
    assert "perf/mfu" not in scalars


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(reference, tmp_path, caplog):
    shutil.copytree(reference["root"] / "single" / "run", tmp_path / "run")
    for file in (tmp_path / "run" / str(STEPS)).rglob("*"):
        if file.is_file() and file.stat().st_size > 0:
            file.write_bytes(b"\0" * 7)
    assert load_trained(tmp_path / "run").meta["step"] == SAVE_EVERY
    assert f"step {STEPS}" in caplog.text


def test_starting_over_a_run_directory_needs_resume(tmp_path):
    config = small_config(tmp_path, steps="1", plan="single")
    train(config)
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        train(config)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "data.seq_len=zero"], "data.seq_len must be int, got 'zero'"),
        (["--set", "optimizer.lr=1"], "unknown field optimizer; allowed:"),
        (["--plan", "nowhere.json"], "plan must be one of auto, single or an existing plan file"),
        (["--set", "dtype=int8"], "dtype must be one of float32, bfloat16, float16"),
    ],
)
def test_config_mistakes_get_one_line_and_exit_2(args, message, tmp_path):
    result = subprocess.run([JAXHET, "train", *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_bfloat16_compute_keeps_float32_master_weights_and_the_float32_loss(reference, tmp_path):
    float32 = reference["single"]
    steps = {"steps": str(STEPS), "save_every": str(SAVE_EVERY)}
    bf16 = train(small_config(tmp_path / "bf16", plan="single", dtype="bfloat16", **steps))
    # The auto plan's placement (the planner's model has no dtype, so it plans bfloat16 the same), from its file.
    assert devices_used(reference["plan"]) > 1
    bf16_plan = train(small_config(tmp_path / "bf16_auto", plan=str(reference["plan"]), dtype="bfloat16", **steps))
    assert len(bf16.losses) == len(bf16_plan.losses) == len(float32.losses) == STEPS
    assert bf16.losses != float32.losses  # the matmuls really ran in bfloat16
    np.testing.assert_allclose(bf16.losses, float32.losses, rtol=2e-2)
    np.testing.assert_allclose(bf16_plan.losses, bf16.losses, rtol=2e-2)
    for run in ("bf16", "bf16_auto"):
        trained = load_trained(tmp_path / run / "run")
        assert trained.model.config.dtype == "bfloat16"
        assert {leaf.dtype for leaf in jax.tree.leaves(llama_params(trained.model))} == {np.dtype("float32")}


def test_fine_tunes_a_local_hugging_face_checkpoint(tmp_path):
    from flax import nnx

    from jaxhet import Llama, LlamaConfig, save_pretrained

    source = tmp_path / "hf"
    hf_config = LlamaConfig.tiny(
        vocab_size=300, num_layers=2, hidden_size=64, intermediate_size=160, dtype="bfloat16", param_dtype="bfloat16"
    )
    save_pretrained(Llama(hf_config, rngs=nnx.Rngs(1)), source)  # stored in bfloat16
    result = train(small_config(tmp_path, model=str(source), steps="4", plan="single", dtype="bfloat16"))
    assert result.end_step == 4 and all(np.isfinite(result.losses))
    run = load_trained(tmp_path / "run")
    assert run.model.config.vocab_size == 300
    assert run.model.config.num_layers == 2
    # bfloat16 compute, float32 master weights, whatever the checkpoint's storage dtype.
    assert (run.model.config.dtype, run.model.config.param_dtype) == ("bfloat16", "float32")


@pytest.mark.slow
def test_fine_tunes_a_qwen3_checkpoint_with_a_plan_as_on_one_device(reference, tmp_path):
    from flax import nnx

    from jaxhet import Llama, LlamaConfig, save_pretrained

    source = tmp_path / "hf"
    hf_config = LlamaConfig.tiny(
        vocab_size=300, num_layers=2, hidden_size=64, intermediate_size=160, architecture="qwen3", qk_norm=True
    )
    save_pretrained(Llama(hf_config, rngs=nnx.Rngs(1)), source)
    single = train(small_config(tmp_path / "single", model=str(source), steps="3", plan="single"))
    # The small model's auto plan, from its file: a plan fixes layers, batch and sequence length, which this model
    # shares (its vocabulary of 300 changes the planner's cost figures, not what the plan may place).
    assert devices_used(reference["plan"]) > 1
    auto = train(small_config(tmp_path / "auto", model=str(source), steps="3", plan=str(reference["plan"])))
    # float32 on both paths; the plan only reorders sums (micro-batches, replicas, TP partial sums).
    np.testing.assert_allclose(auto.losses, single.losses, rtol=1e-5)
    run = load_trained(tmp_path / "auto" / "run")
    assert (run.model.config.architecture, run.model.config.qk_norm) == ("qwen3", True)
