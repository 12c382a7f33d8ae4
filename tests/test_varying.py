"""`pallas_kernels.varying`: Pallas kernels inside `shard_map` with its varying-axes check on, in interpret mode.

A kernel that reads a block inside a loop of static trip count: as `lax.fori_loop` (a `scan`), interpret mode
refuses it under `shard_map` (the kernel is typed without the varying axes its blocks have, the failure the flash
dK/dV kernel had); as `varying.fori_loop` (a while loop) it runs and gives the unsharded result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pallas_kernels import varying

ROWS, WIDTH = 8, 16


def _row_sum_kernel(x_ref, o_ref, *, loop):
    """o = the sum of x's rows, one row read per iteration of a loop of static trip count."""
    o_ref[...] = loop(0, ROWS, lambda i, acc: acc + x_ref[pl.ds(i, 1), :], jnp.zeros((1, WIDTH), jnp.float32))


def _row_sum(x, loop):
    kernel = functools.partial(_row_sum_kernel, loop=loop)
    return pl.pallas_call(kernel, out_shape=varying.output_struct((1, WIDTH), x.dtype, [x]), interpret=True)(x)


def _sharded(loop):
    """Row sums of each device's [ROWS, WIDTH] shard, over a 2-device mesh axis."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
    return jax.jit(jax.shard_map(lambda x: _row_sum(x, loop), mesh=mesh, in_specs=P("d"), out_specs=P("d")))


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(0), (2 * ROWS, WIDTH))


def test_a_static_scan_in_a_kernel_is_refused_inside_shard_map(x):
    with pytest.raises(ValueError, match="mismatched varying manual axes"):
        _sharded(jax.lax.fori_loop)(x)


def test_the_while_loop_runs_inside_shard_map_and_equals_the_unsharded_sums(x):
    want = jnp.stack([_row_sum(shard, jax.lax.fori_loop)[0] for shard in (x[:ROWS], x[ROWS:])])
    np.testing.assert_allclose(_sharded(varying.fori_loop)(x), want, rtol=1e-6)


@pytest.mark.parametrize(("lower", "upper"), [(0, 5), (3, 3), (4, 1)])
def test_fori_loop_equals_lax_fori_loop_for_static_and_traced_bounds(lower, upper):
    body = lambda i, acc: acc * 2 + i  # noqa: E731
    want = jax.lax.fori_loop(lower, upper, body, jnp.int32(1))
    assert varying.fori_loop(lower, upper, body, jnp.int32(1)) == want
    assert jax.jit(lambda lo, hi: varying.fori_loop(lo, hi, body, jnp.int32(1)))(lower, upper) == want


def test_output_struct_varies_over_the_union_of_its_inputs_axes():
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))

    def body(x, y):
        struct = varying.output_struct(x.shape, x.dtype, [x, y])
        assert struct.manual_axis_type.varying == {"a", "b"}
        aligned = varying.align_varying([x, y])
        assert [varying.varying_axes(v) for v in aligned] == [{"a", "b"}] * 2
        return aligned[0] + aligned[1]

    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("a"), P("b")), out_specs=P("a", "b")))(
        jnp.ones((4, 4)), jnp.ones((4, 4))
    )
    np.testing.assert_array_equal(out, 2 * np.ones((4, 8)))
    assert varying.varying_axes(jnp.ones(3)) == frozenset()
