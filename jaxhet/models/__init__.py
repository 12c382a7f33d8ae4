"""Flax NNX language models and their Hugging Face checkpoint format."""

from jaxhet.models.attention import attention, attention_mask
from jaxhet.models.config import ATTENTION_BACKENDS, ConfigError, LlamaConfig, RopeScaling
from jaxhet.models.hf import CheckpointError, load_pretrained, load_sharded_params, pretrained_config, save_pretrained
from jaxhet.models.llama import KVCache, Llama, segment_positions

# `Llama.from_pretrained(path)` and `model.save_pretrained(path)` are the public spellings of the converter's
# functions. The converter depends on the model, so the model's module cannot name it; this package, which holds
# both, binds them.
Llama.from_pretrained = staticmethod(load_pretrained)
Llama.save_pretrained = save_pretrained

__all__ = [
    "ATTENTION_BACKENDS",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "RopeScaling",
    "attention",
    "attention_mask",
    "load_pretrained",
    "load_sharded_params",
    "pretrained_config",
    "save_pretrained",
    "segment_positions",
]
