"""`ClusterSpec`: the nodes of a cluster, their GPUs, and the links inside and between nodes.

A cluster file (YAML or JSON):

```yaml
name: h100x4_l4x4
nodes:
  - {name: h100, gpu: H100, count: 4}                 # intra-node link defaults to the GPU's NVLink/PCIe
  - {name: l4, gpu: L4, count: 4, repeat: 1, intra_node_link: {gb_s: 25, latency_us: 8}, process: 1}
inter_node_link: {gb_s: 12.5, latency_us: 15}          # per GPU, per direction (100 Gb/s Ethernet here)
gpus: {MyGPU: {tflops: 100, memory_gb: 32, memory_bw_gb_s: 900, price_per_hour: 1, nvlink_gb_s: 25}}
profiles: {L4: {compute_efficiency: 0.45}}              # calibrated figures override the catalog
topology:                                              # optional: switches above the nodes (planners.topology)
  - {level: rack, link: {gb_s: 25, latency_us: 10}, groups: {r0: [h100], r1: [l4]}}
```

`process: K` names the multi-controller process that runs a node (default: its position, so node i runs on process
i; several nodes may share one). `repeat: N` expands one entry into N identical nodes (named
`name-0 .. name-N-1`). `devices` is the flat device list plans refer to: node by node in file order, GPUs in order
inside each node. With a `topology:`, node names must be unique, and traffic between nodes crosses the link of
the lowest level whose group holds them all (`link_of`); without one, always `inter_node_link`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from planners import catalog, fields
from planners.errors import SpecError
from planners.presets import CLUSTERS
from planners.profile import DeviceProfile
from planners.topology import Topology

DEFAULT_INTER_NODE = {"gb_s": 12.5, "latency_us": 15.0}
DEFAULT_INTRA_LATENCY_US = 5.0


@dataclasses.dataclass(frozen=True)
class Link:
    """A link class: bandwidth per direction in GB/s and one-message latency in microseconds (alpha-beta)."""

    gb_s: float
    latency_us: float

    def __post_init__(self) -> None:
        fields.positive_float(self.gb_s, "gb_s")
        fields.non_negative_float(self.latency_us, "latency_us")

    @classmethod
    def from_dict(cls, data: Any, field: str) -> Link:
        d = fields.mapping(data, field, ("gb_s", "latency_us"), ("gb_s",))
        return cls(
            fields.positive_float(d["gb_s"], f"{field}.gb_s"),
            fields.non_negative_float(d.get("latency_us", DEFAULT_INTRA_LATENCY_US), f"{field}.latency_us"),
        )

    def seconds(self, nbytes: float, messages: int = 1) -> float:
        """Time to move `nbytes` in `messages` messages over this link."""
        return messages * self.latency_us * 1e-6 + nbytes / (self.gb_s * 1e9)


@dataclasses.dataclass(frozen=True)
class Node:
    """One machine: `count` GPUs of one kind joined by `intra_link`; `process` is the multi-controller process
    that runs it (None: the node's position in the file)."""

    name: str
    kind: str
    count: int
    intra_link: Link
    process: int | None = None


@dataclasses.dataclass(frozen=True)
class Device:
    """One GPU: its index in the flat device list, its node and its rank inside the node."""

    index: int
    node: int
    local: int
    kind: str


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Nodes, the inter-node link, the device profile of every GPU kind present, and the switch levels above the
    nodes (none by default: every pair of nodes joined by `inter_link`)."""

    name: str
    nodes: tuple[Node, ...]
    inter_link: Link
    profiles: Mapping[str, DeviceProfile]
    topology: Topology = Topology()

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "profiles", dict(self.profiles))
        if not self.nodes:
            raise SpecError("nodes must list at least one node")
        for i, node in enumerate(self.nodes):
            fields.positive_int(node.count, f"nodes[{i}].count")
            if node.kind not in self.profiles:
                raise SpecError(f"nodes[{i}].gpu {node.kind!r} has no device profile")
            if self.topology.levels and node.name not in self.topology.paths:
                raise SpecError(
                    f"nodes[{i}] {node.name!r} is in no group of topology level {self.topology.levels[0].name!r}"
                )

    def level_of(self, nodes: Iterable[int]) -> int:
        """The topology level the node indices `nodes` span: 0 inside one node, `topology.top` across the top."""
        return self.topology.level_of(self.nodes[n].name for n in nodes)

    def level_link(self, level: int, node: int) -> Link:
        """The link of `level` (0: the intra-node link of `node`)."""
        if level == 0:
            return self.nodes[node].intra_link
        if level <= len(self.topology.levels):
            return self.topology.levels[level - 1].link
        return self.inter_link

    def link_of(self, nodes: Iterable[int]) -> Link:
        """The link traffic among the node indices `nodes` crosses: that of the level they span (`level_link`)."""
        nodes = list(nodes)
        return self.level_link(self.level_of(nodes), nodes[0])

    @property
    def devices(self) -> tuple[Device, ...]:
        out, index = [], 0
        for n, node in enumerate(self.nodes):
            for local in range(node.count):
                out.append(Device(index, n, local, node.kind))
                index += 1
        return tuple(out)

    @property
    def num_devices(self) -> int:
        return sum(n.count for n in self.nodes)

    def node_classes(self) -> list[list[int]]:
        """Indices of identical nodes (same GPU kind, count and link), classes in order of first appearance."""
        classes: dict[tuple[str, int, Link], list[int]] = {}
        for i, node in enumerate(self.nodes):
            classes.setdefault((node.kind, node.count, node.intra_link), []).append(i)
        return list(classes.values())

    def profile(self, kind: str) -> DeviceProfile:
        return self.profiles[kind]

    def node_offsets(self) -> tuple[int, ...]:
        """Index of each node's first device in the flat list."""
        offsets, at = [], 0
        for node in self.nodes:
            offsets.append(at)
            at += node.count
        return tuple(offsets)

    def with_profiles(self, overrides: Mapping[str, Any]) -> ClusterSpec:
        """A copy whose device profiles take the figures in `overrides[kind]` (e.g. measured by a profiling run:
        `{"H100": {"tflops": 700, "compute_efficiency": 1.0}}`), validated like a cluster file's `profiles:`."""
        d = fields.mapping(overrides, "profiles", list(self.profiles))
        profiles = {kind: p.with_overrides(d.get(kind, {})) for kind, p in self.profiles.items()}
        return dataclasses.replace(self, profiles=profiles)

    def without_devices(self, failed: Iterable[int]) -> tuple[ClusterSpec, tuple[int, ...]]:
        """The cluster left after losing `failed` devices (nodes shrink, empty nodes go), and for each of its
        devices the index it had in this cluster."""
        failed = set(failed)
        unknown = sorted(d for d in failed if not 0 <= d < self.num_devices)
        if unknown:
            raise SpecError(f"failed devices {unknown} are not in the cluster (0..{self.num_devices - 1})")
        nodes, survivors = [], []
        for node, offset in zip(self.nodes, self.node_offsets(), strict=True):
            alive = [offset + i for i in range(node.count) if offset + i not in failed]
            if alive:
                nodes.append(dataclasses.replace(node, count=len(alive)))
                survivors += alive
        if not nodes:
            raise SpecError("every device of the cluster failed")
        kinds = {n.kind for n in nodes}
        profiles = {k: p for k, p in self.profiles.items() if k in kinds}
        return dataclasses.replace(self, nodes=tuple(nodes), profiles=profiles), tuple(survivors)

    def price_per_hour(self) -> float:
        return sum(n.count * self.profiles[n.kind].price_per_hour for n in self.nodes)

    def kinds_summary(self) -> str:
        """E.g. '4xH100 + 4xL4'."""
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.kind] = counts.get(node.kind, 0) + node.count
        return " + ".join(f"{c}x{k}" for k, c in counts.items())

    @classmethod
    def from_dict(cls, data: Any, default_name: str = "cluster") -> ClusterSpec:
        allowed = ("name", "nodes", "inter_node_link", "gpus", "profiles", "topology")
        d = fields.mapping(data, "cluster", allowed, ("nodes",))
        custom: dict[str, catalog.GPUSpec] = {}
        for kind, spec in fields.mapping(d.get("gpus", {}), "gpus", list(d.get("gpus", {}) or {})).items():
            base = None
            try:
                base = catalog.lookup(kind)
            except SpecError:
                pass
            custom[kind] = catalog.GPUSpec.from_dict(kind, spec, base)
        if not isinstance(d["nodes"], list) or not d["nodes"]:
            raise SpecError("nodes must be a non-empty list of {name, gpu, count} entries")
        nodes: list[Node] = []
        aliases: dict[str, list[str]] = {}
        gpus: dict[str, catalog.GPUSpec] = {}
        for i, entry in enumerate(d["nodes"]):
            where = f"nodes[{i}]"
            e = fields.mapping(
                entry, where, ("name", "gpu", "count", "repeat", "intra_node_link", "process"), ("gpu", "count")
            )
            gpu = catalog.lookup(e["gpu"], custom, f"{where}.gpu")
            gpus[gpu.name] = gpu
            count = fields.positive_int(e["count"], f"{where}.count")
            repeat = fields.positive_int(e.get("repeat", 1), f"{where}.repeat")
            if "intra_node_link" in e:
                link = Link.from_dict(e["intra_node_link"], f"{where}.intra_node_link")
            else:
                link = Link(gpu.nvlink_gb_s, DEFAULT_INTRA_LATENCY_US)
            base_name = str(e.get("name", f"{gpu.name.lower()}{i}"))
            process = None if e.get("process") is None else fields.int_at_least(e["process"], 0, f"{where}.process")
            names = [base_name] if repeat == 1 else [f"{base_name}-{r}" for r in range(repeat)]
            nodes += [Node(name, gpu.name, count, link, process) for name in names]
            if repeat > 1:
                aliases[base_name] = names
        inter = Link.from_dict(d.get("inter_node_link", DEFAULT_INTER_NODE), "inter_node_link")
        overrides = fields.mapping(d.get("profiles", {}), "profiles", list(gpus))
        profiles = {
            kind: DeviceProfile.from_gpu(gpu).with_overrides(overrides.get(kind, {})) for kind, gpu in gpus.items()
        }
        topology = Topology()
        if "topology" in d:
            topology = Topology.from_list(d["topology"], [n.name for n in nodes], Link.from_dict, aliases)
        return cls(str(d.get("name", default_name)), tuple(nodes), inter, profiles, topology)

    @classmethod
    def load(cls, path: str | Path) -> ClusterSpec:
        """Read a cluster from a .yaml/.yml or .json file, or take a built-in one by name (`presets.CLUSTERS`)."""
        if str(path) in CLUSTERS:
            return cls.from_dict(CLUSTERS[str(path)])
        path = Path(path)
        data = fields.read_spec_file(path, f"cluster file not found: {path} (built-in clusters: {sorted(CLUSTERS)})")
        try:
            return cls.from_dict(data, default_name=path.stem)
        except SpecError as err:
            raise SpecError(f"{path}: {err}") from None

    @classmethod
    def uniform(cls, kind: str, nodes: int, per_node: int, name: str = "") -> ClusterSpec:
        """`nodes` identical nodes of `per_node` GPUs of `kind`, with default links."""
        spec = {"nodes": [{"name": kind.lower(), "gpu": kind, "count": per_node, "repeat": nodes}]}
        return cls.from_dict(spec, default_name=name or f"{kind.lower()}x{nodes * per_node}")
