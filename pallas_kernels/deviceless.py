"""Compile Pallas kernels for an H100 (sm_90a) on a machine without a GPU, and read what the compile produced.

XLA can compile for a GPU it does not have (the deviceless AOT route of jax's `tests/aot_test.py`): a CUDA
topology built from a `GpuTargetConfigProto` text, a mesh on it, `ShapeDtypeStruct` inputs sharded on that mesh,
and `jax.jit(f).lower(...).compile()`. It needs the CUDA PJRT plugin wheels (at the installed jaxlib's version)
and PyPI's `nvidia-cuda-nvcc-cu12` for `ptxas`, not a GPU or libcuda; JAX itself stays on the CPU platform.

From each compile, `compile_kernels` reads, per Pallas (Triton) kernel:
- the launch XLA planned, from the dumped `*.thunk_sequence.txt`: grid, threads per block, shared memory;
- the instructions in its PTX: Hopper `wgmma`, Ampere-style `mma.sync` and scalar `fma.rn.f32` counts, by kind;
- `ptxas -arch=sm_90a -v` on that PTX: registers per thread, spill stores/loads, stack frame (XLA runs the same
  ptxas during the compile, so these are the figures of the binary it built).
These are facts about the machine code; nothing here measures or estimates speed.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from importlib import metadata

import jax

H100_SM_COUNT = 132

# stream_executor.GpuTargetConfigProto (text format) of an H100 SXM 80GB; XLA adds the `a` features (sm_90a).
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

_THUNK = re.compile(
    r"kCustomKernel .*?\]\s+(\S+) grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]\s+"
    r"shared_memory: (\d+) bytes"
)
_TRITON_CALL = re.compile(r'@__gpu\$xla\.gpu\.triton\(.*?\bname = "([^"]+)"')
_PTXAS_FUNCTION = re.compile(r"Function properties for (\S+)")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_MMA = re.compile(r"\b(wgmma\.mma_async\.sync\.aligned\.\S+?|mma\.sync\.aligned\.\S+?)\s")
_FMA_F32 = re.compile(r"\bfma\.rn\.f32\b")


class Unavailable(RuntimeError):
    """The CUDA plugin or ptxas is missing, so nothing can be compiled for sm_90a here."""


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """What the sm_90a compile of one Pallas kernel produced (see the module docstring for the sources)."""

    name: str
    grid: tuple[int, int, int]
    threads: int
    shared_memory: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    mma: dict[str, int]
    fma_f32: int

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def tensor_core(self) -> bool:
        """Whether any matrix product reached the tensor cores (`wgmma` or `mma.sync`)."""
        return bool(self.mma)

    def to_json(self) -> dict:
        row = dataclasses.asdict(self)
        row.update(grid=list(self.grid), programs=self.programs, spill_bytes=self.spill_bytes)
        return row


def ptxas_path() -> str:
    """The `ptxas` of the `nvidia-cuda-nvcc-cu12` wheel, else one on PATH; raises `Unavailable` without either."""
    try:
        import nvidia.cuda_nvcc  # the wheel's namespace package

        for root in nvidia.cuda_nvcc.__path__:
            candidate = os.path.join(root, "bin", "ptxas")
            if os.access(candidate, os.X_OK):
                return candidate
    except ImportError:
        pass
    found = shutil.which("ptxas")
    if found is None:
        raise Unavailable("no ptxas: install the dev extra (nvidia-cuda-nvcc-cu12)")
    return found


def toolchain_versions() -> dict[str, str]:
    """jax, jaxlib, CUDA plugin and ptxas versions, for the provenance of a report."""
    out = subprocess.run([ptxas_path(), "--version"], capture_output=True, text=True, check=True).stdout
    versions = {"ptxas": next(line for line in out.splitlines() if "release" in line).strip()}
    for package in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cuda-nvcc-cu12"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


@functools.cache
def h100_mesh() -> jax.sharding.Mesh:
    """A one-device mesh on a deviceless H100 topology; raises `Unavailable` without the CUDA plugin."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET_CONFIG, topology="1x1x1")
    except Exception as e:  # the plugin raises various errors when absent or mismatched
        raise Unavailable(f"no CUDA topology (install the dev extra: jax-cuda12-plugin/pjrt): {e}") from e
    return topologies.make_mesh(topo=topology, mesh_shape=(1,), axis_names=("x",))


def on_h100(shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    """An abstract input placed on the deviceless H100."""
    sharding = jax.sharding.NamedSharding(h100_mesh(), jax.sharding.PartitionSpec())
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _ptxas(ptx_file: str) -> dict[str, dict[str, int]]:
    """Per entry of a PTX file: registers, spill stores/loads and stack frame from `ptxas -arch=sm_90a -v`."""
    result = subprocess.run(
        [ptxas_path(), "-arch=sm_90a", "-v", ptx_file, "-o", os.devnull], capture_output=True, text=True, check=True
    )
    figures, current = {}, None
    for line in result.stderr.splitlines():
        if m := _PTXAS_FUNCTION.search(line):
            current = figures.setdefault(m.group(1), {})
        elif current is not None and (m := _PTXAS_STACK.search(line)):
            current.update(stack_frame=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current is not None and (m := _PTXAS_REGISTERS.search(line)):
            current["registers"] = int(m[1])
    return figures


def _ptx_entries(dump: str) -> dict[str, str]:
    """Entry name -> PTX file, over every PTX file XLA dumped."""
    entries = {}
    for path in glob.glob(os.path.join(dump, "*.ptx")):
        with open(path) as f:
            for name in re.findall(r"\.entry (\w+)\(", f.read()):
                entries[name] = path
    return entries


def _launches(dump: str) -> dict[str, tuple[tuple[int, int, int], int, int]]:
    """Kernel name -> (grid, threads per block, shared memory) from the dumped thunk sequences."""
    launches = {}
    for path in glob.glob(os.path.join(dump, "*thunk_sequence.txt")):
        with open(path) as f:
            for m in _THUNK.finditer(f.read()):
                launches[m[1]] = ((int(m[2]), int(m[3]), int(m[4])), int(m[5]) * int(m[6]) * int(m[7]), int(m[8]))
    return launches


def _instructions(ptx_file: str, entry: str) -> tuple[dict[str, int], int]:
    """MMA instruction kinds (with counts) and the number of scalar float32 FMAs in one entry's PTX."""
    with open(ptx_file) as f:
        text = f.read()
    start = text.index(f".entry {entry}(")
    following = text.find(".entry ", start + 1)
    body = text[start : following if following >= 0 else len(text)]
    return dict(sorted(collections.Counter(_MMA.findall(body)).items())), len(_FMA_F32.findall(body))


def compile_kernels(fn: Callable, *args: jax.ShapeDtypeStruct) -> dict[str, KernelResources]:
    """Compile `jax.jit(fn)` for the deviceless H100 and return the resources of every Pallas kernel in it."""
    lowered = jax.jit(fn).lower(*args)
    names = _TRITON_CALL.findall(lowered.as_text())
    with tempfile.TemporaryDirectory(prefix="sm90_") as dump:
        lowered.compile(compiler_options={"xla_dump_to": dump})
        entries, launches = _ptx_entries(dump), _launches(dump)
        figures = {path: _ptxas(path) for path in {entries[n] for n in names}}
        report = {}
        for name in names:
            grid, threads, shared = launches[name]
            mma, fma = _instructions(entries[name], name)
            report[name] = KernelResources(
                name=name,
                grid=grid,
                threads=threads,
                shared_memory=shared,
                mma=mma,
                fma_f32=fma,
                **figures[entries[name]][name],
            )
    return report
