"""Moving arrays between device groups, inside one process or across the processes of a multi-controller run.

Every edge between groups (stage to stage, owner to replica, one plan's layout to another's) goes through
`Transfers.move`. JAX's cross-process `device_put` only copies like for like (same device count, same shard shapes)
and needs a transfer server that not every backend has, while collectives already cross processes on every
backend (gloo on CPU, NCCL on GPU). So a move between groups on different processes takes three steps:

1. inside the source group, reshard the array into its *wire layout*: flattened, padded and split into `L` lanes,
   `L = gcd(source devices, destination devices)`, lane `i` replicated over the `i`-th row of the source devices;
2. one like-for-like copy: a `ppermute` inside a small jitted `shard_map` over a (lane, side) mesh pairing lane
   `i`'s first source device with the `i`-th row's first destination device;
3. inside the destination group, the lanes are copied along their row and unflattened into the destination
   sharding.

Inside one process (or between two layouts over the same devices) a move is a plain `jax.device_put`. Every
process calls `move` for every edge in the same order (they run the same schedule); a process holding neither end
only builds the array's global handle, with no data, so the next program call is a no-op there. Run on CPU
(gloo) with 1, 2 and 4 processes; the `ppermute` is what NCCL carries on GPUs, not yet run on one here.

`Transfers.log` counts what crossed between device groups and between processes, for the benchmarks and for
checking that what the runtime moves is what the cost model charges.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from meshes.dispatch import devices_of, in_order, processes_of

LANE, ROW, SIDE, HOLDER = "lane", "row", "side", "holder"


@dataclasses.dataclass
class TransferLog:
    """Bytes moved by `Transfers.move` between different device sets, and the part that crossed processes."""

    between_groups: int = 0
    between_processes: int = 0
    moves: int = 0

    def reset(self) -> None:
        self.between_groups = self.between_processes = self.moves = 0


@dataclasses.dataclass(frozen=True)
class HolderLayout:
    """The wire layout that the device groups holding the same arrays (the holders) share: each holder flattens
    the arrays (alike in shape and dtype on every holder) into `lanes` lanes of `chunk` elements, `lanes` the gcd of
    the holders' device counts, lane i replicated over the i-th row of the holder's devices; the first device of
    each row is its lane's *head*. The heads of all holders form a (holder, lane) mesh, over which a collective
    along the holder axis pairs like-for-like lanes. `chunk` is a multiple of the number of holders, so a lane
    splits into equal parts, one per holder."""

    devices: tuple[tuple[jax.Device, ...], ...]
    lanes: int
    chunk: int
    shapes: tuple[tuple[int, ...], ...]
    dtype: Any

    @property
    def heads(self) -> tuple[tuple[jax.Device, ...], ...]:
        return tuple(d[:: len(d) // self.lanes] for d in self.devices)

    @property
    def mesh(self) -> Mesh:
        return Mesh(np.array(self.heads, dtype=object), (HOLDER, LANE))

    @property
    def heads_sharding(self) -> NamedSharding:
        """A (holders, lanes, ...) array with head (h, l) holding block (h, l)."""
        return NamedSharding(self.mesh, P(HOLDER, LANE))

    @property
    def local(self) -> bool:
        """Whether this process holds any of the holders' devices."""
        return jax.process_index() in processes_of([d for devices in self.devices for d in devices])


def holder_layout(per_holder: Sequence[Sequence[jax.Array]]) -> HolderLayout:
    """The `HolderLayout` of the holders of `per_holder` (per holder, its arrays, alike across holders)."""
    first = per_holder[0]
    devices = tuple(flat_devices(xs[0].sharding) for xs in per_holder)
    lanes = math.gcd(*(len(d) for d in devices))
    holders = len(per_holder)
    chunk = -(-max(sum(x.size for x in first), 1) // (lanes * holders)) * holders
    return HolderLayout(devices, lanes, chunk, tuple(x.shape for x in first), first[0].dtype)


def flat_devices(sharding: Sharding) -> tuple[jax.Device, ...]:
    """The devices of `sharding` in its own order (a mesh's flat order), which jit's device assignment follows."""
    if isinstance(sharding, NamedSharding):
        return tuple(sharding.mesh.devices.flat)
    if isinstance(sharding, SingleDeviceSharding):
        return tuple(sharding.device_set)
    return tuple(sorted(sharding.device_set, key=lambda d: d.id))


def is_local(sharding: Sharding) -> bool:
    """Whether this process holds any device of `sharding` (elsewhere nothing is computed on it, not even
    compiled: processes stay in step, which gloo's 30 s rendezvous for a new device set needs)."""
    return any(d.process_index == jax.process_index() for d in sharding.device_set)


def is_none(x: Any) -> bool:
    return x is None


def empty_array(shape: tuple[int, ...], dtype: Any, sharding: Sharding) -> jax.Array:
    """The global handle of an array none of whose shards live on this process."""
    return jax.make_array_from_single_device_arrays(shape, sharding, [], dtype=dtype)


def put_host(value: Any, sharding: Sharding) -> jax.Array:
    """A host value that every process holds alike (a batch, an initial parameter) placed on `sharding`: each
    process writes only the shards on its own devices."""
    value = np.asarray(value)
    value = value.astype(jax.dtypes.canonicalize_dtype(value.dtype), copy=False)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index], dtype=value.dtype)


def host_value(x: jax.Array) -> np.ndarray:
    """The value of a replicated array, read from this process's first shard of it (never a remote one)."""
    return host_values([x])[0]


def host_values(xs: Sequence[jax.Array]) -> list[np.ndarray]:
    """`host_value` of each of `xs`, fetched together (one wait for all, not one per array)."""
    if not all(x.addressable_shards for x in xs):
        raise ValueError("this process holds no shard of the array; read it where it lives")
    return [np.asarray(v) for v in jax.device_get([x.addressable_shards[0].data for x in xs])]


def restrict(x: jax.Array, sharding: Sharding) -> jax.Array:
    """A replicated array seen on a subset of its devices (`sharding`, replicated over them), without a copy."""
    return assemble([x], sharding)


def assemble(parts: Sequence[jax.Array], sharding: Sharding) -> jax.Array:
    """One replicated array on `sharding` from replicated `parts` that hold the same value on disjoint device
    sets covering it (e.g. a scalar every group computed alike), without a copy."""
    local = {}
    for part in parts:
        for shard in part.addressable_shards:
            local[shard.device] = shard.data
    mine = [d for d in sharding.device_set if d.process_index == jax.process_index()]
    missing = [d.id for d in mine if d not in local]
    if missing:
        raise ValueError(f"no part covers devices {sorted(missing)} of {sharding}")
    first = parts[0]
    return jax.make_array_from_single_device_arrays(first.shape, sharding, [local[d] for d in mine], dtype=first.dtype)


class Transfers:
    """Moves between shardings, with the small programs each kind of move needs compiled once and reused."""

    def __init__(self):
        self.log = TransferLog()
        self._programs: dict[Any, Any] = {}

    def tree(self, tree: Any, shardings: Any, *, copy: bool = False) -> Any:
        """`move` for every leaf of `tree` to the sharding at the same place in `shardings` (with `copy`, into
        buffers of their own). Leaves that cross processes between the same two device sets travel together: one
        wire buffer per (source devices, destination devices, dtype), so a stage's parameters cost three small
        programs, not three per leaf."""
        leaves, treedef = jax.tree.flatten(tree)
        targets = treedef.flatten_up_to(shardings)
        out: list[Any] = [None] * len(leaves)
        bundles: dict[Any, list[int]] = {}
        for i, (x, dst) in enumerate(zip(leaves, targets, strict=True)):
            if self._needs_wire(x, dst):
                bundles.setdefault((flat_devices(x.sharding), flat_devices(dst), x.dtype), []).append(i)
            else:
                out[i] = self.move(x, dst, copy=copy)
        for (src, dst_devices, _), members in bundles.items():
            xs = [leaves[i] for i in members]
            for x in xs:
                self._count(x, src, dst_devices)
            for i, moved in zip(
                members, self._wire_copy(xs, src, [targets[i] for i in members], dst_devices), strict=True
            ):
                out[i] = moved
        return jax.tree.unflatten(treedef, out)

    def move(self, x: Any, dst: Sharding, *, copy: bool = False) -> jax.Array:
        """`x` (a global `jax.Array`, or a host value every process holds alike) placed on `dst`; with `copy`, never
        sharing `x`'s buffers (what a program that donates its inputs needs)."""
        if not isinstance(x, jax.Array):
            return put_host(x, dst)
        if x.sharding == dst and not copy:
            return x
        src_devices, dst_devices = flat_devices(x.sharding), flat_devices(dst)
        if set(src_devices) != set(dst_devices):
            self._count(x, src_devices, dst_devices)
        if not self._needs_wire(x, dst):
            if jax.process_index() not in processes_of(src_devices) | processes_of(dst_devices):
                return empty_array(x.shape, x.dtype, dst)
            moved = jax.device_put(x, dst)
            # device_put keeps the source buffer for a replica on the source device even with may_alias=False
            # (jax 0.10.2, CPU): a copy made on the destination is the only sure way to own the buffers.
            return jnp.copy(moved) if copy and is_local(dst) else moved
        return self._wire_copy([x], src_devices, [dst], dst_devices)[0]

    @staticmethod
    def _needs_wire(x: Any, dst: Sharding) -> bool:
        """Whether moving `x` to `dst` crosses processes between different device sets with this process at
        one end (every other move is a `device_put`, or nothing at all)."""
        if not isinstance(x, jax.Array) or x.sharding == dst:
            return False
        src, target = flat_devices(x.sharding), flat_devices(dst)
        me = jax.process_index()
        involved = processes_of(src) | processes_of(target)
        return set(src) != set(target) and me in involved and involved != {me}

    def _count(self, x: jax.Array, src: Sequence[jax.Device], dst: Sequence[jax.Device]) -> None:
        nbytes = x.size * x.dtype.itemsize
        self.log.moves += 1
        self.log.between_groups += nbytes
        if processes_of(src) != processes_of(dst) or len(processes_of(src)) > 1:
            self.log.between_processes += nbytes

    def _wire_copy(self, xs: list[jax.Array], src: tuple, dsts: list[Sharding], dst_devices: tuple) -> list[jax.Array]:
        """Arrays of one dtype from `src` devices to `dsts` (all over `dst_devices`) through one wire buffer."""
        dtype = xs[0].dtype
        lanes = math.gcd(len(src), len(dst_devices))
        chunk = -(-max(sum(x.size for x in xs), 1) // lanes)
        wire = self._to_wire(xs, src, lanes, chunk)
        src_heads = src[:: len(src) // lanes]
        dst_heads = dst_devices[:: len(dst_devices) // lanes]
        copied = {s.device: s.data for s in wire.addressable_shards if s.device in dst_heads}
        for pairs in _rounds(list(zip(src_heads, dst_heads, strict=True))):
            copied.update(self._copy_lanes(wire, pairs, chunk))
        dst_wire = _wire_sharding(dst_devices, lanes)
        arrays = [_lane_on(copied, dst_heads[i // (len(dst_devices) // lanes)], d) for i, d in enumerate(dst_devices)]
        mine = [a for a, d in zip(arrays, dst_devices, strict=True) if d.process_index == jax.process_index()]
        if not mine:
            return [empty_array(x.shape, dtype, dst) for x, dst in zip(xs, dsts, strict=True)]
        received = jax.make_array_from_single_device_arrays((lanes, chunk), dst_wire, mine, dtype=dtype)
        shapes = tuple(x.shape for x in xs)
        unflatten = self.program(("unflatten", shapes, dtype, dst_wire, tuple(dsts)), _unflatten(shapes), tuple(dsts))
        return list(unflatten(received))

    def _copy_lanes(self, wire: jax.Array, pairs: list[tuple[jax.Device, jax.Device]], chunk: int) -> dict:
        """Send each pair's lane from its source device to its destination device; {destination: lane data}."""
        by_device = {s.device: s.data for s in wire.addressable_shards}
        mesh = Mesh(np.array(pairs, dtype=object), (LANE, SIDE))
        sharding = NamedSharding(mesh, P(LANE, SIDE))
        me = jax.process_index()
        arrays = []
        for source, target in pairs:
            if source.process_index == me:
                arrays.append(by_device[source].reshape(1, 1, chunk))
            if target.process_index == me:
                arrays.append(jnp.zeros((1, 1, chunk), wire.dtype, device=target))
        pair = jax.make_array_from_single_device_arrays((len(pairs), 2, chunk), sharding, arrays, dtype=wire.dtype)
        send = self.program(("send", len(pairs), chunk, wire.dtype, mesh), _send_over(mesh, sharding), sharding)
        moved = send(pair)
        return {s.device: s.data.reshape(1, chunk) for s in moved.addressable_shards if s.index[1].start == 1}

    def sum_copies(self, copies: list[Any]) -> list[Any]:
        """Every leaf summed over the groups holding it, the sum left in each holder's own layout.

        `copies` has one tree per device group, shaped alike, with None where the group holds nothing (see
        `meshes.replicas`). Leaves with the same holders and dtype travel as one buffer: each holder flattens them
        into its wire layout (`L` lanes, `L` the gcd of the holders' device counts), the lanes' first devices of
        all holders form a (holder, lane) mesh, and one reduce-scatter then all-gather over the holder axis (a
        ring: each holder sends 2(H-1)/H of the buffer) leaves the same bits on every holder; the lanes then go
        along their rows and back into each holder's layout. No group gathers the others' copies."""
        columns = [jax.tree.flatten(c, is_leaf=is_none) for c in copies]
        leaves = [list(flat) for flat, _ in columns]
        for (held, _), members in shared_bundles(leaves).items():
            summed = self._ring_sum([[leaves[g][i] for i in members] for g in held])
            for g, arrays in zip(held, summed, strict=True):
                for i, x in zip(members, arrays, strict=True):
                    leaves[g][i] = x
        return [treedef.unflatten(group) for group, (_, treedef) in zip(leaves, columns, strict=True)]

    def _ring_sum(self, per_holder: list[list[jax.Array]]) -> list[list[jax.Array]]:
        """The elementwise sum of the holders' arrays (alike in shape and dtype), on each holder's shardings."""
        layout = holder_layout(per_holder)
        self.count_holders(layout, passes=2)
        if not layout.local:
            return [[empty_array(x.shape, x.dtype, x.sharding) for x in xs] for xs in per_holder]
        stacked = self.to_heads(layout, per_holder)
        key = ("ring", stacked.shape, layout.dtype, layout.mesh)
        summed = self.program(key, _ring_over(layout.mesh), layout.heads_sharding)(stacked)
        return self.from_heads(layout, summed, [tuple(x.sharding for x in xs) for xs in per_holder])

    def to_heads(self, layout: HolderLayout, per_holder: list[list[jax.Array]]) -> jax.Array:
        """Each holder's arrays (like the layout's) in its wire layout, the lane heads' rows stacked into one
        (holders, lanes, chunk) array over the heads mesh (`HolderLayout.heads_sharding`), without a copy between
        groups: each head holds its own holder's lane."""
        me = jax.process_index()
        arrays = []
        for xs, devices, row in zip(per_holder, layout.devices, layout.heads, strict=True):
            wire = self._to_wire(xs, devices, layout.lanes, layout.chunk)
            by_device = {s.device: s.data for s in wire.addressable_shards}
            arrays += [by_device[head].reshape(1, 1, layout.chunk) for head in row if head.process_index == me]
        shape = (len(layout.heads), layout.lanes, layout.chunk)
        return jax.make_array_from_single_device_arrays(shape, layout.heads_sharding, arrays, dtype=layout.dtype)

    def from_heads(
        self,
        layout: HolderLayout,
        stacked: jax.Array,
        targets: list[tuple[Sharding, ...]],
        only: Sequence[int] | None = None,
    ) -> list:
        """The inverse of `to_heads`: each holder's lanes (its heads' rows of `stacked`) copied along their rows and
        unflattened into the holder's `targets` (one sharding per array of the layout); with `only`, for those
        holders (indices into the layout's) alone."""
        lanes_by_head = {s.device: s.data.reshape(1, layout.chunk) for s in stacked.addressable_shards}
        chosen = range(len(layout.devices)) if only is None else only
        out = []
        for h in chosen:
            devices, row, shardings = layout.devices[h], layout.heads[h], targets[h]
            per_row = len(devices) // layout.lanes
            arrays = [_lane_on(lanes_by_head, row[i // per_row], device) for i, device in enumerate(devices)]
            mine = [a for a, device in zip(arrays, devices, strict=True) if device.process_index == jax.process_index()]
            if not mine:
                out.append(
                    [empty_array(shape, layout.dtype, s) for shape, s in zip(layout.shapes, shardings, strict=True)]
                )
                continue
            wire = _wire_sharding(devices, layout.lanes)
            received = jax.make_array_from_single_device_arrays(
                (layout.lanes, layout.chunk), wire, mine, dtype=layout.dtype
            )
            key = ("unflatten", layout.shapes, layout.dtype, wire, tuple(shardings))
            out.append(list(self.program(key, _unflatten(layout.shapes), tuple(shardings))(received)))
        return out

    def _to_wire(self, xs: list[jax.Array], devices: tuple, lanes: int, chunk: int) -> jax.Array:
        """`xs` flattened into one (lanes, chunk) buffer on `devices`, lane i replicated over their i-th row."""
        wire = _wire_sharding(devices, lanes)
        if jax.process_index() not in processes_of(devices):
            return empty_array((lanes, chunk), xs[0].dtype, wire)
        key = ("flatten", tuple((x.shape, x.sharding) for x in xs), xs[0].dtype, wire, chunk)
        return self.program(key, _flatten(lanes, chunk), wire)(*xs)

    def count_holders(self, layout: HolderLayout, passes: int) -> None:
        """`passes` collectives over the holders of `layout`'s wire buffer (a reduce-scatter or an all-gather is one
        pass, a ring all-reduce two): each holder sends (H-1)/H of the buffer per pass, (H-1) buffers in all."""
        moved = passes * (len(layout.heads) - 1) * layout.lanes * layout.chunk * layout.dtype.itemsize
        self.log.moves += 1
        self.log.between_groups += moved
        if len(processes_of([d for row in layout.heads for d in row])) > 1:
            self.log.between_processes += moved

    def sum_scalars(self, values: Sequence[jax.Array], out: NamedSharding) -> jax.Array:
        """The sum of scalars living on different device sets, replicated on `out` (from `everywhere`).

        Each scalar enters once, from the first device of its sharding (which must be one of `out`'s); the sum is
        one all-reduce over `out`'s devices, which crosses processes like any collective. Every process calls it."""
        devices = flat_devices(out)
        me = jax.process_index()
        first = values[0]
        local: dict[jax.Device, jax.Array] = {}
        for value in values:
            head = flat_devices(value.sharding)[0]
            if head.process_index == me:
                data = next(s.data for s in value.addressable_shards if s.device == head)
                local[head] = data if head not in local else local[head] + data
        arrays = [
            (local[d] if d in local else jnp.zeros(first.shape, first.dtype, device=d)).reshape(1)
            for d in devices
            if d.process_index == me
        ]
        stacked_sharding = NamedSharding(out.mesh, P(out.mesh.axis_names[0]))
        stacked = jax.make_array_from_single_device_arrays((len(devices),), stacked_sharding, arrays, dtype=first.dtype)
        return self.program(("sum", first.dtype, out), jnp.sum, out)(stacked)

    def zeros(self, shape: tuple[int, ...], dtype: Any, sharding: Sharding) -> jax.Array:
        """Zeros made on `sharding`'s devices (only a global handle on processes that hold none of them)."""
        if not is_local(sharding):
            return empty_array(tuple(shape), dtype, sharding)
        key = ("zeros", tuple(shape), jnp.dtype(dtype), sharding)
        return self.program(key, lambda: jnp.zeros(shape, dtype), sharding)()

    def program(self, key: Any, fn: Any, out: Any, donate: tuple[int, ...] = ()) -> Any:
        """`fn` jitted with outputs on `out` (a sharding or a tree of them) and the arguments `donate` donated,
        compiled once per `key` and called in order (`meshes.dispatch.in_order`) on the devices of `out`."""
        if key not in self._programs:
            program = jax.jit(fn, out_shardings=out, donate_argnums=donate)
            self._programs[key] = in_order(program, devices_of(out))
        return self._programs[key]


def shared_bundles(
    leaves: Sequence[Sequence[Any]], kind: Callable[[Any], Any] = lambda x: x.dtype
) -> dict[tuple[tuple[int, ...], Any], list[int]]:
    """Per group, its flat leaves (None where it holds none): the leaves held by several groups, bundled by
    (holding groups, `kind` of the leaf: its dtype), in leaf order; such a bundle travels as one wire buffer."""
    bundles: dict[Any, list[int]] = {}
    for i, column in enumerate(zip(*leaves, strict=True)):
        held = tuple(g for g, leaf in enumerate(column) if leaf is not None)
        if len(held) > 1:
            bundles.setdefault((held, kind(column[held[0]])), []).append(i)
    return bundles


def _flatten(lanes: int, chunk: int):
    def flatten(*xs):
        flat = jnp.concatenate([x.reshape(-1) for x in xs])
        return jnp.pad(flat, (0, lanes * chunk - flat.size)).reshape(lanes, chunk)

    return flatten


def _unflatten(shapes: tuple[tuple[int, ...], ...]):
    def unflatten(wire):
        flat, out, offset = wire.reshape(-1), [], 0
        for shape in shapes:
            size = math.prod(shape)
            out.append(flat[offset : offset + size].reshape(shape))
            offset += size
        return tuple(out)

    return unflatten


def _wire_sharding(devices: Sequence[jax.Device], lanes: int) -> NamedSharding:
    """`lanes` rows of `devices` (in order), row i holding lane i of a (lanes, chunk) buffer."""
    return NamedSharding(Mesh(np.array(devices, dtype=object).reshape(lanes, -1), (LANE, ROW)), P(LANE))


def _ring_over(mesh: Mesh):
    def ring(block):
        part = jax.lax.psum_scatter(block, HOLDER, scatter_dimension=2, tiled=True)
        return jax.lax.all_gather(part, HOLDER, axis=2, tiled=True)

    return jax.shard_map(ring, mesh=mesh, in_specs=P(HOLDER, LANE), out_specs=P(HOLDER, LANE))


def _send_over(mesh: Mesh, sharding: NamedSharding):
    def send(block):
        return jax.lax.ppermute(block, SIDE, perm=[(0, 1)])

    return jax.shard_map(send, mesh=mesh, in_specs=P(LANE, SIDE), out_specs=P(LANE, SIDE))


def _rounds(pairs: list[tuple[jax.Device, jax.Device]]) -> list[list[tuple[jax.Device, jax.Device]]]:
    """Pairs grouped so that no device appears twice in a round (a mesh holds each device once); lanes already
    on their destination need no copy and are left out."""
    rounds: list[list[tuple[jax.Device, jax.Device]]] = []
    for source, target in pairs:
        if source == target:
            continue
        for group in rounds:
            if not {source, target} & {d for pair in group for d in pair}:
                group.append((source, target))
                break
        else:
            rounds.append([(source, target)])
    return rounds


def _lane_on(copied: dict, head: jax.Device, device: jax.Device) -> jax.Array | None:
    """Lane data for `device` of the destination row headed by `head` (copied along the row inside a process)."""
    if device.process_index != jax.process_index():
        return None
    if head not in copied:
        raise ValueError(
            f"device {device.id} shares a wire lane with device {head.id} of another process; a destination group's "
            "devices that share a lane must live in one process"
        )
    return copied[head] if device == head else jax.device_put(copied[head], device)


def replicated_like(sharding: Sharding) -> Sharding:
    """A sharding that replicates over the same devices as `sharding` (a NamedSharding or one device)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P())
    if len(sharding.device_set) != 1:
        raise ValueError(f"parameter shardings must be NamedSharding or single-device, got {sharding}")
    return sharding


def replicated_over(devices: Sequence[jax.Device]) -> NamedSharding:
    """Replicated over `devices`, as a 1-D mesh in id order."""
    ordered = sorted(set(devices), key=lambda d: d.id)
    return NamedSharding(Mesh(np.array(ordered, dtype=object), ("all",)), P())


def everywhere(devices: Sequence[jax.Device] = ()) -> NamedSharding:
    """Replicated over `devices` and one device of every process: where scalars that every process reads (loss,
    gradient norm) are reduced, at the cost of one small all-reduce over those devices."""
    firsts = {}
    for device in jax.devices():
        firsts.setdefault(device.process_index, device)
    covered = {d.process_index for d in devices}
    return replicated_over([*devices, *(d for p, d in firsts.items() if p not in covered)])
