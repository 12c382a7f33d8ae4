"""Run one training step of a `planners.TrainPlan` across device groups (per-group programs, MPMD across groups).

Each pipeline stage of each replica is its own program on its own mesh (its devices, axes `cp` x `tp`): the
stage's per-shard function runs under `shard_map` with Megatron parameter layouts over `tp` and, with the
replica's context-parallel degree `cp` > 1, every sequence split into `cp` consecutive slices (keys and values
gathered across them for attention), traced once per stage shape. A stage with `zero` 3 holds its parameters split
further over the group's axes that layout replicates them on (ZeRO-3 inside the group, `meshes.fsdp`): its program
gathers each block's parameters right before the block runs and again in the backward pass, keeping none of them
between the two, and its gradients come out reduce-scattered into the same split layout. Stages pass
activations forward and their gradients backward by transfers between meshes (in a stage's `compress` codec's
packed form, `meshes.compression`, across its outgoing edge); a stage with `recompute`
rematerialises its blocks in the backward pass; JAX's asynchronous dispatch lets
stages and replicas of different groups run at the same time. Each replica runs its own number of micro-batches
of its own size under the plan's schedule (GPipe or 1F1B). Losses are summed per token and divided once by the
global token weight, so the loss and every gradient equal the single-device mean over the whole batch whatever
the batch shares.

State is held by every replica: each stage of each replica keeps its own layers' parameters on its own devices,
in its Megatron layout (split further under `zero` 3), as one *copy* per stage group (`meshes.replicas`;
`copy_shardings`). A step computes each
stage's gradients (reduced inside the group by `shard_map`'s transpose), then sums every leaf over the groups that
hold it (`Transfers.sum_copies`: a ring over like-for-like wire layouts of the replicas holding the same layers),
leaving the same gradient in every holder's layout; `GroupedOptimizer` then updates every copy alike, so replicas
stay identical and each is a backup of the others of its parameters. Where the holders' stages have `zero` >= 1,
the optimizer sums instead (`value_and_grad(..., summed=False)`): a reduce-scatter over the holders, each updating
its part of the moments, and an all-gather of the parameters, the same bytes as the ring (`meshes.zero`). No group
gathers the model, and none serves as a hub. Switching to another compiled strategy (another executor) reads one
copy of each leaf (`view`) and places it into the new plan's copies (`place`, and `GroupedOptimizer.place_state`
for the optimizer state), never a reload.

Every move between groups goes through `meshes.transfer`, so the same schedule runs in one process or as one
process per node: every process walks the whole schedule and calls every program (a no-op where it holds none of
the program's devices), micro-batches are placed from the host batch every process builds alike, and the loss is
an all-reduce of the replicas' loss sums onto every device, readable by every process. `transfers.log` counts the
bytes that crossed between groups and between processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from meshes.compression import EdgeMover
from meshes.dispatch import in_order
from meshes.fsdp import Zero3
from meshes.hetmesh import DeviceGroup, HetMesh
from meshes.optimizer import zero1_shardings
from meshes.replicas import Copies, first_copies, place
from meshes.schedules import pipeline_steps
from meshes.staged import Params, StagedModel, StageSpec
from meshes.transfer import Transfers, empty_array, everywhere, is_local, put_host
from planners.plan import Replica, Stage, TrainPlan

TP_AXIS = "tp"
CP_AXIS = "cp"
Batch = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class _StageRuntime:
    spec: StageSpec
    group: DeviceGroup
    param_shardings: Any
    replicated: NamedSharding
    sequence: NamedSharding  # activations and micro-batch arrays: [rows, seq, ...], seq split over the cp axis
    forward: Any  # (params, hidden, batch) -> (output, vjp_fn)
    backward: Any  # (vjp_fn, cotangent) -> (param_grads, hidden_grad)
    apply: Any  # (params, hidden, batch) -> output, traceable: the stage's shard_map program

    @property
    def local(self) -> bool:
        """Whether this process holds any of the stage's devices (elsewhere its programs are not even called)."""
        return is_local(self.replicated)


def _compile_stage(model: StagedModel, hetmesh: HetMesh, spec: StageSpec, stage: Stage, cp: int, name: str):
    group = hetmesh.submesh(stage.devices, ((CP_AXIS, cp), (TP_AXIS, stage.tp)), name=name)
    zero3 = Zero3(group.mesh, data_axes=(CP_AXIS,)) if stage.zero == 3 else None
    program = model.stage_program(
        spec, stage.tp, TP_AXIS, CP_AXIS if cp > 1 else None, recompute=stage.recompute, zero3=zero3
    )
    sequence = P(None, CP_AXIS) if cp > 1 else P()
    sharded = jax.shard_map(
        program.apply,
        mesh=group.mesh,
        in_specs=(program.param_specs, P() if spec.first else sequence, sequence),
        out_specs=P() if spec.last else sequence,
    )

    def forward(params, hidden, batch):
        return jax.vjp(lambda p, h: sharded(p, h, batch), params, hidden)

    def backward(vjp_fn, cotangent):
        return vjp_fn(cotangent)

    shardings = jax.tree.map(lambda s: NamedSharding(group.mesh, s), program.param_specs)
    return _StageRuntime(
        spec,
        group,
        shardings,
        NamedSharding(group.mesh, P()),
        NamedSharding(group.mesh, sequence),
        in_order(jax.jit(forward), group.mesh.devices.flat),
        in_order(jax.jit(backward), group.mesh.devices.flat),
        sharded,
    )


class PlanExecutor:
    """Loss and gradients of one step of `plan` for a `StagedModel`, equal to the single-device computation."""

    def __init__(self, plan: TrainPlan, hetmesh: HetMesh, model: StagedModel):
        if plan.num_layers != model.num_layers:
            raise ValueError(f"plan.num_layers ({plan.num_layers}) differs from the model's ({model.num_layers})")
        for r, replica in enumerate(plan.replicas):
            if plan.seq_len % replica.cp:
                raise ValueError(f"replicas[{r}].cp ({replica.cp}) must divide the plan's seq_len ({plan.seq_len})")
        self.plan = plan
        self.model = model
        self.transfers = Transfers()
        self._paths: dict[tuple, list] = {}
        self.edges = EdgeMover(self.transfers)
        self.scalars = everywhere([hetmesh.devices[d] for d in plan.devices])
        self.stages = [
            [
                _compile_stage(
                    model,
                    hetmesh,
                    StageSpec(stage.layers, first=s == 0, last=s == len(replica.stages) - 1),
                    stage,
                    replica.cp,
                    f"replica{r}/stage{s}",
                )
                for s, stage in enumerate(replica.stages)
            ]
            for r, replica in enumerate(plan.replicas)
        ]

    def _microbatches(self, batch: Batch) -> list[list[dict[str, np.ndarray]]]:
        """Split the global batch into each replica's micro-batches (replica order, then micro-batch order)."""
        rows = len(next(iter(batch.values())))
        if rows != self.plan.global_batch:
            raise ValueError(f"batch has {rows} rows but the plan's global_batch is {self.plan.global_batch}")
        out, offset = [], 0
        for replica in self.plan.replicas:
            mbs = []
            for _ in range(replica.num_microbatches):
                stop = offset + replica.microbatch_size
                mbs.append({k: np.asarray(v[offset:stop]) for k, v in batch.items()})
                offset = stop
            out.append(mbs)
        return out

    @property
    def runtimes(self) -> list[_StageRuntime]:
        """Every stage of every replica, replica by replica: the device groups that hold copies of the state."""
        return [rt for replica in self.stages for rt in replica]

    def groups_of(self, replicas: Sequence[int]) -> list[int]:
        """The device groups (indices into `runtimes`) of the given replicas."""
        firsts = np.cumsum([0] + [len(stages) for stages in self.stages])
        return [g for r in replicas for g in range(firsts[r], firsts[r + 1])]

    def copy_shardings(self, params: Params) -> list[Any]:
        """Per device group, a tree like `params` (whole-model structure) giving the sharding of each leaf the
        group holds, None elsewhere."""
        return [self._unstage(rt.param_shardings, rt.spec, params) for rt in self.runtimes]

    def moment_shardings(self, params: Params) -> list[Any]:
        """Per device group, where the optimizer's moments of the leaves it holds live: with their parameters, or
        split over the group's devices where its stage has `zero` 1 (`meshes.optimizer.zero1_shardings`); under
        `zero` 3 the parameters are split that way already and the moments follow them."""
        stages = [stage for replica in self.plan.replicas for stage in replica.stages]
        layouts = self.copy_shardings(params)
        return [zero1_shardings(params, g) if s.zero else g for s, g in zip(stages, layouts, strict=True)]

    def split_across(self) -> list[bool]:
        """Per device group, whether the moments of the leaves it shares with other groups may be split across
        them (its stage has `zero` >= 1; see `meshes.zero`)."""
        return [stage.zero >= 1 for replica in self.plan.replicas for stage in replica.stages]

    def _unstage(self, stage_tree: Any, spec: StageSpec, like: Params) -> Any:
        """A stage's tree (stage structure) as a whole-model tree like `like`, None outside the stage."""
        by_path = dict(zip(self._stage_paths(spec, like), jax.tree.leaves(stage_tree), strict=True))
        return jax.tree_util.tree_map_with_path(lambda path, _: by_path.get(path), like)

    def _stage_paths(self, spec: StageSpec, like: Params) -> list:
        """The whole-model paths of a stage's leaves, in its tree's order; worked out once per stage and model
        structure (every step unstages every stage's gradients)."""
        key = (spec, jax.tree.structure(like))
        if key not in self._paths:
            labels = jax.tree_util.tree_map_with_path(lambda path, _: path, like)
            stage = self.model.stage_params(labels, spec)
            self._paths[key] = jax.tree.leaves(stage, is_leaf=lambda x: isinstance(x, tuple))
        return self._paths[key]

    def place(self, tree: Params) -> Copies:
        """`tree` (parameters, or anything shaped like them; host values or arrays anywhere) as this plan's copies,
        one per device group."""
        return place(self.transfers, tree, self.copy_shardings(tree))

    def view(self, copies: Copies, replicas: Sequence[int] | None = None) -> Params:
        """The whole tree from `copies`, each leaf from the first of `replicas` (default: all) holding it."""
        among = None if replicas is None else self.groups_of(replicas)
        return first_copies(copies, among)

    def _run_replica(self, replica: Replica, runtimes: list[_StageRuntime], copies: Copies, microbatches, scale):
        """Run the replica's pipeline schedule on its stages' `copies`; returns its last stage's loss sums and its
        per-stage gradient sums."""
        move = self.edges.move
        stage_params = [self.model.stage_params(copy, rt.spec) for copy, rt in zip(copies, runtimes, strict=True)]
        stage_batches = [
            [{k: put_host(v, rt.sequence) for k, v in mb.items()} for mb in microbatches] for rt in runtimes
        ]
        inputs: dict[tuple[int, int], Any] = {}
        vjps: dict[tuple[int, int], Any] = {}
        cotangents: dict[tuple[int, int], Any] = {}
        grads: list[Any] = [None] * len(runtimes)
        losses = []
        last = len(runtimes) - 1
        for step in pipeline_steps(len(runtimes), replica.num_microbatches, self.plan.schedule):
            s, m, rt = step.stage, step.microbatch, runtimes[step.stage]
            if step.kind == "F":
                hidden = inputs.pop((s, m), None)
                if hidden is None:
                    hidden = put_host(np.zeros((), np.float32), rt.replicated)
                out, vjps[(s, m)] = _forward(rt, stage_params[s], hidden, stage_batches[s][m])
                if s == last:
                    losses.append(out)
                    cotangents[(s, m)] = put_host(scale, rt.replicated)
                else:
                    inputs[(s + 1, m)] = move(out, runtimes[s + 1].sequence, replica.stages[s].compress)
            else:
                param_grads, hidden_grad = _backward(rt, vjps.pop((s, m)), cotangents.pop((s, m)))
                if grads[s] is None or not rt.local:
                    grads[s] = param_grads
                else:
                    grads[s] = jax.tree.map(jnp.add, grads[s], param_grads)
                if s > 0:
                    cotangents[(s - 1, m)] = move(hidden_grad, runtimes[s - 1].sequence, replica.stages[s - 1].compress)
        return losses, grads

    def one_group_loss(self) -> Callable[[Params, Batch], tuple[jax.Array, Params]] | None:
        """For a plan of one replica of one stage on this process's devices: the traceable `(copy, batch) ->
        (mean loss, gradients)` of that group's copy over the whole batch (its micro-batches summed in one
        program), which a training step fuses with the optimizer update; None for any other plan."""
        if len(self.runtimes) != 1 or self.runtimes[0].group.mesh.is_multi_process:
            return None
        rt, replica = self.runtimes[0], self.plan.replicas[0]

        def loss_and_grad(copy: Params, batch: Batch) -> tuple[jax.Array, Params]:
            def mean_loss(copy: Params) -> jax.Array:
                params = self.model.stage_params(copy, rt.spec)
                rows = replica.microbatch_size
                sums = [
                    rt.apply(
                        params, jnp.zeros((), jnp.float32), {k: v[m * rows : (m + 1) * rows] for k, v in batch.items()}
                    )
                    for m in range(replica.num_microbatches)
                ]
                return sum(sums) / jnp.sum(batch["weights"])

            return jax.value_and_grad(mean_loss)(copy)

        return loss_and_grad

    def value_and_grad(self, copies: Copies, batch: Batch, *, summed: bool = True) -> tuple[jax.Array, Copies]:
        """Mean token loss over `batch` and its gradient with respect to the parameters, as copies like `copies`
        (from `place`): every group's copy of a leaf holds the whole gradient of that leaf; without `summed`, only
        the group's own share of it, which `GroupedOptimizer.step(..., summed=False)` sums as the state's layout
        needs (a ring, or a reduce-scatter where moments are split across groups).

        `batch` holds `input_ids`, `targets` and `weights` (0 for padding) of shape [global_batch, seq], and
        optionally `segment_ids`; rows are dealt to replicas in plan order. Every process passes the same batch.
        The loss is replicated on every device (`self.scalars`).
        """
        total_weight = float(np.sum(batch["weights"]))
        if total_weight <= 0:
            raise ValueError("batch['weights'] sums to 0: there is no token to train on")
        scale = np.float32(1.0 / total_weight)
        groups = iter(copies)
        losses, grads = [], []
        for replica, runtimes, microbatches in zip(
            self.plan.replicas, self.stages, self._microbatches(batch), strict=True
        ):
            mine = [next(groups) for _ in runtimes]
            replica_losses, stage_grads = self._run_replica(replica, runtimes, mine, microbatches, scale)
            losses += replica_losses
            grads += [self._unstage(g, rt.spec, copy) for g, rt, copy in zip(stage_grads, runtimes, mine, strict=True)]
        loss = self.transfers.sum_scalars(losses, self.scalars) / total_weight
        return loss, self.transfers.sum_copies(grads) if summed else grads


def _forward(rt: _StageRuntime, params, hidden, batch):
    """The stage's forward where this process holds its devices; elsewhere only the output's global handle (and
    what the backward placeholder needs), so a process never compiles programs it does not run."""
    if rt.local:
        return rt.forward(params, hidden, batch)
    out = jax.eval_shape(rt.forward, params, hidden, batch)[0]
    sharding = rt.replicated if rt.spec.last else rt.sequence
    return empty_array(out.shape, out.dtype, sharding), (params, hidden)


def _backward(rt: _StageRuntime, vjp_fn, cotangent):
    """The stage's backward, or (elsewhere) global handles of its gradients, shaped like its inputs."""
    if rt.local:
        return rt.backward(vjp_fn, cotangent)
    params, hidden = vjp_fn
    grads = jax.tree.map(lambda p, sh: empty_array(p.shape, p.dtype, sh), params, rt.param_shardings)
    return grads, empty_array(hidden.shape, hidden.dtype, rt.sequence if not rt.spec.first else rt.replicated)
