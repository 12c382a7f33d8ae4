"""Training throughput: jaxhet's step vs a plain `jax.jit` step, and jaxhet on a plan with recompute and ZeRO on/off.

On one device, both train the same Llama-family model (same initial parameters, same batch, bfloat16 compute over
float32 master weights, AdamW with global-norm clipping) and differ only in how the step runs:
- plain: one `jax.jit` of loss, gradients, clipping and the AdamW update, parameters and optimizer state donated,
  attention by `jax.nn.dot_product_attention(implementation="cudnn")` (its XLA implementation off GPU) — what a
  user would write instead;
- jaxhet: the step `jaxhet train --plan single` runs (`jaxhet.train.step.train_step`: jitted loss and gradients,
  then `meshes.GroupedOptimizer`), once per attention backend given (`--backends`, default cudnn and flash).
Tokens/s count every token of every row; MFU counts 6 FLOPs per parameter and token plus causal attention against
the device's catalog peak, its dense 16-bit tensor figure (`jaxhet.train.flops`; n/a off GPU). Batches are random
tokens already on the device, without segment ids, so both sides run plain causal attention. Prints a table and
writes JSON (device, versions, shapes, date, every row) into bench/results/.

Then `bench/train_plans.py`'s rows: jaxhet's step on a 4-device plan (TP 2 x CP 2) with recompute and with ZeRO-1,
each against the same plan with both off (step time, optimizer-state bytes per device, the stage's compiled
memory), on emulated CPU devices (`--xla_force_host_platform_device_count`, set here before JAX starts its
backends) at `--plan-shape` (small enough for a CPU; the smoke shapes with `--smoke`).

    python bench/train.py            # GPU: d=2048, 16 layers, 16 q / 8 kv heads, FFN 5632, vocab 32000, B=8, S=2048
    python bench/train.py --smoke    # any machine: tiny shapes in float32, a step or two each
    python bench/train.py --hidden 256 --layers 4 --heads 8 --kv-heads 4 --ffn 688 --vocab 512 --batch 4 \\
        --seq 256 --dtype float32 --steps 5   # CPU, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from record import provenance, save
from train_plans import plan_rows, print_table

from jaxhet import Llama, LlamaConfig
from jaxhet.parallel import llama_loss_sum, llama_params
from jaxhet.train import OptimConfig, TrainConfig
from jaxhet.train.flops import model_flops_utilisation, peak_flops, training_flops_per_token
from jaxhet.train.step import build_optimizer, initial_state, single_device_execution, train_step

Step = Callable[[], tuple[jax.Array, Any]]  # one step on the prepared state and batch: (loss, the new state)


def plain_jit_step(model: Llama, train_config: TrainConfig, batch: dict) -> Step:
    """A single `jax.jit` training step over donated parameters and optimizer state."""
    optimizer = optax.chain(optax.clip_by_global_norm(train_config.optim.grad_clip), build_optimizer(train_config))
    loss_sum = llama_loss_sum(model)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_sum(p, batch) / jnp.sum(batch["weights"]))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    params = llama_params(model)
    carried = [params, optimizer.init(params)]

    def run() -> tuple[jax.Array, Any]:
        carried[0], carried[1], loss = step(carried[0], carried[1], batch)
        return loss, carried

    return run


def jaxhet_step(model: Llama, train_config: TrainConfig, batch: dict) -> Step:
    """The step of `jaxhet train --plan single`."""
    execution = single_device_execution(model)
    optimizer, state = initial_state(train_config, model, execution)
    carried = [state]

    def run() -> tuple[jax.Array, Any]:
        carried[0], loss, _ = train_step(execution, optimizer, carried[0], batch)
        return loss, carried

    return run


def measure(build: Callable[[], Step], *, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per step over `steps` timed steps after `warmup` untimed ones, the last loss). Timing ends when
    the last step's state is ready, not just its loss (the optimizer update comes after the loss)."""
    run = build()
    for _ in range(warmup):
        jax.block_until_ready(run())
    start = time.perf_counter()
    for _ in range(steps):
        loss, state = run()
    jax.block_until_ready((loss, state))
    seconds = (time.perf_counter() - start) / steps
    del run, state
    gc.collect()  # free this variant's parameters and optimizer state (device memory) before the next one
    return seconds, float(loss)


def _print_table(rows: list[dict]) -> None:
    header = ("step", "attention", "ms/step", "tokens/s", "TFLOP/s", "MFU", "vs plain", "loss")
    print("{:14} {:20} {:>9} {:>10} {:>8} {:>6} {:>8} {:>7}".format(*header))
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(
            f"{r['step']:14} {r['attention']:20} {r['step_ms']:9.2f} {r['tokens_per_s']:10,.0f} "
            f"{r['model_tflops']:8.3g} {mfu:>6} {r['vs_plain']:8.3f} {r['last_loss']:7.3f}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in float32, for any machine")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--backends", nargs="+", default=["cudnn", "flash"], help="attention backends of jaxhet")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation) per variant")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument(
        "--plan-shape",
        type=int,
        nargs=4,
        default=[256, 4, 4, 256],
        metavar=("HIDDEN", "LAYERS", "BATCH", "SEQ"),
        help="the plan rows' model width, blocks, batch and sequence (8 q / 4 kv heads, FFN 2.6875x, vocab 512)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.heads, args.kv_heads, args.ffn, args.vocab = 64, 2, 4, 2, 160, 256
        args.batch, args.seq, args.dtype, args.warmup, args.steps = 2, 32, "float32", 1, 2
        args.plan_shape = [args.hidden, args.layers, args.batch, args.seq]
    return args


def model_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq),
        dtype=args.dtype,
        param_dtype="float32",
    )


def plan_config(args: argparse.Namespace) -> LlamaConfig:
    """The plan rows' model: the smoke model with `--smoke`, else `--plan-shape`'s, in float32."""
    hidden, layers = args.plan_shape[:2]
    if args.smoke:
        heads, kv_heads, ffn, vocab = args.heads, args.kv_heads, args.ffn, args.vocab
    else:
        heads, kv_heads, ffn, vocab = 8, 4, hidden * 43 // 16, 512
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        dtype="float32",
        param_dtype="float32",
    )


def single_device_rows(args: argparse.Namespace, config: LlamaConfig, train_config: TrainConfig) -> list[dict]:
    """The plain `jax.jit` step and jaxhet's `--plan single` step per backend on the first device."""
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
    batch = jax.device_put(
        {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((args.batch, args.seq), np.float32)}
    )

    def model(backend: str) -> Llama:
        return Llama(dataclasses.replace(config, attention_backend=backend), rngs=nnx.Rngs(0))

    variants: list[tuple[str, str, Callable[[], Step]]] = [
        ("plain jax.jit", "cudnn", lambda: plain_jit_step(model("cudnn"), train_config, batch))
    ]
    for backend in args.backends:
        variants.append(("jaxhet", backend, lambda b=backend: jaxhet_step(model(b), train_config, batch)))

    num_params = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))).num_parameters()
    step_flops = training_flops_per_token(config, num_params, args.seq) * args.batch * args.seq
    peak = peak_flops([jax.devices()[0]])
    rows = []
    for name, backend, build in variants:
        seconds, loss = measure(build, warmup=args.warmup, steps=args.steps)
        rows.append(
            dict(
                step=name,
                attention=backend,
                step_ms=seconds * 1e3,
                tokens_per_s=args.batch * args.seq / seconds,
                model_tflops=step_flops / seconds / 1e12,
                mfu=model_flops_utilisation(step_flops, seconds, peak),
                last_loss=loss,
            )
        )
    for row in rows:
        row["vs_plain"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def main(argv: list[str] | None = None) -> pathlib.Path:
    args = parse_args(argv)
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    config = model_config(args)
    train_config = TrainConfig(steps=1000, optim=OptimConfig(learning_rate=3e-4, warmup_steps=10))
    rows = single_device_rows(args, config, train_config)
    device = jax.devices()[0]
    num_params = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))).num_parameters()
    print(f"device {device.device_kind} ({device.platform}); {num_params / 1e6:,.1f}M parameters")
    print(f"batch {args.batch} x {args.seq} tokens, {args.dtype} compute, float32 master weights")
    _print_table(rows)

    p_config = plan_config(args)
    p_config_params = nnx.eval_shape(lambda: Llama(p_config, rngs=nnx.Rngs(0))).num_parameters()
    p_batch, p_seq = args.plan_shape[2:]
    p_ids = np.random.default_rng(1).integers(0, p_config.vocab_size, (p_batch, p_seq + 1)).astype(np.int32)
    where, p_rows = plan_rows(
        p_config, train_config, p_ids, lambda build: measure(build, warmup=args.warmup, steps=args.steps)
    )
    print_table(where, p_rows)

    step_flops = training_flops_per_token(config, num_params, args.seq) * args.batch * args.seq
    report = dict(
        **provenance("train"),
        smoke=args.smoke,
        shapes=dict(batch=args.batch, seq_len=args.seq, model=config.to_hf_dict()),
        num_params=num_params,
        flops_per_step=step_flops,
        peak_flops=peak_flops([device]),
        warmup_steps=args.warmup,
        timed_steps=args.steps,
        rows=rows,
        plan=dict(
            devices=where,
            num_params=p_config_params,
            shapes=dict(batch=p_batch, seq_len=p_seq, model=p_config.to_hf_dict()),
            rows=p_rows,
        ),
    )
    return save(report, args.out, smoke=args.smoke)


if __name__ == "__main__":
    main()
