"""`BlockSizes`: the tiles and launch parameters of the flash and quantized prefill kernels, chosen per head_dim.

A kernel program owns `block_q` query rows (or, in dK/dV, `block_k` keys) and walks the other sequence in tiles
of the other size; `num_warps` and `num_stages` (software pipelining of the tile loads) go to Triton. The
defaults per head_dim (`for_head_dim`) are read off the deviceless sm_90a compile of the forward, dQ and dK/dV
kernels (`pallas_kernels.sm90_report`, bench/results/kernel_resources_sm90.json): the largest tiles whose three
kernels compile with no register spills and fit in shared memory, since no GPU has timed them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two, at least 16 for compiled kernels) and Triton launch parameters."""

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            size = getattr(self, name)
            if size < 1 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two, got {size}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"num_warps must be a power of two up to 16 and num_stages >= 1, got {self}")

    @classmethod
    def for_head_dim(cls, head_dim: int) -> BlockSizes:
        """The compile-checked defaults for a (padded) head_dim."""
        for limit, sizes in _BY_HEAD_DIM:
            if head_dim <= limit:
                return sizes
        return _BY_HEAD_DIM[-1][1]


# (largest padded head_dim, sizes), from the sm_90a compile of the causal forward, dQ and dK/dV kernels at B=4,
# S=4096, 16 heads, bfloat16 (registers per thread fwd/dQ/dKdV, spill bytes, jax 0.10.2, ptxas 12.9.86):
# - 64: 128x64 tiles, 8 warps: 144/126/166, no spills (64x64 with 4 warps: 148/150/208);
# - 128: 64x64, 8 warps: 144/149/244, no spills; 128x64 raises fwd/dQ to 186/184, 64x128 and 128x128 spill;
# - 256: 32x32, 8 warps: 125/128/251, no spills, mma.sync tiles; every tiling with 64-row tiles spills in dK/dV
#   (64x64: 1576 bytes), the dK/dV accumulators alone taking 128 registers a thread.
_BY_HEAD_DIM = (
    (64, BlockSizes(128, 64, num_warps=8, num_stages=2)),
    (128, BlockSizes(64, 64, num_warps=8, num_stages=2)),
    (256, BlockSizes(32, 32, num_warps=8, num_stages=2)),
)
