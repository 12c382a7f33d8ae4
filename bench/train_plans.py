"""The rows of `bench/train.py` that run jaxhet's training step on a plan: recompute, ZeRO-1 and ZeRO-3 (FSDP over
the stage's CP devices), each against all off.

Every row trains the same model (same initial parameters, same batch) through `jaxhet.train.step` (`plan_execution`,
`initial_state`, `train_step`, the loop of `jaxhet train --plan FILE`) on one plan: one replica whose single stage
spans 4 devices as TP 2 x CP 2, so that ZeRO-1 has replicated moments to split. The rows differ only in the stage's
`recompute` and `zero`. They run on emulated CPU devices (`jax.devices("cpu")`, which `bench/train.py` sizes with
`--xla_force_host_platform_device_count` before JAX starts), also on a GPU machine, so their times measure the
runtime on CPU, not a GPU.

Besides step time, each row reports:
- optimizer-state bytes per device: the bytes of the optimizer's moment shards on each device, counted from the
  arrays' addressable shards (`Execution.moment_shardings` places them; step counts and other scalars excluded);
  parameter bytes per device likewise (ZeRO-3 splits them);
- the stage's compiled memory (`memory_analysis()` of the executor's forward and backward programs of one
  micro-batch): the forward's output bytes are the residuals the stage holds between its forward and backward
  passes, which recompute cuts; the backward's temp bytes are given as compiled. XLA's CPU compiler schedules the
  recomputation of all blocks up front in the backward program, so there those temp bytes grow by about what the
  residuals lost (see tests/test_recompute.py); GPU compilers do not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxhet import Llama, LlamaConfig
from jaxhet.parallel import StagedLlama, llama_params
from jaxhet.train import TrainConfig
from jaxhet.train.step import initial_state, plan_execution, train_step
from meshes import HetMesh, PlanExecutor
from meshes.transfer import put_host
from planners import Replica, Stage, TrainPlan
from planners.cluster import ClusterSpec

DEVICES = 4
TP = 2
CP = DEVICES // TP
KIND = "H100"  # the label of the emulated devices; the cost model is not involved
VARIANTS = (  # (name, recompute, zero); each "on" row is compared with the first row
    ("baseline", False, 0),
    ("recompute", True, 0),
    ("zero1", False, 1),
    ("zero3", False, 3),
)

Step = Callable[[], tuple[jax.Array, Any]]


def plan_of(config: LlamaConfig, batch: int, seq: int, *, recompute: bool, zero: int) -> TrainPlan:
    """One replica, one TP x CP stage over devices 0..3 holding every block."""
    stage = Stage(tuple(range(DEVICES)), KIND, TP, (0, config.num_layers), recompute=recompute, zero=zero)
    replica = Replica((stage,), 1, batch, cp=CP)
    return TrainPlan((replica,), config.num_layers, batch, seq, device_kinds=(KIND,) * DEVICES)


def hetmesh(devices: list[jax.Device]) -> HetMesh:
    cluster = ClusterSpec.from_dict({"name": "bench", "nodes": [{"name": "n0", "gpu": KIND, "count": DEVICES}]})
    return HetMesh.from_cluster(cluster, devices)


def moment_bytes_per_device(tree: Any) -> dict[str, int]:
    """Bytes of the non-scalar leaves of `tree` (optimizer state, or parameters) on each device, from the arrays'
    addressable shards."""
    held: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and leaf.ndim > 0:
            for shard in leaf.addressable_shards:
                held[str(shard.device)] = held.get(str(shard.device), 0) + shard.data.nbytes
    return held


def stage_memory(model: Llama, plan: TrainPlan, devices: list[jax.Device], batch: dict) -> dict[str, int]:
    """Compiled memory of the plan's one stage for its one micro-batch: the forward's output bytes (residuals
    held for the backward pass, plus the loss) and temp bytes, and the backward's temp bytes."""
    executor = PlanExecutor(plan, hetmesh(devices), StagedLlama(model.config))
    (runtime,) = executor.runtimes
    params = executor.model.stage_params(executor.place(jax.device_get(llama_params(model)))[0], runtime.spec)
    placed = {k: put_host(v, runtime.sequence) for k, v in batch.items()}
    forward = runtime.forward.lower(params, None, placed).compile()
    out, vjp_fn = forward(params, None, placed)
    backward = runtime.backward.lower(vjp_fn, jnp.ones_like(out)).compile()
    fwd, bwd = forward.memory_analysis(), backward.memory_analysis()
    return dict(
        forward_output_bytes=fwd.output_size_in_bytes,
        forward_temp_bytes=fwd.temp_size_in_bytes,
        backward_temp_bytes=bwd.temp_size_in_bytes,
    )


def plan_step(
    model: Llama, train_config: TrainConfig, plan: TrainPlan, devices: list, batch: dict
) -> tuple[Step, tuple[dict[str, int], dict[str, int]]]:
    """jaxhet's step on `plan`, as `jaxhet train --plan FILE` runs it, and its optimizer-state and parameter bytes
    per device (counted before the first step)."""
    execution = plan_execution(model, plan, hetmesh(devices))
    optimizer, state = initial_state(train_config, model, execution)
    carried = [state]

    def run() -> tuple[jax.Array, Any]:
        carried[0], loss, _ = train_step(execution, optimizer, carried[0], batch)
        return loss, carried

    return run, (moment_bytes_per_device(state["opt_state"]), moment_bytes_per_device(state["params"]))


def plan_rows(
    config: LlamaConfig, train_config: TrainConfig, ids: np.ndarray, measure: Callable[..., tuple[float, float]]
) -> tuple[str, list[dict]]:
    """(the devices in words, one row per variant) for the batch of token rows `ids` ([batch, seq + 1]);
    `measure(build)` times a step builder as `bench/train.py` does."""
    devices = jax.devices("cpu")[:DEVICES]
    if len(devices) < DEVICES:
        raise SystemExit(f"the plan rows need {DEVICES} CPU devices, found {len(devices)}")
    batch_rows, seq = ids.shape[0], ids.shape[1] - 1
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((batch_rows, seq), np.float32)}
    config = dataclasses.replace(config, attention_backend="xla")
    rows = []
    for name, recompute, zero in VARIANTS:
        plan = plan_of(config, batch_rows, seq, recompute=recompute, zero=zero)
        counted: list[tuple[dict[str, int], dict[str, int]]] = []

        def build(plan=plan, counted=counted) -> Step:
            run, held = plan_step(Llama(config, rngs=nnx.Rngs(0)), train_config, plan, devices, batch)
            counted.append(held)
            return run

        seconds, loss = measure(build)
        ((held, params),) = counted
        row = dict(variant=name, recompute=recompute, zero=zero, step_ms=seconds * 1e3, last_loss=loss)
        row.update(opt_state_bytes_max_per_device=max(held.values()), opt_state_bytes_per_device=held)
        row.update(param_bytes_max_per_device=max(params.values()))
        row.update(stage_memory(Llama(config, rngs=nnx.Rngs(0)), plan, devices, batch))
        rows.append(row)
    for row in rows:
        base = rows[0]
        row["step_vs_baseline"] = row["step_ms"] / base["step_ms"]
        row["opt_state_vs_baseline"] = row["opt_state_bytes_max_per_device"] / base["opt_state_bytes_max_per_device"]
        row["params_vs_baseline"] = row["param_bytes_max_per_device"] / base["param_bytes_max_per_device"]
        row["residuals_vs_baseline"] = row["forward_output_bytes"] / base["forward_output_bytes"]
        row["backward_temp_vs_baseline"] = row["backward_temp_bytes"] / base["backward_temp_bytes"]
    return f"{DEVICES} x {devices[0].device_kind} ({devices[0].platform}), TP {TP} x CP {CP}", rows


def print_table(where: str, rows: list[dict]) -> None:
    print(f"jaxhet step on a plan, {where}; ratios against the baseline row (recompute off, zero 0)")
    header = ("variant", "ms/step", "x", "opt B/dev", "x", "param x", "residual B", "x", "bwd temp B", "x", "loss")
    print("{:10} {:>9} {:>6} {:>11} {:>6} {:>7} {:>11} {:>6} {:>11} {:>6} {:>7}".format(*header))
    for r in rows:
        print(
            f"{r['variant']:10} {r['step_ms']:9.2f} {r['step_vs_baseline']:6.2f} "
            f"{r['opt_state_bytes_max_per_device']:11,} {r['opt_state_vs_baseline']:6.2f} "
            f"{r['params_vs_baseline']:7.2f} "
            f"{r['forward_output_bytes']:11,} {r['residuals_vs_baseline']:6.2f} "
            f"{r['backward_temp_bytes']:11,} {r['backward_temp_vs_baseline']:6.2f} {r['last_loss']:7.3f}"
        )
