"""Find the model a command should use: a `jaxhet train` run, a local Hugging Face directory, or a fresh tiny one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx
from jaxtyping import PRNGKeyArray

from jaxhet.chat_template import ChatTemplate, load_chat_template
from jaxhet.generation_config import SamplingDefaults
from jaxhet.models import Llama, LlamaConfig, load_pretrained, pretrained_config
from jaxhet.tokenizers import BYTE_TOKENIZER, ByteTokenizer, Tokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer, and a one-line description of where it came from.

    `weights_dir` is the Hugging Face directory the weights are in when they were left there (`lazy`): `model` is
    then abstract, and each serving engine reads its own blocks of the weights from it. `chat_template` turns a
    conversation into its prompt (None: the model takes no chat requests); `sampling_defaults` fill the sampling
    settings a request leaves unset.
    """

    model: Llama
    tokenizer: Tokenizer
    source: str
    weights_dir: Path | None = None
    chat_template: ChatTemplate | None = None
    sampling_defaults: SamplingDefaults = SamplingDefaults()


def load_model(
    *,
    run: Path | None = None,
    hf_dir: Path | None = None,
    dtype: str | None = None,
    key: PRNGKeyArray | None = None,
    lazy: bool = False,
    chat_template: str | Path | None = None,
) -> LoadedModel:
    """The newest checkpoint of `run`, or the Hugging Face checkpoint in `hf_dir`, or (neither given) a fresh tiny
    Llama with the byte tokenizer initialised from `key`. With `lazy`, a Hugging Face model's weights are not read
    here but by whoever places them (`LoadedModel.weights_dir`). `chat_template` (a Jinja file, or "transcript")
    replaces the template the checkpoint ships, if any."""
    if run is not None and hf_dir is not None:
        raise ValueError("give a train run or a Hugging Face directory, not both")
    if run is not None:
        from jaxhet.train import load_trained

        trained = load_trained(run)
        spec = trained.config.data.tokenizer
        template = load_chat_template(None if spec == BYTE_TOKENIZER else Path(spec), chat_template)
        source = f"{run} (step {trained.meta['step']})"
        return LoadedModel(trained.model, trained.tokenizer, source, chat_template=template)
    if hf_dir is not None:
        hf_dir = Path(hf_dir)
        tokenizer = load_tokenizer(hf_dir) if (hf_dir / "tokenizer.json").is_file() else ByteTokenizer()
        described = {
            "chat_template": load_chat_template(hf_dir, chat_template),
            "sampling_defaults": SamplingDefaults.from_checkpoint(hf_dir),
        }
        if lazy:
            config = pretrained_config(hf_dir, dtype=dtype)
            model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
            return LoadedModel(model, tokenizer, str(hf_dir), weights_dir=hf_dir, **described)
        return LoadedModel(load_pretrained(hf_dir, dtype=dtype), tokenizer, str(hf_dir), **described)
    tokenizer = ByteTokenizer()
    config = LlamaConfig.tiny(vocab_size=tokenizer.vocab_size, **({"dtype": dtype} if dtype else {}))
    model = Llama(config, rngs=nnx.Rngs(params=jax.random.key(0) if key is None else key))
    source = "a fresh tiny model (random weights: expect noise until it is trained)"
    return LoadedModel(model, tokenizer, source, chat_template=load_chat_template(None, chat_template))


def load_model_dir(
    path: Path, *, dtype: str | None = None, lazy: bool = False, chat_template: str | Path | None = None
) -> LoadedModel:
    """A `jaxhet train` run (it holds config.yaml) or a Hugging Face directory (config.json, its weights left
    unread with `lazy`), told apart by content."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return load_model(run=path, chat_template=chat_template)
    if (path / "config.json").is_file():
        return load_model(hf_dir=path, dtype=dtype, lazy=lazy, chat_template=chat_template)
    raise FileNotFoundError(f"{path} is neither a jaxhet train run (config.yaml) nor a Hugging Face model directory")
