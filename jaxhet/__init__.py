"""jaxhet: train and serve language models with JAX on heterogeneous GPU clusters."""

from jaxhet.models import CheckpointError, ConfigError, KVCache, Llama, LlamaConfig

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "KVCache", "Llama", "LlamaConfig", "__version__"]
