"""Hugging Face Llama checkpoints: read and write `config.json` + safetensors (single file or sharded).

One table (`parameter_table`) pairs every HF tensor name with the model variable that holds it, so loading and
saving cannot drift apart. Torch-style linear weights are [out, in]; NNX kernels are [in, out].
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxhet.models.config import LlamaConfig
from jaxhet.models.llama import Llama

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write that are recomputed from the config, never learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file or tensor at fault."""


def _linear_entries(prefix: str, linear: nnx.Linear) -> Iterator[tuple[str, nnx.Variable, bool]]:
    yield f"{prefix}.weight", linear.kernel, True
    if linear.bias is not None:
        yield f"{prefix}.bias", linear.bias, False


def parameter_table(model: Llama) -> list[tuple[str, nnx.Variable, bool]]:
    """(HF tensor name, model variable, stored transposed?) for every parameter of `model`."""
    entries = [("model.embed_tokens.weight", model.embed_tokens.embedding, False)]
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}"
        entries.append((f"{prefix}.input_layernorm.weight", layer.input_layernorm.weight, False))
        entries.append((f"{prefix}.post_attention_layernorm.weight", layer.post_attention_layernorm.weight, False))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            entries.extend(_linear_entries(f"{prefix}.self_attn.{name}", getattr(layer.self_attn, name)))
        for name in ("gate_proj", "up_proj", "down_proj"):
            entries.extend(_linear_entries(f"{prefix}.mlp.{name}", getattr(layer.mlp, name)))
    entries.append(("model.norm.weight", model.norm.weight, False))
    if not model.config.tie_word_embeddings:
        entries.extend(_linear_entries("lm_head", model.lm_head))
    return entries


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


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    attention_backend: str | None = None,
) -> Llama:
    """Build a `Llama` from a local HF directory. `dtype` overrides the compute dtype and, unless `param_dtype` is
    given, the parameter dtype too (training asks for bfloat16 compute over float32 master weights this way)."""
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
    config = LlamaConfig.from_hf_dict(read_config(path), **overrides)
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    files = _weight_files(path)
    table = parameter_table(model)
    expected = {name for name, _, _ in table}
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
    with ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, framework="numpy")) for file in set(files.values())}
        for name, variable, transposed in table:
            tensor = handles[files[name]].get_tensor(name)
            target = variable.get_value()
            expected_shape = target.shape[::-1] if transposed else target.shape
            if tensor.shape != expected_shape:
                raise CheckpointError(
                    f"tensor {name} has shape {tuple(tensor.shape)}, the config implies {tuple(expected_shape)}"
                )
            variable.set_value(jnp.asarray(tensor.T if transposed else tensor, dtype=target.dtype))
    return model


def save_pretrained(model: Llama, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `config.json` and the weights, split into shards with an index above `max_shard_bytes`."""
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
