"""Tokenizers: a byte-level one that needs no files (the default) and Hugging Face `tokenizer.json` files."""

from __future__ import annotations

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


def load_tokenizer(
    checkpoint_dir: str | os.PathLike | None = None, *, bos_id: int | None = None, eos_id: int | None = None
) -> Tokenizer:
    """The checkpoint's `tokenizer.json` when it has one, else the byte-level tokenizer."""
    if checkpoint_dir is not None:
        path = Path(checkpoint_dir) / "tokenizer.json"
        if path.is_file():
            return HFTokenizer(path, bos_id=bos_id, eos_id=eos_id)
    return ByteTokenizer()
