"""Which documents a split holds, and in which order each epoch visits them.

Both come from the seed alone: one seeded permutation of all documents decides the validation/train split and the
`max_documents` cap, so the split's documents are the same every epoch; each epoch then shuffles them with a seed
derived from (seed, epoch). With length buckets, the bucket of each batch is drawn with a seed derived from (seed,
batch number).
"""

from __future__ import annotations

import numpy as np

from jaxhet.models.config import ConfigError

_SPLIT_STREAM = 0
_EPOCH_STREAM = 1
_BUCKET_STREAM = 2


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=stream))


def split_documents(
    num_documents: int, *, seed: int, split: str, validation_fraction: float, max_documents: int | None
) -> np.ndarray:
    """Indices of the documents in `split` ("train" or "validation"), at most `max_documents` of them."""
    permutation = _rng(seed, _SPLIT_STREAM).permutation(num_documents)
    num_validation = max(1, round(validation_fraction * num_documents)) if validation_fraction > 0 else 0
    if num_validation >= num_documents:
        raise ConfigError(
            f"validation_fraction {validation_fraction} holds out {num_validation} of {num_documents} documents "
            "and leaves none for training; lower it or add documents"
        )
    chosen = permutation[:num_validation] if split == "validation" else permutation[num_validation:]
    return chosen[:max_documents]


def epoch_order(documents: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
    """`documents` shuffled for `epoch`."""
    return _rng(seed, _EPOCH_STREAM, epoch).permutation(documents)


def batch_bucket(weights: np.ndarray, *, seed: int, batch: int) -> int:
    """The bucket (index into `weights`) that batch number `batch` comes from, drawn with probability proportional
    to `weights`: a function of (seed, batch) alone, so a resumed run continues the same sequence."""
    return int(_rng(seed, _BUCKET_STREAM, batch).choice(len(weights), p=weights / np.sum(weights)))
