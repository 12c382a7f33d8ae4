"""ZeRO-1 across the device groups that hold the same parameters: each holder keeps a part of their moments.

Replicas of the same layers (and the two ends of a pipeline sharing a tied embedding) hold the same parameters.
Without this, every holder also holds every moment and runs the same update after a ring all-reduce of the
gradients (`Transfers.sum_copies`). Here the holders' shared wire layout (`meshes.transfer.HolderLayout`: `L`
lanes, `L` the gcd of the holders' device counts, each lane headed by the first device of its row) is cut into
`H` parts per lane, one per holder: head (h, l) keeps part h of lane l of every moment. A step reduce-scatters the
gradients over the holders (the ring's first half), each head updates its part of the parameters with its part of
the moments, and an all-gather over the holders (the ring's second half) brings the updated parameters back to
every holder, which unflattens them into its own layout. So the bytes on the wire are the ring's, every holder
ends with the same bits, and each head holds 1/(H*L) of the leaves' moments (the other devices of a row none).

A part mixes elements of several leaves, so the optimizer must treat elements alike and independently (AdamW,
Adam, SGD, Lion without per-leaf masks; not LAMB's per-leaf trust ratio nor Adafactor's factored moments). The
moments of a part live nowhere else: losing a holder loses them, and the run must restore them from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from meshes.transfer import (
    HOLDER,
    LANE,
    HolderLayout,
    Transfers,
    assemble,
    empty_array,
    holder_layout,
    replicated_like,
    restrict,
)

PARTS = P(HOLDER, LANE)
Update = Callable[[Any, Any, Any, Any], tuple[Any, Any]]


def map_slots(optimizer: optax.GradientTransformation, state: Any, on_slot: Callable, on_other: Callable) -> Any:
    """`state` with each of its parameter-shaped subtrees (Adam's `mu` and `nu`: its *slots*) replaced by
    `on_slot(subtree)`, in order, and every other leaf (step counts) by `on_other(leaf)`."""
    return optax.tree_utils.tree_map_params(
        optimizer, on_slot, state, transform_non_params=on_other, is_leaf=lambda _: True
    )


def has_slots(optimizer: optax.GradientTransformation) -> bool:
    """Whether `optimizer` keeps any parameter-shaped state (moments) to split."""
    found: list[Any] = []
    state = jax.eval_shape(optimizer.init, jax.ShapeDtypeStruct((1,), "float32"))
    map_slots(optimizer, state, lambda slot: found.append(slot) or slot, lambda leaf: leaf)
    return bool(found)


class HolderShards:
    """The leaves `members` (indices into the model's flat leaves) that the device groups `holders` all hold,
    with their moments split across those holders (see the module docstring).

    `targets[h]` gives holder h's sharding of each member (its parameter layout). Arrays are passed per holder,
    as lists in `members` order; the optimizer state of the bundle is optax's state of one parameter per head,
    its part, laid out (holders, lanes, part) over the heads.
    """

    def __init__(
        self,
        optimizer: optax.GradientTransformation,
        update: Update,
        transfers: Transfers,
        holders: tuple[int, ...],
        members: list[int],
        targets: list[tuple[Sharding, ...]],
    ):
        self.optimizer = optimizer
        self.update_fn = update
        self.transfers = transfers
        self.holders = holders
        self.members = members
        self.targets = targets
        self._layouts: dict[Any, HolderLayout] = {}

    def layout(self, per_holder: Sequence[Sequence[jax.Array]]) -> HolderLayout:
        """The holders' wire layout for arrays like `per_holder` (one dtype), remembered per dtype."""
        dtypes = {x.dtype for xs in per_holder for x in xs}
        if len(dtypes) != 1:
            raise ValueError(
                f"the leaves held by device groups {list(self.holders)} have dtypes {sorted(map(str, dtypes))}; "
                "splitting their moments across those groups needs one dtype"
            )
        return self._layouts.setdefault(per_holder[0][0].dtype, holder_layout(per_holder))

    def _replicated(self, layout: HolderLayout) -> NamedSharding:
        return NamedSharding(layout.mesh, P())

    def _part_struct(self, layout: HolderLayout) -> jax.ShapeDtypeStruct:
        holders = len(layout.heads)
        return jax.ShapeDtypeStruct((holders, layout.lanes, layout.chunk // holders), layout.dtype)

    def _state_specs(self, layout: HolderLayout) -> Any:
        shape = jax.eval_shape(self.optimizer.init, self._part_struct(layout))
        return map_slots(self.optimizer, shape, lambda _: PARTS, lambda _: P())

    def _shardings(self, layout: HolderLayout, specs: Any) -> Any:
        return jax.tree.map(lambda spec: NamedSharding(layout.mesh, spec), specs)

    def _empty_state(self, layout: HolderLayout) -> Any:
        shape = jax.eval_shape(self.optimizer.init, self._part_struct(layout))
        shardings = self._shardings(layout, self._state_specs(layout))
        return jax.tree.map(lambda leaf, s: empty_array(leaf.shape, leaf.dtype, s), shape, shardings)

    def _run(
        self, name: str, layout: HolderLayout, body: Callable, specs: tuple, *args, donate: tuple[int, ...] = ()
    ) -> Any:
        """`body` under `shard_map` over the heads of `layout` (`specs`: inputs', outputs'), compiled once per name
        and layout, with the arguments `donate` donated."""
        in_specs, out_specs = specs
        program = jax.shard_map(body, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs)
        key = (name, layout, jax.tree.structure(args))
        return self.transfers.program(key, program, self._shardings(layout, out_specs), donate)(*args)

    def init(self, params: list[list[jax.Array]]) -> Any:
        """Optimizer state of the members' parts, from the holders' `params` (identical on every holder)."""
        layout = self.layout(params)
        if not layout.local:
            return self._empty_state(layout)
        specs = self._state_specs(layout)
        stacked = self.transfers.to_heads(layout, params)
        return self._run(
            "init", layout, lambda block: self.optimizer.init(_own_part(block)), ((PARTS,), specs), stacked
        )

    def scatter(self, grads: list[list[jax.Array]], summed: bool) -> tuple[jax.Array, jax.Array]:
        """Each head's part of the members' gradient summed over the holders, and the sum of squares of the whole
        summed gradient (replicated over the heads). With `summed`, every holder already holds the sum and each
        head takes its part with no communication; otherwise one reduce-scatter over the holders."""
        layout = self.layout(grads)
        if not summed:
            self.transfers.count_holders(layout, passes=1)
        if not layout.local:
            part = self._part_struct(layout)
            return (
                empty_array(part.shape, part.dtype, layout.heads_sharding),
                empty_array((), layout.dtype, self._replicated(layout)),
            )

        def scatter(block):
            if summed:
                part = _own_part(block)
            else:
                part = jax.lax.psum_scatter(block, HOLDER, scatter_dimension=2, tiled=True)
            return part, jax.lax.psum(jnp.sum(jnp.square(part)), (HOLDER, LANE))

        name = "take" if summed else "scatter"
        return self._run(name, layout, scatter, ((PARTS,), (PARTS, P())), self.transfers.to_heads(layout, grads))

    def update(
        self, parts: jax.Array, state: Any, params: list[list[jax.Array]], factor: jax.Array
    ) -> tuple[list[list[jax.Array]], Any]:
        """The optimizer step on every head's part (gradients scaled by `factor`), the updated parameters
        all-gathered over the holders and unflattened into each holder's layout: (per holder its members' new
        parameters, new state). `params` and `state` are consumed."""
        layout = self.layout(params)
        self.transfers.count_holders(layout, passes=1)
        if not layout.local:
            return [[empty_array(x.shape, x.dtype, x.sharding) for x in xs] for xs in params], state
        state_specs = self._state_specs(layout)

        def step(grad_part, state, block, factor):
            new_part, state = self.update_fn(grad_part, state, _own_part(block), factor)
            return jax.lax.all_gather(new_part, HOLDER, axis=2, tiled=True), state

        stacked = self.transfers.to_heads(layout, params)
        factor = restrict(factor, self._replicated(layout))
        specs = ((PARTS, state_specs, PARTS, P()), (PARTS, state_specs))
        gathered, state = self._run("update", layout, step, specs, parts, state, stacked, factor, donate=(1, 2))
        return self.transfers.from_heads(layout, gathered, self.targets), state

    def gather_slots(self, state: Any, holder: int) -> list[list[jax.Array]]:
        """Each moment slot of `state` whole again, in holder `holder`'s layout (an index into `holders`): per slot,
        the members' arrays. For checkpoints and strategy switches; it holds the whole moments on that holder."""
        slots: list[jax.Array] = []
        map_slots(self.optimizer, state, lambda slot: slots.append(slot) or slot, lambda leaf: leaf)
        out = []
        for parts in slots:
            layout = self._layouts[parts.dtype]
            if not layout.local:
                targets = self.targets[holder]
                out.append(
                    [empty_array(shape, parts.dtype, s) for shape, s in zip(layout.shapes, targets, strict=True)]
                )
                continue
            gather = lambda p: jax.lax.all_gather(p, HOLDER, axis=2, tiled=True)  # noqa: E731
            whole = self._run("gather", layout, gather, ((PARTS,), PARTS), parts)
            out.append(self.transfers.from_heads(layout, whole, self.targets, only=[holder])[0])
        return out

    def place_slots(self, slots: list[list[Any]], others: list[Any]) -> Any:
        """The bundle's state from whole moments: per slot the members' values (host values alike on every
        process, or arrays anywhere), and the state's other leaves (step counts) in order."""
        parts = []
        for values in slots:
            per_holder = self._placed(values)
            layout = self.layout(per_holder)
            if layout.local:
                stacked = self.transfers.to_heads(layout, per_holder)
                parts.append(self._run("take_part", layout, _own_part, ((PARTS,), PARTS), stacked))
            else:
                part = self._part_struct(layout)
                parts.append(empty_array(part.shape, part.dtype, layout.heads_sharding))
        moved = iter([self._on_heads(x, layout) for x in others])
        shape = jax.eval_shape(self.optimizer.init, self._part_struct(layout))
        chosen = iter(parts)
        return map_slots(self.optimizer, shape, lambda _: next(chosen), lambda _: next(moved))

    def _on_heads(self, value: Any, layout: HolderLayout) -> jax.Array:
        """`value` (a scalar alike everywhere: a step count) replicated over the heads, which may span processes:
        moved to every holder's devices (each inside one process), then seen on the heads without a copy."""
        homes = [replicated_like(targets[0]) for targets in self.targets]
        parts = [self.transfers.move(value, home, copy=True) for home in homes]
        if not layout.local:
            return empty_array(parts[0].shape, parts[0].dtype, self._replicated(layout))
        return assemble(parts, self._replicated(layout))

    def _placed(self, values: list[Any]) -> list[list[jax.Array]]:
        """`values` (the members, whole) placed on every holder in its parameter layout."""
        targets = [target for per_holder in self.targets for target in per_holder]
        moved = self.transfers.tree(list(values) * len(self.holders), targets)
        n = len(self.members)
        return [moved[h * n : (h + 1) * n] for h in range(len(self.holders))]


def _own_part(block: jax.Array) -> jax.Array:
    """Inside the heads' `shard_map`: this head's part (its holder's index along the holder axis) of its lane."""
    holders = jax.lax.axis_size(HOLDER)
    size = block.shape[2] // holders
    return jax.lax.dynamic_slice_in_dim(block, jax.lax.axis_index(HOLDER) * size, size, axis=2)
