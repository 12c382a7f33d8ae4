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

    `length_buckets` (strictly increasing row lengths, e.g. (2048, 16384, 65536)) groups documents by length
    (`jaxhet.data.buckets`): a batch then holds rows of one bucket's length, as many as fit the token budget
    `batch_size * seq_len`, instead of `batch_size` rows of `seq_len`.
    """

    source: str = STDLIB_SOURCE
    seq_len: int = 128
    batch_size: int = 16
    seed: int = 0
    tokenizer: str = BYTE_TOKENIZER
    max_documents: int | None = None
    validation_fraction: float = 0.0
    length_buckets: tuple[int, ...] | None = None

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
        if self.length_buckets is not None:
            object.__setattr__(self, "length_buckets", _checked_buckets(self.length_buckets, self.batch_tokens))

    @property
    def batch_tokens(self) -> int:
        """Tokens a batch holds: `batch_size` rows of `seq_len`; with `length_buckets`, each bucket's budget."""
        return self.batch_size * self.seq_len

    @property
    def longest_row(self) -> int:
        """The longest row a batch can have: the last bucket's length, or `seq_len`."""
        return self.seq_len if self.length_buckets is None else self.length_buckets[-1]

    def bucket_rows(self, length: int) -> int:
        """Rows of a batch of the bucket of row length `length`: as many as fit the token budget."""
        return self.batch_tokens // length


def _checked_buckets(buckets: object, budget: int) -> tuple[int, ...]:
    """`buckets` as a tuple, or a ConfigError naming the field and what it allows."""
    items = tuple(buckets) if isinstance(buckets, (list, tuple)) else None
    integers = items and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in items)
    if not integers or list(items) != sorted(set(items)):
        raise ConfigError(
            f"length_buckets must be a non-empty list of strictly increasing integers >= 1 (row lengths in tokens), "
            f"got {buckets!r}"
        )
    if items[-1] > budget:
        raise ConfigError(
            f"length_buckets: a row of {items[-1]} tokens is longer than a batch's token budget, batch_size x seq_len "
            f"= {budget}; every bucket must be at most {budget}"
        )
    return items


def check_split(split: str, config: DataConfig) -> None:
    """Raise a `ConfigError` unless `split` names a split this configuration has."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "validation" and config.validation_fraction == 0:
        raise ConfigError("split 'validation' needs validation_fraction > 0, got 0")
