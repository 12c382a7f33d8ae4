"""Quantize-dequantize error of the stage-edge codecs (`meshes.compression`) on normal and outlier activations.

Inputs [batch, seq, hidden]: standard normal activations ("normal"), and the same with `--outliers` channels
scaled by `--scale` ("outlier": the few large channels LLM activations carry). For every codec of
`meshes.compression.CODECS`, plus plain tile-wise absmax int4 without the Hadamard rotation (`int4`, what the rotation
must beat), it prints the wire bits per element (values plus scales), the relative error
`|x - decode(encode(x))| / |x|` over the whole tensor, and the same over the channels that are not outliers (which
plain absmax scaling coarsens most). JSON (device, versions, shapes, date, rows) goes into bench/results/.

    python bench/compression_error.py [--batch 4] [--seq 512] [--hidden 4096] [--outliers 8] [--scale 50]
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from record import provenance, save

from meshes.compression import CODECS, Codec

PLAIN_INT4 = Codec("int4", 4, 64)


def inputs(seed: int, shape: tuple[int, int, int], outliers: int, scale: float) -> tuple[dict, np.ndarray]:
    """{name: activations} and the outlier channels' indices."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    channels = np.sort(rng.choice(shape[-1], outliers, replace=False))
    spiky = x.copy()
    spiky[..., channels] *= scale
    return {"normal": x, "outlier": spiky}, channels


def relative_error(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(y.astype(np.float64) - x) / np.linalg.norm(x))


def measure(data: dict, channels: np.ndarray) -> list[dict]:
    rows = []
    quiet = np.setdiff1d(np.arange(next(iter(data.values())).shape[-1]), channels)
    for codec in [*CODECS.values(), PLAIN_INT4]:
        round_trip = jax.jit(lambda v, c=codec: c.decode(c.encode(v), jnp.float32))
        for name, x in data.items():
            packed = jax.eval_shape(codec.encode, x)
            nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(packed))
            y = np.asarray(round_trip(x))
            rows.append(
                dict(
                    codec=codec.name,
                    inputs=name,
                    bits=8 * nbytes / x.size,
                    vs_float32=x.nbytes / nbytes,
                    relative_error=relative_error(y, x),
                    relative_error_quiet_channels=relative_error(y[..., quiet], x[..., quiet]),
                )
            )
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'codec':14} {'inputs':8} {'bits':>6} {'vs f32':>7} {'rel err':>9} {'quiet ch':>9}")
    for r in rows:
        print(
            f"{r['codec']:14} {r['inputs']:8} {r['bits']:6.2f} {r['vs_float32']:7.2f} "
            f"{r['relative_error']:9.5f} {r['relative_error_quiet_channels']:9.5f}"
        )


def main(argv: list[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--outliers", type=int, default=8, help="channels scaled by --scale in the outlier inputs")
    parser.add_argument("--scale", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    shape = (args.batch, args.seq, args.hidden)
    data, channels = inputs(args.seed, shape, args.outliers, args.scale)
    rows = measure(data, channels)
    print_table(rows)
    errors = {(r["codec"], r["inputs"]): r["relative_error"] for r in rows}
    report = dict(
        **provenance("compression_error"),
        jax_version=jax.__version__,
        shape=dict(batch=args.batch, seq=args.seq, hidden=args.hidden),
        outliers=dict(channels=channels.tolist(), scale=args.scale),
        hadamard_beats_plain_int4_on_outliers=errors[("int4_hadamard", "outlier")] < errors[("int4", "outlier")],
        rows=rows,
    )
    return save(report, args.out)


if __name__ == "__main__":
    main()
