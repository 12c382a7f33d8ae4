"""`DeviceProfile`: the figures the cost model uses for one GPU kind (catalog peaks times efficiency factors).

Defaults come from the catalog; a cluster file's `profiles:` section (written by hand or by a profiling run)
overrides any figure, so measured throughput and bandwidth replace the datasheet.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from planners import fields
from planners.catalog import GPUSpec

DEFAULT_COMPUTE_EFFICIENCY = 0.5
DEFAULT_MEMORY_EFFICIENCY = 0.8
DEFAULT_USABLE_MEMORY = 0.9
DEFAULT_LAYER_OVERHEAD_US = 20.0


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Achievable figures of one GPU kind.

    `compute_efficiency` scales peak TFLOP/s to what dense transformer layers reach (model-FLOPs utilisation);
    `memory_efficiency` scales peak memory bandwidth; `usable_memory` is the fraction of memory left to the model
    after the runtime, allocator fragmentation and communication buffers; `layer_overhead_us` is the fixed cost
    of one block's forward and backward pass on one micro-batch (kernel launches, synchronisation).
    """

    kind: str
    tflops: float
    memory_gb: float
    memory_bw_gb_s: float
    price_per_hour: float
    compute_efficiency: float = DEFAULT_COMPUTE_EFFICIENCY
    memory_efficiency: float = DEFAULT_MEMORY_EFFICIENCY
    usable_memory: float = DEFAULT_USABLE_MEMORY
    layer_overhead_us: float = DEFAULT_LAYER_OVERHEAD_US
    source: str = "catalog"

    def __post_init__(self) -> None:
        where = f"profiles.{self.kind}"
        for name in ("tflops", "memory_gb", "memory_bw_gb_s"):
            fields.positive_float(getattr(self, name), f"{where}.{name}")
        fields.non_negative_float(self.price_per_hour, f"{where}.price_per_hour")
        fields.non_negative_float(self.layer_overhead_us, f"{where}.layer_overhead_us")
        for name in ("compute_efficiency", "memory_efficiency", "usable_memory"):
            fields.fraction(getattr(self, name), f"{where}.{name}")

    @classmethod
    def from_gpu(cls, gpu: GPUSpec) -> DeviceProfile:
        return cls(gpu.name, gpu.tflops, gpu.memory_gb, gpu.memory_bw_gb_s, gpu.price_per_hour, source=gpu.source)

    def with_overrides(self, data: Any) -> DeviceProfile:
        """A copy with the figures in mapping `data` replaced (validated, unknown keys named)."""
        allowed = [f.name for f in dataclasses.fields(self) if f.name != "kind"]
        d = fields.mapping(data, f"profiles.{self.kind}", allowed)
        return dataclasses.replace(self, **d)

    @property
    def flops_per_s(self) -> float:
        """Achievable dense FLOP/s."""
        return self.tflops * 1e12 * self.compute_efficiency

    @property
    def bytes_per_s(self) -> float:
        """Achievable memory bandwidth in bytes/s."""
        return self.memory_bw_gb_s * 1e9 * self.memory_efficiency

    @property
    def capacity_bytes(self) -> float:
        """Memory the model may use, in bytes."""
        return self.memory_gb * 1e9 * self.usable_memory
