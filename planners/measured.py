"""A measured device profile: what `jaxhet profile` found on this machine's devices, as a JSON file.

```json
{"format": "jaxhet.device_profile", "kind": "H100", "device": "NVIDIA H100 80GB HBM3 (gpu)", "num_devices": 1,
 "dtype": "bfloat16", "matmul_tflops": {"bfloat16": 640.1}, "attention_tflops": {"bfloat16": 420.3},
 "memory_bw_gb_s": 2650.0, "memory_gb": 79.1, "host_to_device_gb_s": 24.1, "device_to_host_gb_s": 22.7,
 "link": {"gb_s": 160.0, "latency_us": 9.5}, "compute_efficiency": 0.71, "layer_overhead_us": 35.0,
 "calibration": [...], "versions": {...}, "date": "..."}
```

The cost model reads it through `overrides()`: peak FLOP/s becomes the measured matmul throughput in `dtype` (the
dtype models run in), scaled by `compute_efficiency` (what transformer blocks reach relative to that matmul, fitted
on timed steps by `planners.calibrate`; above 1 when fused blocks beat the lone matmul, and then the peak is
raised instead), `layer_overhead_us` the fitted per-block overhead, `matmul_scaling` how matmul throughput falls
at smaller sizes (fractions of the largest size's), and memory bandwidth the measured device copy bandwidth
(efficiency 1). Where the device reports its allocator's figures, `usable_memory_gb` is what a process could still
allocate once the runtime is up (the allocator's limit less what it already holds: run `jaxhet profile` with the
allocator settings training will use, e.g. `XLA_PYTHON_CLIENT_MEM_FRACTION`), and the cost model takes the
allocator's limit as the memory and that share of it as usable. `apply(cluster)`
puts these figures on the cluster's devices of `kind` and the measured collective link on their nodes;
`local_cluster()` describes the measured machine itself as a one-node cluster.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from planners import fields
from planners.cluster import ClusterSpec, Link
from planners.errors import SpecError

FORMAT = "jaxhet.device_profile"


@dataclasses.dataclass(frozen=True)
class MeasuredProfile:
    """Figures measured on `num_devices` local devices of GPU kind `kind` (throughputs in TFLOP/s, bandwidths in
    GB/s per direction; `link` is None with one device). `calibration` lists the timed steps the efficiency factors
    were fitted on; `versions` and `date` say what measured them and when."""

    kind: str
    device: str
    num_devices: int
    dtype: str
    matmul_tflops: Mapping[str, float]
    attention_tflops: Mapping[str, float]
    memory_bw_gb_s: float
    memory_gb: float
    host_to_device_gb_s: float
    device_to_host_gb_s: float
    link: Link | None
    compute_efficiency: float
    layer_overhead_us: float
    matmul_scaling: tuple[tuple[int, float], ...] = ()
    usable_memory_gb: float | None = None
    calibration: tuple[Mapping[str, Any], ...] = ()
    versions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    date: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "matmul_tflops", dict(self.matmul_tflops))
        object.__setattr__(self, "attention_tflops", dict(self.attention_tflops))
        object.__setattr__(self, "calibration", tuple(dict(c) for c in self.calibration))
        object.__setattr__(self, "matmul_scaling", tuple(tuple(p) for p in self.matmul_scaling))
        object.__setattr__(self, "versions", dict(self.versions))
        if not isinstance(self.kind, str) or not self.kind:
            raise SpecError(f"kind must be a non-empty GPU kind name, got {self.kind!r}")
        fields.positive_int(self.num_devices, "num_devices")
        fields.one_of(self.dtype, list(self.matmul_tflops), "dtype")
        for table in ("matmul_tflops", "attention_tflops"):
            for dtype, value in getattr(self, table).items():
                fields.positive_float(value, f"{table}.{dtype}")
        for name in ("memory_bw_gb_s", "memory_gb", "host_to_device_gb_s", "device_to_host_gb_s"):
            fields.positive_float(getattr(self, name), name)
        fields.positive_float(self.compute_efficiency, "compute_efficiency")
        fields.non_negative_float(self.layer_overhead_us, "layer_overhead_us")
        if self.usable_memory_gb is not None:
            fields.positive_float(self.usable_memory_gb, "usable_memory_gb")
            if self.usable_memory_gb > self.memory_gb:
                raise SpecError(f"usable_memory_gb ({self.usable_memory_gb}) exceeds memory_gb ({self.memory_gb})")

    def overrides(self) -> dict[str, Any]:
        """The `DeviceProfile` figures for `kind` (a cluster file's `profiles:` entry)."""
        peak = self.matmul_tflops[self.dtype]
        achieved = peak * self.compute_efficiency
        memory = {}
        if self.usable_memory_gb is not None:
            memory = {"memory_gb": self.memory_gb, "usable_memory": self.usable_memory_gb / self.memory_gb}
        return {
            **memory,
            "tflops": max(peak, achieved),
            "compute_efficiency": achieved / max(peak, achieved),
            "memory_bw_gb_s": self.memory_bw_gb_s,
            "memory_efficiency": 1.0,
            "layer_overhead_us": self.layer_overhead_us,
            "matmul_scaling": self.matmul_scaling,
            "source": f"measured on {self.device} ({self.date})",
        }

    def apply(self, cluster: ClusterSpec) -> ClusterSpec:
        """`cluster` with the measured figures on its `kind` devices and the measured link inside their nodes."""
        if self.kind not in cluster.profiles:
            raise SpecError(
                f"profile kind must be one of the cluster's GPU kinds {sorted(cluster.profiles)}, got {self.kind!r}"
            )
        out = cluster.with_profiles({self.kind: self.overrides()})
        if self.link is None:
            return out
        nodes = tuple(dataclasses.replace(n, intra_link=self.link) if n.kind == self.kind else n for n in out.nodes)
        return dataclasses.replace(out, nodes=nodes)

    def local_cluster(self, count: int | None = None) -> ClusterSpec:
        """The measured machine as one node of `count` (default: all measured) devices of `kind`."""
        link = self.link or Link(self.memory_bw_gb_s, 0.0)
        spec = {
            "name": "local",
            "nodes": [
                {
                    "name": "local",
                    "gpu": self.kind,
                    "count": count or self.num_devices,
                    "intra_node_link": {"gb_s": link.gb_s, "latency_us": link.latency_us},
                }
            ],
            "gpus": {
                self.kind: {
                    "tflops": self.matmul_tflops[self.dtype],
                    "memory_gb": self.memory_gb,
                    "memory_bw_gb_s": self.memory_bw_gb_s,
                    "price_per_hour": 0.0,
                    "nvlink_gb_s": link.gb_s,
                    "source": f"measured on {self.device}",
                }
            },
        }
        return ClusterSpec.from_dict(spec).with_profiles({self.kind: self.overrides()})

    def to_json(self, indent: int | None = 2) -> str:
        data = dataclasses.asdict(self)
        return json.dumps({"format": FORMAT, **data}, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> MeasuredProfile:
        data = json.loads(text)
        allowed = ["format", *(f.name for f in dataclasses.fields(cls))]
        d = dict(fields.mapping(data, "profile", allowed, ["format", "kind", "matmul_tflops"]))
        if d.pop("format") != FORMAT:
            raise SpecError(f"format must be {FORMAT!r}")
        if d.get("link") is not None:
            d["link"] = Link.from_dict(d["link"], "link")
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> MeasuredProfile:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"device profile not found: {path}")
        try:
            return cls.from_json(path.read_text())
        except (json.JSONDecodeError, TypeError) as err:
            raise SpecError(f"{path}: cannot read the profile: {err}") from None
