"""A stage with `recompute` rematerialises its blocks: far fewer bytes held for the backward pass, same gradients.

The stage is compiled the way `meshes.executor` compiles one: `jax.shard_map` over the stage's TP axis, a jitted
forward that returns the VJP's residuals and a jitted backward that consumes them. The residuals are what a stage
holds for every micro-batch in flight between its forward and its backward (the cost model's
`layer_act_bytes`); XLA's `memory_analysis()` of the compiled forward gives their size as its output bytes.

What CPU compilation cannot show: XLA's CPU compiler expands optimisation barriers before its last CSE and scheduling
passes, so inside one CPU program the recomputation is merged back into the forward pass (one `jit(value_and_grad)`
of this stage keeps its temp bytes: 63.3 MB without recompute, 62.7 MB with), and in a separate backward program it
is scheduled for all blocks up front (its temp bytes grow by what the residuals lost). GPU compilers expand the
barriers after scheduling; `test_recompute_cuts_temp_bytes_of_one_value_and_grad_program` checks that on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxhet import Llama, LlamaConfig
from jaxhet.parallel import StagedLlama, llama_loss_sum, llama_params
from meshes.staged import StageSpec

SEQ = 512
BATCH = 1
# Float32; the same program with and without remat, and TP partial sums reordered against one device: ~1e-7.
RTOL = 1e-6
# The bound. Without recompute each block keeps its attention scores and probabilities (s^2 per head) and
# every matmul input; with it, only its input.
MAX_RESIDUAL_RATIO = 0.6
CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2)
SPEC = StageSpec((0, 4), first=True, last=True)
STAGED = StagedLlama(CONFIG)


@pytest.fixture(scope="module")
def setup():
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ + 1), 0, CONFIG.vocab_size)
    batch = {
        "input_ids": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": jnp.ones((BATCH, SEQ), jnp.float32).at[0, :7].set(0.0),
    }
    params = llama_params(model)
    loss, grads = jax.jit(jax.value_and_grad(llama_loss_sum(model)))(params, batch)
    return STAGED.stage_params(params, SPEC), batch, (loss, STAGED.stage_params(grads, SPEC))


def stage_loss(tp: int, recompute: bool):
    """`loss_sum(params, batch)` of the stage under `shard_map` over the first `tp` devices."""
    program = STAGED.stage_program(SPEC, tp, "tp", recompute=recompute)
    mesh = Mesh(np.array(jax.devices()[:tp]), ("tp",))
    sharded = jax.shard_map(program.apply, mesh=mesh, in_specs=(program.param_specs, P(), P()), out_specs=P())
    return lambda params, batch: sharded(params, None, batch)


def run_stage(tp: int, recompute: bool, params, batch):
    """Loss, gradients, the forward's compiled output bytes (residuals and loss) and the backward's temp bytes."""
    sharded = stage_loss(tp, recompute)
    forward = jax.jit(lambda p, b: jax.vjp(lambda q: sharded(q, b), p))
    backward = jax.jit(lambda vjp_fn, cotangent: vjp_fn(cotangent)[0])
    compiled_forward = forward.lower(params, batch).compile()
    loss, vjp_fn = compiled_forward(params, batch)
    compiled_backward = backward.lower(vjp_fn, jnp.ones_like(loss)).compile()
    grads = compiled_backward(vjp_fn, jnp.ones_like(loss))
    held = compiled_forward.memory_analysis().output_size_in_bytes
    return loss, grads, held, compiled_backward.memory_analysis().temp_size_in_bytes


def relative_error(got, want) -> float:
    return max(
        float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )


@pytest.mark.parametrize("tp", [1, 2])
def test_recompute_cuts_residual_bytes_and_keeps_loss_and_gradients(tp, setup):
    params, batch, (want_loss, want_grads) = setup
    kept_loss, kept_grads, kept_held, kept_temp = run_stage(tp, False, params, batch)
    loss, grads, held, temp = run_stage(tp, True, params, batch)
    print(f"tp={tp}: forward output {kept_held} -> {held} B ({held / kept_held:.3f}x), bwd temp {kept_temp} -> {temp}")
    assert held <= MAX_RESIDUAL_RATIO * kept_held
    assert relative_error(loss, kept_loss) <= RTOL
    assert relative_error(grads, kept_grads) <= RTOL
    assert relative_error(loss, want_loss) <= RTOL
    assert relative_error(grads, want_grads) <= RTOL


@pytest.mark.gpu
def test_recompute_cuts_temp_bytes_of_one_value_and_grad_program(setup):
    """On a GPU compiler the barriers hold inside one program, so its temp bytes fall (a deviceless sm_90 compile
    of this shape on the 2-core CPU machine gave 35.1 MB without recompute and 15.3 MB with)."""
    params, batch, _ = setup

    def temp_bytes(recompute: bool) -> int:
        compiled = jax.jit(jax.value_and_grad(stage_loss(1, recompute))).lower(params, batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(True) <= MAX_RESIDUAL_RATIO * temp_bytes(False)
