"""One training step: loss and gradients where an execution computes them, then the optimizer where each parameter
lives.

Between steps every device group holds its own copy of its parameters and optimizer moments (`meshes.replicas`):
with a plan, every stage of every replica, in its tensor-parallel layout (`meshes.PlanExecutor.copy_shardings`);
on one device, that device. A step computes gradients (summed over each leaf's holders by the executor) and runs
the optimizer on every group's devices (`meshes.GroupedOptimizer`, which also clips by the global gradient norm),
so the model and its optimizer state never gather on one device, and one device and any plan give the same loss
at every step. Checkpoints hold one copy of each leaf (`checkpoint_view`), whatever the plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxhet.models import Llama, load_sharded_params
from jaxhet.parallel import StagedLlama, llama_loss_sum, llama_params
from jaxhet.train.config import TrainConfig, changed_fields
from meshes import GroupedOptimizer, HetMesh, PlanExecutor
from meshes.replicas import first_copies
from meshes.transfer import Transfers

Params = Any
State = dict[str, Any]
StepFn = Callable[[Params, dict], tuple[jax.Array, Params]]


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a step computes: `value_and_grad(copies, batch)` giving the mean loss and each group's own share of
    the gradient (summed over groups by the optimizer), `shardings`
    (per device group, a tree like the parameters with the sharding of each leaf it holds), the plan (None: one
    device), the devices the step computes on, and the transfer layer every move between device groups goes
    through, and where the optimizer's moments live (None: with their parameters; a plan's stages with `zero` 1
    split them further; `split_across`: per group, whether moments of leaves shared between groups are split across
    them). Where the state sits on one device group, `one_group_loss` is the traceable (unjitted) loss and
    gradient of that group's copy, which `train_step` fuses with the optimizer into one program."""

    value_and_grad: StepFn
    shardings: list[Params]
    plan: Any
    devices: tuple[jax.Device, ...]
    transfers: Transfers
    one_group_loss: Callable[[Params, dict], tuple[jax.Array, Params]] | None = None
    moment_shardings: list[Params] | None = None
    split_across: list[bool] | None = None


def single_device_execution(model: Llama) -> Execution:
    """Plain `jax.jit` of the whole model's loss and gradients on the first device: the reference of every plan."""
    loss_sum = llama_loss_sum(model)
    loss_and_grad = jax.value_and_grad(lambda p, b: loss_sum(p, b) / jnp.sum(b["weights"]))
    value_and_grad = jax.jit(loss_and_grad)

    def one_copy(copies: list[Params], batch: dict) -> tuple[jax.Array, list[Params]]:
        loss, grads = value_and_grad(copies[0], batch)
        return loss, [grads]

    device = jax.devices()[0]
    placement = jax.sharding.SingleDeviceSharding(device)
    shardings = [jax.tree.map(lambda _: placement, llama_params(model))]
    return Execution(one_copy, shardings, None, (device,), Transfers(), one_group_loss=loss_and_grad)


def plan_execution(model: Llama, plan: Any, hetmesh: HetMesh) -> Execution:
    """The HSPMD executor of `plan` (a `planners.TrainPlan`) on `hetmesh`'s devices."""
    executor = PlanExecutor(plan, hetmesh, StagedLlama(model.config))
    devices = tuple(hetmesh.devices[d] for d in plan.devices)
    params = llama_params(model)
    return Execution(
        partial(executor.value_and_grad, summed=False),
        executor.copy_shardings(params),
        plan,
        devices,
        executor.transfers,
        one_group_loss=executor.one_group_loss(),
        moment_shardings=executor.moment_shardings(params),
        split_across=executor.split_across(),
    )


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0, then cosine decay to `min_lr_ratio` of the peak at the last step."""
    o = config.optim
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.learning_rate,
        warmup_steps=min(o.warmup_steps, config.steps),
        decay_steps=max(config.steps, o.warmup_steps + 1),
        end_value=o.learning_rate * o.min_lr_ratio,
    )


# The fields `learning_rate_schedule` reads.
SCHEDULE_FIELDS = ("steps", "optim.learning_rate", "optim.warmup_steps", "optim.min_lr_ratio")


def schedule_change(saved: TrainConfig, resumed: TrainConfig, step: int) -> str | None:
    """One line on how resuming `saved` as `resumed` at `step` changes the learning-rate schedule (None when it does
    not): the schedule is rebuilt from the resumed config, so a larger `steps` stretches the cosine decay to end at
    the new last step and the rate jumps at `step` to the new schedule's value. A run resumed at step 0 (nothing
    restored) simply starts on the new schedule."""
    changed = changed_fields(saved, resumed, SCHEDULE_FIELDS)
    if not changed or step == 0:
        return None
    before, after = (float(learning_rate_schedule(c)(step)) for c in (saved, resumed))
    return (
        f"{', '.join(changed)}: the learning-rate schedule is rebuilt (warm-up, then cosine decay to step "
        f"{resumed.steps}); at the resumed step {step} the rate is {after:.3g}, the saved schedule had {before:.3g}"
    )


def build_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW on the schedule. Gradient clipping is not part of it: it needs the norm over every parameter, which
    `GroupedOptimizer` sums across device groups before running this per-leaf update in each group."""
    o = config.optim
    return optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)


def grouped_optimizer(config: TrainConfig, execution: Execution) -> GroupedOptimizer:
    """The optimizer for parameters laid out as `execution.shardings`."""
    return GroupedOptimizer(
        build_optimizer(config),
        config.optim.grad_clip,
        execution.shardings,
        execution.transfers,
        moment_shardings=execution.moment_shardings,
        split_across=execution.split_across,
    )


def initial_state(config: TrainConfig, model: Llama, execution: Execution) -> tuple[GroupedOptimizer, State]:
    """The optimizer for parameters laid out as `execution.shardings`, and the state a run carries (`params`
    and `opt_state`, a copy per device group). A fresh model's initial parameters (alike on every process) go
    through the host, so each process places its own shards; a checkpoint directory's (`config.model`) are read
    by every group straight into its layout, each device its own blocks (`load_sharded_params`), so a model larger
    than one device loads. The optimizer state is made on each group's devices."""
    optimizer = grouped_optimizer(config, execution)
    return optimizer, fresh_state(config, model, execution, optimizer)


def fresh_state(config: TrainConfig, model: Llama, execution: Execution, optimizer: GroupedOptimizer) -> State:
    """`initial_state`'s state for an `optimizer` already made for `execution` (`grouped_optimizer`)."""
    if config.model == "tiny":
        params = optimizer.place(jax.device_get(llama_params(model)))
    else:
        params = [load_sharded_params(config.model, model.config, layout) for layout in execution.shardings]
    return {"params": params, "opt_state": optimizer.init(params)}


def checkpoint_view(optimizer: GroupedOptimizer, state: State) -> State:
    """What a checkpoint holds of `state`: one copy of each parameter and optimizer leaf (the first group's
    holding it), in the whole model's structure, without a copy."""
    return {"params": first_copies(state["params"]), "opt_state": optimizer.view_state(state["opt_state"])}


def from_checkpoint(optimizer: GroupedOptimizer, restored: State) -> State:
    """`restored` (a `checkpoint_view`'s structure, arrays anywhere) as the state a run carries: a copy per
    group."""
    return {"params": optimizer.place(restored["params"]), "opt_state": optimizer.place_state(restored["opt_state"])}


def train_step(
    execution: Execution, optimizer: GroupedOptimizer, state: State, batch: dict
) -> tuple[State, jax.Array, jax.Array]:
    """One optimisation step on `batch`: (new state, the batch's mean loss, the gradient norm before clipping).
    The old state's buffers are donated to the new one; nothing is read back to the host."""
    if execution.one_group_loss is not None:
        step = optimizer.fused(execution.one_group_loss)
        params, opt_state, loss, grad_norm = step(state["params"][0], state["opt_state"][0], batch)
        return {"params": [params], "opt_state": [opt_state]}, loss, grad_norm
    loss, grads = execution.value_and_grad(state["params"], batch)
    params, opt_state, grad_norm = optimizer.step(state["params"], grads, state["opt_state"], summed=False)
    return {"params": params, "opt_state": opt_state}, loss, grad_norm
