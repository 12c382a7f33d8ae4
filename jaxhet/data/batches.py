"""An endless, checkpointable iterator of packed training batches.

Documents are read and tokenized one at a time in a seeded per-epoch order and packed greedily into rows of
`seq_len + 1` tokens. A document that does not fit continues in the next row, which starts again with the last
token of the previous one, so every next-token pair of every document is trained exactly once per epoch. The
position between batches is (epoch, document, token offset): a few integers, independent of `seq_len` and
`batch_size`, from which the same continuation is rebuilt by re-reading one document.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from jaxhet.data.config import DataConfig, check_split
from jaxhet.data.order import epoch_order, split_documents
from jaxhet.data.packing import batch_from_rows
from jaxhet.data.sources import open_source
from jaxhet.data.tokens import MIN_DOCUMENT_TOKENS, document_tokens
from jaxhet.tokenizers import load_tokenizer

STATE_VERSION = 1


class PackedBatches:
    """Batches of `input_ids`, `targets`, `weights` and `segment_ids`, each `[batch_size, seq_len]`, forever."""

    def __init__(self, config: DataConfig, split: str = "train", documents: np.ndarray | None = None):
        """With `documents` (indices into the source), only those of the split's documents are read (one length
        bucket's, `jaxhet.data.buckets`); `config.length_buckets` is not read here."""
        check_split(split, config)
        self.config = config
        self.split = split
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.vocab_size: int = self.tokenizer.vocab_size
        self._source = open_source(config.source)
        self._documents = split_documents(
            len(self._source),
            seed=config.seed,
            split=split,
            validation_fraction=config.validation_fraction,
            max_documents=config.max_documents,
        )
        if documents is not None:
            self._documents = self._documents[np.isin(self._documents, documents)]
        self._seek(epoch=0, position=0, offset=0)

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        row_len = self.config.seq_len + 1
        tokens = np.empty((self.config.batch_size, row_len), np.int32)
        segments = np.empty((self.config.batch_size, row_len), np.int32)
        for row in range(self.config.batch_size):
            self._fill_row(tokens[row], segments[row])
        return batch_from_rows(tokens, segments)

    def state(self) -> dict[str, Any]:
        """The position between batches, as JSON-serialisable plain data."""
        position = {"epoch": self._epoch, "position": self._position_in_epoch, "offset": self._offset}
        return {"version": STATE_VERSION, **self._identity(), **position}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where the iterator that produced `state` stood; a state from another corpus, split,
        seed or tokenizer, or one pointing outside its documents, raises a `ValueError`."""
        expected = {"version": STATE_VERSION, **self._identity()}
        differences = [
            f"{key} {state.get(key)!r} (here {value!r})" for key, value in expected.items() if state.get(key) != value
        ]
        if differences:
            raise ValueError(f"the data state belongs to another corpus, split or tokenizer: {'; '.join(differences)}")
        epoch, position, offset = (state.get(key) for key in ("epoch", "position", "offset"))
        counters_valid = all(isinstance(v, int) and v >= 0 for v in (epoch, position, offset))
        if not counters_valid or position >= len(self._documents):
            raise ValueError(f"the data state's position is invalid: epoch {epoch!r}, position {position!r}")
        self._seek(epoch=epoch, position=position, offset=offset)
        if offset >= len(self._tokens) - 1:
            raise ValueError(f"the data state's offset {offset} lies past the end of its document")

    @functools.cached_property
    def tokens_per_epoch(self) -> int:
        """Tokens packed per epoch (documents with their BOS/EOS), counted by tokenizing the split once."""
        _, lengths = self.document_lengths
        return int(np.sum(lengths[lengths >= MIN_DOCUMENT_TOKENS]))

    @functools.cached_property
    def document_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(the split's documents as source indices, each one's token count with its BOS/EOS), by tokenizing each
        document once."""
        lengths = [len(document_tokens(self.tokenizer, self._source.read(int(d)))) for d in self._documents]
        return self._documents.copy(), np.asarray(lengths, dtype=np.int64)

    def _identity(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same documents and tokens here."""
        config = self.config
        return {
            "source": config.source,
            "tokenizer": config.tokenizer,
            "seed": config.seed,
            "split": self.split,
            "validation_fraction": config.validation_fraction,
            "max_documents": config.max_documents,
            "num_documents": len(self._documents),
        }

    def _seek(self, *, epoch: int, position: int, offset: int) -> None:
        self._epoch = epoch
        self._order = epoch_order(self._documents, seed=self.config.seed, epoch=epoch)
        self._position_in_epoch = position
        self._offset = offset
        self._tokens = self._read_current()

    def _read_current(self) -> np.ndarray:
        """Tokens of the document at the current position, moving past documents too short to train on."""
        for _ in range(len(self._order)):
            tokens = document_tokens(self.tokenizer, self._source.read(int(self._order[self._position_in_epoch])))
            if len(tokens) >= MIN_DOCUMENT_TOKENS:
                return tokens
            self._advance_position()
        raise ValueError(f"no documents with text in {self._source.description}")

    def _advance_position(self) -> None:
        self._offset = 0
        self._position_in_epoch += 1
        if self._position_in_epoch == len(self._order):
            self._epoch += 1
            self._position_in_epoch = 0
            self._order = epoch_order(self._documents, seed=self.config.seed, epoch=self._epoch)

    def _fill_row(self, tokens: np.ndarray, segments: np.ndarray) -> None:
        """Pack documents into one row in place; segment ids count documents from 1 within the row."""
        filled = 0
        segment = 0
        while filled < len(tokens):
            take = min(len(tokens) - filled, len(self._tokens) - self._offset)
            segment += 1
            tokens[filled : filled + take] = self._tokens[self._offset : self._offset + take]
            segments[filled : filled + take] = segment
            filled += take
            self._offset += take
            if self._offset == len(self._tokens):
                self._advance_position()
                self._tokens = self._read_current()
            elif filled == len(tokens):
                self._offset -= 1  # the next row starts with this row's last token, its first input
