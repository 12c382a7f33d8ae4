"""Training with a compressed pipeline stage edge against the same training with the edge uncompressed.

A tiny Llama (byte-level vocabulary, untied embeddings) is trained for `--steps` AdamW steps as a 2-stage
pipeline, TP 2 on two emulated H100s feeding TP 2 on two emulated L4s, once per stage-edge codec
(`meshes.compression.CODECS`), on the same batches: consecutive bytes of the Python standard library's own sources.
Per codec it prints the mean loss of the last 10 steps, its relative difference from the uncompressed run's, and
the bytes per step that crossed between the stages (`Transfers.log`; a single replica without tied embeddings
has no gradient sync, so these are the edge's activations and gradients alone). JSON (device, versions, shapes,
date, loss curves, rows) goes into bench/results/.

On a CPU machine the devices are emulated (`--xla_force_host_platform_device_count=8`), set here before JAX starts.
    python bench/compression_training.py [--steps 200] [--batch 8] [--seq 64] [--hidden 64] [--layers 4]
"""

from __future__ import annotations

import argparse
import os
import pathlib


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step, in 2 micro-batches")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    return parser.parse_args(argv)


def byte_batches(steps: int, rows: int, seq: int, seed: int) -> list[dict]:
    """`steps` batches of `rows` windows of `seq + 1` consecutive bytes of the standard library's sources."""
    import numpy as np

    from jaxhet.data import stdlib_corpus_files

    files = sorted(stdlib_corpus_files())[:200]
    text = np.frombuffer(b"\n".join(p.read_bytes() for p in files), np.uint8).astype(np.int32)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        starts = rng.integers(0, text.size - seq - 1, rows)
        ids = np.stack([text[s : s + seq + 1] for s in starts])
        out.append({"input_ids": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((rows, seq), np.float32)})
    return out


def train(codec: str, config, params, batches: list[dict], lr: float) -> tuple[list[float], list[int]]:
    """Losses and bytes between the stages per step of the 2-stage plan with `codec` on its edge."""
    import optax

    from jaxhet.parallel import StagedLlama
    from meshes import GroupedOptimizer, HetMesh, PlanExecutor
    from planners import Replica, Stage, TrainPlan
    from planners.cluster import ClusterSpec

    cluster = ClusterSpec.from_dict(
        {"name": "emulated", "nodes": [{"gpu": "H100", "count": 4}, {"gpu": "L4", "count": 4}]}
    )
    rows = len(batches[0]["input_ids"])
    first = Stage((0, 1), "H100", 2, (0, config.num_layers // 2), compress=codec)
    last = Stage((4, 5), "L4", 2, (config.num_layers // 2, config.num_layers))
    plan = TrainPlan((Replica((first, last), 2, rows // 2),), config.num_layers, rows, len(batches[0]["weights"][0]))
    executor = PlanExecutor(plan, HetMesh.from_cluster(cluster), StagedLlama(config))
    optimizer = optax.adamw(lr)
    grouped = GroupedOptimizer(optimizer, 1.0, executor.copy_shardings(params), executor.transfers)
    copies = grouped.place(params)
    states = grouped.init(copies)
    losses, moved = [], []
    for batch in batches:
        executor.transfers.log.reset()
        loss, grads = executor.value_and_grad(copies, batch)
        moved.append(executor.transfers.log.between_groups)
        copies, states, _ = grouped.step(copies, grads, states)
        losses.append(float(loss))
    return losses, moved


def main(argv: list[str] | None = None) -> pathlib.Path:
    args = parse_args(argv)
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import numpy as np
    from flax import nnx
    from record import provenance, save

    from jaxhet import Llama, LlamaConfig
    from jaxhet.parallel import llama_params
    from meshes.compression import CODECS

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=2,
        tie_word_embeddings=False,
    )
    params = llama_params(Llama(config, rngs=nnx.Rngs(args.seed)))
    batches = byte_batches(args.steps, args.batch, args.seq, args.seed)
    curves = {codec: train(codec, config, params, batches, args.lr) for codec in CODECS}
    tail = min(10, args.steps)
    reference = float(np.mean(curves["none"][0][-tail:]))
    rows = []
    print(f"{'codec':14} {'first loss':>10} {'last loss':>10} {'vs none':>8} {'bytes/step':>11} {'vs none':>8}")
    for codec, (losses, moved) in curves.items():
        last = float(np.mean(losses[-tail:]))
        row = dict(
            codec=codec,
            first_loss=losses[0],
            last_loss=last,
            loss_vs_none=(last - reference) / reference,
            edge_bytes_per_step=moved[0],
            bytes_reduction=curves["none"][1][0] / moved[0],
        )
        rows.append(row)
        print(
            f"{codec:14} {losses[0]:10.4f} {last:10.4f} {row['loss_vs_none']:+8.2%} {moved[0]:11d} "
            f"{row['bytes_reduction']:7.2f}x"
        )
    report = dict(
        **provenance("compression_training"),
        shape=dict(steps=args.steps, batch=args.batch, seq=args.seq, hidden=args.hidden, layers=args.layers),
        lr=args.lr,
        last_loss_window=tail,
        rows=rows,
        losses={codec: losses for codec, (losses, _) in curves.items()},
    )
    return save(report, args.out)


if __name__ == "__main__":
    main()
