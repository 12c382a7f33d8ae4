"""Tokenizers: a byte-level one that needs no files (the default) and Hugging Face `tokenizer.json` files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    """What the models, trainer and server need from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, then BOS, EOS and PAD; decoding skips special ids and repairs broken UTF-8."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face fast tokenizer read from a local `tokenizer.json`."""

    def __init__(self, path: str | os.PathLike, *, bos_id: int | None = None, eos_id: int | None = None):
        from tokenizers import Tokenizer as _Tokenizer

        self._tokenizer = _Tokenizer.from_file(str(path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


BYTE_TOKENIZER = "byte"


def _first_id(value: object) -> int | None:
    """A special-token id from a Hugging Face config, where a list means several and the first is canonical."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """The byte-level tokenizer for "byte"; otherwise the `tokenizer.json` in directory `spec`, with BOS/EOS ids
    from the directory's `config.json` (`bos_token_id`, `eos_token_id`) when it is a Hugging Face checkpoint."""
    if str(spec) == BYTE_TOKENIZER:
        return ByteTokenizer()
    directory = Path(spec).expanduser()
    if not (directory / "tokenizer.json").is_file():
        from jaxhet.models.config import ConfigError

        raise ConfigError(f"tokenizer must be {BYTE_TOKENIZER!r} or a directory holding tokenizer.json, got {spec!r}")
    config_path = directory / "config.json"
    model_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return HFTokenizer(
        directory / "tokenizer.json",
        bos_id=_first_id(model_config.get("bos_token_id")),
        eos_id=_first_id(model_config.get("eos_token_id")),
    )
