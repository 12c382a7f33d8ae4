"""Pallas GPU kernels for attention: dense and block-sparse flash attention, with dynamic sparsity estimation.

Modules, one job each:
- `flash_attention`: forward, dQ and dK/dV kernels (Triton lowering on GPU, interpret mode elsewhere) and the
  differentiable `flash_attention` entry point;
- `geometry`: query/key positions, causal/window conventions and the block bounds every kernel loops over;
- `schedule`: block masks turned into per-block lists of kept blocks (and their transpose for dK/dV);
- `block_masks`: static pattern builders (causal, sliding window, A-shape, vertical-slash, arbitrary, random);
- `sparsity`: `estimate_block_mask` (pooled and low-bit estimators) and the one-call `sparse_attention`;
- `reference`: plain-jnp float32 references used by the tests;
- `synthetic`: structured (local + global) attention inputs for quality measurements.
"""

from pallas_kernels import block_masks, reference, synthetic
from pallas_kernels.flash_attention import default_interpret, flash_attention
from pallas_kernels.geometry import Geometry
from pallas_kernels.schedule import BlockSchedule, build_schedule
from pallas_kernels.sparsity import ESTIMATORS, estimate_block_mask, sparse_attention

__all__ = [
    "BlockSchedule",
    "ESTIMATORS",
    "Geometry",
    "block_masks",
    "build_schedule",
    "default_interpret",
    "estimate_block_mask",
    "flash_attention",
    "reference",
    "sparse_attention",
    "synthetic",
]
