"""Tokenizers: a byte-level one that needs no files (the default) and Hugging Face `tokenizer.json` files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from jaxhet.generation_config import eos_token_ids, read_json
from jaxhet.models.config import ConfigError

# The special tokens `transformers` names in a tokenizer config and hands to chat templates by these names.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer(Protocol):
    """What the models, trainer and server need from a tokenizer: `eos_id` ends a training document, and any of
    `stop_ids` (which holds `eos_id`) ends a generated reply."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    stop_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, then BOS, EOS and PAD; decoding skips special ids and repairs broken UTF-8."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258
    stop_ids = frozenset({eos_id})

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face fast tokenizer read from a local `tokenizer.json`.

    Replies end at any of `eos_ids` and at the `end_of_turn` token (when the vocabulary has it); the first of them
    is `eos_id`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        bos_id: int | None = None,
        eos_ids: Sequence[int] = (),
        end_of_turn: str | None = None,
    ):
        from tokenizers import Tokenizer as _Tokenizer

        self._tokenizer = _Tokenizer.from_file(str(path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        turn_id = self._tokenizer.token_to_id(end_of_turn) if end_of_turn is not None else None
        stops = [*eos_ids, *([turn_id] if turn_id is not None else [])]
        self.eos_id = stops[0] if stops else None
        self.stop_ids = frozenset(stops)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


BYTE_TOKENIZER = "byte"


def special_tokens(directory: Path) -> dict[str, str]:
    """The special tokens (`bos_token`, `eos_token`, ...) the `tokenizer_config.json` in `directory` names, as text
    (a config writes each as a string or as an added-token object with `content`)."""
    config = read_json(directory / "tokenizer_config.json")
    found = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            found[name] = value
    return found


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """The byte-level tokenizer for "byte"; otherwise the `tokenizer.json` in directory `spec`.

    In a Hugging Face checkpoint, BOS is `config.json`'s `bos_token_id`; the ids that end a reply are every
    `eos_token_id` of `config.json` and `generation_config.json` and the end-of-turn token `tokenizer_config.json`
    names as `eos_token` (`<|eot_id|>`, `<|im_end|>`); the first of them is the EOS a training document ends with.
    """
    if str(spec) == BYTE_TOKENIZER:
        return ByteTokenizer()
    directory = Path(spec).expanduser()
    if not (directory / "tokenizer.json").is_file():
        raise ConfigError(f"tokenizer must be {BYTE_TOKENIZER!r} or a directory holding tokenizer.json, got {spec!r}")
    bos = read_json(directory / "config.json").get("bos_token_id")
    return HFTokenizer(
        directory / "tokenizer.json",
        bos_id=bos if isinstance(bos, int) else None,
        eos_ids=eos_token_ids(directory),
        end_of_turn=special_tokens(directory).get("eos_token"),
    )
