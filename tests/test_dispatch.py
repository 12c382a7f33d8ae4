"""Multi-device programs on CPU run one at a time (`meshes.dispatch.in_order`), so their collectives cannot
stall each other in the CPU client's thread pool."""

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from meshes.dispatch import in_order

ROOT = Path(__file__).resolve().parents[1]

# Five ring all-reduces over overlapping sets of 8 CPU devices, each fed by an elementwise program, issued 300
# times. Issued without waiting, this stopped within 100 iterations in every run on a 2-core VM (XLA
# then aborts the process after 40 s); through `in_order` it finishes in seconds.
OVERLAPPING_RINGS = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from meshes.dispatch import in_order

    devices = jax.devices()
    groups = [devices, devices[0::2], devices[1::2], devices[:4], devices[4:]]

    def ring(mesh):
        def body(block):
            part = jax.lax.psum_scatter(block, "h", scatter_dimension=1, tiled=True)
            return jax.lax.all_gather(part, "h", axis=1, tiled=True) / jax.lax.axis_size("h")

        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("h"), out_specs=P("h")))

    meshes = [Mesh(np.array(g), ("h",)) for g in groups]
    rings = [in_order(ring(m), g) for m, g in zip(meshes, groups)]
    xs = [jax.device_put(jnp.ones((len(g), 64 * len(g))), NamedSharding(m, P("h"))) for m, g in zip(meshes, groups)]
    scale = jax.jit(lambda x: x * 0.5 + 1.0)
    for _ in range(300):
        xs = [r(scale(x)) for r, x in zip(rings, xs)]
    print("finished", float(xs[0][0, 0]))
    """
)


def test_overlapping_collective_programs_finish():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", OVERLAPPING_RINGS], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finished 2.0" in done.stdout  # each ring returns its input's mean over holders: x -> x/2 + 1 -> 2


def test_single_device_programs_are_left_alone():
    program = jax.jit(lambda x: x + 1)
    assert in_order(program, jax.devices()[:1]) is program
    assert in_order(program, jax.devices()[:2]) is not program


@pytest.mark.parametrize("count", [2, 8])
def test_ordered_program_returns_finished_results(count):
    devices = jax.devices()[:count]
    mesh = jax.sharding.Mesh(devices, ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    program = in_order(jax.jit(lambda x: x.sum(), out_shardings=replicated), devices)
    x = jax.device_put(jax.numpy.arange(count * 4.0), sharding)
    out = program(x)
    assert out.is_ready() and out.is_fully_replicated and float(out) == sum(range(count * 4))
    assert program.lower(x).compile() is not None
