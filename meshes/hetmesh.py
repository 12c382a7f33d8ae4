"""Device groups of different kinds and sizes, on real GPUs or emulated on CPU devices.

A `HetMesh` maps a cluster's flat device list (`planners.ClusterSpec.devices`: node by node) onto JAX devices.
On a machine with the cluster's GPUs the mapping is the identity; on a CPU machine
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`) each CPU device stands in for one GPU and carries its kind
as a label, which proves correctness and shapes but says nothing about speed.

Multi-host: with `jax.distributed` each process sees every device in `jax.devices()` (in process order), so the
same index mapping holds; a group's program is then dispatched by the processes owning its devices, and transfers
between groups on different hosts go through the same `jax.device_put` between shardings used here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

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
        """Bind `cluster` to `devices` (default: `jax.devices()`); emulated unless they are GPUs."""
        devices = tuple(jax.devices() if devices is None else devices)
        if len(devices) < cluster.num_devices:
            raise ValueError(
                f"cluster {cluster.name!r} has {cluster.num_devices} devices but only {len(devices)} are available "
                "(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count before importing jax)"
            )
        devices = devices[: cluster.num_devices]
        groups, offset = [], 0
        for node in cluster.nodes:
            members = devices[offset : offset + node.count]
            groups.append(DeviceGroup(node.name, node.kind, members, (("devices", node.count),)))
            offset += node.count
        kinds = tuple(d.kind for d in cluster.devices)
        return cls(devices, kinds, tuple(groups), emulated=devices[0].platform != "gpu")

    def submesh(self, indices: Sequence[int], axis_sizes: Sequence[tuple[str, int]], name: str = "") -> DeviceGroup:
        """A group over the devices at `indices` of the flat list; they must share one kind."""
        kinds = {self.kinds[i] for i in indices}
        if len(kinds) != 1:
            raise ValueError(f"group {name!r} mixes device kinds {sorted(kinds)}")
        return DeviceGroup(name, kinds.pop(), tuple(self.devices[i] for i in indices), tuple(axis_sizes))
