"""Model FLOPs of a training step and the devices' peak, for model FLOPs utilisation (MFU).

The count is the usual one (PaLM, appendix B): 6 FLOPs per parameter per token (forward 2, backward 4) plus the
attention score and value matmuls, 12 * layers * heads * head_dim * seq_len per token, halved because attention is
causal. Every parameter counts, embeddings included, so figures compare with published MFU (for the ~1B model of
`bench/train.py` this gives 5.72 GFLOP per token at S=2048). Recomputation is not counted: MFU measures useful
work. The peak is the catalog's dense 16-bit tensor figure of each device (`planners.catalog`); devices outside the
catalog (CPUs, emulated clusters, unknown GPUs) have no meaningful peak, and MFU is then None ("n/a").
"""

from __future__ import annotations

from collections.abc import Iterable

import jax

from jaxhet.models.config import LlamaConfig
from planners.catalog import for_device_kind


def training_flops_per_token(config: LlamaConfig, num_params: int, seq_len: int) -> float:
    """Model FLOPs of one token's forward and backward pass in a causal sequence of `seq_len` tokens."""
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len / 2
    return 6 * num_params + attention


def peak_flops(devices: Iterable[jax.Device]) -> float | None:
    """The summed peak FLOP/s of `devices`, or None unless every one is a GPU the catalog knows."""
    total = 0.0
    for device in devices:
        spec = for_device_kind(device.device_kind) if device.platform == "gpu" else None
        if spec is None:
            return None
        total += spec.tflops * 1e12
    return total


def model_flops_utilisation(model_flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of `model_flops` done in `seconds` against `peak` FLOP/s (None without a peak)."""
    if peak is None or seconds <= 0:
        return None
    return model_flops / seconds / peak
