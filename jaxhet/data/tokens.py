"""Tokenizer loading for the data pipeline and the token sequence of one document."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxhet.data.config import BYTE_TOKENIZER
from jaxhet.models.config import ConfigError
from jaxhet.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer

# A document needs at least one (input, target) pair to teach anything.
MIN_DOCUMENT_TOKENS = 2


def _first_id(value: object) -> int | None:
    """A special-token id from a Hugging Face config, where a list means several and the first is canonical."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def load_data_tokenizer(spec: str) -> Tokenizer:
    """The byte-level tokenizer for "byte"; otherwise the `tokenizer.json` in directory `spec`, with BOS/EOS ids
    from the directory's `config.json` (`bos_token_id`, `eos_token_id`) when it is a Hugging Face checkpoint."""
    if spec == BYTE_TOKENIZER:
        return ByteTokenizer()
    directory = Path(spec).expanduser()
    if not (directory / "tokenizer.json").is_file():
        raise ConfigError(f"tokenizer must be {BYTE_TOKENIZER!r} or a directory holding tokenizer.json, got {spec!r}")
    config_path = directory / "config.json"
    model_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return HFTokenizer(
        directory / "tokenizer.json",
        bos_id=_first_id(model_config.get("bos_token_id")),
        eos_id=_first_id(model_config.get("eos_token_id")),
    )


def document_tokens(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """`[bos] + tokens + [eos]` (each special only when the tokenizer has it) as int32; empty text gives none."""
    ids = tokenizer.encode(text)
    if not ids:
        return np.zeros(0, np.int32)
    prefix = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    suffix = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    return np.asarray(prefix + ids + suffix, dtype=np.int32)
