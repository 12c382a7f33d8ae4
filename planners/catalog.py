"""A catalog of GPU kinds: peak dense 16-bit tensor throughput, memory, bandwidths and an hourly price.

Figures are vendor peak numbers (dense, no structured sparsity) and are only a starting point: the cost model
applies efficiency factors, and a measured `DeviceProfile` overrides them. Where a GPU has no bf16 tensor cores
(T4, V100) the fp16 figure is given and the source says so. Prices are approximate on-demand cloud prices per GPU
(2024-2025) and vary by provider and region; they matter only relative to each other. `usable_memory` is the
fraction of memory a training or serving process may fill (the rest goes to the CUDA context, NCCL buffers and
allocator fragmentation): 0.9 unless a measurement says otherwise (the source then names it); a cluster file's
`profiles:` section or `jaxhet profile` replaces it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from planners import fields
from planners.errors import SpecError

DEFAULT_USABLE_MEMORY = 0.9


@dataclasses.dataclass(frozen=True)
class GPUSpec:
    """Peak figures of one GPU kind. `nvlink_gb_s` is the default intra-node link per direction (PCIe if none);
    `usable_memory` the fraction of `memory_gb` a process may fill."""

    name: str
    tflops: float
    memory_gb: float
    memory_bw_gb_s: float
    price_per_hour: float
    nvlink_gb_s: float
    source: str
    usable_memory: float = DEFAULT_USABLE_MEMORY

    def __post_init__(self) -> None:
        where = f"gpus.{self.name}"
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"gpu name must be a non-empty string, got {self.name!r}")
        for name in ("tflops", "memory_gb", "memory_bw_gb_s", "nvlink_gb_s"):
            fields.positive_float(getattr(self, name), f"{where}.{name}")
        fields.non_negative_float(self.price_per_hour, f"{where}.price_per_hour")
        fields.fraction(self.usable_memory, f"{where}.usable_memory")

    @classmethod
    def from_dict(cls, name: str, data: Any, base: GPUSpec | None = None) -> GPUSpec:
        """A GPU from a mapping; with `base`, only the given figures change (a calibrated or custom GPU)."""
        allowed = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
        required = [] if base is not None else [a for a in allowed if a not in ("source", "usable_memory")]
        d = fields.mapping(data, f"gpus.{name}", allowed, required)
        values = dataclasses.asdict(base) if base is not None else {"source": "user-provided"}
        values.update(d)
        values["name"] = name
        return cls(**values)


_PCIE4 = 25.0  # GB/s per direction, effective, PCIe 4.0 x16
_PCIE3 = 12.0  # GB/s per direction, effective, PCIe 3.0 x16

CATALOG: Mapping[str, GPUSpec] = {
    g.name: g
    for g in (
        GPUSpec(
            "H100",
            989.0,
            80.0,
            3350.0,
            2.99,
            450.0,
            "NVIDIA H100 SXM5 datasheet: 989 TF bf16 dense, 80 GB HBM3 3.35 TB/s, NVLink4 900 GB/s bidirectional",
        ),
        GPUSpec(
            "H200",
            989.0,
            141.0,
            4800.0,
            3.80,
            450.0,
            "NVIDIA H200 SXM datasheet: 989 TF bf16 dense, 141 GB HBM3e 4.8 TB/s, NVLink4 900 GB/s bidirectional",
        ),
        GPUSpec(
            "H800",
            989.0,
            80.0,
            3350.0,
            2.99,
            200.0,
            "NVIDIA H800 SXM5 (China-market H100): 989 TF bf16 dense, 80 GB HBM3 3.35 TB/s, NVLink 400 GB/s "
            "bidirectional; no public on-demand price, H100's assumed; usable memory 74 of 80 GiB, what FlagPerf's "
            "llama-2-70b TP4PP8 run on 4 x 8 H800 used",
            usable_memory=74 / 80,
        ),
        GPUSpec(
            "H20",
            148.0,
            96.0,
            4000.0,
            1.29,
            450.0,
            "NVIDIA H20 (China-market Hopper): 148 TF bf16 dense, 96 GB HBM3 4.0 TB/s, NVLink 900 GB/s "
            "bidirectional; no public on-demand price, A100-40GB's assumed",
        ),
        GPUSpec(
            "A100-80GB",
            312.0,
            80.0,
            2039.0,
            1.79,
            300.0,
            "NVIDIA A100 SXM4 80GB datasheet: 312 TF bf16 dense, 2.04 TB/s, NVLink3 600 GB/s bidirectional",
        ),
        GPUSpec(
            "A100-40GB",
            312.0,
            40.0,
            1555.0,
            1.29,
            300.0,
            "NVIDIA A100 SXM4 40GB datasheet: 312 TF bf16 dense, 1.56 TB/s, NVLink3 600 GB/s bidirectional",
        ),
        GPUSpec(
            "L40S",
            362.0,
            48.0,
            864.0,
            1.04,
            _PCIE4,
            "NVIDIA L40S datasheet: 362 TF bf16 dense (733 with sparsity), 48 GB GDDR6 864 GB/s, PCIe 4.0",
        ),
        GPUSpec(
            "A10G",
            70.0,
            24.0,
            600.0,
            1.01,
            _PCIE4,
            "AWS G5 (A10G): ~70 TF bf16 dense as commonly reported, 24 GB GDDR6 600 GB/s; price g5.xlarge us-east-1",
        ),
        GPUSpec(
            "L4",
            121.0,
            24.0,
            300.0,
            0.71,
            _PCIE4,
            "NVIDIA L4 datasheet: 121 TF bf16 dense (242 with sparsity), 24 GB GDDR6 300 GB/s, PCIe 4.0",
        ),
        GPUSpec(
            "T4",
            65.0,
            16.0,
            320.0,
            0.35,
            _PCIE3,
            "NVIDIA T4 datasheet: 65 TF fp16 tensor (no bf16), 16 GB GDDR6 320 GB/s, PCIe 3.0",
        ),
        GPUSpec(
            "V100",
            125.0,
            32.0,
            900.0,
            2.48,
            150.0,
            "NVIDIA V100 SXM2 32GB datasheet: 125 TF fp16 tensor (no bf16), 900 GB/s HBM2, NVLink2 300 GB/s "
            "bidirectional",
        ),
        GPUSpec(
            "RTX4090",
            165.0,
            24.0,
            1008.0,
            0.40,
            _PCIE4,
            "NVIDIA Ada whitepaper (RTX 4090): 165 TF bf16 dense with fp32 accumulate, 24 GB GDDR6X 1008 GB/s",
        ),
        GPUSpec(
            "RTX3090",
            71.0,
            24.0,
            936.0,
            0.22,
            _PCIE4,
            "NVIDIA Ampere GA102 whitepaper (RTX 3090): 71 TF bf16 dense with fp32 accumulate, 24 GB GDDR6X 936 GB/s",
        ),
    )
}

ALIASES: Mapping[str, str] = {
    "A100": "A100-80GB",
    "A100-80G": "A100-80GB",
    "A100-40G": "A100-40GB",
    "4090": "RTX4090",
    "3090": "RTX3090",
    "RTX-4090": "RTX4090",
    "RTX-3090": "RTX3090",
}


def lookup(kind: str, extra: Mapping[str, GPUSpec] | None = None, field: str = "gpu") -> GPUSpec:
    """The GPUSpec of `kind` (case-insensitive; a few aliases), checking `extra` (custom kinds) first."""
    if extra and kind in extra:
        return extra[kind]
    if not isinstance(kind, str):
        raise SpecError(f"{field} must be a GPU kind name, got {kind!r}")
    canonical = {k.upper(): k for k in CATALOG}
    key = ALIASES.get(kind, ALIASES.get(kind.upper(), kind)).upper()
    if key not in canonical:
        known = sorted(CATALOG) + sorted(extra or {})
        raise SpecError(f"{field}: unknown GPU kind {kind!r}; known: {known} (or define it under 'gpus:')")
    return CATALOG[canonical[key]]


def _alphanumeric(text: str) -> str:
    return "".join(c for c in text.upper() if c.isalnum())


def for_device_kind(device_kind: str) -> GPUSpec | None:
    """The catalog GPU a JAX `device.device_kind` names ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA
    GeForce RTX 4090", ...), or None for anything else (CPUs, unknown GPUs). Longer model names are tried first
    (L40S before L4); A100 picks its memory variant from the name, 80 GB when it does not say."""
    reported = _alphanumeric(device_kind)
    models: dict[str, list[GPUSpec]] = {}
    for spec in CATALOG.values():
        models.setdefault(_alphanumeric(spec.name.split("-")[0]), []).append(spec)
    for model in sorted(models, key=len, reverse=True):
        if model in reported:
            variants = models[model]
            sized = [v for v in variants if f"{v.memory_gb:.0f}GB" in reported]
            return (sized or sorted(variants, key=lambda v: -v.memory_gb))[0]
    return None
