"""Every Pallas kernel compiled for sm_90a (H100) without a GPU, and what the machine code shows.

The compile is XLA's own deviceless one (`pallas_kernels.deviceless`); each case of `pallas_kernels.sm90_report`
compiles once per session. Skipped, with the reason, only where the CUDA plugin or nvcc wheels of the dev extra
are not installed (they need Python >= 3.11 and the jaxlib version they are pinned to).
"""

from __future__ import annotations

import pytest

from pallas_kernels import deviceless, sm90_report

FLASH = {"flash_attention_fwd", "flash_attention_dq", "flash_attention_dkdv"}

# Registers per thread of the flash kernels before the per-head_dim block sizes (jax 0.10.2, ptxas 12.9.86):
# a change must not make them worse.
FLASH_REGISTERS_BEFORE = {
    "flash_dense": {"flash_attention_fwd": 120, "flash_attention_dq": 134, "flash_attention_dkdv": 215},
    "flash_causal": {"flash_attention_fwd": 144, "flash_attention_dq": 149, "flash_attention_dkdv": 244},
    "flash_causal_gqa4": {"flash_attention_fwd": 144, "flash_attention_dq": 149, "flash_attention_dkdv": 244},
    "flash_causal_segments": {"flash_attention_fwd": 164, "flash_attention_dq": 166, "flash_attention_dkdv": 234},
    "flash_block_sparse": {"flash_attention_fwd": 115, "flash_attention_dq": 128, "flash_attention_dkdv": 215},
}


@pytest.fixture(scope="session")
def compiled() -> dict[str, dict[str, deviceless.KernelResources]]:
    try:
        deviceless.h100_mesh()
        deviceless.ptxas_path()
    except deviceless.Unavailable as e:
        pytest.skip(f"cannot compile for sm_90a here: {e}")
    return {case.name: sm90_report.compile_case(case) for case in sm90_report.cases()}


def _kernels(compiled):
    return [(case, kernel) for case, kernels in compiled.items() for kernel in kernels.values()]


def test_every_kernel_compiles(compiled):
    for case, kernels in compiled.items():
        if case.startswith("flash"):
            assert set(kernels) == FLASH, case
        elif case.startswith("quantized"):
            assert set(kernels) == {"quantized_attention"}, case
        else:
            assert set(kernels) == {"decode_attention"}, case
    assert len(compiled) == len(sm90_report.cases())


def test_no_register_spills(compiled):
    spilled = {f"{case}/{k.name}": k.spill_bytes for case, k in _kernels(compiled) if k.spill_bytes}
    assert not spilled, f"spill bytes per thread: {spilled}"


def test_every_kernel_uses_tensor_cores(compiled):
    """All of them are matrix products; none may leave its dots to scalar FMAs."""
    scalar = {f"{case}/{k.name}": k.fma_f32 for case, k in _kernels(compiled) if not k.tensor_core}
    assert not scalar, f"no wgmma/mma (scalar fma.f32 count): {scalar}"


def test_products_use_hopper_wgmma(compiled):
    """q·kᵀ and P·V of every kernel are Hopper `wgmma`, including the 8-bit ones of quantized prefill; flash at
    head_dim 256 takes 32-row tiles to avoid spills (`BlockSizes`), below wgmma's 64 rows, so it runs `mma.sync`."""
    for case, kernel in _kernels(compiled):
        kinds = set(kernel.mma)
        if case.endswith("_d256"):
            assert kinds, (case, kernel.name)
            continue
        assert kinds and all(kind.startswith("wgmma") for kind in kinds), (case, kernel.name, kinds)
        if case.startswith("quantized"):
            assert any(".s32.s8.s8" in kind for kind in kinds), (case, kinds)
        if case.endswith("pv_fp8"):
            assert any(".e4m3.e4m3" in kind for kind in kinds), (case, kinds)


def test_decode_fills_the_gpu(compiled):
    """At B=32 with 8 kv heads, decode launches at least 2 programs per SM of an H100."""
    for case, kernel in _kernels(compiled):
        if case.startswith("decode"):
            assert kernel.programs >= 2 * deviceless.H100_SM_COUNT, (case, kernel.grid)


def test_flash_registers_not_above_before(compiled):
    for case, before in FLASH_REGISTERS_BEFORE.items():
        for name, registers in before.items():
            assert compiled[case][name].registers <= registers, (case, name, compiled[case][name].registers)
