"""Output types for `pallas_call` that hold inside `shard_map` with its varying-axes check on.

Inside `shard_map(check_vma=True)` every value carries the set of manual mesh axes it varies over, and a
`pallas_call` output declared by a bare `jax.ShapeDtypeStruct` has none, which the check refuses. A kernel's output
is computed from all its inputs, so it varies over every axis some input varies over. `align_varying` first makes
every input vary over that union (a kernel mixing, say, a query shard with all-gathered keys otherwise trips the
check inside Pallas interpret mode's loops), and `output_struct` declares the outputs alike. Outside `shard_map`
the sets are empty and both change nothing. jax spells the declaration `manual_axis_type=ManualAxisType(...)` and
the cast `lax.pcast(..., to="varying")` from 0.10 on, `vma=...` and `lax.pvary` before.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import jax
from jax.typing import DTypeLike

_STRUCT_PARAMETERS = inspect.signature(jax.ShapeDtypeStruct).parameters


def varying_axes(x: jax.Array) -> frozenset:
    """The manual mesh axes `x` varies over (empty outside `shard_map`)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", frozenset()))


def align_varying(arrays: Sequence[jax.Array]) -> list[jax.Array]:
    """`arrays`, each cast to vary over every manual axis any of them varies over (the identity outside
    `shard_map`); the cast's transpose sums cotangents over the added axes, so gradients stay right."""
    union = frozenset().union(*(varying_axes(x) for x in arrays))
    return [_vary(x, tuple(sorted(union - varying_axes(x)))) for x in arrays]


def _vary(x: jax.Array, axes: tuple) -> jax.Array:
    if not axes:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)


def output_struct(shape: Sequence[int], dtype: DTypeLike, inputs: Sequence[jax.Array]) -> jax.ShapeDtypeStruct:
    """`jax.ShapeDtypeStruct(shape, dtype)` varying over the union of `inputs`' varying axes."""
    varying = frozenset().union(*(varying_axes(x) for x in inputs))
    if "manual_axis_type" in _STRUCT_PARAMETERS:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))
    return jax.ShapeDtypeStruct(shape, dtype, vma=varying)
