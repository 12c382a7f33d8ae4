"""Find the model a command should use: a `jaxhet train` run, a local Hugging Face directory, or a fresh tiny one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx
from jaxtyping import PRNGKeyArray

from jaxhet.models import Llama, LlamaConfig
from jaxhet.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer, and a one-line description of where it came from."""

    model: Llama
    tokenizer: Tokenizer
    source: str


def load_model(
    *, run: Path | None = None, hf_dir: Path | None = None, dtype: str | None = None, key: PRNGKeyArray | None = None
) -> LoadedModel:
    """The newest checkpoint of `run`, or the Hugging Face checkpoint in `hf_dir`, or (neither given) a fresh tiny
    Llama with the byte tokenizer initialised from `key`."""
    if run is not None and hf_dir is not None:
        raise ValueError("give a train run or a Hugging Face directory, not both")
    if run is not None:
        from jaxhet.train import load_trained

        trained = load_trained(run)
        return LoadedModel(trained.model, trained.tokenizer, f"{run} (step {trained.meta['step']})")
    if hf_dir is not None:
        model = Llama.from_pretrained(hf_dir, dtype=dtype)
        tokenizer = load_tokenizer(hf_dir) if (Path(hf_dir) / "tokenizer.json").is_file() else ByteTokenizer()
        return LoadedModel(model, tokenizer, str(hf_dir))
    tokenizer = ByteTokenizer()
    config = LlamaConfig.tiny(vocab_size=tokenizer.vocab_size, **({"dtype": dtype} if dtype else {}))
    model = Llama(config, rngs=nnx.Rngs(params=jax.random.key(0) if key is None else key))
    return LoadedModel(model, tokenizer, "a fresh tiny model (random weights: expect noise until it is trained)")


def load_model_dir(path: Path, *, dtype: str | None = None) -> LoadedModel:
    """A `jaxhet train` run (it holds config.yaml) or a Hugging Face directory (config.json), told apart by content."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return load_model(run=path)
    if (path / "config.json").is_file():
        return load_model(hf_dir=path, dtype=dtype)
    raise FileNotFoundError(f"{path} is neither a jaxhet train run (config.yaml) nor a Hugging Face model directory")
