"""ZeRO-3 (FSDP) inside a pipeline stage's device group: parameters stored split, gathered where they are used.

A stage with `zero` 3 stores each parameter split as ZeRO-1 splits moments (`meshes.optimizer.zero1_sharding`):
over the group's mesh axes its tensor-parallel layout replicates it on (`cp` for every leaf, `tp` too for leaves
Megatron replicates, such as norms), along its first dimension they divide. The stage's program (written by the
model, `meshes.StagedModel.stage_program`) gathers a part's parameters back into their tensor-parallel layout
(`Zero3Layout.gather`) right before the part runs, inside a `jax.checkpoint` region whose policy
(`Zero3Layout.policy`) has the backward pass gather them again instead of keeping what they gathered.

A gather runs axis by axis. Over a *data* axis (`cp`: every device computes on its own slice of the sequence) it is
`all_gather`, whose transpose is a reduce-scatter (`psum_scatter`): the devices' partial gradients are summed and
each keeps its block. Over any other axis (`tp`, over which Megatron replicates the leaf) it is
`all_gather(to="invarying")`: the gathered leaf is typed replicated over `tp`, as it is without ZeRO-3, so
`shard_map`'s transpose sums its gradient over `tp` where it meets per-shard values (the tensor-parallel all-reduce
of the activations' gradients), and the gather's transpose only slices out the device's block.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from meshes.optimizer import zero1_sharding

Params = Any


def _axes(entry: Any) -> tuple[str, ...]:
    """The mesh axes of one `PartitionSpec` entry (None, a name, or a tuple of names)."""
    if entry is None:
        return ()
    return entry if isinstance(entry, tuple) else (entry,)


def _entry(spec: P, dim: int) -> tuple[str, ...]:
    return _axes(spec[dim] if dim < len(spec) else None)


def gathered_axes(stored: P, spec: P) -> tuple[int, tuple[str, ...]] | None:
    """Where a leaf stored as `stored` is split beyond its layout `spec`: (dimension, mesh axes major to minor), or
    None when the two agree (nothing to gather)."""
    for dim in range(max(len(stored), len(spec))):
        extra, held = _entry(stored, dim), _entry(spec, dim)
        if extra != held:
            return dim, tuple(axis for axis in extra if axis not in held)
    return None


def _block_shape(shape: tuple[int, ...], spec: P, mesh: Mesh) -> tuple[int, ...]:
    """The shape of one device's block of an array of `shape` laid out as `spec` over `mesh`."""
    return tuple(size // math.prod(mesh.shape[axis] for axis in _entry(spec, dim)) for dim, size in enumerate(shape))


@dataclasses.dataclass(frozen=True)
class Zero3Layout:
    """One stage's ZeRO-3 parameters: the `PartitionSpec` trees they are stored with (`stored`) and computed with
    (`specs`), and `blocks`, the (shape, dtype) a split parameter's block has at each step of its gather, from
    stored to gathered."""

    stored: Params
    specs: Params
    data_axes: tuple[str, ...]
    blocks: frozenset[tuple[tuple[int, ...], str]]

    def gather_leaf(self, x: jax.Array, stored: P, spec: P) -> jax.Array:
        """Inside `shard_map`: this device's block of a leaf stored as `stored`, gathered into its block of `spec`,
        minor axis first (a dimension split over axes (a, b) holds a-major blocks)."""
        split = gathered_axes(stored, spec)
        if split is None:
            return x
        dim, axes = split
        for axis in reversed(axes):
            to = "varying" if axis in self.data_axes else "invarying"
            x = jax.lax.all_gather(x, axis, axis=dim, tiled=True, to=to)
        return x

    def gather(self, params: Params, stored: Params, specs: Params) -> Params:
        """Inside `shard_map`: `params` (blocks of leaves stored as `stored`, a subtree of `self.stored`) gathered
        into their layout `specs`."""
        return jax.tree.map(self.gather_leaf, params, stored, specs)

    def policy(self, recompute: bool) -> Callable[..., bool]:
        """The `jax.checkpoint` policy of a region that gathers parameters: with `recompute`, nothing is saved (the
        region is rematerialised from its inputs, as `Stage.recompute` asks); otherwise everything but values
        computed from parameter blocks alone (the gathers, and the transposes, broadcasts or casts of what they
        gathered), so the backward pass gathers the parameters again rather than keeping them. A value counts as
        computed from parameter blocks alone when every operand has the shape and dtype of a step in `blocks`;
        the model's activations have higher rank (or integer dtype) and never do."""
        blocks = self.blocks

        def saveable(primitive: Any, *avals: Any, **params: Any) -> bool:
            if recompute:
                return False
            signatures = [(tuple(getattr(a, "shape", ())), str(getattr(a, "dtype", ""))) for a in avals]
            return not signatures or not all(signature in blocks for signature in signatures)

        return saveable


@dataclasses.dataclass(frozen=True)
class Zero3:
    """ZeRO-3 over the axes of one stage's `mesh`; `data_axes` are those its devices split the data over."""

    mesh: Mesh
    data_axes: tuple[str, ...]

    def layout(self, shapes: Params, specs: Params) -> Zero3Layout:
        """The stored layout of a stage's parameters (`shapes`: arrays or `jax.ShapeDtypeStruct`s) whose
        tensor-parallel layout is `specs`: `zero1_sharding` of each leaf over `mesh`."""

        def stored(leaf: Any, spec: P) -> P:
            return zero1_sharding(tuple(leaf.shape), NamedSharding(self.mesh, spec)).spec

        stored_specs = jax.tree.map(stored, shapes, specs)
        blocks = set()
        for leaf, held, spec in zip(*(jax.tree.leaves(t) for t in (shapes, stored_specs, specs)), strict=True):
            blocks |= self._gather_steps(tuple(leaf.shape), str(leaf.dtype), held, spec)
        return Zero3Layout(stored_specs, specs, self.data_axes, frozenset(blocks))

    def _gather_steps(self, shape: tuple[int, ...], dtype: str, stored: P, spec: P) -> set:
        """The (shape, dtype) of a leaf's block at each step of its gather (`Zero3Layout.gather_leaf`), stored
        and gathered included; none for a leaf stored as laid out."""
        split = gathered_axes(stored, spec)
        if split is None:
            return set()
        dim, axes = split
        block = list(_block_shape(shape, stored, self.mesh))
        steps = {(tuple(block), dtype)}
        for axis in reversed(axes):
            block[dim] *= self.mesh.shape[axis]
            steps.add((tuple(block), dtype))
        return steps
