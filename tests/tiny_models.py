"""A tiny float32 Llama with the byte tokenizer, as the serving tests load it: seeded, and chatting as a plain
transcript."""

from __future__ import annotations

import jax
from flax import nnx

from jaxhet.chat_template import TRANSCRIPT, load_chat_template
from jaxhet.loading import LoadedModel
from jaxhet.models import Llama, LlamaConfig
from jaxhet.tokenizers import ByteTokenizer


def tiny_loaded(seed: int, layers: int = 2) -> LoadedModel:
    """A tiny Llama of `layers` blocks initialised from `seed`, named `tiny-<seed>`."""
    tokenizer = ByteTokenizer()
    config = LlamaConfig.tiny(vocab_size=tokenizer.vocab_size, num_layers=layers, dtype="float32")
    model = Llama(config, rngs=nnx.Rngs(params=jax.random.key(seed)))
    return LoadedModel(model, tokenizer, f"tiny-{seed}", chat_template=load_chat_template(None, TRANSCRIPT))
