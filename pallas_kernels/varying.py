"""Kernels that run inside `shard_map` with its varying-axes check on: `pallas_call` output types and loops.

Inside `shard_map(check_vma=True)` every value carries the set of manual mesh axes it varies over, and a
`pallas_call` output declared by a bare `jax.ShapeDtypeStruct` has none, which the check refuses. A kernel's output
is computed from all its inputs, so it varies over every axis some input varies over. `align_varying` first makes
every input vary over that union (a kernel mixing, say, a query shard with all-gathered keys otherwise trips the
check inside Pallas interpret mode's loops), and `output_struct` declares the outputs alike. Outside `shard_map`
the sets are empty and both change nothing. The spelling is that of every jax the project supports (0.10 to 0.12):
jax 0.10.0 replaced `ShapeDtypeStruct(vma=...)` by `manual_axis_type=ManualAxisType(...)` and removed `lax.pvary`
for `lax.pcast(..., to="varying")` (jax's CHANGELOG), and the aval's `.vma` gave way to `.manual_axis_type`.

Pallas interpret mode evaluates a kernel typed without the varying axes on blocks that have them; a `lax.scan`
in the kernel then refuses its own carry (the blocks its body reads become carry, varying on the way in and not
on the way out). `lax.fori_loop` is such a scan whenever its bounds are static, so kernels loop with
`fori_loop` here, which is always a while loop: it has no such check, and Triton lowers it to the same `scf.for`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

Carry = TypeVar("Carry")


def varying_axes(x: jax.Array) -> frozenset:
    """The manual mesh axes `x` varies over (empty outside `shard_map`)."""
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def align_varying(arrays: Sequence[jax.Array]) -> list[jax.Array]:
    """`arrays`, each cast to vary over every manual axis any of them varies over (the identity outside
    `shard_map`); the cast's transpose sums cotangents over the added axes, so gradients stay right."""
    union = frozenset().union(*(varying_axes(x) for x in arrays))
    return [_vary(x, tuple(sorted(union - varying_axes(x)))) for x in arrays]


def _vary(x: jax.Array, axes: tuple) -> jax.Array:
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def output_struct(shape: Sequence[int], dtype: DTypeLike, inputs: Sequence[jax.Array]) -> jax.ShapeDtypeStruct:
    """`jax.ShapeDtypeStruct(shape, dtype)` varying over the union of `inputs`' varying axes."""
    varying = frozenset().union(*(varying_axes(x) for x in inputs))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def fori_loop(lower: ArrayLike, upper: ArrayLike, body: Callable[[jax.Array, Carry], Carry], carry: Carry) -> Carry:
    """`lax.fori_loop(lower, upper, body, carry)`, as a while loop even for static bounds (see the module
    docstring), in the form Pallas's Triton lowering turns into `scf.for`: (index, bound, carry), `index < bound`,
    `index + 1`."""

    def step(state):
        index, bound, value = state
        return index + 1, bound, body(index, value)

    start = (jnp.asarray(lower, jnp.int32), jnp.asarray(upper, jnp.int32), carry)
    return jax.lax.while_loop(lambda state: state[0] < state[1], step, start)[2]
