"""A plan whose state sits on one device group steps as one jitted program (loss, gradients, norm, clipping and
the update, buffers donated), equal to the same plan run stage program by stage program and to one device
(float32: the fused program only reorders sums, ~1e-7 relative; 1e-5 after AdamW's division by sqrt(v))."""

import dataclasses

import jax
import numpy as np

import planners
from jaxhet.data import PackedBatches
from jaxhet.train import TrainConfig
from jaxhet.train.loop import build_model
from jaxhet.train.step import initial_state, plan_execution, single_device_execution, train_step
from meshes import HetMesh
from meshes.replicas import first_copies
from tests.compile_events import compiled_programs

RTOL = 1e-5
CONFIG = TrainConfig.load(
    None,
    {
        "num_layers": "2",
        "hidden_size": "64",
        "intermediate_size": "160",
        "data.seq_len": "32",
        "data.batch_size": "4",
        "data.max_documents": "40",
        "optim.warmup_steps": "1",
        "checkpoint_dir": "unused",
    },
)


def losses_and_params(execution, model, batches):
    optimizer, state = initial_state(CONFIG, model, execution)
    losses = []
    for batch in batches:
        state, loss, _ = train_step(execution, optimizer, state, batch)
        losses.append(float(np.asarray(loss)))
    return losses, jax.device_get(first_copies(state["params"]))


def test_a_one_group_plan_fuses_its_step_and_equals_the_staged_run_and_one_device():
    data = PackedBatches(CONFIG.data)
    batches = [next(data) for _ in range(3)]
    model = build_model(CONFIG, data.vocab_size, jax.random.key(0))
    cluster = planners.ClusterSpec.from_dict({"name": "four", "nodes": [{"gpu": "H100", "count": 4}]})
    stage = planners.Stage((0, 1, 2, 3), "H100", 2, (0, 2), zero=1)
    plan = planners.TrainPlan((planners.Replica((stage,), 2, 2, cp=2),), 2, 4, 32)
    fused = plan_execution(model, plan, HetMesh.from_cluster(cluster))
    assert fused.one_group_loss is not None
    staged = dataclasses.replace(fused, one_group_loss=None)
    fused_losses, fused_params = losses_and_params(fused, model, batches)
    staged_losses, staged_params = losses_and_params(staged, model, batches)
    single_losses, single_params = losses_and_params(single_device_execution(model), model, batches)
    np.testing.assert_allclose(fused_losses, staged_losses, rtol=RTOL)
    np.testing.assert_allclose(fused_losses, single_losses, rtol=RTOL)
    # Parameters after 3 AdamW steps: where a gradient element is near zero, its ~1e-7 reordering error is large
    # relative to it, and Adam's division by sqrt(v) turns it into up to ~1e-3 of that element's update (the
    # learning rate, 3e-3 here): 1.3e-6 was measured on a 2-core VM. A wrong gradient moves an element by a whole
    # update; the tolerance is a hundredth of one.
    atol = 1e-2 * CONFIG.optim.learning_rate
    for got, staged_leaf, want in zip(*map(jax.tree.leaves, (fused_params, staged_params, single_params)), strict=True):
        np.testing.assert_allclose(got, staged_leaf, rtol=RTOL, atol=atol)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol)


def test_a_plan_of_several_groups_has_no_fused_step():
    model = build_model(CONFIG, PackedBatches(CONFIG.data).vocab_size, jax.random.key(0))
    cluster = planners.ClusterSpec.from_dict({"name": "two", "nodes": [{"gpu": "H100", "count": 2}]})
    stages = (planners.Stage((0,), "H100", 1, (0, 1)), planners.Stage((1,), "H100", 1, (1, 2)))
    plan = planners.TrainPlan((planners.Replica(stages, 2, 2),), 2, 4, 32)
    assert plan_execution(model, plan, HetMesh.from_cluster(cluster)).one_group_loss is None


def test_the_one_device_step_compiles_at_the_first_step_only():
    """The optimizer state starts committed to its device as the step's outputs are, so the second step reuses the
    first step's program (uncommitted initial state compiled the step a second time)."""
    data = PackedBatches(CONFIG.data)
    model = build_model(CONFIG, data.vocab_size, jax.random.key(0))
    execution = single_device_execution(model)
    optimizer, state = initial_state(CONFIG, model, execution)
    compiled = []
    for batch in [next(data) for _ in range(3)]:
        with compiled_programs() as names:
            state, loss, _ = train_step(execution, optimizer, state, batch)
            jax.block_until_ready(loss)
        compiled.append(names)
    assert compiled[0] and compiled[1:] == [[], []], compiled
