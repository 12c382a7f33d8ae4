"""The optimizer step run on every device group's copy of its parameters equals optax on one device (float32,
~1e-6 relative: only the order of the gradient-norm sum differs)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxhet import Llama, LlamaConfig
from jaxhet.parallel import StagedLlama, llama_params
from meshes import GroupedOptimizer, HetMesh, PlanExecutor
from planners import Replica, Stage, TrainPlan
from planners.cluster import ClusterSpec

CLUSTER = ClusterSpec.from_dict(
    {
        "name": "emulated",
        "nodes": [{"name": "h100", "gpu": "H100", "count": 4}, {"name": "l4", "gpu": "L4", "count": 4}],
    }
)
KINDS = tuple(d.kind for d in CLUSTER.devices)
CONFIG = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2)


def _stage(devices, layers):
    return Stage(tuple(devices), KINDS[devices[0]], len(devices), layers, False)


PLAN = TrainPlan(
    (
        Replica((_stage([0, 1], (0, 1)), _stage([4], (1, 4))), 2, 1),
        Replica((_stage([6], (0, 4)),), 1, 1),
    ),
    4,
    3,
    8,
    device_kinds=KINDS,
)


def _adamw():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)
    return optax.adamw(schedule, weight_decay=0.1)


@pytest.mark.parametrize("max_norm", [None, 1e-3])
def test_grouped_step_equals_one_device_optax_on_every_copy(max_norm):
    params = llama_params(Llama(CONFIG, rngs=nnx.Rngs(0)))
    executor = PlanExecutor(PLAN, HetMesh.from_cluster(CLUSTER), StagedLlama(CONFIG))
    shardings = executor.copy_shardings(params)
    reference = _adamw() if max_norm is None else optax.chain(optax.clip_by_global_norm(max_norm), _adamw())
    grouped = GroupedOptimizer(_adamw(), max_norm, shardings)
    assert len(grouped.homes) == 3  # the TP2 stage on devices 0-1, the L4 stage on device 4, replica 1 on device 6

    ref_params, ref_state = params, reference.init(params)
    het_params = grouped.place(params)
    het_state = grouped.init(het_params)
    keys = jax.random.split(jax.random.key(1), 3)
    for key in keys:
        grads = jax.tree.map(lambda p, k=key: jax.random.normal(k, p.shape, p.dtype), params)
        updates, ref_state = reference.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        het_params, het_state, norm = grouped.step(het_params, grouped.place(grads), het_state)
        np.testing.assert_allclose(float(norm), float(optax.tree.norm(grads)), rtol=1e-6)

    def close(a, b):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)

    ref_moments = ref_state if max_norm is None else ref_state[1]
    for group, (copy, state, placement) in enumerate(zip(het_params, het_state, shardings, strict=True)):
        held = jax.tree.map(lambda x, s: x if s is not None else None, ref_params, placement)
        jax.tree.map(close, copy, held)
        jax.tree.map(
            close, state[0].mu, jax.tree.map(lambda x, s: x if s is not None else None, ref_moments[0].mu, placement)
        )

        def on_its_group(leaf, sharding):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), f"{leaf.sharding} is not {sharding}"

        jax.tree.map(on_its_group, copy, placement)
        jax.tree.map(on_its_group, state[0].nu, placement)
        assert int(state[0].count) == len(keys), group


def test_single_device_layout_is_one_group():
    params = llama_params(Llama(CONFIG, rngs=nnx.Rngs(0)))
    device = jax.devices()[3]
    shardings = [jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), params)]
    grouped = GroupedOptimizer(_adamw(), 1.0, shardings)
    copies = grouped.place(params)
    state = grouped.init(copies)
    grads = jax.tree.map(jnp.ones_like, params)
    new_params, _, _ = grouped.step(copies, [grads], state)
    assert {d for leaf in jax.tree.leaves(new_params) for d in leaf.devices()} == {device}
