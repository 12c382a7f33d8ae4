"""Training data: corpora (the standard library's sources, local text and JSONL), tokenization, packing into
fixed-length rows with segment ids, and a seeded, endless, checkpointable batch iterator (optionally in length
buckets)."""

from jaxhet.data.batches import PackedBatches
from jaxhet.data.buckets import BucketedBatches
from jaxhet.data.config import DataConfig
from jaxhet.data.sources import stdlib_corpus_files

__all__ = ["BucketedBatches", "DataConfig", "PackedBatches", "stdlib_corpus_files"]
