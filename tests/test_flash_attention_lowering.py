"""The kernels lower through Pallas's Triton backend, checked on any machine by lowering for CUDA.

`lower(lowering_platforms=("cuda",))` runs the Pallas -> Triton-dialect lowering of every kernel without a GPU;
each kernel's Triton module is then parsed back and run through the MLIR verifier. This catches operations the
Triton lowering does not support, non-power-of-two tensors and malformed IR; it does not run Triton's own
compiler to PTX (that happens inside XLA on a GPU, see the `gpu`-marked tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax._src.lib.mlir import ir
from jax._src.pallas.triton import lowering as triton_lowering

import pallas_kernels as pk

KERNELS = {"flash_attention_fwd", "flash_attention_dq", "flash_attention_dkdv"}

VARIANTS = {
    "dense_bf16_d128": dict(),
    "causal_window_gqa4_bf16": dict(causal=True, local_window=100),
    "segments_mqa_fp16_d64": dict(causal=True, segments=True, kv_heads=1, dtype=jnp.float16, head_dim=64),
    "block_mask_per_head_f32_d256": dict(block_mask=(2, 8), dtype=jnp.float32, head_dim=256),
    "block_mask_broadcast_short_q_d80": dict(block_mask=(1, 1), causal=True, q_len=300, head_dim=80),
}


def _triton_modules(fn, *args) -> dict[str, str]:
    """Name -> verified Triton module text of every Pallas kernel in `fn` lowered for CUDA."""
    stablehlo = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    modules = {}

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "stablehlo.custom_call" and "mhlo.backend_config" in inner.attributes:
                        config = inner.attributes["mhlo.backend_config"]
                        with triton_lowering._new_ir_context():
                            module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
                            assert module.operation.verify()
                            modules[ir.StringAttr(config["name"]).value] = str(module)
                    walk(inner.operation)

    walk(stablehlo.operation)
    return modules


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_backward_lower_to_triton(variant):
    spec = dict(VARIANTS[variant])
    batch, kv_len, heads = 2, 1000, 8
    q_len, kv_heads = spec.pop("q_len", kv_len), spec.pop("kv_heads", 2)
    dtype, head_dim = spec.pop("dtype", jnp.bfloat16), spec.pop("head_dim", 128)
    q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dtype)
    extras = []
    if spec.pop("segments", False):
        extras.append(jax.ShapeDtypeStruct((batch, kv_len), jnp.int32))
    mask_lead = spec.pop("block_mask", None)
    if mask_lead is not None:
        extras.append(jax.ShapeDtypeStruct((*mask_lead, -(-q_len // 64), -(-kv_len // 64)), jnp.bool_))

    def run(q, k, v, *extra):
        options = dict(spec, interpret=False)
        if mask_lead is not None:
            options["block_mask"] = extra[-1]
        if len(extra) == 2 or (extra and mask_lead is None):
            options["segment_ids"] = extra[0]
        out, vjp = jax.vjp(lambda q, k, v: pk.flash_attention(q, k, v, **options), q, k, v)
        return out, vjp(out)

    modules = _triton_modules(run, q, kv, kv, *extras)
    assert set(modules) == KERNELS
    for name, text in modules.items():
        assert "scf.while" not in text, f"{name}: a kv/q-block loop did not lower to scf.for"
        assert "tt.dot" in text
        if dtype == jnp.float32:
            assert "tf32" not in text, f"{name}: float32 products must not use TF32"
