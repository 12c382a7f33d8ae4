"""Pallas GPU kernels for attention: dense and block-sparse flash attention with dynamic sparsity estimation."""

from pallas_kernels import block_masks, reference
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
]
