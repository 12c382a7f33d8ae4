"""One process of a multi-process HSPMD step: run a plan's step, compare every shard this process holds with the
same computation on one device, and write what was checked as JSON.

    python hspmd_step.py PROCESS_ID NUM_PROCESSES PORT CASE OUT_JSON
"""

from __future__ import annotations

import json
import sys
import time

from planners import Replica, Stage, TrainPlan
from planners.cluster import ClusterSpec

SEQ = 10
CLUSTERS = {
    2: {
        "name": "two_nodes",
        "nodes": [{"name": "h100", "gpu": "H100", "count": 4}, {"name": "l4", "gpu": "L4", "count": 4}],
    },
    4: {
        "name": "four_nodes",
        "nodes": [
            {"name": "a100-0", "gpu": "A100-80GB", "count": 2},
            {"name": "a100-1", "gpu": "A100-80GB", "count": 2},
            {"name": "l4-0", "gpu": "L4", "count": 2},
            {"name": "l4-1", "gpu": "L4", "count": 2},
        ],
    },
}


def stage(kinds, devices, layers, tp=None, compress="none", zero=0):
    return Stage(tuple(devices), kinds[devices[0]], tp or len(devices), tuple(layers), compress=compress, zero=zero)


def plan_of(kinds, replicas) -> TrainPlan:
    """A plan of a 4-layer model over `replicas`, its global batch their batch shares."""
    return TrainPlan(tuple(replicas), 4, sum(r.batch_share for r in replicas), SEQ, device_kinds=kinds)


def plans(kinds) -> dict[str, tuple[dict, TrainPlan]]:
    """Per case: model config overrides and the plan (stage edges and replicas crossing processes)."""

    plan = lambda replicas: plan_of(kinds, replicas)  # noqa: E731
    s = lambda *a, **k: stage(kinds, *a, **k)  # noqa: E731
    return {
        "tp4_feeds_tp2_beside_dp": (
            {"num_kv_heads": 4},
            plan(
                [
                    Replica((s([0, 1, 2, 3], (0, 2)), s([4, 5], (2, 4))), 2, 1),
                    Replica((s([6], (0, 4)),), 1, 2),
                    Replica((s([7], (0, 4)),), 1, 1),
                ]
            ),
        ),
        # ZeRO-1 on every stage: in the switching case the moments are split across the replicas, which sit on
        # both processes (the single-step case does not reach the optimizer).
        "cp2_beside_pipelines_across_processes": (
            {},
            plan(
                [
                    Replica((s([4, 5], (0, 4), tp=1, zero=1),), 2, 1, cp=2),
                    Replica((s([0, 1], (0, 2), zero=1), s([6], (2, 4), zero=1)), 2, 1),
                    Replica((s([2], (0, 1), zero=1), s([7], (1, 4), zero=1)), 1, 1),
                ]
            ),
        ),
        "int4_hadamard_edge_across_processes": (
            {"num_kv_heads": 4},
            plan([Replica((s([0, 1, 2, 3], (0, 2), compress="int4_hadamard"), s([4, 5], (2, 4))), 2, 1)]),
        ),
        "four_nodes_tp2_pipeline_cp2_dp": (
            {},
            plan(
                [
                    Replica((s([0, 1], (0, 2)), s([2, 3], (2, 4))), 2, 1),
                    Replica((s([4, 5], (0, 4), tp=1),), 1, 2, cp=2),
                    Replica((s([6], (0, 4)),), 1, 1),
                    Replica((s([7], (0, 4)),), 1, 1),
                ]
            ),
        ),
    }


def main(process_id: int, num_processes: int, port: int, cases: list[str], out: str) -> None:
    from meshes.distributed import Launch, start

    cluster = ClusterSpec.from_dict(CLUSTERS[num_processes])
    start(cluster, Launch(f"127.0.0.1:{port}", num_processes, process_id))
    checks = {
        "switch": check_switching,
        "asymmetric_dp": check_asymmetric_dp,
        "elastic": check_elastic,
        "int4_hadamard_edge_across_processes": check_compressed,
    }
    compiling = compile_clock()
    results = {}
    for name in cases:
        began, compiled = time.perf_counter(), compiling()
        results[name] = checks.get(name, check)(cluster, name)
        took = time.perf_counter() - began
        print(f"case {name} checked in {took:.1f} s, {compiling() - compiled:.1f} s of it compiling", flush=True)
    with open(out, "w") as f:
        json.dump(results, f)
    import jax

    jax.distributed.shutdown()


def compile_clock():
    """A function returning the seconds this process has spent in XLA's compiler so far (the log says how much of
    each case is compiling, the part a persistent compilation cache saves)."""
    import jax

    total = [0.0]

    def listen(event: str, seconds: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            total[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    return lambda: total[0]


def model_and_batch(overrides: dict, rows: int, seed: int = 1):
    import jax
    from flax import nnx

    from jaxhet import Llama, LlamaConfig
    from jaxhet.parallel import llama_params

    fields = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2)
    model = Llama(LlamaConfig(**{**fields, **overrides}), rngs=nnx.Rngs(0))
    return model, jax.device_get(llama_params(model)), make_batch(rows, model.config.vocab_size, seed)


def make_batch(rows: int, vocab: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, SEQ + 1))
    weights = (rng.random((rows, SEQ)) > 0.15).astype(np.float32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "weights": weights}


_REFERENCE_STEPS: dict = {}


def one_device(model):
    """The reference: jitted loss and gradients of the whole model on this process's first device (compiled once
    per model config, for every case that uses the config)."""
    import jax
    import jax.numpy as jnp

    from jaxhet.parallel import llama_loss_sum

    if model.config not in _REFERENCE_STEPS:
        loss_sum = llama_loss_sum(model)
        _REFERENCE_STEPS[model.config] = jax.jit(
            jax.value_and_grad(lambda p, b: loss_sum(p, b) / jnp.sum(b["weights"]))
        )
    step = _REFERENCE_STEPS[model.config]
    return lambda params, batch: jax.device_get(step(*jax.device_put((params, batch), jax.local_devices()[0])))


_EXECUTORS: dict = {}


def executor(cluster: ClusterSpec, plan: TrainPlan, config):
    """The `PlanExecutor` of `plan` for a model config, shared by the cases that run the same plan and config, so
    that their programs are compiled once; its transfer log starts empty for each case."""
    from jaxhet.parallel import StagedLlama
    from meshes import PlanExecutor

    key = (plan, config)
    if key not in _EXECUTORS:
        _EXECUTORS[key] = PlanExecutor(plan, hetmesh(cluster), StagedLlama(config))
    _EXECUTORS[key].transfers.log.reset()
    return _EXECUTORS[key]


_HETMESHES: dict = {}


def hetmesh(cluster: ClusterSpec):
    """One `HetMesh` per cluster and process, for every executor of every case."""
    from meshes import HetMesh

    if cluster.name not in _HETMESHES:
        _HETMESHES[cluster.name] = HetMesh.from_cluster(cluster)
    return _HETMESHES[cluster.name]


def compare_shards(tree, expected) -> tuple[float, list]:
    """Worst relative error of every shard of `tree` this process holds against the host tree `expected`."""
    return compare_copies([tree], expected)


def compare_copies(copies: list, expected) -> tuple[float, list]:
    """Worst relative error of every shard this process holds of every copy in `copies` (trees like `expected`,
    None where a device group holds nothing) against the host tree `expected`; and [leaf, device] per shard."""
    import jax
    import numpy as np

    wanted = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(expected)}
    worst, shards = 0.0, []
    for copy in copies:
        for path, leaf in jax.tree_util.tree_leaves_with_path(copy):
            name = jax.tree_util.keystr(path)
            want = wanted[name]
            scale = max(float(np.max(np.abs(want))), 1e-12)
            for shard in leaf.addressable_shards:
                error = float(np.max(np.abs(np.asarray(shard.data) - want[shard.index]))) / scale
                worst = max(worst, error)
                shards.append([name, shard.device.id])
    return worst, shards


def relative(a, b) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


def check(cluster: ClusterSpec, name: str) -> dict:
    import jax

    from meshes.transfer import host_value

    overrides, plan = plans(tuple(d.kind for d in cluster.devices))[name]
    model, params, batch = model_and_batch(overrides, plan.global_batch)
    expected_loss, expected_grads = one_device(model)(params, batch)
    run = executor(cluster, plan, model.config)
    loss, grads = run.value_and_grad(run.place(params), batch)
    worst, shards = compare_copies(grads, expected_grads)
    return {
        "loss_error": relative(host_value(loss), expected_loss),
        "grad_error": worst,
        "shards": shards,
        "leaves": len(jax.tree.leaves(expected_grads)),
        "bytes_between_processes": run.transfers.log.between_processes,
    }


def check_compressed(cluster: ClusterSpec, name: str) -> dict:
    """A plan whose stage edge crosses processes in a compressed form: its loss against one device (it differs by
    the quantization error), and the bytes that crossed processes in the step against what the plan charges."""
    import jax
    import numpy as np

    from meshes.transfer import host_value
    from planners.model import ModelSpec
    from planners.traffic import step_traffic

    overrides, plan = plans(tuple(d.kind for d in cluster.devices))[name]
    model, params, batch = model_and_batch(overrides, plan.global_batch)
    expected_loss, _ = one_device(model)(params, batch)
    run = executor(cluster, plan, model.config)
    copies = run.place(params)
    run.transfers.log.reset()
    loss, grads = run.value_and_grad(copies, batch)
    spec = ModelSpec.from_hf_config(model.config.to_hf_dict(), name="test")
    shards = [np.asarray(s.data) for leaf in jax.tree.leaves(grads) for s in leaf.addressable_shards]
    return {
        "loss_error": relative(host_value(loss), expected_loss),
        "finite_local_grads": bool(shards) and all(np.isfinite(x).all() for x in shards),
        "bytes_between_processes": run.transfers.log.between_processes,
        "charged_between_nodes": step_traffic(plan, cluster, spec, act_bytes=4, grad_bytes=4).between_nodes,
    }


def reference_steps(model, params, rows: int, steps: int, optimizer) -> tuple[list[float], dict]:
    """The same AdamW steps (clipped at norm 1) on one device: the losses and the final parameters. Computed before
    the plan's steps, so no process's device runs other work between the programs every process runs in step."""
    import jax
    import optax

    reference = one_device(model)
    update = jax.jit(optimizer.update)
    host_params, host_state, losses = params, jax.device_get(optimizer.init(params)), []
    for step in range(steps):
        loss, grads = reference(host_params, make_batch(rows, model.config.vocab_size, 10 + step))
        factor = min(1.0, 1.0 / float(optax.global_norm(grads)))
        clipped = jax.tree.map(lambda g, f=factor: g * f, grads)
        updates, host_state = jax.device_get(update(clipped, host_state, host_params))
        host_params = jax.device_get(optax.apply_updates(host_params, updates))
        losses.append(float(loss))
    return losses, host_params


def adamw_steps(model, params, chosen: list, failures: dict | None = None) -> tuple[list[float], list, dict, int]:
    """AdamW steps, step i through executor `chosen[i]`, against the same steps on one device. Consecutive steps of
    one executor carry its copies (every replica's own state); at a change of executor, one copy of each leaf is
    read from the replicas that survived and placed into the next executor's copies, across processes. `failures`
    maps a step to devices lost before it (their buffers deleted). Returns the loss errors, the final parameter
    copies, the reference's parameters, and how many buffers this process lost."""
    import jax
    import optax
    from failures import lose_devices  # this script's folder is its first import path

    from meshes import GroupedOptimizer
    from meshes.replicas import first_copies
    from meshes.transfer import host_value

    optimizer = optax.adamw(3e-3)
    expected, host_params = reference_steps(model, params, chosen[0].plan.global_batch, len(chosen), optimizer)
    grouped = {
        id(ex): GroupedOptimizer(
            optimizer,
            1.0,
            ex.copy_shardings(params),
            ex.transfers,
            moment_shardings=ex.moment_shardings(params),
            split_across=ex.split_across(),
        )
        for ex in chosen
    }
    view, view_state = params, jax.device_get(optimizer.init(params))
    loss_errors, deleted, lost, running = [], 0, set(), None
    copies: list = []
    states: list = []
    for step, executor in enumerate(chosen):
        if step in (failures or {}):
            deleted += lose_devices(failures[step])
            lost = {d.id for d in failures[step]}
        opt = grouped[id(executor)]
        if running is not executor:
            if running is not None:
                whole = [r for r, rep in enumerate(running.plan.replicas) if not lost & set(rep.devices)]
                among = running.groups_of(whole)
                view, view_state = first_copies(copies, among), grouped[id(running)].view_state(states, among)
            copies, states, running = opt.place(view), opt.place_state(view_state), executor
        batch = make_batch(executor.plan.global_batch, model.config.vocab_size, 10 + step)
        loss, grads = executor.value_and_grad(copies, batch, summed=False)
        copies, states, _ = opt.step(copies, grads, states, summed=False)
        loss_errors.append(relative(host_value(loss), expected[step]))
    return loss_errors, copies, host_params, deleted


def steps_result(loss_errors: list[float], copies, host_params, deleted: int, executors) -> dict:
    import jax

    worst, shards = compare_copies(copies, host_params)
    return {
        "loss_error": max(loss_errors),
        "grad_error": worst,
        "shards": shards,
        "leaves": len(jax.tree.leaves(host_params)),
        "bytes_between_processes": sum(ex.transfers.log.between_processes for ex in executors),
        "deleted_on_failed_devices": deleted,
    }


def check_switching(cluster: ClusterSpec, name: str) -> dict:
    """AdamW steps alternating between two plans (parameters and optimizer state resharded between their copies,
    across processes) against the same steps on one device: losses and final parameters."""
    named = plans(tuple(d.kind for d in cluster.devices))
    chosen = [named["tp4_feeds_tp2_beside_dp"][1], named["cp2_beside_pipelines_across_processes"][1]]
    model, params, _ = model_and_batch({"num_kv_heads": 4}, chosen[0].global_batch)
    executors = [executor(cluster, p, model.config) for p in chosen]
    return steps_result(*adamw_steps(model, params, [executors[step % 2] for step in range(4)]), executors)


def check_elastic(cluster: ClusterSpec, name: str) -> dict:
    """Devices 2 and 3 (process 0's half of replica 0) fail after three steps: every buffer on them is deleted, and
    the run continues on a plan over the survivors of both processes, its state read from the replicas that
    survived whole (replicas 1 and 2, on process 1) and placed onto both processes; the trajectory equals six
    steps on one device."""
    from jaxhet.parallel import StagedLlama
    from meshes import HetMesh, PlanExecutor

    kinds = tuple(d.kind for d in cluster.devices)
    s = lambda *a, **k: stage(kinds, *a, **k)  # noqa: E731
    before = (
        Replica((s([0, 1], (0, 2)), s([2, 3], (2, 4))), 2, 1),
        Replica((s([4, 5], (0, 4)),), 1, 1),
        Replica((s([6], (0, 2)), s([7], (2, 4))), 1, 1),
    )
    after = (Replica((s([0, 1], (0, 4)),), 2, 1), Replica((s([4, 5], (0, 2)), s([6, 7], (2, 4))), 1, 2))
    model, params, _ = model_and_batch({}, 4)
    hetmesh = HetMesh.from_cluster(cluster)
    executors = [PlanExecutor(plan_of(kinds, r), hetmesh, StagedLlama(model.config)) for r in (before, after)]
    failures = {3: {hetmesh.devices[2], hetmesh.devices[3]}}
    return steps_result(*adamw_steps(model, params, [executors[0]] * 3 + [executors[1]] * 3, failures), executors)


def check_asymmetric_dp(cluster: ClusterSpec, name: str) -> dict:
    """One SPMD program with per-device trip counts over devices of both processes."""
    import jax

    from jaxhet.parallel import llama_loss_sum
    from meshes import AsymmetricDataParallel, HetMesh

    hetmesh = HetMesh.from_cluster(cluster)
    counts = (2, 1, 3)
    model, params, batch = model_and_batch({}, 2 * sum(counts))
    devices = [hetmesh.devices[i] for i in (0, 4, 6)]
    dp = AsymmetricDataParallel(llama_loss_sum(model), devices, counts, microbatch_size=2)
    loss, grads = dp.value_and_grad(params, batch)
    expected_loss, expected_grads = one_device(model)(params, batch)
    worst, shards = compare_shards(grads, expected_grads)
    return {
        "loss_error": relative(loss.addressable_shards[0].data, expected_loss),
        "grad_error": worst,
        "shards": shards,
        "leaves": len(jax.tree.leaves(grads)),
        "processes": sorted({d.process_index for d in loss.sharding.device_set}),
    }


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(","), sys.argv[5])
