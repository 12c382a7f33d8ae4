"""Pallas GPU kernels for attention: dense, block-sparse and quantized attention, dynamic sparsity estimation, decode.

Modules, one job each:
- `block_sizes`: `BlockSizes`, the flash/quantized kernels' tiles, warps and stages per head_dim;
- `flash_attention`: forward, dQ and dK/dV kernels (Triton lowering on GPU, interpret mode elsewhere) and the
  differentiable `flash_attention` entry point;
- `geometry`: query/key positions, causal/window conventions and the block bounds every kernel loops over;
- `schedule`: block masks turned into per-block lists of kept blocks (and their transpose for dK/dV);
- `block_masks`: static pattern builders (causal, sliding window, A-shape, vertical-slash, arbitrary, random);
- `sparsity`: `estimate_block_mask` (pooled and low-bit estimators) and the one-call `sparse_attention`;
- `kv_cache`: KV-cache storage formats (float, int8, packed int4), quantisation and paged layout;
- `online_softmax`: the running max / sum / accumulator bookkeeping every attention kernel shares, and the merge
  of split-K partial results;
- `quantization`: SageAttention-style operand quantisation (smoothed K, per-block int8/int4 Q and K, bf16/fp8 V);
- `quantized_attention`: prefill with integer q·kᵀ and bf16/fp8 P·V (Pallas kernel and XLA path);
- `decode_attention`: one query token per sequence against a (quantised, paged) KV cache;
- `decode_kernel`: its Pallas flash-decoding kernel (split-K, in-kernel dequantisation);
- `reference`: plain-jnp float32 references used by the tests;
- `varying`: kernel outputs typed to vary over the `shard_map` axes their inputs vary over (kernels inside `shard_map`);
- `deviceless`, `sm90_report`: every kernel compiled for sm_90a without a GPU, and what its machine code shows;
- `synthetic`: structured (local + global) attention inputs for quality measurements.
"""

from pallas_kernels import block_masks, kv_cache, online_softmax, quantization, reference, synthetic
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import default_interpret, flash_attention
from pallas_kernels.geometry import Geometry
from pallas_kernels.kv_cache import KV_FORMATS, dequantize_kv, quantize_kv
from pallas_kernels.quantized_attention import quantized_attention
from pallas_kernels.schedule import BlockSchedule, build_schedule
from pallas_kernels.sparsity import ESTIMATORS, estimate_block_mask, sparse_attention

__all__ = [
    "BlockSchedule",
    "BlockSizes",
    "ESTIMATORS",
    "KV_FORMATS",
    "Geometry",
    "block_masks",
    "build_schedule",
    "decode_attention",
    "default_interpret",
    "dequantize_kv",
    "estimate_block_mask",
    "flash_attention",
    "kv_cache",
    "online_softmax",
    "quantization",
    "quantize_kv",
    "quantized_attention",
    "reference",
    "sparse_attention",
    "synthetic",
]
