"""`GroupedOptimizer`: the optimizer step where the parameters live, one program per device group.

A plan's state is one copy per device group (`meshes.replicas`): trees shaped like the whole model, `None` where
the group holds nothing. A jitted program needs all its inputs on one device set, and gathering the model onto one
device is exactly what a heterogeneous plan avoids, so each group runs optax on its own copy: optax transformations
are per-leaf apart from the global gradient norm, which is summed from per-group partial sums (each leaf counted in
the first group holding it) by an all-reduce of scalars, and applied as a clipping factor before each group's
update. Gradients arrive already summed over the groups holding each leaf (`PlanExecutor.value_and_grad`), so
copies of a leaf get the same update and stay identical. The optimizer state is a copy per group as well, in
optax's structure (masked), with its step counts on each group's devices; a moment lives where its parameter does,
or (ZeRO-1, `zero1_shardings`) split further over the group's devices that hold the parameter whole, each device
updating its part and the parameter gathered back; where every group holding a leaf allows it, the leaf's moments
are split across those groups instead (`meshes.zero`: a reduce-scatter of the gradients, each part updated where
it lives, an all-gather of the parameters). Its `first_copies` view is the whole model's optax state, which
checkpoints hold, so checkpoints do not depend on the plan. Parameters and state are
updated in place (donated buffers). The same optimizer runs in one process or across processes: a process runs
only its own groups' programs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from meshes.dispatch import in_order
from meshes.replicas import Copies, first_copies, place
from meshes.transfer import (
    Transfers,
    empty_array,
    everywhere,
    is_local,
    is_none,
    replicated_like,
    restrict,
    shared_bundles,
)
from meshes.zero import HolderShards, has_slots, map_slots

Params = Any


def zero1_sharding(shape: tuple[int, ...], sharding: Sharding) -> Sharding:
    """Where a moment of a parameter of `shape` laid out as `sharding` lives under ZeRO-1: split as well over the
    mesh axes the parameter is replicated on, along its first unsplit dimension they divide (as the parameter is
    when none does, or when it lives on one device)."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    mesh = sharding.mesh
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    used = {axis for entry in spec if entry is not None for axis in (entry if isinstance(entry, tuple) else (entry,))}
    free = tuple(axis for axis in mesh.axis_names if axis not in used and mesh.shape[axis] > 1)
    ways = math.prod(mesh.shape[axis] for axis in free)
    for dim, (entry, size) in enumerate(zip(spec, shape, strict=True)):
        if free and entry is None and size % ways == 0:
            spec[dim] = free
            return NamedSharding(mesh, P(*spec))
    return sharding


def zero1_shardings(params: Params, shardings: Params) -> Params:
    """`zero1_sharding` of every leaf of one group's `shardings` (a tree like `params`, None where not held)."""
    return jax.tree.map(
        lambda sharding, leaf: None if sharding is None else zero1_sharding(tuple(leaf.shape), sharding),
        shardings,
        params,
        is_leaf=is_none,
    )


def clip_factor(norm: jax.Array, max_norm: float) -> jax.Array:
    """The factor `optax.clip_by_global_norm` scales gradients by: 1 below `max_norm`, `max_norm / norm` above."""
    return jnp.where(norm < max_norm, 1.0, max_norm / norm)


def _home(shardings: Any, group: int) -> Sharding:
    """The devices of a group's copy (every leaf of a group lives on the same devices), replicated over them."""
    leaves = jax.tree.leaves(shardings)
    if not leaves:
        raise ValueError(f"device group {group} holds no parameter")
    devices = {frozenset(s.device_set) for s in leaves}
    if len(devices) != 1:
        raise ValueError(f"device group {group}'s leaves live on {len(devices)} different device sets, not one")
    return replicated_like(leaves[0])


def _optimizer_update(optimizer: optax.GradientTransformation, grads, state, params, factor):
    """`optimizer`'s step on gradients scaled by the clipping `factor`: (new parameters, new state)."""
    grads = jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _pinned(leaf: Any, sharding: Sharding | None) -> Any:
    """`leaf` constrained to `sharding` inside a jitted program (a leaf on one device needs no constraint)."""
    if not isinstance(sharding, NamedSharding) or leaf is None:
        return leaf
    return jax.lax.with_sharding_constraint(leaf, sharding)


class GroupedOptimizer:
    """Apply `optimizer` (after global-norm clipping at `max_grad_norm`) to copies laid out as `shardings`.

    `shardings` has one tree per device group, like the parameters, giving the sharding of each leaf the group
    holds and None elsewhere (`PlanExecutor.copy_shardings`; on one device, one group holding everything).
    `moment_shardings`, alike, places the optimizer's moments (default: with their parameters; `zero1_shardings`
    for ZeRO-1). `split_across` says per group whether the moments of the leaves it shares with other groups may
    be split across them (`meshes.zero`: a plan's stage with `zero` >= 1); a shared leaf is split where all its
    holders allow it.

    The state (`init`, `place_state`) is a list: one optax state per group, over the leaves it keeps whole, then
    one per bundle of leaves whose moments are split across their holders.
    """

    def __init__(
        self,
        optimizer: optax.GradientTransformation,
        max_grad_norm: float | None,
        shardings: Sequence[Params],
        transfers: Transfers | None = None,
        moment_shardings: Sequence[Params] | None = None,
        split_across: Sequence[bool] | None = None,
    ):
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.shardings = list(shardings)
        self.transfers = Transfers() if transfers is None else transfers
        self.homes = [_home(s, g) for g, s in enumerate(self.shardings)]
        self.bundles = self._split_bundles([False] * len(self.shardings) if split_across is None else split_across)
        self._split = {i for bundle in self.bundles for i in bundle.members}
        self.moment_shardings = [
            self.own(g, tree) for g, tree in enumerate(self.shardings if moment_shardings is None else moment_shardings)
        ]
        self._own_shardings = [self.own(g, tree) for g, tree in enumerate(self.shardings)]
        self.scalars = everywhere(list({d for home in self.homes for d in home.device_set}))
        self._counted = self._first_holders()
        self._updates = [
            in_order(jax.jit(partial(self._group_update, group=g), donate_argnums=(1, 2)), home.device_set)
            for g, home in enumerate(self.homes)
        ]
        self._fused: dict[Callable, Callable] = {}
        square_sum = jax.jit(lambda tree: sum((jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)), 0.0))
        self._square_sums = [in_order(square_sum, home.device_set) for home in self.homes]

    def _split_bundles(self, split_across: Sequence[bool]) -> list[HolderShards]:
        """The leaves shared by groups that all allow it, bundled by holders, each with its moments split across
        them (none for an optimizer without moments)."""
        if not has_slots(self.optimizer):
            return []
        flat = [jax.tree.flatten(tree, is_leaf=is_none)[0] for tree in self.shardings]
        update = partial(_optimizer_update, self.optimizer)
        return [
            HolderShards(
                self.optimizer,
                update,
                self.transfers,
                holders,
                members,
                [tuple(flat[g][i] for i in members) for g in holders],
            )
            for (holders, _), members in shared_bundles(flat, kind=lambda _: None).items()
            if all(split_across[g] for g in holders)
        ]

    def own(self, group: int, tree: Params) -> Params:
        """`tree` (group `group`'s copy, whole-model structure) without the leaves whose moments are split across
        groups (None there): what the group updates itself."""
        if not self._split:
            return tree
        leaves, treedef = jax.tree.flatten(tree, is_leaf=is_none)
        return treedef.unflatten([None if i in self._split else leaf for i, leaf in enumerate(leaves)])

    def _per_holder(self, copies: Copies, bundle: HolderShards) -> list[list[Any]]:
        """The bundle's members from each of its holders' copies."""
        flat = {g: jax.tree.flatten(copies[g], is_leaf=is_none)[0] for g in bundle.holders}
        return [[flat[g][i] for i in bundle.members] for g in bundle.holders]

    def _first_holders(self) -> list[Params]:
        """Per group, a tree of booleans: whether the group is the first holding the leaf (counted in the norm;
        leaves split across groups are counted by their bundles)."""
        seen: set = set()

        def first(group: Params) -> Params:
            def mark(path, sharding):
                if sharding is None or path in seen:
                    return False
                seen.add(path)
                return True

            return jax.tree_util.tree_map_with_path(mark, group, is_leaf=is_none)

        return [first(group) for group in self._own_shardings]

    def _map_state(self, state: Any, shardings: Params, on_param: Callable, on_other: Callable) -> Any:
        return optax.tree_utils.tree_map_params(
            self.optimizer, on_param, state, shardings, transform_non_params=on_other, is_leaf=is_none
        )

    def place(self, params: Params) -> Copies:
        """`params` (whole-model structure; host values alike on every process, or arrays anywhere) as copies in
        this layout."""
        return place(self.transfers, params, self.shardings)

    def init(self, params: Copies) -> Copies:
        """Optimizer state for the parameter copies `params` (from `place`, or read straight into this layout), each
        group's made by a program on its own devices, so no model-sized value passes through one device or the
        host; another process's group gets handles only."""
        groups = [self._init_group(group, self.own(group, copy)) for group, copy in enumerate(params)]
        return groups + [bundle.init(self._per_holder(params, bundle)) for bundle in self.bundles]

    def _init_group(self, group: int, copy: Params) -> Any:
        moments, home = self.moment_shardings[group], self.homes[group]
        if not is_local(home):
            return self._map_state(
                jax.eval_shape(self.optimizer.init, copy),
                moments,
                lambda leaf, sharding: None if sharding is None else empty_array(leaf.shape, leaf.dtype, sharding),
                lambda leaf: empty_array(leaf.shape, leaf.dtype, home),
            )

        def init(params: Params) -> Any:
            state = self.optimizer.init(params)
            return self._map_state(state, moments, _pinned, lambda leaf: _pinned(leaf, home))

        # Committed outputs (explicit shardings, one device too), as the step's outputs are: a step then compiles
        # once, not again at its second call.
        placed = self._map_state(jax.eval_shape(init, copy), moments, lambda _, sharding: sharding, lambda _: home)
        return in_order(jax.jit(init, out_shardings=placed), home.device_set)(copy)

    def place_state(self, state: Any) -> Copies:
        """`state` (the whole model's optax state; host values or arrays anywhere) as a copy per group: moments
        with their parameters, step counts on every group's devices."""
        leaves, targets = [], []

        def collect(leaf, sharding):
            if sharding is not None:
                leaves.append(leaf)
                targets.append(sharding)
            return leaf

        def collect_other(home):
            def other(leaf):
                leaves.append(leaf)
                targets.append(home)
                return leaf

            return other

        for group, home in zip(self.moment_shardings, self.homes, strict=True):
            self._map_state(state, group, collect, collect_other(home))
        moved = iter(self.transfers.tree(leaves, targets))
        groups = [
            self._map_state(
                state,
                group,
                lambda leaf, sharding: None if sharding is None else next(moved),
                lambda leaf: next(moved),
            )
            for group in self.moment_shardings
        ]
        if not self.bundles:
            return groups
        slots, others = [], []
        map_slots(self.optimizer, state, lambda slot: slots.append(jax.tree.leaves(slot)), others.append)
        return groups + [
            bundle.place_slots([[slot[i] for i in bundle.members] for slot in slots], others) for bundle in self.bundles
        ]

    def view_state(self, states: Copies, among: Sequence[int] | None = None) -> Any:
        """The whole model's optax state from `states`, each leaf from the first group of `among` holding it.

        Moments split across groups are gathered whole onto their first holder in `among`, which needs every
        holder: when one is missing from `among` (a lost group), their parts are gone and this raises, naming the
        groups; such a run restores its optimizer state from its last checkpoint."""
        groups = list(states[: len(self.homes)])
        chosen = list(range(len(self.homes)) if among is None else among)
        for bundle, state in zip(self.bundles, states[len(self.homes) :], strict=True):
            lost = [g for g in bundle.holders if g not in chosen]
            if lost:
                raise ValueError(
                    f"the optimizer moments of {len(bundle.members)} leaves are split across device groups "
                    f"{list(bundle.holders)} and groups {lost} are not among {chosen}: restore them from a checkpoint"
                )
            first = next(g for g in chosen if g in bundle.holders)
            slots = iter(bundle.gather_slots(state, bundle.holders.index(first)))
            groups[first] = map_slots(
                self.optimizer,
                groups[first],
                lambda slot, m=bundle.members, v=slots: _filled(slot, m, next(v)),
                lambda x: x,
            )
        return first_copies(groups, among)

    def fused(self, value_and_grad: Callable) -> Callable:
        """For a layout of one device group: `step(params, state, batch) -> (params, state, loss, norm)` as one
        jitted program (`value_and_grad(params, batch)`, the gradient norm, clipping and the update) over the
        group's copy, with the parameters and optimizer state donated; nothing is read back to the host. Compiled
        once per `value_and_grad`."""
        if len(self.homes) != 1:
            raise ValueError(f"a fused step needs one device group; this layout has {len(self.homes)}")
        if value_and_grad not in self._fused:

            def step(params, state, batch):
                loss, grads = value_and_grad(params, batch)
                norm = optax.global_norm(grads)
                factor = jnp.ones_like(norm) if self.max_grad_norm is None else clip_factor(norm, self.max_grad_norm)
                params, state = self._group_update(grads, state, params, factor, group=0)
                return params, state, loss, norm

            self._fused[value_and_grad] = in_order(jax.jit(step, donate_argnums=(0, 1)), self.homes[0].device_set)
        return self._fused[value_and_grad]

    def _group_update(self, grads, state, params, factor, *, group: int):
        """Group `group`'s update. On a device mesh each device updates its block of every leaf as the moments
        are laid out (`shard_map`; under ZeRO-1 a part of a parameter it otherwise holds whole), and the parameters
        are gathered back into their layout. Every group's devices thus run the same per-element program on their
        blocks, whatever the blocks' shapes, so copies held by differently split groups get the same bits."""
        update = partial(_optimizer_update, self.optimizer)
        home = self.homes[group]
        if isinstance(home, NamedSharding):
            moments = self.moment_shardings[group]
            leaf_specs = jax.tree.map(lambda sharding: sharding and sharding.spec, moments, is_leaf=is_none)
            state_specs = self._map_state(state, moments, lambda _, sharding: sharding and sharding.spec, lambda _: P())
            update = jax.shard_map(
                update,
                mesh=home.mesh,
                in_specs=(leaf_specs, state_specs, leaf_specs, P()),
                out_specs=(leaf_specs, state_specs),
            )
        params, state = update(grads, state, params, factor)
        return jax.tree.map(_pinned, params, self._own_shardings[group], is_leaf=is_none), state

    def global_norm(self, grads: Copies, squares: Sequence[jax.Array] = ()) -> jax.Array:
        """The gradient norm over every leaf each group keeps whole (each counted once) plus the sums of `squares`
        (the split bundles'): per-group sums of squares, all-reduced onto every device."""
        partial = list(squares)
        for group, (copy, counted, home) in enumerate(zip(grads, self._counted, self.homes, strict=True)):
            mine = jax.tree.map(lambda g, c: g if c else None, copy, counted, is_leaf=is_none)
            if is_local(home) and jax.tree.leaves(mine):
                partial.append(self._square_sums[group](mine))
            else:  # nothing counted here, or another process's group (a handle with no data)
                partial.append(self.transfers.zeros((), jnp.float32, home))
        return jnp.sqrt(self.transfers.sum_scalars(partial, self.scalars))

    def step(
        self, params: Copies, grads: Copies, state: Copies, *, summed: bool = True
    ) -> tuple[Copies, Copies, jax.Array]:
        """One optimizer step on every group's copy: (new params, new state, the gradient norm before clipping).
        `grads` are each group's gradient of every leaf it holds: summed over the leaf's holders already
        (`summed`, as `PlanExecutor.value_and_grad` gives them) or each group's own share, which this sums (a ring
        over the holders, or a reduce-scatter where the moments are split). `params` and `state` are donated:
        their buffers hold the new values."""
        groups = len(self.homes)
        own = [self.own(g, copy) for g, copy in enumerate(grads)]
        if not summed:
            own = self.transfers.sum_copies(own)
        scattered = [bundle.scatter(self._per_holder(grads, bundle), summed) for bundle in self.bundles]
        norm = self.global_norm(own, [square for _, square in scattered])
        factor = jnp.ones_like(norm) if self.max_grad_norm is None else clip_factor(norm, self.max_grad_norm)
        new_params, new_state = [], []
        for group, home in enumerate(self.homes):
            mine = self.own(group, params[group])
            if is_local(home):  # also where every leaf is split across groups: its step counts advance
                p, s = self._updates[group](own[group], state[group], mine, restrict(factor, home))
            else:  # another process's group: its handles stand for the result, which this process never reads
                p, s = mine, state[group]
            new_params.append(jax.tree.flatten(p, is_leaf=is_none))
            new_state.append(s)
        for bundle, (parts, _), bundle_state in zip(self.bundles, scattered, state[groups:], strict=True):
            updated, bundle_state = bundle.update(parts, bundle_state, self._per_holder(params, bundle), factor)
            for g, arrays in zip(bundle.holders, updated, strict=True):
                for i, x in zip(bundle.members, arrays, strict=True):
                    new_params[g][0][i] = x
            new_state.append(bundle_state)
        return [treedef.unflatten(leaves) for leaves, treedef in new_params], new_state, norm


def _filled(slot: Params, members: Sequence[int], values: Sequence[jax.Array]) -> Params:
    """A moment slot (whole-model structure, None where not held) with `values` at the flat leaves `members`."""
    leaves, treedef = jax.tree.flatten(slot, is_leaf=is_none)
    for i, value in zip(members, values, strict=True):
        leaves[i] = value
    return treedef.unflatten(leaves)
