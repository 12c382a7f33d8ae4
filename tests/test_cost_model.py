"""Cost-model sanity: monotone in the right directions, alpha-beta communication, plan evaluation."""

import pytest

import planners
from planners.cost_model import moment_splits, ring_allgather_seconds, ring_allreduce_seconds

CLUSTER = planners.ClusterSpec.load("h100x4_l4x4")
MODEL = planners.ModelSpec.preset("llama-2-7b")
COSTS = planners.TrainCosts(CLUSTER, MODEL, 2048)
NVLINK = CLUSTER.nodes[0].intra_link
PCIE = CLUSTER.nodes[1].intra_link


def test_faster_gpu_is_faster() -> None:
    assert COSTS.layer_seconds("H100", 1, 2, False, NVLINK) < COSTS.layer_seconds("L4", 1, 2, False, PCIE)
    assert COSTS.head_seconds("H100", 1, 2) < COSTS.head_seconds("L4", 1, 2)


def test_time_grows_with_batch_and_recompute_and_shrinks_with_tp() -> None:
    one = COSTS.layer_seconds("H100", 1, 1, False, NVLINK)
    assert COSTS.layer_seconds("H100", 1, 4, False, NVLINK) > 3 * one
    assert COSTS.layer_seconds("H100", 1, 1, True, NVLINK) > one
    assert COSTS.layer_seconds("H100", 4, 1, False, NVLINK) < one
    # Over slow PCIe, TP's all-reduces can cost more than they save.
    assert COSTS.layer_seconds("L4", 4, 1, False, planners.Link(1.0, 10.0)) > COSTS.layer_seconds(
        "L4", 1, 1, False, PCIE
    )


def test_compute_bound_layer_matches_flops() -> None:
    flops = 3 * COSTS.layer_flops(2048)
    prof = CLUSTER.profile("H100")
    expected = flops / prof.flops_per_s + prof.layer_overhead_us * 1e-6
    assert COSTS.layer_seconds("H100", 1, 1, False, NVLINK) == pytest.approx(expected, rel=1e-9)


def test_memory_grows_with_layers_and_in_flight_and_shrinks_with_recompute_and_tp() -> None:
    def mem(tp: int = 1, layers: int = 4, recompute: bool = False, in_flight: int = 1) -> float:
        return COSTS.stage_memory_bytes(tp, layers, 1, recompute, in_flight, False, False)

    assert mem(layers=8) > mem(layers=4)
    assert mem(in_flight=4) > mem(in_flight=1)
    assert mem(recompute=True, in_flight=4) < mem(in_flight=4)
    assert mem(tp=4) < mem(tp=1)
    assert COSTS.stage_memory_bytes(1, 4, 1, False, 1, True, True) > mem()
    # 16 bytes of weight, gradient and Adam state per parameter.
    assert COSTS.piece_state_bytes("block", 1, 1, 0) == 16 * MODEL.layer_params


def test_alpha_beta() -> None:
    link = planners.Link(10.0, 5.0)
    assert link.seconds(10e9) == pytest.approx(1.0 + 5e-6)
    assert ring_allreduce_seconds(1e9, 1, link) == 0.0
    assert ring_allreduce_seconds(1e9, 4, link) == pytest.approx(6 * 5e-6 + 1.5 * 0.1)
    assert COSTS.p2p_seconds(CLUSTER.inter_link, 1) > COSTS.p2p_seconds(NVLINK, 1)


def test_evaluate_plan() -> None:
    def plan(split: int, microbatches: int = 4) -> planners.TrainPlan:
        stages = (
            planners.Stage((0, 1, 2, 3), "H100", 4, (0, split)),
            planners.Stage((4, 5, 6, 7), "L4", 4, (split, 32), recompute=True),
        )
        return planners.TrainPlan((planners.Replica(stages, microbatches, 1),), 32, microbatches, 2048)

    balanced, skewed = (planners.evaluate_train_plan(plan(s), CLUSTER, MODEL) for s in (26, 16))
    assert balanced.iteration_s < skewed.iteration_s
    assert balanced.grad_sync_s == 0.0 and len(balanced.peak_memory_gb[0]) == 2
    longer = planners.evaluate_train_plan(plan(26, 8), CLUSTER, MODEL)
    # 1F1B: more micro-batches add (m - 1) times the slowest stage.
    stage_max = longer.replica_s[0] - balanced.replica_s[0]
    assert 0 < stage_max < balanced.replica_s[0]
    assert planners.memory_excess(plan(26), CLUSTER, balanced) == []


def test_zero1_takes_off_the_moments_beyond_the_stage_share_and_adds_one_gather() -> None:
    plain = COSTS.stage_memory_bytes(2, 4, 1, False, 1, True, False, 2)
    zero = COSTS.stage_memory_bytes(2, 4, 1, False, 1, True, False, 2, zero=1)
    held = 4 * MODEL.layer_params / 2 + MODEL.embedding_params  # blocks split over TP, the embedding whole
    share = (4 * MODEL.layer_params + MODEL.embedding_params) / 4  # every moment split over the 2 x 2 devices
    assert plain - zero == pytest.approx(8 * (held - share))

    def one_stage(zero: int) -> planners.PlanEstimate:
        stage = planners.Stage((0, 1, 2, 3), "H100", 4, (0, 32), zero=zero)
        return planners.evaluate_train_plan(
            planners.TrainPlan((planners.Replica((stage,), 2, 1),), 32, 2, 2048), CLUSTER, MODEL
        )

    before, after = one_stage(0), one_stage(1)
    assert after.peak_memory_gb[0][0] < before.peak_memory_gb[0][0]
    gather = ring_allgather_seconds(
        4 * (32 * MODEL.layer_params + MODEL.embedding_params + MODEL.head_params), 4, NVLINK
    )
    assert after.iteration_s - before.iteration_s == pytest.approx(gather)


def test_data_parallel_sync_crosses_nodes() -> None:
    def dp(devices: tuple[int, int]) -> planners.PlanEstimate:
        replicas = tuple(
            planners.Replica((planners.Stage((d,), CLUSTER.devices[d].kind, 1, (0, 32), True),), 1, 1) for d in devices
        )
        return planners.evaluate_train_plan(planners.TrainPlan(replicas, 32, 2, 2048), CLUSTER, MODEL)

    assert dp((0, 4)).grad_sync_s > 10 * dp((0, 1)).grad_sync_s


def _collective_bytes(
    first: bool, last: bool, tp: int, cp: int, microbatch: int, seq: int, cfg, zero3: bool = False
) -> dict[str, int]:
    """Per-device bytes the real stage program's forward and backward put into collectives over the CP axis,
    read from its jaxpr: all-gather outputs, reduce-scatter inputs, and the parameter-gradient sums; with `zero3`,
    of the stage storing its parameters split over CP (ZeRO-3)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from jaxhet.models.llama import Llama
    from jaxhet.parallel import StagedLlama, llama_params
    from meshes.fsdp import Zero3
    from meshes.staged import StageSpec

    staged = StagedLlama(cfg)
    spec = StageSpec((0, cfg.num_layers), first=first, last=last)
    mesh = Mesh(np.array(jax.devices()[: tp * cp]).reshape(cp, tp), ("cp", "tp"))
    program = staged.stage_program(spec, tp, "tp", "cp", zero3=Zero3(mesh, ("cp",)) if zero3 else None)
    sequence = P(None, "cp")
    sharded = jax.shard_map(
        program.apply,
        mesh=mesh,
        in_specs=(program.param_specs, P() if first else sequence, sequence),
        out_specs=P() if last else sequence,
    )
    params = staged.stage_params(llama_params(Llama(cfg, rngs=nnx.Rngs(0))), spec)
    hidden = jnp.zeros(()) if first else jnp.zeros((microbatch, seq, cfg.hidden_size))
    rows = jnp.zeros((microbatch, seq), jnp.int32)
    batch = {"input_ids": rows, "targets": rows, "weights": jnp.ones((microbatch, seq))}

    def step(p, h):
        out, vjp = jax.vjp(lambda p, h: sharded(p, h, batch), p, h)
        return vjp(jnp.ones_like(out))

    totals = {"all_gather": 0, "reduce_scatter": 0, "grads": 0}
    for eqn in _equations(jax.make_jaxpr(step)(params, hidden).jaxpr):
        axes = eqn.params.get("axis_name", eqn.params.get("axes", ()))
        if "cp" not in (axes if isinstance(axes, tuple) else (axes,)):
            continue
        name = eqn.primitive.name
        values = eqn.outvars if name == "all_gather" else eqn.invars
        nbytes = sum(v.aval.size * v.aval.dtype.itemsize for v in values)
        if name in ("all_gather", "reduce_scatter"):
            totals[name] += nbytes
        elif name == "psum_invariant" and eqn.invars[0].aval.size > 1:  # not the loss scalar
            totals["grads"] += nbytes
    return totals


def _equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in its equations (shard_map, remat, custom rules)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                inner = getattr(inner, "jaxpr", inner) if not hasattr(inner, "eqns") else inner
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize(("first", "last"), [(False, False), (True, True)])
def test_cp_bytes_equal_the_stage_programs_collectives(first: bool, last: bool) -> None:
    """The key/value all-gathers, their gradients' reduce-scatters and the parameter-gradient all-reduces over the
    CP axis that `jaxhet.parallel`'s stage program runs (TP 2 x CP 2) are the bytes the cost model prices."""
    from jaxhet.models.config import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, dtype="bfloat16"
    )
    spec = planners.ModelSpec("t", 64, 32, 64, 2, 4, 2)
    tp, cp, b, seq = 2, 2, 3, 16
    counted = _collective_bytes(first, last, tp, cp, b, seq, cfg)
    costs = planners.TrainCosts(CLUSTER, spec, seq)
    kv = spec.num_layers * costs.kv_gather_bytes(tp, b)
    assert counted["all_gather"] == kv and counted["reduce_scatter"] == kv
    grads = spec.num_layers * costs.cp_grad_bytes(tp)
    if first:
        grads += costs.cp_grad_bytes(tp, "embedding")
    if last:
        grads += costs.cp_grad_bytes(tp, "head")
    norms = (2 * spec.num_layers + last) * spec.hidden_size
    # Norm gradients are summed in fp32 or in the compute dtype, depending on where the cast lands: 2 bytes each.
    assert grads - 2 * norms <= counted["grads"] <= grads


def test_zero3_bytes_equal_the_stage_programs_collectives() -> None:
    """A zero-3 stage (TP 2 x CP 2, bfloat16 compute) gathers each block's stored fp32 parameters over CP for its
    forward and again for its backward, and reduce-scatters their gradients once: besides the key/value collectives,
    the bytes `fsdp_gather_bytes` prices (the replicated norms gathered over TP, then over CP: the same ring time as
    one gather over all four devices), and no CP all-reduce of parameter gradients."""
    from jaxhet.models.config import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, dtype="bfloat16"
    )
    spec = planners.ModelSpec("t", 64, 32, 64, 2, 4, 2)
    tp, cp, b, seq = 2, 2, 3, 16
    counted = _collective_bytes(False, False, tp, cp, b, seq, cfg, zero3=True)
    costs = planners.TrainCosts(CLUSTER, spec, seq)
    kv = spec.num_layers * costs.kv_gather_bytes(tp, b)
    split, replicated = costs.fsdp_gather_bytes(tp, "block")
    over_cp = spec.num_layers * (split + replicated)
    assert counted == {"all_gather": kv + 2 * over_cp, "reduce_scatter": kv + over_cp, "grads": 0}


def test_cp_time_is_ring_collectives_over_the_cp_link() -> None:
    link = planners.Link(10.0, 0.0)
    b, tp, cp = 1, 2, 2
    plain = COSTS.layer_seconds("H100", tp, b, False, NVLINK, cp, NVLINK)
    slow = COSTS.layer_seconds("H100", tp, b, False, NVLINK, cp, link)
    fast = COSTS.layer_seconds("H100", tp, b, False, NVLINK, cp, planners.Link(1e9, 0.0))
    # Without latency: two ring passes of (cp - 1) / cp of the gathered K/V, one all-reduce of the block's grads.
    expected = (2 * 0.5 * COSTS.kv_gather_bytes(tp, b) + 2 * 0.5 * COSTS.cp_grad_bytes(tp)) / 10e9
    assert slow - fast == pytest.approx(expected, rel=1e-6)
    assert plain > fast and COSTS.layer_seconds("H100", tp, b, False, NVLINK) != plain


def test_cp_splits_activations_and_attention_but_not_state() -> None:
    for recompute in (False, True):
        one = COSTS.layer_act_bytes(2, 1, recompute)
        two = COSTS.layer_act_bytes(2, 1, recompute, 2)
        if recompute:
            assert two == pytest.approx(one / 2)
        else:  # the gathered keys and values cover the whole sequence on every rank
            assert two == pytest.approx(one / 2 + COSTS.kv_gather_bytes(2, 1) / 2)
    assert COSTS.logits_bytes(2, 1, 2) == pytest.approx(COSTS.logits_bytes(2, 1) / 2)
    # The last of cp consecutive slices attends (2 cp - 1) / (2 cp) of the sequence per query.
    assert COSTS.attended_keys(1) == 1024 and COSTS.attended_keys(2) == 2048 * 3 / 4
    assert COSTS.layer_flops(1024, 2) - COSTS.layer_flops(1024) == pytest.approx(1024 * 4 * MODEL.hidden_size * 512)
    assert COSTS.stage_memory_bytes(2, 4, 1, True, 1, False, False, 2) > 4 * COSTS.piece_state_bytes("block", 2, 2, 0)


def test_gpipe_keeps_every_microbatch_in_flight() -> None:
    def peak(schedule: str) -> tuple[float, ...]:
        stages = (
            planners.Stage((0, 1, 2, 3), "H100", 2, (0, 16)),
            planners.Stage((4, 5, 6, 7), "L4", 2, (16, 32), recompute=True),
        )
        plan = planners.TrainPlan((planners.Replica(stages, 6, 1, cp=2),), 32, 6, 2048, schedule=schedule)
        return planners.evaluate_train_plan(plan, CLUSTER, MODEL).peak_memory_gb[0]

    gpipe, one_f_one_b = peak("gpipe"), peak("1f1b")
    per_microbatch = [16 * COSTS.layer_act_bytes(2, 1, rc, 2) / 1e9 for rc in (False, True)]
    # 1F1B: the first of two stages holds 2 micro-batches, the last 1; GPipe: all 6 on both.
    assert gpipe[0] - one_f_one_b[0] == pytest.approx(4 * per_microbatch[0])
    assert gpipe[1] - one_f_one_b[1] == pytest.approx(5 * per_microbatch[1])


def test_a_stage_holding_the_embedding_and_a_tied_head_holds_the_matrix_once() -> None:
    tiny = planners.ModelSpec.preset("tiny")
    assert tiny.tied_embeddings
    costs = planners.TrainCosts(CLUSTER, tiny, 128)
    acts = 4 * costs.layer_act_bytes(1, 1, False) + costs.logits_bytes(1, 1)
    assert costs.stage_memory_bytes(1, 4, 1, False, 1, True, True) - acts == pytest.approx(16 * tiny.num_params)
    assert costs.stage_grad_bytes(1, 4, True, True) == 4 * tiny.num_params
    # A last stage that is not the first holds its own copy of the matrix, beside the final norm.
    assert costs.stage_grad_bytes(1, 0, False, True) == 4 * (tiny.embedding_params + tiny.hidden_size)


def test_zero3_splits_the_state_over_the_stage_and_gathers_every_block_per_microbatch() -> None:
    tp, cp, params, h = 2, 2, MODEL.layer_params, MODEL.hidden_size
    acts = 4 * COSTS.layer_act_bytes(tp, 1, False, cp)
    plain = COSTS.stage_memory_bytes(tp, 4, 1, False, 1, False, False, cp) - acts
    fsdp = COSTS.stage_memory_bytes(tp, 4, 1, False, 1, False, False, cp, zero=3) - acts
    assert plain == pytest.approx(16 * 4 * params / tp)
    # 16 bytes per parameter split over all 4 devices, plus one block's stored fp32 weights gathered with its fp32
    # gradient.
    assert fsdp == pytest.approx(16 * 4 * params / (tp * cp) + 8 * params / tp)
    link = planners.Link(10.0, 0.0)
    for recompute in (False, True):
        zero0, zero3 = (COSTS.layer_seconds("H100", tp, 1, recompute, link, cp, link, z) for z in (0, 3))
        matrices, norms = 2 * (params - 2 * h) / tp, 4 * 2 * h  # the all-reduce's: bf16 matrices, fp32 norms
        # Two gathers and a reduce-scatter of the stored fp32 weights: the matrices over the 2 CP ranks, the norms
        # over all 4 devices; in place of the all-reduce of both over the CP ranks. The backward's gather serves the
        # recomputation too.
        expected = 3 * (2 * matrices / 2 + norms * 3 / 4) - (matrices + norms)
        assert zero3 - zero0 == pytest.approx(expected / 10e9, rel=1e-9)


def _replicas(*stages: planners.Stage, microbatches: int = 1) -> planners.TrainPlan:
    """One replica per stage, each holding all 32 blocks."""
    replicas = tuple(planners.Replica((s,), microbatches, 1) for s in stages)
    return planners.TrainPlan(replicas, 32, microbatches * len(stages), 2048)


def test_moments_split_across_holders_only_where_every_holder_has_zero() -> None:
    def tp4_beside_tp2(zeros: tuple[int, int]) -> planners.TrainPlan:
        return _replicas(
            planners.Stage((0, 1, 2, 3), "H100", 4, (0, 32), zero=zeros[0]),
            planners.Stage((4, 5), "L4", 2, (0, 32), zero=zeros[1]),
        )

    # Two holders of 4 and 2 devices: 2 lanes each, a quarter of every piece's moments on each lane head.
    splits = moment_splits(tp4_beside_tp2((1, 1)), MODEL)
    assert splits[0, 0] == splits[1, 0] == [("block", 0.25)] * 32 + [("embedding", 0.25), ("head", 0.25)]
    assert moment_splits(tp4_beside_tp2((1, 0)), MODEL) == {(0, 0): [], (1, 0): []}
    across, inside, plain = (
        planners.evaluate_train_plan(tp4_beside_tp2(z), CLUSTER, MODEL) for z in ((1, 1), (0, 1), (0, 0))
    )
    # The TP2 stage held half of every moment inside its group, a quarter across the holders.
    assert inside.peak_memory_gb[1][0] - across.peak_memory_gb[1][0] == pytest.approx(8 * MODEL.num_params / 4e9)
    # Across the holders the parameters come back with the gradient sync: no gather, the time of zero 0.
    assert across.iteration_s == pytest.approx(plain.iteration_s, rel=1e-12)
    gather = ring_allgather_seconds(4 * MODEL.num_params, 2, PCIE)
    assert inside.replica_s[1] - plain.replica_s[1] == pytest.approx(gather)


def test_a_single_device_holder_leaves_one_lane_and_half_the_moments_on_a_tp4_stage() -> None:
    def tp4_beside_one(zeros: tuple[int, int]) -> planners.PlanEstimate:
        plan = _replicas(
            planners.Stage((0, 1, 2, 3), "H100", 4, (0, 32), zero=zeros[0]),
            planners.Stage((4,), "L4", 1, (0, 32), zero=zeros[1]),
        )
        return planners.evaluate_train_plan(plan, CLUSTER, MODEL)

    across, inside = tp4_beside_one((1, 1)), tp4_beside_one((1, 0))
    # gcd(4, 1) = 1 lane: the TP4 stage's first device holds 1/2 of every moment, not the 1/4 of its own split.
    assert across.peak_memory_gb[0][0] - inside.peak_memory_gb[0][0] == pytest.approx(8 * MODEL.num_params / 4e9)


def test_a_tied_embedding_is_split_between_the_two_ends_of_one_pipeline() -> None:
    tiny = planners.ModelSpec.preset("tiny")

    def pipeline(zeros: tuple[int, int]) -> planners.TrainPlan:
        stages = (
            planners.Stage((0, 1), "H100", 2, (0, 2), zero=zeros[0]),
            planners.Stage((2, 3), "H100", 2, (2, 4), zero=zeros[1]),
        )
        return planners.TrainPlan((planners.Replica(stages, 2, 1),), 4, 2, 128)

    assert moment_splits(pipeline((1, 1)), tiny) == {(0, 0): [("embedding", 0.25)], (0, 1): [("embedding", 0.25)]}
    assert moment_splits(pipeline((3, 0)), tiny) == {(0, 0): [], (0, 1): []}
