"""ZeRO-3 (FSDP) inside a stage's device group (`Stage.zero == 3`): parameters, gradients and moments stored split over
the group's devices, each block's parameters gathered before it runs and again in the backward pass; loss,
gradients and AdamW steps equal one device (float32, relative error <= 1e-5: the plan only reorders sums)."""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxhet import Llama
from jaxhet.parallel import StagedLlama, llama_params
from meshes import GroupedOptimizer, HetMesh, PlanExecutor
from meshes.transfer import put_host
from planners import Replica
from tests.test_hspmd import (
    CLUSTER,
    OPTIMIZER,
    RTOL,
    assert_copies_identical,
    assert_trees_close,
    config,
    make_batch,
    plan_of,
    single_device_step,
    stage,
    train,
)

SEQ = 10
CONFIG = config()  # 4 blocks, tied embedding: one stage's collectives and bytes
PLAN_CONFIG = config(num_layers=2, tie_word_embeddings=False)
# A CP2 x TP2 group with zero 3 beside a CP2 pipeline whose first stage has zero 3 and recompute, its last zero 0.
PLAN = plan_of(
    [
        Replica((stage([0, 1, 2, 3], (0, 2), tp=2, zero=3),), 2, 1, cp=2),
        Replica((stage([4, 5], (0, 1), tp=1, zero=3, recompute=True), stage([6, 7], (1, 2), tp=1)), 1, 2, cp=2),
    ],
    2,
    seq=SEQ,
)
ZERO3_GROUPS = (0, 1)
# A block's parameters: 7 projection kernels and 2 norm weights.
BLOCK_LEAVES = 9


@pytest.fixture(scope="module")
def hetmesh() -> HetMesh:
    return HetMesh.from_cluster(CLUSTER)


@pytest.fixture(scope="module")
def executor(hetmesh) -> PlanExecutor:
    return PlanExecutor(PLAN, hetmesh, StagedLlama(PLAN_CONFIG))


def per_device_bytes(tree, device) -> int:
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == device)


def test_zero3_groups_store_parameters_split_and_give_the_single_device_gradients(executor):
    model = Llama(PLAN_CONFIG, rngs=nnx.Rngs(0))
    params = llama_params(model)
    layouts = executor.copy_shardings(params)
    block = layouts[0]["layers"][0]
    assert block["self_attn"]["q_proj"]["kernel"].spec == P("cp", "tp")  # Megatron P(None, "tp"), split over cp
    assert block["mlp"]["down_proj"]["kernel"].spec == P("tp", "cp")  # Megatron P("tp", None)
    assert block["input_layernorm"]["weight"].spec == P(("cp", "tp"))  # replicated by Megatron: over both axes
    assert layouts[0]["embed_tokens"]["embedding"].spec == P(None, ("cp", "tp"))  # 50 rows: 4 do not divide
    assert layouts[1]["layers"][0]["input_layernorm"]["weight"].spec == P("cp")
    assert layouts[2]["lm_head"]["kernel"].spec == P()  # zero 0: as laid out

    batch = make_batch(1, PLAN.global_batch, PLAN_CONFIG.vocab_size, packed=True, seq=SEQ)
    loss, grads = executor.value_and_grad(executor.place(params), batch)
    expected_loss, expected_grads = single_device_step(model)(params, batch)
    np.testing.assert_allclose(loss, expected_loss, rtol=RTOL)
    assert_copies_identical(grads)
    for replica in range(len(PLAN.replicas)):
        assert_trees_close(executor.view(grads, [replica]), expected_grads)
    for group in ZERO3_GROUPS:
        same = jax.tree.map(lambda g, s: g.sharding.is_equivalent_to(s, g.ndim), grads[group], layouts[group])
        assert all(jax.tree.leaves(same))


def test_zero3_adamw_steps_equal_single_device_with_a_share_of_parameters_and_moments_per_device(executor):
    model = Llama(PLAN_CONFIG, rngs=nnx.Rngs(4))
    params = llama_params(model)
    layouts, moments = executor.copy_shardings(params), executor.moment_shardings(params)
    grouped = GroupedOptimizer(OPTIMIZER, None, layouts, moment_shardings=moments)
    copies = grouped.place(params)
    states = grouped.init(copies)
    for group in ZERO3_GROUPS:
        assert moments[group] == layouts[group]  # moments follow the split parameters, no further split
        rt = executor.runtimes[group]
        state = [leaf for leaf in jax.tree.leaves(states[group]) if leaf.ndim > 0]
        for tree in (copies[group], state):
            total = sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
            for device in rt.group.mesh.devices.flat:  # every leaf of this model divides over the whole group
                assert per_device_bytes(tree, device) == total // rt.group.mesh.size
    batches = [make_batch(200 + step, PLAN.global_batch, PLAN_CONFIG.vocab_size, False, SEQ) for step in range(3)]
    np.testing.assert_allclose(train(model, [executor] * 3, batches), train(model, [None] * 3, batches), rtol=RTOL)


def cp2_stage(hetmesh, zero: int, recompute: bool):
    """A 4-block CP2 stage (first and last, tied embedding) on 2 devices, its parameters and one micro-batch."""
    plan = plan_of([Replica((stage([6, 7], (0, 4), tp=1, zero=zero, recompute=recompute),), 2, 1, cp=2)], 4, seq=SEQ)
    executor = PlanExecutor(plan, hetmesh, StagedLlama(CONFIG))
    rt = executor.runtimes[0]
    copy = executor.place(llama_params(Llama(CONFIG, rngs=nnx.Rngs(0))))[0]
    batch = make_batch(2, 2, CONFIG.vocab_size, packed=True, seq=SEQ)
    placed = {key: put_host(value, rt.sequence) for key, value in batch.items()}
    return rt, executor.model.stage_params(copy, rt.spec), put_host(np.zeros((), np.float32), rt.replicated), placed


COLLECTIVES = {"all_gather": "gather", "all_gather_invariant": "gather", "reduce_scatter": "reduce_scatter"}


def is_parameter_like(aval) -> bool:
    return aval.ndim <= 2 and jnp.issubdtype(aval.dtype, jnp.floating)


def parameter_collectives(jaxpr, counts: Counter, regions: list) -> Counter:
    """Count the all-gathers and reduce-scatters of parameters (float operands of rank <= 2; the model's activations
    are of rank >= 3 or integer) in `jaxpr` and every jaxpr inside it; `regions` gets, per `jax.checkpoint` region
    met, the all-gathers inside it."""
    for eqn in jaxpr.eqns:
        name = str(eqn.primitive)
        if name in COLLECTIVES and is_parameter_like(eqn.invars[0].aval):
            counts[COLLECTIVES[name]] += 1
        inner = Counter()
        for sub in jax.tree.leaves(list(eqn.params.values()), is_leaf=lambda x: isinstance(x, jax.extend.core.Jaxpr)):
            sub = getattr(sub, "jaxpr", sub)
            if isinstance(sub, jax.extend.core.Jaxpr):
                parameter_collectives(sub, inner, regions)
        if name == "remat2":
            regions.append(inner["gather"])
        counts.update(inner)
    return counts


@pytest.mark.parametrize("recompute", [False, True])
def test_each_block_gathers_its_parameters_before_it_runs_and_again_in_the_backward_pass(hetmesh, recompute):
    rt, params, hidden, batch = cp2_stage(hetmesh, 3, recompute)
    regions = []
    parameter_collectives(jax.make_jaxpr(rt.apply)(params, hidden, batch).jaxpr, Counter(), regions)
    # The embedding where it is looked up, each block's 9 leaves inside its own region, then norm and tied head.
    assert regions == [1] + [BLOCK_LEAVES] * 4 + [2]

    def forward(p, h, b):
        return jax.vjp(lambda q, g: rt.apply(q, g, b), p, h)

    loss, vjp_fn = jax.jit(forward)(params, hidden, batch)
    forward_counts = parameter_collectives(jax.make_jaxpr(forward)(params, hidden, batch).jaxpr, Counter(), [])
    backward_counts = parameter_collectives(jax.make_jaxpr(lambda v, c: v(c))(vjp_fn, loss).jaxpr, Counter(), [])
    gathers = 4 * BLOCK_LEAVES + 3  # + the embedding twice and the final norm
    assert forward_counts == Counter(gather=gathers, reduce_scatter=0)
    # Again for every use whose gradient needs the parameter (not the embedding lookup); each gather's transpose
    # reduce-scatters its gradient.
    assert backward_counts == Counter(gather=gathers - 1, reduce_scatter=gathers)

    # Beyond its parameters, the forward keeps for the backward what a zero-0 stage keeps (to within a few small
    # constants, 48 bytes with recompute); kept gathered parameters would add the half each device does not store.
    rt0, params0, hidden0, batch0 = cp2_stage(hetmesh, 0, recompute)
    _, vjp_fn0 = jax.jit(lambda p, h, b: jax.vjp(lambda q, g: rt0.apply(q, g, b), p, h))(params0, hidden0, batch0)
    for device, device0 in zip(rt.group.mesh.devices.flat, rt0.group.mesh.devices.flat, strict=True):
        extra = per_device_bytes(jax.tree.leaves(vjp_fn), device) - per_device_bytes(params, device)
        extra0 = per_device_bytes(jax.tree.leaves(vjp_fn0), device0) - per_device_bytes(params0, device0)
        assert abs(extra - extra0) <= 64
        assert per_device_bytes(params0, device0) - per_device_bytes(params, device) > 1000 * 64


def test_zero3_cp2_stage_program_takes_half_the_parameter_bytes(hetmesh):
    argument_bytes = {}
    for zero in (0, 3):
        rt, params, hidden, batch = cp2_stage(hetmesh, zero, recompute=False)
        compiled = jax.jit(rt.apply).lower(params, hidden, batch).compile()
        device = rt.group.mesh.devices.flat[0]
        others = per_device_bytes(hidden, device) + per_device_bytes(batch, device)
        argument_bytes[zero] = compiled.memory_analysis().argument_size_in_bytes - others
    assert argument_bytes[3] / argument_bytes[0] == pytest.approx(0.5, abs=1e-3)
