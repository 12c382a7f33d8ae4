"""HSPMD plans on 8 emulated devices give the single-device loss and gradients (float32, relative error <= 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import planners
from jaxhet import Llama, LlamaConfig
from jaxhet.parallel import StagedLlama, llama_loss_sum, llama_params
from meshes import AsymmetricDataParallel, GroupedOptimizer, HetMesh, PlanExecutor, pipeline_steps
from meshes.replicas import first_copies
from planners import Replica, Stage, TrainPlan
from planners.cluster import ClusterSpec
from planners.cost_model import moment_splits, piece_params
from planners.traffic import step_traffic
from tests.multiprocess.failures import lose_devices

SEQ = 9
# Float32 everywhere; the plans only reorder sums (micro-batches, replicas, TP partial sums): ~1e-7 relative.
RTOL = 1e-5

CLUSTER = ClusterSpec.from_dict(
    {
        "name": "emulated",
        "nodes": [
            {"name": "h100", "gpu": "H100", "count": 4},
            {"name": "a100", "gpu": "A100-80GB", "count": 2},
            {"name": "l4", "gpu": "L4", "count": 2},
        ],
    }
)
KINDS = tuple(d.kind for d in CLUSTER.devices)


def stage(devices, layers, recompute=False, tp=None, zero=0, compress="none"):
    return Stage(
        tuple(devices), KINDS[devices[0]], tp or len(devices), tuple(layers), recompute, zero=zero, compress=compress
    )


def plan_of(replicas, num_layers, schedule="1f1b", seq=SEQ):
    global_batch = sum(r.batch_share for r in replicas)
    return TrainPlan(tuple(replicas), num_layers, global_batch, seq, device_kinds=KINDS, schedule=schedule)


def config(num_layers=4, **overrides):
    fields = dict(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


PLANS = {
    "dp_shares_5_2_1": (
        config(),
        plan_of(
            [
                Replica((stage([0], (0, 4)),), 5, 1),
                Replica((stage([4], (0, 4)),), 1, 2),
                Replica((stage([6], (0, 4)),), 1, 1),
            ],
            4,
        ),
    ),
    "tp_4_2_1_1": (
        config(num_kv_heads=4),
        plan_of(
            [
                Replica((stage([0, 1, 2, 3], (0, 4)),), 2, 2),
                Replica((stage([4, 5], (0, 4)),), 1, 2),
                Replica((stage([6], (0, 4)),), 1, 1),
                Replica((stage([7], (0, 4)),), 1, 1),
            ],
            4,
        ),
    ),
    "pp_3_and_5_layers_on_tp4_and_tp2": (
        config(num_layers=8, num_kv_heads=4, tie_word_embeddings=False),
        plan_of([Replica((stage([0, 1, 2, 3], (0, 3)), stage([4, 5], (3, 8))), 4, 1)], 8),
    ),
    "tp2_pp2_beside_dp": (
        config(),
        plan_of(
            [
                Replica((stage([0, 1], (0, 1)), stage([2, 3], (1, 4))), 3, 1),
                Replica((stage([4], (0, 4)),), 2, 1),
                Replica((stage([6], (0, 4)),), 1, 1),
            ],
            4,
        ),
    ),
    "hspmd_shape_dp3_depths_4_2_1": (
        config(num_layers=8),
        plan_of(
            [
                Replica((stage([0], (0, 1)), stage([1], (1, 2)), stage([2], (2, 5)), stage([3], (5, 8))), 4, 1),
                Replica((stage([4], (0, 3)), stage([5], (3, 8))), 2, 1),
                Replica((stage([6], (0, 8)),), 1, 1),
            ],
            8,
        ),
    ),
    "gpipe_untied_uneven_microbatch_sizes": (
        config(tie_word_embeddings=False),
        plan_of(
            [
                Replica((stage([0, 1], (0, 2)), stage([2], (2, 4))), 1, 3),
                Replica((stage([4], (0, 1)), stage([6, 7], (1, 4))), 5, 1),
            ],
            4,
            schedule="gpipe",
        ),
    ),
    # Qwen3's per-head q/k norms: replicated over TP, their gradients summed over the shards' heads.
    "qwen3_tp2_pp2_beside_tp1": (
        config(architecture="qwen3", qk_norm=True, tie_word_embeddings=False),
        plan_of(
            [
                Replica((stage([0, 1], (0, 1)), stage([2, 3], (1, 4))), 3, 1),
                Replica((stage([6], (0, 4)),), 1, 1),
            ],
            4,
        ),
    ),
    "tp2_pp3_three_kinds": (
        config(num_layers=6),
        plan_of(
            [Replica((stage([0, 1], (0, 1)), stage([4, 5], (1, 3)), stage([6, 7], (3, 6))), 3, 2)],
            6,
        ),
    ),
    "mqa_tp1_pipeline_with_dp": (
        config(num_kv_heads=1),
        plan_of(
            [
                Replica((stage([0], (0, 3)), stage([1], (3, 4))), 2, 2),
                Replica((stage([2], (0, 2)), stage([3], (2, 4))), 3, 1),
            ],
            4,
        ),
    ),
    # Context parallelism: sequences split over 2 or 3 devices, with TP inside, in a pipeline, beside plain DP.
    "cp2_tp2_beside_cp2_pipeline_packed": (
        config(),
        plan_of(
            [
                Replica((stage([0, 1, 2, 3], (0, 4), tp=2),), 2, 1, cp=2),
                Replica((stage([4, 5], (0, 2), tp=1), stage([6, 7], (2, 4), tp=1)), 1, 2, cp=2),
            ],
            4,
            seq=10,
        ),
    ),
    # ZeRO-1: moments split over each group's devices (over CP and over TP where a leaf is replicated on them).
    "zero1_cp2_tp2_beside_tp2": (
        config(),
        plan_of(
            [
                Replica((stage([0, 1, 2, 3], (0, 4), tp=2, zero=1),), 2, 1, cp=2),
                Replica((stage([4, 5], (0, 4), zero=1),), 1, 2),
            ],
            4,
            seq=10,
        ),
    ),
    "cp3_beside_dp": (
        config(),
        plan_of([Replica((stage([0, 1, 2], (0, 4), tp=1),), 3, 1, cp=3), Replica((stage([4], (0, 4)),), 1, 2)], 4),
    ),
}


def make_batch(seed: int, rows: int, vocab: int, packed: bool, seq: int = SEQ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, seq + 1))
    batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "weights": (rng.random((rows, seq)) > 0.15).astype(np.float32),
    }
    if packed:  # three documents, the last two of them starting mid-row
        positions = np.arange(seq)
        batch["segment_ids"] = np.repeat((1 + (positions >= 4) + (positions >= 7))[None], rows, axis=0)
    return batch


def single_device_step(model: Llama):
    """The reference: jitted loss and gradient of the whole model on one device, for one batch."""
    loss_sum = llama_loss_sum(model)
    return jax.jit(jax.value_and_grad(lambda params, batch: loss_sum(params, batch) / jnp.sum(batch["weights"])))


def assert_trees_close(actual, expected):
    def relative_error(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))

    errors = jax.tree.map(relative_error, actual, expected)
    worst = max(jax.tree.leaves(errors))
    assert worst <= RTOL, f"worst relative gradient error {worst:.2e}"


@pytest.fixture(scope="module")
def hetmesh() -> HetMesh:
    return HetMesh.from_cluster(CLUSTER)


@pytest.fixture(scope="module")
def executors(hetmesh):
    """One executor per named plan, shared so that each plan's stage programs compile once per test module."""
    cache = {}

    def get(name: str) -> PlanExecutor:
        if name not in cache:
            cfg, plan = PLANS[name]
            cache[name] = PlanExecutor(plan, hetmesh, StagedLlama(cfg))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(PLANS))
def test_plan_step_equals_single_device(name, executors):
    cfg, plan = PLANS[name]
    model = Llama(cfg, rngs=nnx.Rngs(0))
    params = llama_params(model)
    packed = name.startswith("gpipe") or name.endswith("packed")
    batch = make_batch(1, plan.global_batch, cfg.vocab_size, packed=packed, seq=plan.seq_len)
    executor = executors(name)
    copies = executor.place(params)
    executor.transfers.log.reset()
    loss, grads = executor.value_and_grad(copies, batch)
    expected_loss, expected_grads = single_device_step(model)(params, batch)
    np.testing.assert_allclose(loss, expected_loss, rtol=RTOL)
    assert_copies_identical(grads)
    assert_trees_close(executor.view(grads), expected_grads)
    assert_traffic_as_planned(executor, cfg)


def assert_traffic_as_planned(executor: PlanExecutor, cfg: LlamaConfig) -> None:
    """What the executor's last step moved between groups is what its plan says it moves (float32 activations,
    packed where a stage compresses, and float32 gradients); the runtime pads each gradient buffer to whole ring
    chunks, well under 5% here."""
    model = planners.ModelSpec.from_hf_config(cfg.to_hf_dict(), name="test")
    charged = step_traffic(executor.plan, CLUSTER, model, act_bytes=4, grad_bytes=4).between_groups
    np.testing.assert_allclose(executor.transfers.log.between_groups, charged, rtol=0.05)


def test_twenty_step_loss_trajectory_matches_single_device(executors):
    cfg, plan = PLANS["hspmd_shape_dp3_depths_4_2_1"]
    model = Llama(cfg, rngs=nnx.Rngs(3))
    executor = executors("hspmd_shape_dp3_depths_4_2_1")
    # Two alternating batches: learnable, so the loss must fall, and still a different batch every step.
    batches = [make_batch(100 + step % 2, plan.global_batch, cfg.vocab_size, False) for step in range(20)]
    hspmd = train(model, [executor] * 20, batches)
    single = train(model, [None] * 20, batches)
    np.testing.assert_allclose(hspmd, single, rtol=RTOL)
    assert hspmd[-1] < 0.8 * hspmd[0]


OPTIMIZER = optax.adamw(3e-3)
OPTIMIZER_UPDATE = jax.jit(OPTIMIZER.update)


def assert_copies_identical(copies) -> None:
    """Every device group's copy of a leaf holds the same bits as the others' copies of it."""
    columns = zip(*(jax.tree.leaves(c, is_leaf=lambda x: x is None) for c in copies), strict=True)
    for column in columns:
        held = [np.asarray(x) for x in column if x is not None]
        for other in held[1:]:
            np.testing.assert_array_equal(other, held[0])


def survivors(executor: PlanExecutor, lost: list) -> list[int]:
    """The replicas of `executor`'s plan none of whose devices were lost."""
    ids = {d.id for d in lost}
    return [r for r, replica in enumerate(executor.plan.replicas) if not ids & set(replica.devices)]


def plan_optimizer(executor: PlanExecutor, params) -> GroupedOptimizer:
    """`OPTIMIZER` in the layout `executor`'s plan asks for (ZeRO where its stages say), counting its traffic in
    the executor's log."""
    return GroupedOptimizer(
        OPTIMIZER,
        None,
        executor.copy_shardings(params),
        executor.transfers,
        moment_shardings=executor.moment_shardings(params),
        split_across=executor.split_across(),
    )


def moment_bytes_by_device(states) -> dict[int, int]:
    """Bytes of optimizer moments (arrays of rank > 0; not step counts) each device holds, from the shards."""
    held: dict[int, int] = {}
    for leaf in jax.tree.leaves(states):
        if leaf.ndim > 0:
            for shard in leaf.addressable_shards:
                held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    return held


def train(model: Llama, executors: list, batches: list, failures: dict | None = None) -> list[float]:
    """AdamW steps, each through the given executor or, for None, on one device. Consecutive steps of one executor
    carry its copies (every replica's own parameters and optimizer state); at a change of executor the state is
    read from one copy of each leaf, held by replicas that survived, and placed into the next executor's copies.
    `failures` maps a step to devices lost before it: their buffers are deleted. After a plan's steps every copy
    of every leaf must be bit-identical. Returns the losses."""
    reference = single_device_step(model)
    params = llama_params(model)
    opt_state = OPTIMIZER.init(params)
    optimizers: dict[int, GroupedOptimizer] = {}
    held = None  # (executor, optimizer, parameter copies, state copies) while one executor runs consecutive steps
    lost: list = []
    losses = []
    for step, (executor, batch) in enumerate(zip(executors, batches, strict=True)):
        if step in (failures or {}):
            lost = failures[step]
            assert lose_devices(lost) > 0
        if held is not None and held[0] is not executor:
            previous, grouped, copies, states = held
            among = previous.groups_of(survivors(previous, lost))
            params, opt_state = first_copies(copies, among), grouped.view_state(states, among)
            held = None
        if executor is None:
            loss, grads = reference(params, batch)
            updates, opt_state = OPTIMIZER_UPDATE(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        else:
            grouped = optimizers.setdefault(id(executor), plan_optimizer(executor, params))
            copies, states = (grouped.place(params), grouped.place_state(opt_state)) if held is None else held[2:]
            loss, grads = executor.value_and_grad(copies, batch, summed=False)
            copies, states, _ = grouped.step(copies, grads, states, summed=False)
            assert {d.id for leaf in jax.tree.leaves(copies) for d in leaf.devices()} <= set(executor.plan.devices)
            held = (executor, grouped, copies, states)
        losses.append(float(loss))
    if held is not None:
        assert_copies_identical(held[2])
        assert_copies_identical(held[3][: len(held[1].homes)])  # the groups' states; split moments have one copy
    return losses


def test_zero1_splits_moments_across_the_replicas_holding_the_same_layers(executors):
    """Both replicas hold every layer: the moments are split across them, a quarter on each lane head (L = gcd(4,
    2) = 2 lanes: devices 0 and 2 of the CP2xTP2 group, 4 and 5 of the TP2 group), none on devices 1 and 3, one
    copy of the moments in all; the gradient reduce-scatter and parameter all-gather move the ring's bytes."""
    cfg, plan = PLANS["zero1_cp2_tp2_beside_tp2"]
    model = Llama(cfg, rngs=nnx.Rngs(4))
    executor = executors("zero1_cp2_tp2_beside_tp2")
    params = llama_params(model)
    grouped = plan_optimizer(executor, params)
    copies = grouped.place(params)
    states = grouped.init(copies)
    held = moment_bytes_by_device(states)
    whole = 2 * sum(leaf.nbytes for leaf in jax.tree.leaves(params))  # AdamW's mu and nu
    assert held.keys() == {0, 2, 4, 5}, held
    assert len(set(held.values())) == 1 and whole <= sum(held.values()) < whole + 2 * 4 * 4 * len(grouped.bundles)
    # The cost model's moment bytes on each stage's first device (the runtime pads each lane by < H elements).
    spec = planners.ModelSpec.from_hf_config(cfg.to_hf_dict(), name="test")
    for stage, splits in moment_splits(plan, spec).items():
        charged = sum(8 * piece_params(spec, piece) * share for piece, share in splits)
        first = plan.replicas[stage[0]].stages[stage[1]].devices[0]
        assert charged <= held[first] < charged + 2 * 4 * 2 * len(grouped.bundles), (stage, charged, held[first])
    batches = [make_batch(200 + step, plan.global_batch, cfg.vocab_size, False, plan.seq_len) for step in range(5)]
    executor.transfers.log.reset()
    _, grads = executor.value_and_grad(copies, batches[0], summed=False)
    grouped.step(copies, grads, states, summed=False)
    assert_traffic_as_planned(executor, cfg)
    np.testing.assert_allclose(train(model, [executor] * 5, batches), train(model, [None] * 5, batches), rtol=RTOL)


def test_zero1_inside_a_group_splits_moments_over_its_devices(executors):
    """Leaves held by one group only (a single replica) keep ZeRO-1 inside the group: each moment split further
    over the CP2xTP2 group's devices, an equal share on each."""
    cfg, plan = PLANS["zero1_cp2_tp2_beside_tp2"]
    executor = executors("zero1_cp2_tp2_beside_tp2")
    params = llama_params(Llama(cfg, rngs=nnx.Rngs(4)))
    layouts = executor.copy_shardings(params)[:1], executor.moment_shardings(params)[:1]
    grouped = GroupedOptimizer(OPTIMIZER, None, layouts[0], moment_shardings=layouts[1], split_across=[True])
    held = moment_bytes_by_device(grouped.init(grouped.place(params)))
    whole = 2 * sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    assert held == {d.id: whole // 4 for d in executor.runtimes[0].group.mesh.devices.flat}


def test_switching_strategies_per_batch_keeps_the_single_device_trajectory(executors):
    """Two compiled strategies in one job, chosen per batch (as per sequence-length bucket), parameters resharded
    from one layout to the other between steps."""
    names = ["tp2_pp2_beside_dp", "dp_shares_5_2_1"]
    cfg = PLANS[names[0]][0]
    assert all(PLANS[n][0] == cfg for n in names)
    model = Llama(cfg, rngs=nnx.Rngs(6))
    chosen = [executors(names[step % 2]) for step in range(6)]
    batches = [make_batch(200 + step, ex.plan.global_batch, cfg.vocab_size, False) for step, ex in enumerate(chosen)]
    np.testing.assert_allclose(train(model, chosen, batches), train(model, [None] * 6, batches), rtol=RTOL)


def test_resharding_round_trip_is_bit_identical_and_grads_come_back_as_copies(executors):
    first, second = executors("tp2_pp2_beside_dp"), executors("dp_shares_5_2_1")
    params = llama_params(Llama(PLANS["tp2_pp2_beside_dp"][0], rngs=nnx.Rngs(7)))
    there = first.place(params)
    back = first.place(second.view(second.place(first.view(there))))
    for copy_back, copy_there in zip(back, there, strict=True):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), copy_back, copy_there)
        assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.sharding == b.sharding, copy_back, copy_there)))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), first.view(back), params)
    shardings = first.copy_shardings(params)
    assert len(shardings) == 4  # replica 0's two stages, replica 1, replica 2
    q_kernel = shardings[0]["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert q_kernel.spec == jax.sharding.PartitionSpec(None, "tp")
    assert {d.id for d in q_kernel.device_set} == {0, 1}
    assert not jax.tree.leaves(shardings[0]["layers"][3]) and not jax.tree.leaves(shardings[1]["layers"][0])
    assert {d.id for d in shardings[1]["layers"][3]["mlp"]["down_proj"]["kernel"].device_set} == {2, 3}
    assert {d.id for d in shardings[2]["layers"][3]["mlp"]["down_proj"]["kernel"].device_set} == {4}
    _, grads = first.value_and_grad(there, make_batch(8, first.plan.global_batch, 50, False))
    for grad, placement in zip(grads, shardings, strict=True):
        assert all(jax.tree.leaves(jax.tree.map(lambda g, s: g.sharding.is_equivalent_to(s, g.ndim), grad, placement)))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,microbatches", [(1, 3), (3, 2), (4, 6)])
def test_schedules_respect_dependencies(schedule, stages, microbatches):
    steps = pipeline_steps(stages, microbatches, schedule)
    assert len(steps) == 2 * stages * microbatches
    tick_of = {(s.stage, s.kind, s.microbatch): s.tick for s in steps}
    for (s, kind, m), tick in tick_of.items():
        if kind == "F" and s > 0:
            assert tick_of[(s - 1, "F", m)] < tick
        if kind == "B":
            assert tick_of[(s, "F", m)] < tick
            if s < stages - 1:
                assert tick_of[(s + 1, "B", m)] < tick


def test_1f1b_bounds_live_activations_by_depth():
    """Under 1F1B stage s holds at most (stages - s) micro-batches' activations; GPipe holds all of them."""

    def peak_live(schedule, stage_index):
        live = peak = 0
        for step in pipeline_steps(4, 8, schedule):
            if step.stage == stage_index:
                live += 1 if step.kind == "F" else -1
                peak = max(peak, live)
        return peak

    assert [peak_live("1f1b", s) for s in range(4)] == [4, 3, 2, 1]
    assert [peak_live("gpipe", s) for s in range(4)] == [8, 8, 8, 8]


def test_plan_and_model_disagreeing_on_depth_is_named(hetmesh):
    _, plan = PLANS["dp_shares_5_2_1"]
    with pytest.raises(ValueError, match=r"plan.num_layers \(4\) differs from the model's \(6\)"):
        PlanExecutor(plan, hetmesh, StagedLlama(config(num_layers=6)))


def test_cp_degree_that_does_not_divide_the_sequence_is_named(hetmesh):
    plan = plan_of([Replica((stage([0, 1], (0, 4), tp=1),), 2, 1, cp=2)], 4)
    with pytest.raises(ValueError, match=r"replicas\[0\]\.cp \(2\) must divide the plan's seq_len \(9\)"):
        PlanExecutor(plan, hetmesh, StagedLlama(config()))


def test_tp_degree_that_does_not_divide_heads_is_named(hetmesh):
    _, plan = PLANS["tp_4_2_1_1"]
    with pytest.raises(ValueError, match=r"num_kv_heads \(2\) must be divisible by the stage's tp \(4\)"):
        PlanExecutor(plan, hetmesh, StagedLlama(config()))


@pytest.mark.parametrize(
    "counts", [(5, 2, 1), (3, 0, 1, 2, 1, 1, 4, 2)], ids=["5_2_1", "eight_devices_with_an_idle_one"]
)
def test_one_spmd_program_with_per_device_trip_counts_equals_single_device(counts, hetmesh):
    cfg = config()
    model = Llama(cfg, rngs=nnx.Rngs(4))
    params = llama_params(model)
    devices = hetmesh.devices[: len(counts)]
    dp = AsymmetricDataParallel(llama_loss_sum(model), devices, counts, microbatch_size=2)
    batch = make_batch(5, 2 * sum(counts), cfg.vocab_size, packed=True)
    loss, grads = dp.value_and_grad(params, batch)
    expected_loss, expected_grads = single_device_step(model)(params, batch)
    np.testing.assert_allclose(loss, expected_loss, rtol=RTOL)
    assert_trees_close(grads, expected_grads)


def test_asymmetric_dp_from_a_plan_of_single_devices(hetmesh):
    cfg, plan = PLANS["dp_shares_5_2_1"]
    model = Llama(cfg, rngs=nnx.Rngs(5))
    with pytest.raises(ValueError, match=r"microbatch_size values differ \(\[1, 2\]\)"):
        AsymmetricDataParallel.from_plan(plan, hetmesh, llama_loss_sum(model))
    even = plan_of([Replica((stage([0], (0, 4)),), 5, 1), Replica((stage([4], (0, 4)),), 2, 1)], 4)
    dp = AsymmetricDataParallel.from_plan(even, hetmesh, llama_loss_sum(model))
    assert dp.microbatches == (5, 2)
    batch = make_batch(6, 7, cfg.vocab_size, packed=False)
    loss, _ = dp.value_and_grad(llama_params(model), batch)
    np.testing.assert_allclose(loss, single_device_step(model)(llama_params(model), batch)[0], rtol=RTOL)


def test_elastic_drop_a_group_replan_over_survivors_and_continue(hetmesh):
    """A node fails mid-run (every buffer on it deleted), taking replica 0's last stage with it: the planner
    re-plans over the survivors and training continues from the parameters and optimizer state of the replicas
    that survived whole (replicas 1 and 2, each holding its own copy), with nothing read from the lost devices; the
    trajectory equals six steps on one device."""
    cfg = config()
    model = Llama(cfg, rngs=nnx.Rngs(8))
    spec = planners.ModelSpec.from_hf_config(cfg.to_hf_dict(), name="test")
    before = plan_of(
        [
            Replica((stage([0, 1], (0, 2)), stage([6], (2, 4))), 4, 1),
            Replica((stage([4, 5], (0, 4)),), 2, 1),
            Replica((stage([2, 3], (0, 4)),), 2, 1),
        ],
        4,
    )
    workload = planners.TrainWorkload(global_batch=8, seq_len=SEQ, recompute=False)
    options = dict(time_limit_s=5.0, num_workers=1, use_all_devices=True)
    failed = [6, 7]  # the L4 node
    after = planners.replan_training(CLUSTER, failed, spec, workload, **options)
    assert not set(failed) & set(after.devices)
    executors = [PlanExecutor(p, hetmesh, StagedLlama(cfg)) for p in (before, after)]
    chosen = [executors[0]] * 3 + [executors[1]] * 3
    batches = [make_batch(300 + step, 8, cfg.vocab_size, False) for step in range(6)]
    lost = {3: [hetmesh.devices[d] for d in failed]}
    assert survivors(executors[0], lost[3]) == [1, 2]
    np.testing.assert_allclose(train(model, chosen, batches, lost), train(model, [None] * 6, batches), rtol=RTOL)


def test_elastic_drop_with_moments_split_across_replicas_names_the_lost_parts(hetmesh):
    """With ZeRO-1 across replicas, each replica holds the only copy of its part of the moments: after the L4 node
    fails (its buffers deleted), the survivors' view of the optimizer state is refused, naming the lost groups,
    instead of continuing from moments that no longer exist (the run restores them from its checkpoint)."""
    cfg = config()
    model = Llama(cfg, rngs=nnx.Rngs(8))
    before = plan_of(
        [
            Replica((stage([0, 1], (0, 2), zero=1), stage([6], (2, 4), zero=1)), 4, 1),
            Replica((stage([4, 5], (0, 4), zero=1),), 2, 1),
        ],
        4,
    )
    after = plan_of([Replica((stage([4, 5], (0, 4)),), 6, 1)], 4)
    executors = [PlanExecutor(p, hetmesh, StagedLlama(cfg)) for p in (before, after)]
    batches = [make_batch(300 + step, 6, cfg.vocab_size, False) for step in range(3)]
    lost = {2: [hetmesh.devices[d] for d in (6, 7)]}
    with pytest.raises(ValueError, match=r"split across device groups \[0, 1, 2\] and groups \[0, 1\] are not among"):
        train(model, executors[:1] * 2 + executors[1:], batches, lost)
