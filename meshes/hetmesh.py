"""Device groups of different kinds and sizes, on real GPUs or emulated on CPU devices.

A `HetMesh` maps a cluster's flat device list (`planners.ClusterSpec.devices`: node by node) onto JAX devices.
On a machine with the cluster's GPUs the mapping is the identity; on a CPU machine
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`) each CPU device stands in for one GPU and carries its kind
as a label, which proves correctness and shapes but says nothing about speed.

Multi-process (`meshes.distributed`): every process sees every device in `jax.devices()`; node `i` takes its
devices from its own process (`meshes.distributed.node_processes`), so each process's nodes are bound to that
process's local devices whatever order the cluster file lists them in. Groups on different processes exchange
arrays through `meshes.transfer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from meshes.distributed import node_processes
from planners.cluster import ClusterSpec


@dataclasses.dataclass(frozen=True)
class DeviceGroup:
    """Devices of one kind arranged as a mesh with named axes (e.g. data x model)."""

    name: str
    kind: str
    devices: tuple[jax.Device, ...]
    axis_sizes: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        size = int(np.prod([n for _, n in self.axis_sizes]))
        if size != len(self.devices):
            raise ValueError(
                f"group {self.name!r}: axis sizes {dict(self.axis_sizes)} need {size} devices, got {len(self.devices)}"
            )

    @property
    def mesh(self) -> Mesh:
        shape = tuple(n for _, n in self.axis_sizes)
        return Mesh(np.array(self.devices, dtype=object).reshape(shape), tuple(a for a, _ in self.axis_sizes))


@dataclasses.dataclass(frozen=True)
class HetMesh:
    """The cluster's devices in flat order, with their GPU kinds, grouped by node."""

    devices: tuple[jax.Device, ...]
    kinds: tuple[str, ...]
    groups: tuple[DeviceGroup, ...]
    emulated: bool

    @classmethod
    def from_cluster(cls, cluster: ClusterSpec, devices: Sequence[jax.Device] | None = None) -> HetMesh:
        """Bind `cluster` to `devices` (default: `jax.devices()`), each node to devices of its own process;
        emulated unless they are GPUs."""
        devices = tuple(jax.devices() if devices is None else devices)
        if len(devices) < cluster.num_devices:
            raise ValueError(
                f"cluster {cluster.name!r} has {cluster.num_devices} devices but only {len(devices)} are available "
                "(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count before importing jax)"
            )
        processes = sorted({d.process_index for d in devices})
        owners = node_processes(cluster, len(processes)) if len(processes) > 1 else (processes[0],) * len(cluster.nodes)
        pools = {p: [d for d in devices if d.process_index == p] for p in processes}
        groups = []
        for i, node in enumerate(cluster.nodes):
            pool = pools[owners[i]]
            if len(pool) < node.count:
                raise ValueError(f"nodes[{i}] ({node.name!r}) needs {node.count} devices of process {owners[i]}")
            members, pools[owners[i]] = tuple(pool[: node.count]), pool[node.count :]
            groups.append(DeviceGroup(node.name, node.kind, members, (("devices", node.count),)))
        flat = tuple(d for g in groups for d in g.devices)
        kinds = tuple(d.kind for d in cluster.devices)
        return cls(flat, kinds, tuple(groups), emulated=flat[0].platform != "gpu")

    def submesh(self, indices: Sequence[int], axis_sizes: Sequence[tuple[str, int]], name: str = "") -> DeviceGroup:
        """A group over the devices at `indices` of the flat list; they must share one kind."""
        kinds = {self.kinds[i] for i in indices}
        if len(kinds) != 1:
            raise ValueError(f"group {name!r} mixes device kinds {sorted(kinds)}")
        return DeviceGroup(name, kinds.pop(), tuple(self.devices[i] for i in indices), tuple(axis_sizes))
