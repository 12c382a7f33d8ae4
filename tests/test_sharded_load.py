"""Loading a Hugging Face checkpoint straight into a TP4 layout: every device reads only its own block of each
tensor the layout splits, the arrays hold exactly the checkpoint's values, and TP4 logits equal the one-device load.

The reads are observed by wrapping the real `safe_open` (every read still goes to the file): the wrapper records
the shape of each block read and offers no whole-tensor read (`get_tensor`), so one would fail the test.
"""

from __future__ import annotations

import asyncio

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import planners
from jaxhet import Llama, LlamaConfig, load_sharded_params
from jaxhet.generate import SamplingConfig, generate
from jaxhet.loading import load_model_dir
from jaxhet.models import hf
from jaxhet.parallel import llama_params, megatron_specs, module_from_params, shard_config
from jaxhet.serve import EngineConfig, SamplingParams, build_deployments
from jaxhet.serve.runner import ModelRunner, StepInputs

TP = 4
CONFIG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4)
# Float32; the TP4 program only reorders the row-parallel partial sums (psum over 4 shards): ~1e-7 relative.
RTOL, ATOL = 1e-5, 1e-6


class _RecordedSlice:
    def __init__(self, name: str, tensor, reads: list[tuple[str, tuple[int, ...]]]):
        self._name, self._tensor, self._reads = name, tensor, reads

    def get_shape(self):
        return self._tensor.get_shape()

    def __getitem__(self, index):
        block = self._tensor[index]
        self._reads.append((self._name, tuple(block.shape)))
        return block


class _RecordedFile:
    """A real safetensors file handle that records block reads and has no whole-tensor read."""

    def __init__(self, handle, reads):
        self._handle, self._reads = handle, reads

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def get_slice(self, name: str) -> _RecordedSlice:
        return _RecordedSlice(name, self._handle.get_slice(name), self._reads)


@pytest.fixture
def reads(monkeypatch) -> list[tuple[str, tuple[int, ...]]]:
    log: list[tuple[str, tuple[int, ...]]] = []
    real = hf.safe_open
    monkeypatch.setattr(hf, "safe_open", lambda *args, **kwargs: _RecordedFile(real(*args, **kwargs), log))
    return log


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved model split over several safetensors files (with an index), as large checkpoints are."""
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(Llama(CONFIG, rngs=nnx.Rngs(0)), path, max_shard_bytes=64 * 1024)
    assert (path / hf.INDEX_FILE).is_file()
    return path


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:TP]), ("tp",))


def tp_shardings(mesh: Mesh):
    abstract = llama_params(nnx.eval_shape(lambda: Llama(CONFIG, rngs=nnx.Rngs(0))))
    specs = megatron_specs(abstract, TP, "tp")
    return specs, jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def assert_only_device_blocks_read(reads, shardings) -> None:
    """Every tensor was read only in blocks of its sharding's shard shape (in storage order): one per device where
    the layout splits it, at least one where it is replicated (jax may read a replicated block once for all)."""
    abstract = llama_params(nnx.eval_shape(lambda: Llama(CONFIG, rngs=nnx.Rngs(0))))
    split = 0
    for name, path, transposed in hf.parameter_paths(CONFIG):
        target, sharding = abstract, shardings
        for key in path:
            target, sharding = target[key], sharding[key]
        block = sharding.shard_shape(target.shape)
        stored_block = block[::-1] if transposed else block
        seen = [shape for read, shape in reads if read == name]
        assert seen and set(seen) == {stored_block}, name
        if block != target.shape:
            assert len(seen) == TP, name
            split += 1
    assert split == CONFIG.num_layers * 7  # q, k, v, o, gate, up, down of every block


def test_tp4_load_reads_only_each_devices_block_and_holds_the_checkpoint(checkpoint, mesh, reads):
    whole = llama_params(hf.load_pretrained(checkpoint))
    reads.clear()
    _, shardings = tp_shardings(mesh)
    params = load_sharded_params(checkpoint, CONFIG, shardings)
    assert_only_device_blocks_read(reads, shardings)
    for array, sharding, want in zip(
        jax.tree.leaves(params), jax.tree.leaves(shardings), jax.tree.leaves(whole), strict=True
    ):
        assert array.sharding == sharding
        assert {shard.data.shape for shard in array.addressable_shards} == {sharding.shard_shape(array.shape)}
        np.testing.assert_array_equal(np.asarray(array), np.asarray(want))


def test_tp4_logits_equal_the_one_device_load(checkpoint, mesh):
    specs, shardings = tp_shardings(mesh)
    model = hf.load_pretrained(checkpoint, shardings=shardings)
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 11))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(shard_config(CONFIG, TP, "tp"), rngs=nnx.Rngs(0))))
    tp_logits = jax.jit(
        jax.shard_map(
            lambda p, x: module_from_params(graphdef, abstract, p)(x), mesh=mesh, in_specs=(specs, P()), out_specs=P()
        )
    )(llama_params(model), ids)
    want = hf.load_pretrained(checkpoint)(ids)
    np.testing.assert_allclose(np.asarray(tp_logits), np.asarray(want), rtol=RTOL, atol=ATOL)


def test_tp4_serving_runner_reads_its_blocks_and_samples_as_one_device(checkpoint, reads):
    config = EngineConfig(max_running=1, page_size=16, num_pages=4, kv_format="float32", max_model_len=32)
    abstract = nnx.eval_shape(lambda: Llama(CONFIG, rngs=nnx.Rngs(0)))
    split = ModelRunner(abstract, config, devices=jax.devices()[:TP], weights_dir=checkpoint)
    _, shardings = tp_shardings(Mesh(np.array(jax.devices()[:TP]), ("tp",)))
    assert_only_device_blocks_read(reads, shardings)
    single = ModelRunner(hf.load_pretrained(checkpoint), config, devices=jax.devices()[TP : TP + 1])
    inputs = StepInputs.empty(1, 16, config.pages_per_sequence)
    inputs.tokens[0] = np.arange(16) * 5 % CONFIG.vocab_size
    inputs.input_lengths[0] = 16
    got, want = split.run(inputs), single.run(inputs)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, rtol=RTOL, atol=ATOL)


def test_a_planned_tp4_replica_of_a_lazily_loaded_checkpoint_reads_its_blocks_and_generates_as_one_device(
    checkpoint, reads
):
    loaded = load_model_dir(checkpoint, lazy=True)  # what `jaxhet serve --model DIR` does: no weights read here
    assert not reads
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(loaded.model)))
    replica = planners.ServeReplica(
        model="m", kind="cpu", tp=TP, devices=tuple(range(TP)), max_batch=1, capacity_rps=1.0, routed_rps=1.0
    )
    plan = planners.ServePlan((replica,), "min_latency", throughput_scale=1.0, price_per_hour=0.0, rates={"m": 1.0})
    config = EngineConfig(
        max_running=1, page_size=16, num_pages=4, kv_format="float32", max_model_len=32, prefill_chunk=16
    )
    (deployment,) = build_deployments({"m": loaded}, config, plan=plan).values()
    assert_only_device_blocks_read(reads, tp_shardings(Mesh(np.array(jax.devices()[:TP]), ("tp",)))[1])
    prompt = [3, 14, 15, 92, 65, 35]

    async def served() -> list[int]:
        greedy = SamplingParams(max_tokens=6, temperature=0)
        outputs = [out async for _, out in deployment.generate("r", prompt, greedy)]
        await asyncio.gather(*(r.close() for r in deployment.replicas))
        return outputs[-1].token_ids

    whole = hf.load_pretrained(checkpoint)
    (want,) = generate(whole, [prompt], SamplingConfig(max_new_tokens=6), jax.random.key(0))
    assert asyncio.run(served()) == want


def test_training_on_a_plan_reads_each_groups_blocks_into_its_copy(checkpoint, reads, tmp_path):
    """`jaxhet train --set model=DIR` on a plan: a TP4 stage and a TP2 stage each read only their devices' blocks of
    the tensors they split, and every group's copy holds the checkpoint's values in its layout."""
    from jaxhet.train import TrainConfig
    from jaxhet.train.loop import build_model
    from jaxhet.train.step import initial_state, plan_execution
    from meshes import HetMesh

    cluster = planners.ClusterSpec.from_dict({"name": "six", "nodes": [{"gpu": "H100", "count": 6}]})
    stages = (planners.Stage((0, 1, 2, 3), "H100", 4, (0, 1)), planners.Stage((4, 5), "H100", 2, (1, 2), zero=1))
    plan = planners.TrainPlan((planners.Replica(stages, 2, 1),), 2, 2, 16)
    config = TrainConfig.load(None, {"model": str(checkpoint), "checkpoint_dir": str(tmp_path / "run")})
    model = build_model(config, CONFIG.vocab_size, jax.random.key(0))
    assert not reads  # the model is shapes only
    execution = plan_execution(model, plan, HetMesh.from_cluster(cluster))
    whole = llama_params(hf.load_pretrained(checkpoint))
    reads.clear()
    _, state = initial_state(config, model, execution)
    block_shapes: dict[str, set] = {}
    for name, path, transposed in hf.parameter_paths(CONFIG):
        for layout, copy in zip(execution.shardings, state["params"], strict=True):
            sharding, array, want = layout, copy, whole
            for key in path:
                sharding, array, want = sharding[key], array[key], want[key]
            if sharding is None:
                assert array is None
                continue
            block = sharding.shard_shape(array.shape)
            block_shapes.setdefault(name, set()).add(block[::-1] if transposed else block)
            assert {shard.data.shape for shard in array.addressable_shards} == {block}
            np.testing.assert_array_equal(np.asarray(array), np.asarray(want))
    for name, shape in reads:
        assert shape in block_shapes[name], (name, shape)  # never a whole tensor where every holder splits it
