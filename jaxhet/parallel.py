"""The Llama model specialised for HSPMD execution: pipeline stages and tensor-parallel shards.

`meshes` runs any model that can describe its pipeline stages (`meshes.StagedModel`); this module is that
description for `Llama`. A stage is built from the same layer classes as the whole model, with the config
specialised to one tensor-parallel shard (local head counts and FFN width, row-parallel outputs summed over the
`shard_map` axis), so the model code is traced once per group shape, never forked. Parameters travel as Flax
"pure dicts" (nested dicts of arrays) keyed like the whole model's, so a stage's slice is a dict selection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from jaxhet.models.config import ConfigError, LlamaConfig
from jaxhet.models.llama import DecoderLayer, Llama, add_output_head, output_logits, token_embedding, token_positions
from meshes.fsdp import Zero3, Zero3Layout
from meshes.staged import StageProgram, StageSpec

Params = dict[str, Any]
# Megatron layout: column-parallel projections split their outputs across shards, row-parallel ones their inputs.
_COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW_PARALLEL = ("o_proj", "down_proj")


def next_token_loss_sum(
    logits: Float[Array, "batch seq vocab"], targets: Int[Array, "batch seq"], weights: Float[Array, "batch seq"]
) -> Float[Array, ""]:
    """Sum over tokens of weighted cross-entropy, in float32; dividing by the token count gives the mean loss."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_loss = -jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_loss * weights)


def shard_config(config: LlamaConfig, tp: int, axis: str, cp_axis: str | None = None) -> LlamaConfig:
    """The config one of `tp` tensor-parallel shards sees (split over `cp_axis` too when given); names the field
    that does not divide."""
    if cp_axis is not None:
        config = config.replace(context_parallel_axis=cp_axis)
    if tp == 1:
        return config
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(config, name) % tp:
            raise ConfigError(f"{name} ({getattr(config, name)}) must be divisible by the stage's tp ({tp})")
    if config.attention_bias or config.mlp_bias or config.qkv_bias:
        raise ConfigError("tensor parallelism needs attention_bias, qkv_bias and mlp_bias off")
    return config.replace(
        num_heads=config.num_heads // tp,
        num_kv_heads=config.num_kv_heads // tp,
        intermediate_size=config.intermediate_size // tp,
        head_dim=config.head_dim,
        tensor_parallel_axis=axis,
    )


def _block(layer: DecoderLayer, x, positions, segment_ids):
    return layer(x, positions, segment_ids)


# What the cost model assumes of a recomputed block (`planners.cost_model.TrainCosts.layer_act_bytes` and
# `stage_memory_bytes` with `recompute`): it keeps only its input hidden states between forward and backward, and the
# backward pass re-runs the whole block, its TP all-reduces included (`layer_seconds`: 4 passes, 6 all-reduces), in
# one block's worth of working space. `nothing_saveable` saves no intermediate: the checkpoint's residuals are its
# inputs (hidden states, positions, segment ids) and the parameters, which are held anyway.
_recomputed_block = nnx.remat(_block, policy=jax.checkpoint_policies.nothing_saveable)


class LlamaStage(nnx.Module):
    """Blocks `layers[0]..layers[1]-1` of a Llama, with the embedding if first and the norm + head if last.

    With `recompute`, each block is rematerialised in the backward pass (see `_recomputed_block`): its
    intermediate activations are recomputed from its input rather than kept.
    """

    def __init__(self, config: LlamaConfig, spec: StageSpec, *, recompute: bool = False, rngs: nnx.Rngs):
        self.config = config
        self.spec = spec
        self.recompute = recompute
        if spec.first or (spec.last and config.tie_word_embeddings):
            self.embed_tokens = token_embedding(config, rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(spec.layers[1] - spec.layers[0])])
        if spec.last:
            add_output_head(self, config, rngs)

    def __call__(
        self,
        hidden: Float[Array, "batch seq hidden"] | None,
        batch: dict[str, Array],
        zero3: Zero3Stage | None = None,
    ):
        """Stage output: activations for the next stage, or the micro-batch's loss sum on the last stage. With
        `zero3`, the module holds its parameters split (ZeRO-3) and each part gathers its own where it runs."""
        segment_ids = batch.get("segment_ids")
        cp_axis = self.config.context_parallel_axis
        positions = token_positions(batch["input_ids"], segment_ids, cp_axis)
        if not self.spec.first:
            x = hidden
        elif zero3 is None:
            x = self.embed_tokens(batch["input_ids"])
        else:
            x = zero3.region(_embed, ("embed_tokens",))(self, batch["input_ids"])
        for index, layer in enumerate(self.layers):
            x = self._block(index, zero3)(layer, x, positions, segment_ids)
        if not self.spec.last:
            return x
        if zero3 is None:
            logits = output_logits(self, x)
        else:
            head = "embed_tokens" if self.config.tie_word_embeddings else "lm_head"
            logits = zero3.region(_head, ("norm", head))(self, x)
        loss_sum = next_token_loss_sum(logits, batch["targets"], batch["weights"])
        return loss_sum if cp_axis is None else jax.lax.psum(loss_sum, cp_axis)

    def _block(self, index: int, zero3: Zero3Stage | None) -> Callable:
        """Block `index`'s function of `(layer, x, positions, segment_ids)`: rematerialised with `recompute`;
        under ZeRO-3 its parameters gathered inside (see `Zero3Stage.block`)."""
        if zero3 is not None:
            return zero3.block(index, self.recompute)
        return _recomputed_block if self.recompute else _block


def _embed(stage: LlamaStage, input_ids: Int[Array, "batch seq"]) -> Float[Array, "batch seq hidden"]:
    return stage.embed_tokens(input_ids)


def _head(stage: LlamaStage, x: Float[Array, "batch seq hidden"]) -> Float[Array, "batch seq vocab"]:
    return output_logits(stage, x)


@dataclasses.dataclass(frozen=True)
class Zero3Stage:
    """Where a ZeRO-3 stage's split parameters are gathered (`meshes.fsdp`): a block's inside the block's
    rematerialised region, the embedding's, final norm's and head's inside the regions that use them, so that no
    gathered parameter is kept between the forward and the backward pass (each is gathered again there)."""

    layout: Zero3Layout

    def gathered(self, module: nnx.Module, stored: Params, specs: Params) -> nnx.Module:
        """`module` with each parameter named in `stored` (a subtree of the layout's, like `specs`) gathered."""
        graphdef, state = nnx.split(module)
        params = nnx.to_pure_dict(state)
        held = {key: params[key] for key in stored}
        params.update(self.layout.gather(held, stored, {key: specs[key] for key in stored}))
        return module_from_params(graphdef, state, params)

    def block(self, index: int, recompute: bool) -> Callable:
        """Block `index`'s `(layer, x, positions, segment_ids) -> x`, its parameters gathered inside a region
        that saves nothing (`recompute`) or everything but the gathered parameters."""
        stored, specs = self.layout.stored["layers"][index], self.layout.specs["layers"][index]

        def gathered_block(layer: DecoderLayer, x, positions, segment_ids):
            return _block(self.gathered(layer, stored, specs), x, positions, segment_ids)

        return nnx.remat(gathered_block, policy=self.layout.policy(recompute))

    def region(self, use: Callable, keys: tuple[str, ...]) -> Callable:
        """`use(stage, x)` on the stage with its parts `keys` (embedding, final norm, head) gathered, saving
        everything but the gathered parameters (these parts are not rematerialised: `recompute` is about blocks)."""
        stored = {key: self.layout.stored[key] for key in keys}

        def gathered_use(stage: LlamaStage, x):
            return use(self.gathered(stage, stored, self.layout.specs), x)

        return nnx.remat(gathered_use, policy=self.layout.policy(False))


def megatron_specs(params: Params, tp: int, tp_axis: str) -> Any:
    """`PartitionSpec`s of a (whole-model or stage) parameter dict in Megatron layout over `tp_axis`.

    Column-parallel projections split their output features, row-parallel ones their input features; norms and
    embeddings are replicated. With `tp == 1` everything is replicated.
    """

    def spec(path, _) -> P:
        names = [getattr(k, "key", None) for k in path]
        module, leaf = names[-2], names[-1]
        if tp == 1:
            return P()
        if module in _COLUMN_PARALLEL:
            return P(None, tp_axis) if leaf == "kernel" else P(tp_axis)
        if module in _ROW_PARALLEL and leaf == "kernel":
            return P(tp_axis, None)
        return P()

    return jax.tree_util.tree_map_with_path(spec, params)


@dataclasses.dataclass(frozen=True)
class StagedLlama:
    """`meshes.StagedModel` for a `Llama` config: slices parameters per stage and builds each stage's program."""

    config: LlamaConfig

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def stage_params(self, params: Params, spec: StageSpec) -> Params:
        out: Params = {"layers": {i - spec.layers[0]: params["layers"][i] for i in range(*spec.layers)}}
        if spec.first or (spec.last and self.config.tie_word_embeddings):
            out["embed_tokens"] = params["embed_tokens"]
        if spec.last:
            out["norm"] = params["norm"]
            if not self.config.tie_word_embeddings:
                out["lm_head"] = params["lm_head"]
        return out

    def stage_program(
        self,
        spec: StageSpec,
        tp: int,
        tp_axis: str,
        cp_axis: str | None = None,
        *,
        recompute: bool = False,
        zero3: Zero3 | None = None,
    ) -> StageProgram:
        """`spec`'s blocks as one TP shard's program; with `recompute`, every block is rematerialised in the
        backward pass, keeping only its input (what the planner's cost model charges a recomputed stage). With
        `zero3`, parameters are held split over the stage's mesh (`param_specs` says how) and gathered where used
        (`Zero3Stage`)."""
        local_config = shard_config(self.config, tp, tp_axis, cp_axis)
        stage = nnx.eval_shape(lambda: LlamaStage(local_config, spec, recompute=recompute, rngs=nnx.Rngs(0)))
        graphdef, abstract = nnx.split(stage)
        whole = nnx.eval_shape(lambda: LlamaStage(self.config, spec, rngs=nnx.Rngs(0)))
        shapes = nnx.state(whole).to_pure_dict()
        specs = megatron_specs(shapes, tp, tp_axis)
        if zero3 is None:
            split, held = None, specs
        else:
            layout = zero3.layout(shapes, specs)
            split, held = Zero3Stage(layout), layout.stored

        def apply(params: Params, hidden, batch):
            return module_from_params(graphdef, abstract, params)(hidden, batch, split)

        return StageProgram(apply=apply, param_specs=held)


def module_from_params(graphdef: nnx.GraphDef, state: nnx.State, params: Params) -> nnx.Module:
    """A module of `graphdef`'s structure holding `params` (a pure dict), leaving `state` untouched."""
    state = jax.tree.map(lambda leaf: leaf, state)
    state.replace_by_pure_dict(params)
    return nnx.merge(graphdef, state)


def llama_loss_sum(model: Llama) -> Callable[[Params, dict[str, Array]], Float[Array, ""]]:
    """`loss_sum(params, batch)` of the whole model: the single-device computation every plan must reproduce."""
    graphdef, state = nnx.split(model)

    def loss_sum(params: Params, batch: dict[str, Array]) -> Float[Array, ""]:
        logits = module_from_params(graphdef, state, params)(batch["input_ids"], segment_ids=batch.get("segment_ids"))
        return next_token_loss_sum(logits, batch["targets"], batch["weights"])

    return loss_sum


def llama_params(model: Llama) -> Params:
    """The model's parameters as a pure dict, the form `meshes` executors take and return."""
    return nnx.state(model, nnx.Param).to_pure_dict()
