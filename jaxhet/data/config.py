"""What the training data pipeline reads and how it batches it, as plain frozen data.

Validation here checks values only; paths are checked when a pipeline opens them, so that a configuration can be
built, stored and compared on a machine that does not hold the data.
"""

from __future__ import annotations

import dataclasses

from jaxhet.models.config import ConfigError
from jaxhet.tokenizers import BYTE_TOKENIZER

STDLIB_SOURCE = "stdlib"
SPLITS = ("train", "validation")


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _require_name_or_path(name: str, value: object, keyword: str, paths: str) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be {keyword!r} or a path to {paths}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer and batch shape of a training run.

    `source` is "stdlib" (the Python standard library's own source files), a directory (its *.txt, *.md and *.py
    files, recursively), a single text file, or a .jsonl file with one document per line under the key "text".
    `tokenizer` is "byte" or a directory holding `tokenizer.json`. `max_documents` caps each split after the
    seeded shuffle; `validation_fraction` of the documents is held out for the "validation" split.
    """

    source: str = STDLIB_SOURCE
    seq_len: int = 128
    batch_size: int = 16
    seed: int = 0
    tokenizer: str = BYTE_TOKENIZER
    max_documents: int | None = None
    validation_fraction: float = 0.0

    def __post_init__(self) -> None:
        _require_name_or_path("source", self.source, STDLIB_SOURCE, "a directory, a text file or a .jsonl file")
        _require_name_or_path("tokenizer", self.tokenizer, BYTE_TOKENIZER, "a directory holding tokenizer.json")
        _require_int("seq_len", self.seq_len, 1)
        _require_int("batch_size", self.batch_size, 1)
        _require_int("seed", self.seed, 0)
        if self.max_documents is not None:
            _require_int("max_documents", self.max_documents, 1)
        fraction = self.validation_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise ConfigError(f"validation_fraction must be a number in [0, 1), got {fraction!r}")


def check_split(split: str, config: DataConfig) -> None:
    """Raise a `ConfigError` unless `split` names a split this configuration has."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "validation" and config.validation_fraction == 0:
        raise ConfigError("split 'validation' needs validation_fraction > 0, got 0")
