"""Throughput of a training run, step by step and overall: tokens/s, model TFLOP/s and MFU.

A step's time runs from the previous step's record to this one's, so it includes data loading, the optimizer and
checkpoint hand-off, and (on the first step) compilation; the caller takes the record after the step's loss has
been read back, which waits for the step's work.
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

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def mfu(self) -> float | None:
        """Over the whole run so far, compilation included; None without a known peak."""
        return model_flops_utilisation(self.model_flops, self.seconds, self.peak_flops)

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, float | None]:
        """Count `batch` as done now; returns the step's record fields (tokens so far, seconds so far, and the
        step's tokens/s, model TFLOP/s and MFU)."""
        rows, seq_len = batch["input_ids"].shape
        tokens = int(np.sum(batch["weights"]))
        flops = training_flops_per_token(self.config, self.num_params, seq_len) * rows * seq_len
        self.tokens += tokens
        self.model_flops += flops
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        return {
            "tokens": self.tokens,
            "seconds": now - self.started,
            "tokens_per_s": tokens / seconds,
            "model_tflops": flops / seconds / 1e12,
            "mfu": model_flops_utilisation(flops, seconds, self.peak_flops),
        }
