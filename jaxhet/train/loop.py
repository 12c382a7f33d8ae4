"""The training loop: a model, its data, and steps (`jaxhet.train.step`) on one device or on an HSPMD plan, with
checkpoints and metrics.

Everything a run needs to continue exactly is checkpointed: parameters, optimizer state (which holds the step
count the learning-rate schedule reads) and the data iterator's position. Parameters and optimizer state are held
as a copy per device group (see `jaxhet.train.step`); checkpoints hold one copy of each leaf and do not depend on
the plan: Orbax writes each array from wherever it lives and restores it into whatever layout the resuming run (or
`load_trained`, on one device) asks for, from which every group's copy is placed.

With `data.length_buckets` each batch comes from one length bucket (`jaxhet.data.buckets`) and each bucket runs on
its own execution (with `--plan auto`, a plan made for the bucket's batch shape), all built before the first step
and kept; a plan's programs compile on its bucket's first batch. Before a batch of another bucket the state moves
into that execution's layout device to device (one copy of each leaf, placed as the new layout's copies); losses
are read back there, so each window of the metrics holds one bucket's steps.

Several processes (one per node, `meshes.distributed`) run the same loop in lockstep: process 0 makes the plan
and every process runs that plan; each builds the same batches from its own copy of the data; losses and norms
are read from each process's own shard of arrays replicated on every device; a stop request on any process stops
all of them at the same step, after a save; Orbax saves and restores with every process taking part, on one
shared directory; only process 0 writes metrics, TensorBoard events, `plan.json`, `plan.png` and `config.yaml`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import jax
from flax import nnx

from jaxhet.data import BucketedBatches, PackedBatches
from jaxhet.models import CheckpointError, Llama, LlamaConfig, pretrained_config
from jaxhet.tokenizers import Tokenizer, load_tokenizer
from jaxhet.train.checkpoints import CheckpointStore
from jaxhet.train.config import TrainConfig, check_resume, check_writable_directory
from jaxhet.train.flops import peak_flops
from jaxhet.train.meter import ThroughputMeter
from jaxhet.train.metrics import MetricsLog
from jaxhet.train.process_checkpoints import ProcessCheckpoints, gather_state, is_process_checkpointed
from jaxhet.train.step import (
    Execution,
    State,
    checkpoint_view,
    fresh_state,
    from_checkpoint,
    grouped_optimizer,
    initial_state,
    learning_rate_schedule,
    plan_execution,
    schedule_change,
    single_device_execution,
    train_step,
)
from meshes import GroupedOptimizer, HetMesh
from meshes.distributed import Runtime, any_process, broadcast_text
from meshes.transfer import host_values

log = logging.getLogger(__name__)
MASTER_DTYPE = "float32"
ONE_PROCESS = Runtime(process_id=0, num_processes=1, process_of_node=())


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a run did: per-step losses from this process, where it started and stopped, why it stopped, the model
    FLOPs it did, and their utilisation of its devices' peak over the whole run, compilation included (None on
    CPUs and emulated clusters); with `data.length_buckets`, the tokens/s of each bucket over the steps it ran
    (`ThroughputMeter.bucket_rates`)."""

    start_step: int
    end_step: int
    losses: tuple[float, ...]
    tokens: int
    seconds: float
    model_flops: float
    mfu: float | None
    interrupted: bool
    plan: str
    checkpoint_dir: Path
    tensorboard_dir: Path
    bucket_tokens_per_s: dict[int, float] = dataclasses.field(default_factory=dict)


def build_model(config: TrainConfig, vocab_size: int, key: jax.Array) -> Llama:
    """The model to train: computing in `config.dtype` over float32 master parameters (gradients and optimizer
    state are float32 too, whatever dtype a fine-tuned checkpoint was stored in). A checkpoint directory's model
    is abstract (shapes only): its parameters are read into the run's layout by `initial_state`."""
    if config.model == "tiny":
        model_config = LlamaConfig.tiny(
            vocab_size=vocab_size,
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=max(1024, config.data.longest_row),
            dtype=config.dtype,
            param_dtype=MASTER_DTYPE,
            attention_backend=config.attention_backend,
        )
        return Llama(model_config, rngs=nnx.Rngs(params=key))
    model_config = pretrained_config(
        config.model, dtype=config.dtype, param_dtype=MASTER_DTYPE, attention_backend=config.attention_backend
    )
    model = nnx.eval_shape(lambda: Llama(model_config, rngs=nnx.Rngs(0)))
    if model.config.vocab_size < vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but the model {config.model} only {model.config.vocab_size}"
        )
    return model


def _plan_name(bucket: int | None) -> str:
    """The file stem of the run's plan (`plan`), or of a length bucket's (`plan-bucket<length>`)."""
    return "plan" if bucket is None else f"plan-bucket{bucket}"


def _batch_shape(config: TrainConfig, bucket: int | None) -> tuple[int, int]:
    """(rows, seq_len) of the run's batches, or of a length bucket's."""
    if bucket is None:
        return config.data.batch_size, config.data.seq_len
    return config.data.bucket_rows(bucket), bucket


def _resolve_plan(
    config: TrainConfig, cluster, model: Llama, directory: Path, resume: bool, runtime: Runtime, bucket: int | None
):
    """The plan to run on `cluster` (for a length bucket's batches), made by process 0 and sent to the others."""
    import planners

    text = _main_plan(config, cluster, model, directory, resume, bucket) if runtime.is_main else None
    return planners.TrainPlan.from_json(broadcast_text(_plan_name(bucket), text, runtime))


def _main_plan(config: TrainConfig, cluster, model: Llama, directory: Path, resume: bool, bucket: int | None) -> str:
    """The plan as JSON, reusing a resumed run's saved plan so it continues identically; a new one is saved and
    drawn in the run directory (one per length bucket, each for its batch shape)."""
    import planners
    from planners.picture import save_placement_png

    saved = directory / f"{_plan_name(bucket)}.json"
    if resume and saved.is_file():
        return saved.read_text()
    if config.plan != "auto":
        return Path(config.plan).read_text()
    mc = model.config
    spec = planners.ModelSpec(
        name="jaxhet-train",
        vocab_size=mc.vocab_size,
        hidden_size=mc.hidden_size,
        ffn_size=mc.intermediate_size,
        num_layers=mc.num_layers,
        num_heads=mc.num_heads,
        num_kv_heads=mc.num_kv_heads,
        tied_embeddings=mc.tie_word_embeddings,
    )
    rows, seq_len = _batch_shape(config, bucket)
    if bucket is not None:
        log.info("planning length bucket %d: batches of %d rows of %d tokens", bucket, rows, seq_len)
    workload = planners.TrainWorkload(global_batch=rows, seq_len=seq_len)
    plan = planners.plan_training(cluster, spec, workload, time_limit_s=10.0, use_all_devices=config.use_all_devices)
    directory.mkdir(parents=True, exist_ok=True)
    saved.write_text(plan.to_json())
    save_placement_png(plan, cluster, directory / f"{_plan_name(bucket)}.png")
    return saved.read_text()


def _execution(
    config: TrainConfig, model: Llama, directory: Path, resume: bool, runtime: Runtime, bucket: int | None = None
) -> Execution:
    """One device for `--plan single`; otherwise the HSPMD executor of the plan `config` asks for (for a length
    bucket's batches)."""
    if config.plan == "single":
        if runtime.multi_process:
            raise ValueError("--plan single trains on one device of one process; with several processes use a plan")
        return single_device_execution(model)
    import planners

    cluster = planners.ClusterSpec.load(config.cluster)
    plan = _resolve_plan(config, cluster, model, directory, resume, runtime, bucket)
    return plan_execution(model, plan, HetMesh.from_cluster(cluster))


class _Executions:
    """The execution and optimizer of each length bucket (None: the run's one batch shape), built once and kept, so
    that a plan's programs (compiled on its first batch) compile once however often the run switches back to it."""

    def __init__(self, config: TrainConfig, build: Callable[[int | None], Execution]):
        self._config = config
        self._build = build
        self._built: dict[int | None, tuple[Execution, GroupedOptimizer]] = {}

    def get(self, bucket: int | None) -> tuple[Execution, GroupedOptimizer]:
        if bucket not in self._built:
            execution = self._build(bucket)
            self._built[bucket] = execution, grouped_optimizer(self._config, execution)
        return self._built[bucket]

    def move(self, state: State, source: int | None, target: int | None) -> State:
        """`state`, laid out for `source`'s execution, in `target`'s layout: each leaf's first copy (`checkpoint_view`)
        placed as every copy of the new layout (`from_checkpoint`), device to device, nothing reloaded."""
        return from_checkpoint(self.get(target)[1], checkpoint_view(self.get(source)[1], state))

    def label(self, bucket: int | None) -> str:
        """What runs `bucket`'s steps, for the step log and the summary."""
        plan = self.get(bucket)[0].plan
        return "single device" if plan is None else _describe(plan)

    def plan_record(self, bucket: int | None) -> object:
        """`bucket`'s plan as plain data ("single": one device), for a checkpoint's meta record."""
        plan = self.get(bucket)[0].plan
        return "single" if plan is None else plan.to_dict()

    @property
    def built(self) -> list[int | None]:
        """The buckets whose executions exist, in the order they were first needed."""
        return list(self._built)


def _upcoming_bucket(data: PackedBatches | BucketedBatches) -> int | None:
    """The length bucket of the next batch; None without buckets."""
    return data.upcoming if isinstance(data, BucketedBatches) else None


def _drawn_buckets(data: PackedBatches | BucketedBatches) -> list[int | None]:
    """The length buckets batches can come from (those with documents); [None] without buckets."""
    return data.drawn if isinstance(data, BucketedBatches) else [None]


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps, so a stop always saves first."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _open_store(config: TrainConfig, directory: Path, resume: bool, runtime: Runtime):
    """The run directory's checkpoints, locked for this trainer; a resumed run must keep what its checkpoints'
    shapes and data position depend on. Checked before any other work: a run directory that cannot be written."""
    check_writable_directory("checkpoint_dir", directory)
    if runtime.multi_process:
        store = ProcessCheckpoints(directory, keep=config.keep, runtime=runtime)
    else:
        store = CheckpointStore(directory, keep=config.keep)
    store.lock()
    if not resume and store.steps():
        raise ValueError(f"{directory} already holds checkpoints; pass --resume, or choose another checkpoint_dir")
    return store


def _saved_config(directory: Path, config: TrainConfig) -> TrainConfig | None:
    """The config a resumed run was saved with (None for a run without one), refused if `config` changes what its
    checkpoints' shapes depend on."""
    saved = directory / "config.yaml"
    if not saved.is_file():
        return None
    saved_config = TrainConfig.load(saved)
    check_resume(saved_config, config)
    return saved_config


def _restore(store, optimizer, state, data: PackedBatches, directory: Path) -> tuple[int, object]:
    """The resumed step and state (data repositioned; every device group's copy placed from the checkpoint's one).
    When no checkpoint restores the run starts again from step 0 and `state` as given, with a warning naming the
    steps that failed (each also in a warning of its own)."""
    saved = store.steps()
    restored = store.restore_latest(jax.tree.map(_abstract, checkpoint_view(optimizer, state)))
    if restored is None:
        if saved:
            log.warning(
                "none of the checkpoints in %s restores (steps %s); starting again from step 0",
                directory,
                ", ".join(map(str, saved)),
            )
        else:
            log.warning("no checkpoint to resume in %s; starting from step 0", directory)
        return 0, state
    step, held, meta = restored
    data.restore(meta["data"])
    return step, from_checkpoint(optimizer, held)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: Callable[[dict], None] | None = None,
    runtime: Runtime = ONE_PROCESS,
) -> TrainResult:
    """Run (or continue, with `resume`) the training `config` describes; `progress` receives each step's metrics.
    With a multi-process `runtime` every process calls this alike (see the module docstring)."""
    directory = Path(config.checkpoint_dir)
    store = _open_store(config, directory, resume, runtime)
    try:
        result = _train(config, store, directory, resume, progress, runtime)
    except BaseException:
        with contextlib.suppress(CheckpointError):  # the error on its way out is the one to report
            store.close()
        raise
    store.close()
    return result


def _train(config: TrainConfig, store, directory: Path, resume: bool, progress, runtime: Runtime) -> TrainResult:
    saved_config = _saved_config(directory, config) if resume else None
    data = PackedBatches(config.data) if config.data.length_buckets is None else BucketedBatches(config.data)
    model = build_model(config, data.vocab_size, jax.random.key(config.seed))
    executions = _Executions(config, lambda b: _execution(config, model, directory, resume, runtime, b))
    for drawn in _drawn_buckets(data):  # every bucket planned before the first step: one the planner cannot place
        executions.get(drawn)  # fails now, not when its first batch comes
    bucket = _upcoming_bucket(data)
    execution, optimizer = executions.get(bucket)
    state = fresh_state(config, model, execution, optimizer)
    start_step = 0
    if resume:
        start_step, state = _restore(store, optimizer, state, data, directory)
        note = saved_config and schedule_change(saved_config, config, start_step)
        if note and runtime.is_main:
            log.warning("%s", note)
    if runtime.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.yaml").write_text(config.to_yaml())
    schedule = learning_rate_schedule(config)
    num_params = sum(leaf.size for leaf in jax.tree.leaves(checkpoint_view(optimizer, state)["params"]))
    meter = ThroughputMeter(model.config, num_params, peak_flops(execution.devices))

    losses: list[float] = []
    pending: list[_Dispatched] = []
    step = start_step
    stopping = False
    with _StopRequest() as stop, MetricsLog(directory, start_step, writer=runtime.is_main) as metrics:
        while step < config.steps and not stopping:
            if _upcoming_bucket(data) != bucket:
                state = executions.move(state, bucket, _upcoming_bucket(data))
                bucket = _upcoming_bucket(data)
                execution, optimizer = executions.get(bucket)
            batch = next(data)
            state, loss, grad_norm = train_step(execution, optimizer, state, batch)
            step += 1
            pending.append(_Dispatched(step, loss, grad_norm, meter.count(batch), bucket))
            switching = _upcoming_bucket(data) != bucket
            if not (switching or _window_ends(step, config, stop.requested, runtime)):
                continue
            for record in _read_back(pending, meter, schedule, executions):
                losses.append(record["loss"])
                metrics.write(record)
                if progress is not None:
                    progress(record)
            pending = []
            stopping = any_process(f"stop/{step}", stop.requested, runtime)
            if step % config.save_every == 0 or step == config.steps or stopping:
                metrics.flush()
                meta = {"step": step, "data": data.state(), "plan": _plan_record(config, executions)}
                store.save(step, checkpoint_view(optimizer, state), meta)
    return TrainResult(
        start_step=start_step,
        end_step=step,
        losses=tuple(losses),
        tokens=meter.tokens,
        seconds=meter.seconds,
        model_flops=meter.model_flops,
        mfu=meter.mfu,
        interrupted=step < config.steps,
        plan=_summary(config, executions),
        checkpoint_dir=directory,
        tensorboard_dir=metrics.tensorboard_dir,
        bucket_tokens_per_s=meter.bucket_rates(),
    )


def _plan_record(config: TrainConfig, executions: _Executions) -> object:
    """A checkpoint's record of what ran: the plan ("single": one device), or with length buckets each bucket's
    so far, by row length."""
    if config.data.length_buckets is None:
        return executions.plan_record(None)
    return {str(b): executions.plan_record(b) for b in sorted(executions.built)}


def _summary(config: TrainConfig, executions: _Executions) -> str:
    """What ran the run's steps: the plan, or with length buckets each bucket's so far."""
    if config.data.length_buckets is None:
        return executions.label(None)
    return "; ".join(f"bucket {b}: {executions.label(b)}" for b in sorted(executions.built))


@dataclasses.dataclass(frozen=True)
class _Dispatched:
    """A step dispatched but not yet read back: its loss and gradient norm still on the devices."""

    step: int
    loss: jax.Array
    grad_norm: jax.Array
    counted: tuple[int, float]
    bucket: int | None


def _window_ends(step: int, config: TrainConfig, stop_requested: bool, runtime: Runtime) -> bool:
    """Whether the loop reads its dispatched steps back after `step`: every `log_every` steps, before a save, at
    the end, and (in one process) as soon as a stop is requested. Processes must agree on it without talking, so
    a multi-process run sees a stop request at the next of the other points."""
    return (
        step % config.log_every == 0
        or step % config.save_every == 0
        or step == config.steps
        or (stop_requested and not runtime.multi_process)
    )


def _read_back(pending: list[_Dispatched], meter: ThroughputMeter, schedule, executions: _Executions) -> list[dict]:
    """The metrics records of the `pending` steps (all of one length bucket: a window ends where the bucket
    changes), their losses and norms read back together; with buckets, each names its bucket and plan."""
    values = host_values([x for d in pending for x in (d.loss, d.grad_norm)])
    bucket = pending[0].bucket
    throughput = meter.records([d.counted for d in pending], bucket)
    ran = {} if bucket is None else {"bucket": bucket, "plan": executions.label(bucket)}
    return [
        {
            "step": d.step,
            "loss": float(loss),
            "lr": float(schedule(d.step - 1)),
            "grad_norm": float(norm),
            **rates,
            **ran,
        }
        for d, loss, norm, rates in zip(pending, values[::2], values[1::2], throughput, strict=True)
    ]


def _abstract(x: jax.Array) -> jax.ShapeDtypeStruct:
    """Shape, dtype and placement of an array: what Orbax restores into."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _describe(plan) -> str:
    """The plan in one line: per replica its stages (GPU kind x devices: layers), micro-batches and, where the
    sequence is split, its context-parallel degree."""
    parts = []
    for replica in plan.replicas:
        stages = "+".join(f"{s.kind}x{len(s.devices)}:L{s.layers[0]}-{s.layers[1] - 1}" for s in replica.stages)
        context = f" cp {replica.cp}" if replica.cp > 1 else ""
        parts.append(f"[{stages}] mb {replica.num_microbatches}x{replica.microbatch_size}{context}")
    return f"{len(plan.replicas)} replica(s): " + ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A `jaxhet train` run directory's newest checkpoint, ready to generate from or serve."""

    model: Llama
    tokenizer: Tokenizer
    meta: dict
    config: TrainConfig


def load_trained(directory: str | Path) -> TrainedRun:
    """The model of the newest restorable checkpoint in `directory`, with its tokenizer and meta record."""
    directory = Path(directory)
    if not (directory / "config.yaml").is_file():
        raise FileNotFoundError(f"{directory} is not a jaxhet train run directory (no config.yaml)")
    config = TrainConfig.load(directory / "config.yaml")
    tokenizer = load_tokenizer(config.data.tokenizer)
    model = build_model(config, tokenizer.vocab_size, jax.random.key(config.seed))
    optimizer, state = initial_state(config, model, single_device_execution(model))
    abstract = jax.tree.map(_abstract, checkpoint_view(optimizer, state))
    if is_process_checkpointed(directory):
        restored = gather_state(directory, abstract)
    else:
        restored = CheckpointStore(directory, keep=config.keep).restore_latest(abstract, move_aside=False)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    _, state, meta = restored
    graphdef, model_state = nnx.split(model)
    model_state.replace_by_pure_dict(state["params"])
    return TrainedRun(nnx.merge(graphdef, model_state), tokenizer, meta, config)
