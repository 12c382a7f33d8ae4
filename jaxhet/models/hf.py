"""Hugging Face checkpoints of the Llama family (`ARCHITECTURES`: Llama, Qwen2, Mistral, Qwen3): read and write
`config.json` + safetensors (single file or sharded).

This module depends on the model (`jaxhet.models.llama`), not the reverse: `load_pretrained` and `save_pretrained`
are its entry points (also `jaxhet.load_pretrained` / `jaxhet.save_pretrained`).

One table (`parameter_paths`) pairs every HF tensor name with the parameter that holds it, so loading and saving
cannot drift apart. Torch-style linear weights are [out, in]; NNX kernels are [in, out]. Loading reads each device's
block of each tensor straight into the layout asked for (one device, or split over a mesh), so a model larger than
one device loads onto the devices that serve or train it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Sharding, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxhet.models.config import LlamaConfig
from jaxhet.models.llama import Llama

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write that are recomputed from the config, never learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
Params = dict[str, Any]


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file or tensor at fault."""


ParamPath = tuple[str | int, ...]


def _linear_entries(prefix: str, path: ParamPath, bias: bool) -> Iterator[tuple[str, ParamPath, bool]]:
    yield f"{prefix}.weight", (*path, "kernel"), True
    if bias:
        yield f"{prefix}.bias", (*path, "bias"), False


def parameter_paths(config: LlamaConfig) -> list[tuple[str, ParamPath, bool]]:
    """(HF tensor name, path of the parameter in the model's pure dict, stored transposed?) for every parameter."""
    entries: list[tuple[str, ParamPath, bool]] = [("model.embed_tokens.weight", ("embed_tokens", "embedding"), False)]
    for i in range(config.num_layers):
        prefix, path = f"model.layers.{i}", ("layers", i)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            entries.append((f"{prefix}.{norm}.weight", (*path, norm, "weight"), False))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            bias = config.attention_bias or (config.qkv_bias and name != "o_proj")
            entries.extend(_linear_entries(f"{prefix}.self_attn.{name}", (*path, "self_attn", name), bias))
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                entries.append((f"{prefix}.self_attn.{norm}.weight", (*path, "self_attn", norm, "weight"), False))
        for name in ("gate_proj", "up_proj", "down_proj"):
            entries.extend(_linear_entries(f"{prefix}.mlp.{name}", (*path, "mlp", name), config.mlp_bias))
    entries.append(("model.norm.weight", ("norm", "weight"), False))
    if not config.tie_word_embeddings:
        entries.extend(_linear_entries("lm_head", ("lm_head",), False))
    return entries


def _variable(model: Llama, path: ParamPath) -> nnx.Variable:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def parameter_table(model: Llama) -> list[tuple[str, nnx.Variable, bool]]:
    """(HF tensor name, model variable, stored transposed?) for every parameter of `model`."""
    return [(name, _variable(model, path), transposed) for name, path, transposed in parameter_paths(model.config)]


def read_config(path: str | os.PathLike) -> dict:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} not found: a Hugging Face checkpoint directory needs a config.json")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from None


def _weight_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = {name: path / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointError(f"{file} is listed in {index} but missing")
        return files
    single = path / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


def pretrained_config(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    attention_backend: str | None = None,
) -> LlamaConfig:
    """The config of a local HF directory. `dtype` overrides the compute dtype and, unless `param_dtype` is given,
    the parameter dtype too (training asks for bfloat16 compute over float32 master weights this way)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    overrides = {}
    if dtype is not None:
        overrides.update(dtype=dtype, param_dtype=dtype)
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    if attention_backend is not None:
        overrides["attention_backend"] = attention_backend
    return LlamaConfig.from_hf_dict(read_config(path), **overrides)


def _checkpoint_files(path: str | os.PathLike, config: LlamaConfig) -> dict[str, Path]:
    """Each tensor `config`'s model needs, mapped to its safetensors file; names missing or unexpected tensors."""
    path = Path(path)
    files = _weight_files(path)
    expected = {name for name, _, _ in parameter_paths(config)}
    missing = sorted(expected - files.keys())
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks tensors: {', '.join(missing[:8])}")
    unexpected = sorted(
        name
        for name in files.keys() - expected
        if not name.endswith(_IGNORED_SUFFIXES) and not (name == "lm_head.weight" and config.tie_word_embeddings)
    )
    if unexpected:
        raise CheckpointError(f"checkpoint {path} has tensors this model does not: {', '.join(unexpected[:8])}")
    return files


def _check_shape(name: str, stored: tuple[int, ...], target: tuple[int, ...], transposed: bool) -> None:
    """Raise naming `name` unless a stored tensor of shape `stored` fills a parameter of shape `target`."""
    expected = target[::-1] if transposed else target
    if tuple(stored) != tuple(expected):
        raise CheckpointError(f"tensor {name} has shape {tuple(stored)}, the config implies {tuple(expected)}")


def _leaf_at(tree: Any, path: ParamPath) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _read_block(tensor: Any, transposed: bool, dtype: np.dtype, index: tuple[slice, ...]) -> np.ndarray:
    """The block `index` of a parameter (in the model's layout), read from the stored tensor alone."""
    block = tensor[index[::-1] if transposed else index]
    return np.asarray(block.T if transposed else block).astype(dtype)


def load_sharded_params(
    path: str | os.PathLike, config: LlamaConfig, shardings: Sharding | Any | None = None
) -> Params:
    """The parameters of `config`'s model read from the HF directory `path`, as a pure dict of arrays (keyed like
    `jaxhet.parallel.llama_params`) laid out by `shardings`.

    `shardings` is one `jax.sharding.Sharding` for every parameter, or a tree of them shaped like the parameters
    (e.g. `megatron_specs` over a TP mesh; a None leaf is not read and stays None, as in a plan's copy of a device
    group that holds only some layers); default: the first device. Every device's block of every tensor is
    read on its own (`safe_open(...).get_slice`, `jax.make_array_from_callback`), transposed and cast there, so a
    tensor the layout splits is never whole on a device, nor in host memory; a process reads only the blocks of its
    own devices.
    """
    abstract = nnx.state(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))).to_pure_dict()
    if shardings is None:
        shardings = SingleDeviceSharding(jax.devices()[0])
    files = _checkpoint_files(path, config)
    arrays = {}
    with ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, framework="numpy")) for file in set(files.values())}
        for name, param_path, transposed in parameter_paths(config):
            target = _leaf_at(abstract, param_path)
            tensor = handles[files[name]].get_slice(name)
            _check_shape(name, tuple(tensor.get_shape()), target.shape, transposed)
            sharding = shardings if isinstance(shardings, Sharding) else _leaf_at(shardings, param_path)
            if sharding is not None:
                read = partial(_read_block, tensor, transposed, target.dtype)
                arrays[param_path] = jax.make_array_from_callback(target.shape, sharding, read)
    return jax.tree_util.tree_map_with_path(lambda keys, _: arrays.get(tuple(k.key for k in keys)), abstract)


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    attention_backend: str | None = None,
    shardings: Sharding | Any | None = None,
) -> Llama:
    """Build a `Llama` from a local HF directory (config.json + safetensors, single file or sharded; overrides as in
    `pretrained_config`), its parameters laid out by `shardings` (one `jax.sharding.Sharding`, or a tree of them
    shaped like the parameters) as `load_sharded_params` reads them, each device reading only its own block
    (default: all on the first device)."""
    config = pretrained_config(path, dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    state.replace_by_pure_dict(load_sharded_params(path, config, shardings))
    return nnx.merge(graphdef, state)


def save_pretrained(model: Llama, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `config.json` and the weights, which transformers' class for the model's architecture loads; above
    `max_shard_bytes` the weights are split into shards with an index."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, variable, transposed in parameter_table(model):
        array = np.asarray(variable.get_value())
        tensors[name] = np.ascontiguousarray(array.T if transposed else array)
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for name, array in tensors.items():
        if shards[-1] and shard_bytes + array.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = array
        shard_bytes += array.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        (path / INDEX_FILE).unlink(missing_ok=True)
        save_file(shards[0], path / SINGLE_FILE, metadata=metadata)
    else:
        (path / SINGLE_FILE).unlink(missing_ok=True)
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / file, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, file))
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
