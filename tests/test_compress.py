"""Stage-edge compression: the codecs against a numpy reference, their error bounds and wire sizes, the plan field,
a compressed pipeline step and short training run against the uncompressed plan, and the bytes the plan charges."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx

from jaxhet import Llama
from jaxhet.parallel import StagedLlama, llama_params
from meshes import HetMesh, PlanExecutor
from meshes.compression import CODECS, Codec, fwht, pack_int4, unpack_int4
from planners import Replica, TrainPlan, TrainWorkload, plan_training
from planners.cluster import ClusterSpec, Link
from planners.compression import FORMATS, edge_bytes_per_token
from planners.cost_model import TrainCosts, evaluate_train_plan
from planners.errors import SpecError
from planners.model import ModelSpec
from planners.plan import COMPRESSIONS, PlanError, Stage
from planners.simulate import simulate_replica
from planners.train import compress_edges
from tests.test_hspmd import (
    CLUSTER,
    assert_traffic_as_planned,
    config,
    make_batch,
    plan_of,
    stage,
    train,
)

PLAIN_INT4 = Codec("int4", 4, 64)  # tile-wise absmax int4 without the rotation: what the rotation must beat


def activations(seed: int, shape=(2, 16, 256), outliers: int = 0) -> np.ndarray:
    """Normal activations; with `outliers`, that many channels 50x larger (the channels LLM activations have)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    x[..., rng.choice(shape[-1], outliers, replace=False)] *= 50
    return x


def reference_round_trip(x: np.ndarray, bits: int, tile: int, rotate: bool) -> np.ndarray:
    """Numpy reference of a codec's decode(encode(x)): per tile, absmax quantization to `bits`, and with `rotate`
    the same after multiplying by the orthonormal Hadamard matrix, keeping whichever reconstructs better."""
    qmax = 2 ** (bits - 1) - 1
    tiles = x.reshape(*x.shape[:-1], -1, tile).astype(np.float64)

    def quantized(t):
        scale = np.abs(t).max(-1, keepdims=True) / qmax
        return np.clip(np.round(t / np.where(scale > 0, scale, 1)), -qmax, qmax) * scale

    out = quantized(tiles)
    if rotate:
        h = scipy.linalg.hadamard(tile) / np.sqrt(tile)
        turned = quantized(tiles @ h) @ h
        better = ((turned - tiles) ** 2).sum(-1) < ((out - tiles) ** 2).sum(-1)
        out = np.where(better[..., None], turned, out)
    return out.reshape(x.shape)


def relative_error(y, x) -> float:
    return float(np.linalg.norm(np.asarray(y, np.float64) - x) / np.linalg.norm(x))


def round_trip(codec: Codec, x, dtype=jnp.float32) -> np.ndarray:
    return np.asarray(jax.jit(lambda v: codec.decode(codec.encode(v), dtype))(x), np.float32)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 128])
def test_fast_hadamard_transform_is_the_orthonormal_hadamard_matrix(n):
    x = np.random.default_rng(n).normal(size=(3, 5, n)).astype(np.float32)
    expected = x @ (scipy.linalg.hadamard(n) / np.sqrt(n))
    # float32, log2(n) butterfly additions of O(1) values: ~1e-6 absolute.
    np.testing.assert_allclose(fwht(jnp.asarray(x)), expected, atol=1e-5)
    np.testing.assert_allclose(fwht(fwht(jnp.asarray(x))), x, atol=1e-5)


def test_four_bit_values_pack_two_per_byte_and_unpack_exactly():
    q = jnp.asarray(np.random.default_rng(0).integers(-8, 8, (3, 4, 10)))
    packed = pack_int4(q)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 4, 5)
    np.testing.assert_array_equal(unpack_int4(packed), q)
    assert int(pack_int4(jnp.asarray([[-8, 7]]))[0, 0]) == 0xF0  # low nibble first


@pytest.mark.parametrize("name", ["int8", "int4_hadamard", "int4"])
@pytest.mark.parametrize("outliers", [0, 3])
def test_round_trip_matches_the_numpy_reference(name, outliers):
    codec = CODECS.get(name, PLAIN_INT4)
    x = activations(1, outliers=outliers)
    got = round_trip(codec, x)
    expected = reference_round_trip(x, codec.bits, codec.tile, codec.rotate)
    # float32 against float64: a value on a rounding boundary may land one step away (at most one step of its
    # tile's scale, absmax / qmax); everywhere else they agree to float32 rounding.
    step = np.abs(x).reshape(*x.shape[:-1], -1, codec.tile).max(-1, keepdims=True) / codec.qmax
    diff = np.abs(got - expected).reshape(step.shape[:-1] + (codec.tile,))
    assert np.all(diff <= 1.01 * step)
    assert np.mean(diff > 1e-4 * step) < 1e-3


def test_int8_error_is_at_most_half_a_step_per_element():
    x = activations(2, outliers=3)
    err = np.abs(round_trip(CODECS["int8"], x) - x).reshape(2, 16, 2, 128)
    half_step = np.abs(x).reshape(2, 16, 2, 128).max(-1, keepdims=True) / 127 / 2
    assert np.all(err <= half_step * (1 + 1e-5))


@pytest.mark.parametrize("outliers", [0, 3])
def test_adaptive_hadamard_never_loses_to_plain_int4_on_a_tile(outliers):
    """Per tile, int4_hadamard keeps the better of the rotated and unrotated quantizations, so its squared error
    is at most plain int4's; each is bounded by half a step per (rotated) element."""
    x = activations(3, outliers=outliers)
    codec = CODECS["int4_hadamard"]

    def tile_errors(c):
        return ((round_trip(c, x) - x) ** 2).reshape(2, 16, 4, 64).sum(-1)

    hadamard, plain = tile_errors(codec), tile_errors(PLAIN_INT4)
    assert np.all(hadamard <= plain * (1 + 1e-4) + 1e-10)
    scales = np.abs(np.asarray(codec.encode(jnp.asarray(x))["scales"]))
    assert np.all(np.sqrt(hadamard) <= np.sqrt(64) * scales / 2 * (1 + 1e-4))


def test_hadamard_rotation_beats_plain_int4_on_outlier_channels():
    x = activations(4, outliers=3)
    hadamard = relative_error(round_trip(CODECS["int4_hadamard"], x), x)
    plain = relative_error(round_trip(PLAIN_INT4, x), x)
    assert hadamard < 0.6 * plain, (hadamard, plain)  # measured 0.055 against 0.130


def test_bf16_tensors_round_trip_in_bf16():
    x = jnp.asarray(activations(5, outliers=3), jnp.bfloat16)
    y = jax.jit(lambda v: CODECS["int4_hadamard"].decode(CODECS["int4_hadamard"].encode(v), jnp.bfloat16))(x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert relative_error(np.asarray(y, np.float32), np.asarray(x, np.float32)) < 0.1


@pytest.mark.parametrize("hidden", [32, 96, 256, 4096])
@pytest.mark.parametrize("name", COMPRESSIONS)
def test_planner_wire_sizes_are_the_codecs_packed_bytes(name, hidden):
    x = jnp.zeros((2, 3, hidden), jnp.float32)
    packed = jax.eval_shape(CODECS[name].encode, x)
    nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(packed))
    assert nbytes == 6 * edge_bytes_per_token(name, hidden, act_bytes=4)
    if name != "none":
        assert FORMATS[name] == (CODECS[name].bits, CODECS[name].tile)
    assert tuple(CODECS) == tuple(FORMATS) == COMPRESSIONS


def test_int4_hadamard_shrinks_the_wire_by_over_3_5x_from_float32_and_1_8x_from_bf16():
    for hidden in (32, 4096):
        packed = edge_bytes_per_token("int4_hadamard", hidden, act_bytes=4)
        assert 4 * hidden / packed >= 3.5 and 2 * hidden / packed >= 1.8


def test_stage_compress_is_validated_and_round_trips():
    plain = Stage((0, 1), "H100", 2, (0, 2))
    assert plain.compress == "none" and plain.to_dict()["compress"] == "none"
    with pytest.raises(PlanError, match=r"compress must be one of \['none', 'int8', 'int4_hadamard'\], got 'int3'"):
        Stage((0,), "H100", 1, (0, 2), compress="int3")
    first = Stage((0,), "H100", 1, (0, 2), compress="int4_hadamard")
    plan = TrainPlan((Replica((first, Stage((1,), "H100", 1, (2, 4))), 2, 1),), 4, 2, 8)
    assert TrainPlan.from_json(plan.to_json()) == plan
    old = plan.to_dict()
    for s in old["replicas"][0]["stages"]:
        del s["compress"]
    assert all(s.compress == "none" for s in TrainPlan.from_dict(old).replicas[0].stages)
    bad = plan.to_dict()
    bad["replicas"][0]["stages"][0]["compress"] = 8
    with pytest.raises(PlanError, match=r"replicas\[0\]\.stages\[0\]\.compress must be one of"):
        TrainPlan.from_dict(bad)
    with pytest.raises(PlanError, match=r"stages\[1\]\.compress is 'int8' but the last stage sends nothing onward"):
        Replica((first, Stage((1,), "H100", 1, (2, 4), compress="int8")), 2, 1)


def two_stage_plan(compress: str, cp: int = 1) -> TrainPlan:
    """Two TP-2 stages on the H100s and A100s (or, with `cp` 2, two CP-2 stages of TP 1), the first sending its
    activations across the edge in `compress`."""
    if cp == 1:
        stages = (stage([0, 1], (0, 2), compress=compress), stage([4, 5], (2, 4)))
    else:
        stages = (stage([0, 1], (0, 2), tp=1, compress=compress), stage([4, 5], (2, 4), tp=1))
    return plan_of([Replica(stages, 2, 2, cp=cp)], 4, seq=10)


@pytest.fixture(scope="module")
def executor_of():
    """One executor per (codec, cp) of `two_stage_plan`, shared so that each compiles once per test module."""
    hetmesh, cache = HetMesh.from_cluster(CLUSTER), {}

    def get(compress: str, cp: int = 1) -> PlanExecutor:
        if (compress, cp) not in cache:
            model = StagedLlama(config(num_kv_heads=2))
            cache[(compress, cp)] = PlanExecutor(two_stage_plan(compress, cp), hetmesh, model)
        return cache[(compress, cp)]

    return get


def one_step(executor: PlanExecutor, params, batch) -> tuple[float, object]:
    """Loss and gradients of one step, with the transfer log counting that step alone."""
    copies = executor.place(params)
    executor.transfers.log.reset()
    loss, grads = executor.value_and_grad(copies, batch)
    return float(loss), executor.view(grads)


@pytest.mark.parametrize(("compress", "cp"), [("int8", 1), ("int4_hadamard", 1), ("int4_hadamard", 2)])
def test_compressed_edge_step_is_close_to_uncompressed_and_moves_the_planned_bytes(executor_of, compress, cp):
    cfg = config(num_kv_heads=2)
    params = llama_params(Llama(cfg, rngs=nnx.Rngs(0)))
    batch = make_batch(1, 4, cfg.vocab_size, packed=False, seq=10)
    exact = executor_of("none", cp)
    squeezed = executor_of(compress, cp)
    loss, grads = one_step(exact, params, batch)
    assert_traffic_as_planned(exact, cfg)
    moved_exact = exact.transfers.log.between_groups
    loss_c, grads_c = one_step(squeezed, params, batch)
    assert_traffic_as_planned(squeezed, cfg)
    # The loss sees the activations' quantization error (int8 ~0.5%, int4 ~10% relative on the edge tensor), damped
    # by the second stage's blocks and the loss; gradients see it forward and backward.
    assert abs(loss_c - loss) <= (1e-3 if compress == "int8" else 2e-2) * abs(loss)
    g, g_c = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (grads, grads_c))
    assert relative_error(g_c, g) < (0.02 if compress == "int8" else 0.3)
    # Only the stage edge differs between the two plans; the gradient sync is the same.
    model = ModelSpec.from_hf_config(cfg.to_hf_dict(), name="test")
    edge_exact = 2 * 4 * 10 * edge_bytes_per_token("none", model.hidden_size, 4)  # both ways, 4 rows of 10 tokens
    edge = edge_exact - (moved_exact - squeezed.transfers.log.between_groups)
    assert edge_exact / edge >= (3.5 if compress == "int8" else 6.0)


def test_twenty_steps_with_an_int4_hadamard_edge_track_the_uncompressed_loss(executor_of):
    cfg = config(num_kv_heads=2)
    model = Llama(cfg, rngs=nnx.Rngs(3))
    batches = [make_batch(100 + step % 2, 4, cfg.vocab_size, False, seq=10) for step in range(20)]
    exact = train(model, [executor_of("none")] * 20, batches)
    squeezed = train(model, [executor_of("int4_hadamard")] * 20, batches)
    assert squeezed[-1] < 0.8 * squeezed[0]
    np.testing.assert_allclose(squeezed, exact, rtol=0.02)


def test_cost_model_charges_packed_bytes_and_codec_time():
    cluster = ClusterSpec.load("examples/clusters/h100x4_l4x4.yaml")
    model = ModelSpec.preset("llama-2-7b")
    costs = TrainCosts(cluster, model, 4096)
    link = cluster.inter_link
    plain = costs.p2p_seconds(link, 2)
    squeezed = costs.p2p_seconds(link, 2, "int4_hadamard", ("H100", "L4"))
    packed = costs.edge_bytes(2, "int4_hadamard")
    raw = costs.edge_bytes(2)
    assert raw / packed == pytest.approx(2 * 64 / 36)
    codec = sum((raw + packed) / cluster.profile(k).bytes_per_s for k in ("H100", "L4"))
    assert squeezed == pytest.approx(2 * (link.seconds(packed) + codec))
    assert squeezed < plain
    with pytest.raises(ValueError, match="needs the device kinds"):
        costs.p2p_seconds(link, 2, "int8")
    kinds = tuple(d.kind for d in cluster.devices)

    def replica(compress: str) -> Replica:
        h100 = Stage((kinds.index("H100"),), "H100", 1, (0, 16), compress=compress)
        return Replica((h100, Stage((kinds.index("L4"),), "L4", 1, (16, 32))), 2, 2)

    def iteration_s(compress: str) -> float:
        return evaluate_train_plan(TrainPlan((replica(compress),), 32, 4, 4096), cluster, model).iteration_s

    # The pipeline pays each edge once (its micro-batches' transfers are not modelled as overlapping compute).
    assert iteration_s("none") - iteration_s("int4_hadamard") == pytest.approx(plain - squeezed)
    simulated = {c: simulate_replica(replica(c), cluster, model, 4096) for c in ("none", "int4_hadamard")}
    assert simulated["int4_hadamard"] < simulated["none"]


def test_edges_are_compressed_where_the_link_is_slow_enough_to_pay():
    model = ModelSpec.preset("llama-2-7b")
    slow = ClusterSpec.load("examples/clusters/h100x4_l4x4.yaml")  # 12.5 GB/s between the nodes
    fast = dataclasses.replace(slow, inter_link=Link(1e5, 15))
    kinds = tuple(d.kind for d in slow.devices)
    h100 = Stage((0,), "H100", 1, (0, 16))
    plan = TrainPlan((Replica((h100, Stage((4,), "L4", 1, (16, 32))), 2, 2),), 32, 4, 4096, device_kinds=kinds)

    def codec(cluster, lossiest):
        return compress_edges(plan, cluster, model, lossiest).replicas[0].stages[0].compress

    assert codec(slow, "int4_hadamard") == "int4_hadamard" and codec(slow, "int8") == "int8"
    assert codec(slow, "none") == "none"
    assert codec(fast, "int4_hadamard") == "none"  # faster than the devices' memory: (de)quantising costs more
    chosen = compress_edges(plan, slow, model, "int4_hadamard")
    assert chosen.estimate.iteration_s < evaluate_train_plan(plan, slow, model).iteration_s


def test_planner_turns_compression_on_only_when_the_workload_allows_it():
    """Two single-H100 nodes over 12.5 GB/s: a 7B model's state fits on neither, so every plan pipelines across
    the nodes, and the edge is compressed when (and only when) the workload allows it."""
    cluster = ClusterSpec.from_dict(
        {
            "name": "two_h100_nodes",
            "nodes": [{"name": "a", "gpu": "H100", "count": 1}, {"name": "b", "gpu": "H100", "count": 1}],
            "inter_node_link": {"gb_s": 12.5, "latency_us": 15},
        }
    )
    model = ModelSpec.preset("llama-2-7b")

    def planned(compress):
        workload = TrainWorkload(global_batch=8, seq_len=2048, microbatch_sizes=(1,), compress=compress)
        return plan_training(cluster, model, workload, time_limit_s=5.0)

    plain, squeezed = planned("none"), planned("int4_hadamard")
    assert [len(r.stages) for r in plain.replicas] == [2]
    assert all(s.compress == "none" for r in plain.replicas for s in r.stages)
    assert [s.compress for s in squeezed.replicas[0].stages] == ["int4_hadamard", "none"]
    assert squeezed.estimate.iteration_s < plain.estimate.iteration_s
    assert squeezed.solve.status == "FEASIBLE"  # the search's bound does not cover compressed plans
    with pytest.raises(SpecError, match=r"compress must be one of \['none', 'int8', 'int4_hadamard'\]"):
        TrainWorkload(global_batch=8, seq_len=2048, compress="fp8")
