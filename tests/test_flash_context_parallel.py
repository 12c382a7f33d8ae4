"""Context-parallel training through the Pallas flash kernels (interpret mode) inside `shard_map`.

A plan whose replicas split every sequence over a `cp` axis (with tensor parallelism beside it, and packed
documents) runs its stage programs with `attention_backend="flash"`: the forward and both backward kernels run
inside `shard_map` with its varying-axes check on, on a shard of queries against all-gathered keys. Loss and every
gradient must equal the plain-jnp (`xla`) model on one device.

Tolerance (float32): relative 1e-5 on the loss and on the worst gradient leaf (max |difference| over max
|reference|), as tests/test_hspmd.py allows the plans alone. The plan only reorders sums (~1e-7); the kernels differ
from `xla` in summation order and in computing the softmax in base 2 (`exp2` with log2(e) folded into the scale),
about 1e-6 relative per attention call; measured here: 7e-7 on the worst gradient, 6e-8 on the loss. A wrong mask,
offset or missing cross-shard sum is off by orders of magnitude more.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from jaxhet import Llama
from jaxhet.models.attention import ROUTES
from jaxhet.parallel import StagedLlama, llama_params
from meshes import HetMesh, PlanExecutor
from planners import Replica
from tests.test_hspmd import CLUSTER, assert_trees_close, config, make_batch, plan_of, single_device_step, stage

# Float32 throughout; measured worst relative gradient error 7e-7 (loss 6e-8) on this plan.
RTOL = 1e-5
SEQ = 10  # cp=2 gives two 5-token shards; the packed documents start at positions 4 and 7
# One replica of 4 devices: every sequence split over cp=2, heads over tp=2 (2 query heads and 1 kv head per shard,
# so the dK/dV kernel loops over a GQA group), two rows of packed documents.
PLAN = plan_of([Replica((stage([0, 1, 2, 3], (0, 4), tp=2),), 2, 1, cp=2)], 4, seq=SEQ)


@pytest.mark.slow
def test_context_parallel_flash_training_equals_one_device_xla():
    model = Llama(config(), rngs=nnx.Rngs(0))
    params = llama_params(model)
    batch = make_batch(1, PLAN.global_batch, model.config.vocab_size, packed=True, seq=SEQ)
    before = ROUTES[("flash", "offset")]
    executor = PlanExecutor(PLAN, HetMesh.from_cluster(CLUSTER), StagedLlama(config(attention_backend="flash")))
    loss, grads = executor.value_and_grad(executor.place(params), batch)
    assert ROUTES[("flash", "offset")] > before, "the CP stages did not trace the flash kernels"
    assert model.config.attention_backend == "xla"
    expected_loss, expected_grads = single_device_step(model)(params, batch)
    np.testing.assert_allclose(loss, expected_loss, rtol=RTOL)
    assert_trees_close(executor.view(grads), expected_grads)
