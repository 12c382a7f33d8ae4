"""Asymmetric data parallelism as one SPMD program: every device runs its own number of micro-batches.

Inside `shard_map`, control flow may depend on `lax.axis_index`, so each device looks up its own trip count and
accumulates gradients over that many micro-batches before a single `psum` over the data axis. One compiled program
serves a fast group taking 5 micro-batches beside a slow one taking 1: no per-group specialisation is needed when
the groups differ only in their batch share. Loss sums (not means) are accumulated and divided once by the global
token weight, so the result equals the single-device mean over the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from meshes.dispatch import in_order
from meshes.hetmesh import HetMesh
from planners.plan import TrainPlan

DATA_AXIS = "data"
Params = Any
Batch = Mapping[str, Any]


class AsymmetricDataParallel:
    """Loss and gradients of `loss_sum(params, microbatch)` with `microbatches[d]` micro-batches on device d."""

    def __init__(
        self,
        loss_sum: Callable[[Params, Batch], jax.Array],
        devices: Sequence[jax.Device],
        microbatches: Sequence[int],
        microbatch_size: int,
    ):
        if len(devices) != len(microbatches):
            raise ValueError(f"got {len(devices)} devices but {len(microbatches)} micro-batch counts")
        if any(m < 0 for m in microbatches) or sum(microbatches) == 0:
            raise ValueError(f"microbatches must be non-negative with a positive sum, got {list(microbatches)}")
        self.microbatches = tuple(int(m) for m in microbatches)
        self.microbatch_size = microbatch_size
        self.mesh = Mesh(np.array(devices, dtype=object), (DATA_AXIS,))
        counts = jnp.asarray(self.microbatches, jnp.int32)
        grad_fn = jax.value_and_grad(loss_sum)

        def per_device(params, local_batch):
            trips = counts[jax.lax.axis_index(DATA_AXIS)]
            local_batch = jax.tree.map(lambda x: x[0], local_batch)  # drop the device axis of this shard
            # Differentiate a device-varying copy: the gradient of a replicated input would carry an implicit psum
            # into the loop body, a collective that devices with different trip counts would never all reach.
            params = jax.lax.pcast(params, (DATA_AXIS,), to="varying")

            def body(m, carry):
                loss, grads = carry
                mb_loss, mb_grads = grad_fn(params, jax.tree.map(lambda x: x[m], local_batch))
                return loss + mb_loss, jax.tree.map(jnp.add, grads, mb_grads)

            loss_zero = jax.lax.pcast(jnp.zeros((), jnp.float32), (DATA_AXIS,), to="varying")
            zeros = (loss_zero, jax.tree.map(jnp.zeros_like, params))
            loss, grads = jax.lax.fori_loop(0, trips, body, zeros)
            return jax.lax.psum((loss, grads), DATA_AXIS)

        self._step = in_order(
            jax.jit(jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()))),
            self.mesh.devices.flat,
        )

    @classmethod
    def from_plan(cls, plan: TrainPlan, hetmesh: HetMesh, loss_sum: Callable[[Params, Batch], jax.Array]):
        """For plans whose replicas are single devices (one stage, tp 1) with one micro-batch size."""
        for r, replica in enumerate(plan.replicas):
            if len(replica.stages) != 1 or replica.stages[0].tp != 1:
                raise ValueError(f"replicas[{r}] is not a single device (one stage with tp 1)")
        sizes = {r.microbatch_size for r in plan.replicas}
        if len(sizes) != 1:
            raise ValueError(f"replicas' microbatch_size values differ ({sorted(sizes)}); they must be equal")
        devices = [hetmesh.devices[r.stages[0].devices[0]] for r in plan.replicas]
        return cls(loss_sum, devices, [r.num_microbatches for r in plan.replicas], sizes.pop())

    def _layout(self, batch: Batch) -> dict[str, jax.Array]:
        """Deal rows to devices in order and pad every device to the largest micro-batch count."""
        rows = len(next(iter(batch.values())))
        expected = sum(self.microbatches) * self.microbatch_size
        if rows != expected:
            raise ValueError(f"batch has {rows} rows, the micro-batch counts need {expected}")
        most = max(self.microbatches)
        sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        out = {}
        for key, value in batch.items():
            value = np.asarray(value)
            padded = np.zeros((len(self.microbatches), most, self.microbatch_size, *value.shape[1:]), value.dtype)
            offset = 0
            for d, count in enumerate(self.microbatches):
                stop = offset + count * self.microbatch_size
                padded[d, :count] = value[offset:stop].reshape(count, self.microbatch_size, *value.shape[1:])
                offset = stop
            out[key] = jax.device_put(padded, sharding)
        return out

    def value_and_grad(self, params: Params, batch: Batch) -> tuple[jax.Array, Params]:
        """Mean token loss over `batch` (weighted by `batch['weights']`) and its gradient."""
        total_weight = float(np.sum(batch["weights"]))
        if total_weight <= 0:
            raise ValueError("batch['weights'] sums to 0: there is no token to train on")
        params = jax.device_put(params, NamedSharding(self.mesh, P()))
        loss, grads = self._step(params, self._layout(batch))
        return loss / total_weight, jax.tree.map(lambda g: g / total_weight, grads)
