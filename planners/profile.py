"""`DeviceProfile`: the figures the cost model uses for one GPU kind (catalog peaks times efficiency factors).

Defaults come from the catalog; a cluster file's `profiles:` section (written by hand or by a profiling run)
overrides any figure, so measured throughput and bandwidth replace the datasheet.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

from planners import fields
from planners.catalog import DEFAULT_USABLE_MEMORY, GPUSpec
from planners.errors import SpecError

DEFAULT_COMPUTE_EFFICIENCY = 0.5
DEFAULT_MEMORY_EFFICIENCY = 0.8
DEFAULT_LAYER_OVERHEAD_US = 20.0


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Achievable figures of one GPU kind.

    `compute_efficiency` scales peak TFLOP/s to what dense transformer layers reach (model-FLOPs utilisation);
    `memory_efficiency` scales peak memory bandwidth; `usable_memory` is the fraction of memory left to the model
    after the runtime, allocator fragmentation and communication buffers (the catalog's per kind, or measured);
    `layer_overhead_us` is the fixed cost of one block's forward and backward pass on one micro-batch (kernel
    launches, synchronisation).
    `matmul_scaling` lists `(n, fraction)` pairs: the fraction of `tflops` a matmul whose smallest dimension is `n`
    reaches (measured; small matmuls keep fewer units busy), interpolated log-linearly and held flat beyond the
    ends; empty means every size reaches `tflops`.
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
    matmul_scaling: tuple[tuple[int, float], ...] = ()
    source: str = "catalog"

    def __post_init__(self) -> None:
        where = f"profiles.{self.kind}"
        if not isinstance(self.matmul_scaling, (list, tuple)):
            raise SpecError(f"{where}.matmul_scaling must be a list of [n, fraction] pairs")
        pairs = []
        for i, pair in enumerate(self.matmul_scaling):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise SpecError(f"{where}.matmul_scaling[{i}] must be a pair [n, fraction], got {pair!r}")
            pairs.append(
                (
                    fields.positive_int(pair[0], f"{where}.matmul_scaling[{i}][0]"),
                    fields.fraction(pair[1], f"{where}.matmul_scaling[{i}][1]"),
                )
            )
        if len({n for n, _ in pairs}) != len(pairs):
            raise SpecError(f"{where}.matmul_scaling repeats a size: {sorted(n for n, _ in pairs)}")
        object.__setattr__(self, "matmul_scaling", tuple(sorted(pairs)))
        for name in ("tflops", "memory_gb", "memory_bw_gb_s"):
            fields.positive_float(getattr(self, name), f"{where}.{name}")
        fields.non_negative_float(self.price_per_hour, f"{where}.price_per_hour")
        fields.non_negative_float(self.layer_overhead_us, f"{where}.layer_overhead_us")
        for name in ("compute_efficiency", "memory_efficiency", "usable_memory"):
            fields.fraction(getattr(self, name), f"{where}.{name}")

    @classmethod
    def from_gpu(cls, gpu: GPUSpec) -> DeviceProfile:
        return cls(
            gpu.name,
            gpu.tflops,
            gpu.memory_gb,
            gpu.memory_bw_gb_s,
            gpu.price_per_hour,
            usable_memory=gpu.usable_memory,
            source=gpu.source,
        )

    def with_overrides(self, data: Any) -> DeviceProfile:
        """A copy with the figures in mapping `data` replaced (validated, unknown keys named)."""
        allowed = [f.name for f in dataclasses.fields(self) if f.name != "kind"]
        d = fields.mapping(data, f"profiles.{self.kind}", allowed)
        return dataclasses.replace(self, **d)

    @property
    def flops_per_s(self) -> float:
        """Achievable dense FLOP/s."""
        return self.tflops * 1e12 * self.compute_efficiency

    def flops_per_s_at(self, n: int) -> float:
        """Achievable dense FLOP/s of matmuls whose smallest dimension is `n` (see `matmul_scaling`)."""
        points = self.matmul_scaling
        if not points or n >= points[-1][0]:
            return self.flops_per_s * (points[-1][1] if points else 1.0)
        if n <= points[0][0]:
            return self.flops_per_s * points[0][1]
        (n0, f0), (n1, f1) = next((a, b) for a, b in itertools.pairwise(points) if a[0] <= n <= b[0])
        w = math.log(n / n0) / math.log(n1 / n0)
        return self.flops_per_s * (f0 + w * (f1 - f0))

    @property
    def bytes_per_s(self) -> float:
        """Achievable memory bandwidth in bytes/s."""
        return self.memory_bw_gb_s * 1e9 * self.memory_efficiency

    @property
    def capacity_bytes(self) -> float:
        """Memory the model may use, in bytes."""
        return self.memory_gb * 1e9 * self.usable_memory
