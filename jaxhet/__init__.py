"""jaxhet: train and serve language models with JAX on heterogeneous GPU clusters.

The public names are loaded on first use, so that `import jaxhet.cli` can set XLA flags before JAX starts.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "jaxhet.models",
    "ConfigError": "jaxhet.models",
    "KVCache": "jaxhet.models",
    "Llama": "jaxhet.models",
    "LlamaConfig": "jaxhet.models",
    "load_pretrained": "jaxhet.models",
    "load_sharded_params": "jaxhet.models",
    "pretrained_config": "jaxhet.models",
    "save_pretrained": "jaxhet.models",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxhet' has no attribute {name!r}")
