"""`ModelRunner`: the engine's device side, one jitted forward-and-sample step over a batch of sequence chunks.

Every call has one of a few static shapes: decode batches `[rows, 1]` and prefill batches `[rows, tokens]` with
rows a power of two up to `max_running` and `rows * tokens` equal to the prefill budget. `warmup` compiles them
all, so a new request never waits for a compilation. The KV pools are donated to each step and updated in place.
Pages can be exported and imported, which is how a prefill engine hands a sequence's cache to a decode engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxhet.models.config import LlamaConfig
from jaxhet.models.hf import load_sharded_params
from jaxhet.models.llama import Llama
from jaxhet.parallel import llama_params, megatron_specs, module_from_params, shard_config
from jaxhet.sampling import sample_rows
from jaxhet.serve.config import MAX_TOP_LOGPROBS, EngineConfig
from jaxhet.serve.paged_cache import LayerPool, PagedKVCache, create_pools

MIN_PREFILL_TOKENS = 8
TP_AXIS = "tp"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Host-side inputs of one step: row b feeds `tokens[b, :input_lengths[b]]` after `lengths[b]` cached tokens
    held in pages `block_tables[b]`, and samples with its own settings and key `(seeds[b], counts[b])`."""

    tokens: np.ndarray
    block_tables: np.ndarray
    lengths: np.ndarray
    input_lengths: np.ndarray
    seeds: np.ndarray
    counts: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray

    @classmethod
    def empty(cls, rows: int, tokens: int, pages_per_sequence: int) -> StepInputs:
        """All-padding inputs: rows that read page 0, write nothing and sample greedily."""
        ints = partial(np.zeros, dtype=np.int32)
        return cls(
            tokens=ints((rows, tokens)),
            block_tables=ints((rows, pages_per_sequence)),
            lengths=ints(rows),
            input_lengths=ints(rows),
            seeds=ints(rows),
            counts=ints(rows),
            temperature=np.zeros(rows, np.float32),
            top_k=ints(rows),
            top_p=np.ones(rows, np.float32),
        )


@dataclasses.dataclass(frozen=True)
class StepOutputs:
    """Per row: the sampled token, its log-probability, and the `MAX_TOP_LOGPROBS` most likely tokens."""

    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def _forward_and_sample(model: Llama, pools: tuple[LayerPool, ...], inputs: StepInputs):
    cache = PagedKVCache(pools, inputs.block_tables, inputs.lengths)
    logits, cache = model.extend(inputs.tokens, cache, inputs.input_lengths, last_only=True)
    logits = logits[:, 0].astype(jnp.float32)
    keys = jax.vmap(lambda seed, count: jax.random.fold_in(jax.random.key(seed), count))(inputs.seeds, inputs.counts)
    tokens = sample_rows(logits, keys, inputs.temperature, inputs.top_k, inputs.top_p)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_TOP_LOGPROBS, logprobs.shape[-1]))
    return (tokens, chosen, top_ids, top_logprobs), cache.pools


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("pools",))
def _step(graphdef, state, pools: tuple[LayerPool, ...], inputs: StepInputs):
    return _forward_and_sample(nnx.merge(graphdef, state), pools, inputs)


def _place_params(model: Llama, shardings, weights_dir: Path | None):
    """`model`'s parameters laid out by `shardings`: read block by block from `weights_dir` when given, else copied."""
    if weights_dir is not None:
        return load_sharded_params(weights_dir, model.config, shardings)
    return jax.device_put(llama_params(model), shardings)


def serving_backend(model_backend: str, kv_format: str) -> str:
    """The attention backend an engine runs: `sage` (int8 q·kᵀ prefill) over an int8 KV cache, whose keys are
    int8 already, else the model's own."""
    return "sage" if kv_format == "int8" else model_backend


def _abstract_model(config: LlamaConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and abstract state of a `Llama` built from `config` (nothing allocated)."""
    return nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))


def _tensor_parallel_program(
    model: Llama, config: LlamaConfig, mesh: Mesh, pools: tuple[LayerPool, ...], weights_dir: Path | None
):
    """The step of a replica of `model`, specialised to `config`, split over `mesh`'s tp axis (Megatron layout, KV
    pools split by kv head), and the weights laid out for it. Every shard samples the same tokens from the same
    (all-reduced) logits."""
    tp = mesh.shape[TP_AXIS]
    graphdef, abstract = _abstract_model(shard_config(config, tp, TP_AXIS))
    specs = megatron_specs(llama_params(model), tp, TP_AXIS)
    params = _place_params(model, jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs), weights_dir)
    pool_specs = jax.tree.map(lambda _: P(None, None, TP_AXIS), pools)

    def body(params, pools, inputs):
        return _forward_and_sample(module_from_params(graphdef, abstract, params), pools, inputs)

    sharded = jax.shard_map(body, mesh=mesh, in_specs=(specs, pool_specs, P()), out_specs=(P(), pool_specs))
    return jax.jit(sharded, donate_argnums=(1,)), params, jax.tree.map(lambda s: NamedSharding(mesh, s), pool_specs)


@jax.jit
def _gather_pages(pools: tuple[LayerPool, ...], pages: jax.Array) -> tuple[LayerPool, ...]:
    return jax.tree.map(lambda pool: pool[pages], pools)


@partial(jax.jit, donate_argnames=("pools",))
def _scatter_pages(pools: tuple[LayerPool, ...], pages: jax.Array, data: tuple[LayerPool, ...]):
    return jax.tree.map(lambda pool, new: pool.at[pages].set(new, mode="drop"), pools, data)


def page_runs(count: int) -> list[int]:
    """`count` split into distinct powers of two, largest first (37 -> 32, 4, 1): the run lengths pages are handed
    over in."""
    return [1 << bit for bit in reversed(range(count.bit_length())) if count >> bit & 1]


class ModelRunner:
    """Owns the model's weights and the KV pools on its devices and runs steps on them: one device, or several
    that split every layer tensor-parallel (heads and FFN columns; the kv-head count must divide by their number).

    With `weights_dir` (the Hugging Face directory `model` comes from), each device reads only its own block of the
    weights from there (`load_sharded_params`), and `model` may be abstract (`nnx.eval_shape`): a model larger
    than one device is never whole anywhere. Steps attend with `attention_backend` (`serving_backend`).
    """

    def __init__(
        self,
        model: Llama,
        config: EngineConfig,
        *,
        devices: Sequence[jax.Device] | None = None,
        weights_dir: Path | None = None,
    ):
        self.config = config
        self.devices = tuple(devices or jax.devices()[:1])
        self.attention_backend = serving_backend(model.config.attention_backend, config.kv_format)
        serving = model.config.replace(attention_backend=self.attention_backend)
        make_pools = partial(create_pools, model.config, config.num_pages, config.page_size, config.kv_format)
        pools = jax.eval_shape(make_pools)
        if len(self.devices) == 1:
            graphdef, _ = _abstract_model(serving)
            state = nnx.state(model)
            self._pool_shardings = jax.tree.map(lambda _: SingleDeviceSharding(self.devices[0]), pools)
            state.replace_by_pure_dict(_place_params(model, SingleDeviceSharding(self.devices[0]), weights_dir))
            self._state = state
            self._program = partial(_step, graphdef)
        else:
            mesh = Mesh(np.array(self.devices), (TP_AXIS,))
            self._program, self._state, self._pool_shardings = _tensor_parallel_program(
                model, serving, mesh, pools, weights_dir
            )
        self._pools = jax.jit(make_pools, out_shardings=self._pool_shardings)()

    def row_buckets(self) -> list[int]:
        """Batch sizes a decode step is padded to: powers of two up to `max_running` (and `max_running`)."""
        sizes = [1 << i for i in range(self.config.max_running.bit_length()) if 1 << i < self.config.max_running]
        return [*sizes, self.config.max_running]

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """(rows, tokens per row) of prefill steps: the budget split over 1, 2, 4, ... rows."""
        shapes, rows = [], 1
        while rows <= self.config.max_running and self.config.prefill_chunk // rows >= MIN_PREFILL_TOKENS:
            shapes.append((rows, self.config.prefill_chunk // rows))
            rows *= 2
        return shapes

    def decode_rows(self, count: int) -> int:
        return next(size for size in self.row_buckets() if size >= count)

    def prefill_shape(self, count: int) -> tuple[int, int]:
        """The smallest prefill shape with at least `count` rows (or the widest one there is)."""
        shapes = self.prefill_shapes()
        return next((shape for shape in shapes if shape[0] >= count), shapes[-1])

    def run(self, inputs: StepInputs) -> StepOutputs:
        outputs, self._pools = self._program(self._state, self._pools, inputs)
        return StepOutputs(*(np.asarray(x) for x in outputs))

    def export_pages(self, pages: list[int]) -> tuple[tuple[LayerPool, ...], ...]:
        """Copies of exactly `pages` from every layer, in the pools' stored format (scales included), as runs of
        power-of-two lengths (`page_runs`): a few compiled shapes, and no page more than the sequence holds."""
        runs, start = [], 0
        for size in page_runs(len(pages)):
            runs.append(_gather_pages(self._pools, np.asarray(pages[start : start + size], np.int32)))
            start += size
        return tuple(runs)

    def import_pages(self, pages: list[int], runs: Sequence[tuple[LayerPool, ...]]) -> None:
        """Write `export_pages` output (from any device) into `pages` here, run by run in order."""
        start = 0
        for run in runs:
            size = run[0].k.shape[0]
            table = np.asarray(pages[start : start + size], np.int32)
            self._pools = _scatter_pages(self._pools, table, jax.device_put(run, self._pool_shardings))
            start += size
        if start != len(pages):
            raise ValueError(f"a handoff of {start} pages cannot fill the {len(pages)} pages allocated for it")

    def warmup(self) -> None:
        """Compile every step shape now rather than on a user's request."""
        pages = self.config.pages_per_sequence
        for rows in self.row_buckets():
            self.run(StepInputs.empty(rows, 1, pages))
        for rows, tokens in self.prefill_shapes():
            self.run(StepInputs.empty(rows, tokens, pages))
        for size in page_runs((1 << self.config.pages_per_sequence.bit_length()) - 1):
            nowhere = np.full(size, self.config.num_pages, np.int32)  # out of the pool: the scatter drops it
            self._pools = _scatter_pages(self._pools, nowhere, _gather_pages(self._pools, np.zeros(size, np.int32)))
