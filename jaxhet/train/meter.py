"""Throughput of a training run, window by window and overall: tokens/s, model TFLOP/s and MFU.

The loop dispatches steps without waiting and reads their losses back every `log_every` steps; a window's time runs
from the previous read-back to this one, so it includes data loading, the optimizer, checkpoint hand-off and (in
the first window) compilation, and its steps share it equally. With length buckets a window holds the steps of one
bucket (the loop reads back where the bucket changes), so each bucket's tokens/s is its windows' tokens over their
time; a bucket's first window includes its plan's compilation, and a window's time the move of the state into its
layout.
"""

from __future__ import annotations

import time

import numpy as np

from jaxhet.models.config import LlamaConfig
from jaxhet.train.flops import model_flops_utilisation, training_flops_per_token


class ThroughputMeter:
    """Counts tokens (with non-zero weight) and model FLOPs (every position of every row) of each step."""

    def __init__(self, config: LlamaConfig, num_params: int, peak_flops: float | None):
        self.config = config
        self.num_params = num_params
        self.peak_flops = peak_flops
        self.tokens = 0
        self.model_flops = 0.0
        self.started = self._last = time.perf_counter()
        self._buckets: dict[int, tuple[int, float]] = {}  # length bucket -> (tokens, seconds)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def mfu(self) -> float | None:
        """Over the whole run so far, compilation included; None without a known peak."""
        return model_flops_utilisation(self.model_flops, self.seconds, self.peak_flops)

    def count(self, batch: dict[str, np.ndarray]) -> tuple[int, float]:
        """Count `batch`'s step as dispatched; returns its tokens and model FLOPs for `records`."""
        rows, seq_len = batch["input_ids"].shape
        tokens = int(np.sum(batch["weights"]))
        flops = training_flops_per_token(self.config, self.num_params, seq_len) * rows * seq_len
        self.tokens += tokens
        self.model_flops += flops
        return tokens, flops

    def bucket_rates(self) -> dict[int, float]:
        """Tokens/s of each length bucket over the windows of its steps so far."""
        return {bucket: tokens / seconds for bucket, (tokens, seconds) in sorted(self._buckets.items())}

    def records(self, counted: list[tuple[int, float]], bucket: int | None = None) -> list[dict[str, float | None]]:
        """The record fields of the steps `counted` (their `count` results, in order) that are done now: tokens and
        seconds so far, and tokens/s, model TFLOP/s and MFU over the window since the previous call, whose time
        the window's steps share equally (their results were read back together). The window's tokens and time
        count towards `bucket`'s rate, if given."""
        now = time.perf_counter()
        if bucket is not None:
            tokens, seconds = self._buckets.get(bucket, (0, 0.0))
            self._buckets[bucket] = tokens + sum(t for t, _ in counted), seconds + now - self._last
        seconds = (now - self._last) / len(counted)
        tokens_so_far = self.tokens - sum(tokens for tokens, _ in counted)
        elapsed = self._last - self.started
        self._last = now
        records = []
        for tokens, flops in counted:
            tokens_so_far += tokens
            elapsed += seconds
            records.append(
                {
                    "tokens": tokens_so_far,
                    "seconds": elapsed,
                    "tokens_per_s": tokens / seconds,
                    "model_tflops": flops / seconds / 1e12,
                    "mfu": model_flops_utilisation(flops, seconds, self.peak_flops),
                }
            )
        return records
