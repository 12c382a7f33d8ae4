"""`GroupedOptimizer`: the optimizer step where the parameters live, one program per device group.

A plan's parameters live with their owners (`PlanExecutor.owner_shardings`): different leaves on different device
sets. optax jits an update over a whole tree, and a jitted program needs all its inputs on one device set, so
gathering everything to one device would put the whole model and its optimizer state in one device's memory
— exactly what a heterogeneous plan avoids. Instead each device set runs the optimizer on its own leaves: optax
transformations are per-leaf apart from the global gradient norm, which is summed from per-group partial sums
(a cross-group reduction of scalars) and applied as a clipping factor before the per-group update. The optimizer
state keeps optax's structure (so checkpoints do not depend on the plan); its moment leaves sit with their
parameters and its scalars (step counts) are replicated over every group's devices, each group updating its own
view of them. Scalars cross groups only as collectives and views of replicated arrays (`meshes.transfer`), so the
same optimizer runs in one process or across processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from meshes.transfer import Transfers, assemble, empty_array, everywhere, is_local, replicated_over, restrict

Params = Any


def _device_set(sharding: Sharding) -> frozenset:
    return frozenset(sharding.device_set)


def _replicated(sharding: Sharding) -> Sharding:
    """A sharding that replicates over the same devices as `sharding`."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P())
    if len(sharding.device_set) != 1:
        raise ValueError(f"parameter shardings must be NamedSharding or single-device, got {sharding}")
    return sharding


def _first_present(*candidates: Any) -> Any:
    return next(c for c in candidates if c is not None)


def _is_none(x: Any) -> bool:
    return x is None


def clip_factor(norm: jax.Array, max_norm: float) -> jax.Array:
    """The factor `optax.clip_by_global_norm` scales gradients by: 1 below `max_norm`, `max_norm / norm` above."""
    return jnp.where(norm < max_norm, 1.0, max_norm / norm)


class GroupedOptimizer:
    """Apply `optimizer` (after global-norm clipping at `max_grad_norm`) to parameters laid out as `shardings`.

    `shardings` is a tree like the parameters giving each leaf's sharding; leaves whose shardings share a
    device set form one group, updated by one jitted program on those devices.
    """

    def __init__(
        self,
        optimizer: optax.GradientTransformation,
        max_grad_norm: float | None,
        shardings: Params,
        transfers: Transfers | None = None,
    ):
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.shardings = shardings
        self.transfers = Transfers() if transfers is None else transfers
        homes: dict[frozenset, Sharding] = {}
        for sharding in jax.tree.leaves(shardings):
            homes.setdefault(_device_set(sharding), _replicated(sharding))
        self.groups = list(homes)
        self._homes = list(homes.values())
        self.scalars = everywhere(list(set().union(*self.groups)))
        self._state_scalars = replicated_over(list(set().union(*self.groups)))
        self._update = jax.jit(self._group_update)
        self._square_sum = jax.jit(lambda tree: sum((jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)), 0.0))

    def _in_group(self, sharding: Sharding, group: int) -> bool:
        return _device_set(sharding) == self.groups[group]

    def _mask(self, tree: Params, group: int) -> Params:
        """`tree` (shaped like the parameters) with every leaf outside `group` replaced by None."""
        return jax.tree.map(lambda x, s: x if self._in_group(s, group) else None, tree, self.shardings)

    def _map_state(self, state: Any, on_param: Callable, on_other: Callable) -> Any:
        return optax.tree_utils.tree_map_params(
            self.optimizer, on_param, state, self.shardings, transform_non_params=on_other, is_leaf=_is_none
        )

    def init(self, params: Params) -> Any:
        """Optimizer state for `params` (host values, alike on every process), its moments placed with their
        parameters."""
        return self.place_state(jax.device_get(self.optimizer.init(params)))

    def place_state(self, state: Any) -> Any:
        """`state` (optax structure; host values or arrays anywhere) moved into this layout: moments with their
        parameters, scalars over every group's devices."""
        leaves, shardings = [], []

        def collect(leaf, sharding):
            leaves.append(leaf)
            shardings.append(sharding)
            return leaf

        self._map_state(state, collect, lambda leaf: leaf)
        moved = iter(self.transfers.tree(leaves, shardings))
        return self._map_state(state, lambda leaf, _: next(moved), self._place_scalar)

    def _place_scalar(self, leaf: Any) -> jax.Array:
        """A replicated scalar (a step count) onto every group's devices: from the host; as a view of the copies
        already there when it is held on all of them (after an elastic drop, the survivors' copies: nothing is
        read from the devices left out); else all-reduced from the first device holding it, which needs no layout
        both ends share."""
        if not isinstance(leaf, jax.Array):
            return self.transfers.move(leaf, self._state_scalars)
        if leaf.sharding == self._state_scalars:
            return leaf
        if self._state_scalars.device_set <= leaf.sharding.device_set:
            return restrict(leaf, self._state_scalars)
        return restrict(self.transfers.sum_scalars([leaf], everywhere(jax.devices())), self._state_scalars)

    def _group_update(self, grads, state, params, factor):
        grads = jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)
        updates, state = self.optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def global_norm(self, grads: Params) -> jax.Array:
        """The gradient norm over every group: per-group sums of squares, all-reduced onto every device."""
        partial = [
            self._square_sum(self._mask(grads, g)) if is_local(home) else empty_array((), jnp.float32, home)
            for g, home in enumerate(self._homes)
        ]
        return jnp.sqrt(self.transfers.sum_scalars(partial, self.scalars))

    def step(self, params: Params, grads: Params, state: Any) -> tuple[Params, Any, jax.Array]:
        """One optimizer step: (new params, new state, the gradient norm before clipping)."""
        norm = self.global_norm(grads)
        factor = jnp.ones_like(norm) if self.max_grad_norm is None else clip_factor(norm, self.max_grad_norm)
        results = []
        for g, home in enumerate(self._homes):
            state_g = self._map_state(
                state,
                lambda leaf, sharding, g=g: leaf if self._in_group(sharding, g) else None,
                lambda leaf, home=home: restrict(leaf, home),
            )
            grads_g, params_g = self._mask(grads, g), self._mask(params, g)
            if is_local(home):
                results.append(self._update(grads_g, state_g, params_g, restrict(factor, home)))
            else:  # another process's group: its handles stand for the result, which this process never reads
                results.append((params_g, state_g))
        # Each parameter and moment comes from the one group holding it; scalars (step counts, equal in every
        # group) are put together from every group's copy of them.
        params = jax.tree.map(_first_present, *(p for p, _ in results), is_leaf=_is_none)
        return params, self._join_states([s for _, s in results]), norm

    def _join_states(self, per_group: list[Any]) -> Any:
        """One state from the groups' partial ones: each moment from its group, scalars over every group."""
        columns = list(zip(*(jax.tree.leaves(s, is_leaf=_is_none) for s in per_group), strict=True))
        firsts = [_first_present(*column) for column in columns]
        copies = {id(first): column for first, column in zip(firsts, columns, strict=True)}
        state = jax.tree.unflatten(jax.tree.structure(per_group[0], is_leaf=_is_none), firsts)
        return self._map_state(
            state, lambda leaf, _: leaf, lambda leaf: assemble(copies[id(leaf)], self._state_scalars)
        )
