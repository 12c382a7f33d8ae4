"""The optimizer step run where a plan's parameters live equals optax on one device (float32, ~1e-6 relative:
only the order of the gradient-norm sum differs)."""

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
def test_grouped_step_equals_one_device_optax_and_stays_with_the_owners(max_norm):
    params = llama_params(Llama(CONFIG, rngs=nnx.Rngs(0)))
    owners = PlanExecutor(PLAN, HetMesh.from_cluster(CLUSTER), StagedLlama(CONFIG)).owner_shardings(params)
    reference = _adamw() if max_norm is None else optax.chain(optax.clip_by_global_norm(max_norm), _adamw())
    grouped = GroupedOptimizer(_adamw(), max_norm, owners)
    assert len(grouped.groups) == 2  # the TP2 stage on devices 0-1 and the L4 stage on device 4

    ref_params, ref_state = params, reference.init(params)
    het_params, het_state = jax.device_put(params, owners), grouped.init(params)
    keys = jax.random.split(jax.random.key(1), 3)
    for key in keys:
        grads = jax.tree.map(lambda p, k=key: jax.random.normal(k, p.shape, p.dtype), params)
        updates, ref_state = reference.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        het_params, het_state, norm = grouped.step(het_params, jax.device_put(grads, owners), het_state)
        np.testing.assert_allclose(float(norm), float(optax.tree.norm(grads)), rtol=1e-6)

    def close(a, b):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)

    jax.tree.map(close, het_params, ref_params)
    ref_moments = ref_state if max_norm is None else ref_state[1]
    jax.tree.map(close, het_state, ref_moments)

    def with_owner(leaf, owner):
        assert leaf.sharding.is_equivalent_to(owner, leaf.ndim), f"{leaf.sharding} is not the owner's {owner}"

    jax.tree.map(with_owner, het_params, owners)
    jax.tree.map(with_owner, het_state[0].mu, owners)
    jax.tree.map(with_owner, het_state[0].nu, owners)
    assert int(het_state[0].count) == len(keys)


def test_single_device_layout_is_one_group():
    params = llama_params(Llama(CONFIG, rngs=nnx.Rngs(0)))
    device = jax.devices()[3]
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), params)
    grouped = GroupedOptimizer(_adamw(), 1.0, shardings)
    state = grouped.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    new_params, _, _ = grouped.step(jax.device_put(params, device), grads, state)
    assert {d for leaf in jax.tree.leaves(new_params) for d in leaf.devices()} == {device}
