"""Length-bucketed batches: documents grouped by length, each batch packed from the documents of one bucket.

`DataConfig.length_buckets` lists row lengths. A document of n tokens (n - 1 next-token pairs) belongs to the first
bucket whose rows hold all its pairs, documents longer than the last bucket to the last one (packed over several
of its rows, as without buckets). Each bucket is a `PackedBatches` over its own documents with rows of the
bucket's length, as many as fit the token budget `batch_size * seq_len`: short documents are packed with short
ones, and only the long ones pay for long rows.

Which bucket the next batch comes from is drawn from the seed and the batch number, each bucket with probability
proportional to its number of documents: every document is as likely to come next whatever its length, so the
buckets of short documents pass through their epochs in fewer tokens than those of long ones. The position between
batches is the batch number and each bucket's own position, so a resumed run continues the same batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxhet.data.batches import PackedBatches
from jaxhet.data.config import DataConfig
from jaxhet.data.order import batch_bucket
from jaxhet.data.tokens import MIN_DOCUMENT_TOKENS
from jaxhet.models.config import ConfigError

STATE_VERSION = 1


def bucket_index(num_tokens: np.ndarray, lengths: tuple[int, ...]) -> np.ndarray:
    """Per document of `num_tokens` tokens, the index of its bucket among row `lengths`."""
    fits = np.searchsorted(np.asarray(lengths), np.asarray(num_tokens) - 1, side="left")
    return np.minimum(fits, len(lengths) - 1)


class BucketedBatches:
    """Batches of `input_ids`, `targets`, `weights` and `segment_ids`, each `[rows, length]` of one bucket, forever;
    `upcoming` is the row length of the next batch."""

    def __init__(self, config: DataConfig, split: str = "train"):
        if config.length_buckets is None:
            raise ConfigError("BucketedBatches needs data.length_buckets, got None")
        self.config = config
        self.lengths: tuple[int, ...] = config.length_buckets
        whole = PackedBatches(dataclasses.replace(config, length_buckets=None), split)
        self.tokenizer = whole.tokenizer
        self.vocab_size: int = whole.vocab_size
        documents, num_tokens = whole.document_lengths
        trainable = num_tokens >= MIN_DOCUMENT_TOKENS
        buckets = bucket_index(num_tokens, self.lengths)
        members = [documents[trainable & (buckets == b)] for b in range(len(self.lengths))]
        self.documents_per_bucket = np.asarray([len(m) for m in members])
        self._streams = [self._stream(length, m, split) for length, m in zip(self.lengths, members, strict=True)]
        self._batch = 0

    def _stream(self, length: int, documents: np.ndarray, split: str) -> PackedBatches | None:
        """The batches of one bucket; None for a bucket no document falls in (never drawn)."""
        if not len(documents):
            return None
        shape = dataclasses.replace(
            self.config, seq_len=length, batch_size=self.config.bucket_rows(length), length_buckets=None
        )
        return PackedBatches(shape, split, documents=documents)

    def __iter__(self) -> BucketedBatches:
        return self

    @property
    def drawn(self) -> list[int]:
        """The row lengths of the buckets batches come from: those with documents."""
        return [length for length, stream in zip(self.lengths, self._streams, strict=True) if stream is not None]

    @property
    def upcoming(self) -> int:
        """The row length (bucket) of the batch `next` returns."""
        return self.lengths[self._upcoming_index()]

    def _upcoming_index(self) -> int:
        return batch_bucket(self.documents_per_bucket, seed=self.config.seed, batch=self._batch)

    def __next__(self) -> dict[str, np.ndarray]:
        stream = self._streams[self._upcoming_index()]
        assert stream is not None  # a bucket without documents has weight 0
        self._batch += 1
        return next(stream)

    def state(self) -> dict[str, Any]:
        """The position between batches, as JSON-serialisable plain data."""
        streams = [None if s is None else s.state() for s in self._streams]
        return {
            "version": STATE_VERSION,
            "length_buckets": list(self.lengths),
            "batch": self._batch,
            "buckets": streams,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where the iterator that produced `state` stood; a state of other buckets, or one whose
        buckets belong to another corpus, split or tokenizer (`PackedBatches.restore`), raises a `ValueError`."""
        if state.get("version") != STATE_VERSION or state.get("length_buckets") != list(self.lengths):
            raise ValueError(
                f"the data state belongs to other length buckets: version {state.get('version')!r}, length_buckets "
                f"{state.get('length_buckets')!r} (here version {STATE_VERSION}, length_buckets {list(self.lengths)})"
            )
        batch, streams = state.get("batch"), state.get("buckets")
        if (
            not isinstance(batch, int)
            or batch < 0
            or not isinstance(streams, list)
            or len(streams) != len(self.lengths)
        ):
            raise ValueError(f"the data state's position is invalid: batch {batch!r}, buckets {streams!r}")
        for length, stream, saved in zip(self.lengths, self._streams, streams, strict=True):
            if (stream is None) != (saved is None):
                raise ValueError(f"the data state's bucket {length} differs in having documents from this corpus's")
            if stream is not None:
                stream.restore(saved)
        self._batch = batch
