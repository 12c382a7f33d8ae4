"""How well the calibrated cost model predicts training step times on this machine's devices.

The profile (from `--profile FILE`, written by `jaxhet profile`, or measured here first) fixes peak matmul
throughput, memory bandwidth and the efficiency factors fitted on its own timed steps. This script then times
*other* configurations (widths, depths, batches and sequence lengths the fit never saw): the forward and backward
pass of a fresh Llama on one device, no optimizer step, as the cost model counts it. When it measures the profile
itself, the profile's own steps are timed again in the same interleaved rounds as the others and the factors
refitted on them, so that a machine whose load changes over time (a shared CPU) does not bias the comparison.
It prints predicted and measured times with the relative error (target: within 10%) and writes JSON to
bench/results/.
    python bench/cost_model_calibration.py [--profile profile.json] [--scale small|full|tiny] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

SHAPES = {
    # hidden, layers, batch, sequence length
    "tiny": ((96, 1, 2, 16), (64, 2, 2, 32)),
    "small": ((192, 2, 4, 128), (384, 2, 2, 128), (256, 3, 2, 256), (128, 4, 8, 64), (320, 2, 4, 96)),
    "full": ((1536, 4, 4, 1024), (3072, 2, 4, 2048), (2048, 6, 2, 2048), (1024, 8, 16, 512), (4096, 2, 1, 4096)),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, help="profile JSON from `jaxhet profile` (default: measure now)")
    parser.add_argument("--scale", choices=sorted(SHAPES), help="sizes (default: full on GPUs, small on CPUs)")
    parser.add_argument("--repeats", type=int, help="timed runs per configuration (default: the scale's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import jax

    from jaxhet import profiling
    from planners.calibrate import fit_efficiency, predict_step
    from planners.measured import MeasuredProfile

    device = jax.devices()[0]
    scale = args.scale or profiling.default_scale(device)
    sizes = profiling.ProfileSizes.preset(scale)
    repeats = args.repeats or sizes.repeats
    shapes = [profiling.StepShape(*shape) for shape in SHAPES[scale]]
    if args.profile is not None:
        profile = MeasuredProfile.load(args.profile)
        samples = profiling.step_samples(shapes, profile.dtype, device, repeats)
    else:
        dtype = "float32" if device.platform == "cpu" else "bfloat16"
        profile = profiling.measure([device], sizes, [dtype], on_step=lambda label: print(f"profiling: {label}"))
        timed = profiling.step_samples([*sizes.steps, *shapes], dtype, device, repeats)
        fit, samples = timed[: len(sizes.steps)], timed[len(sizes.steps) :]
        bare = dataclasses.replace(profile, compute_efficiency=1.0, layer_overhead_us=0.0)
        efficiency, overhead = fit_efficiency(bare.local_cluster(1), fit)
        profile = dataclasses.replace(profile, compute_efficiency=efficiency, layer_overhead_us=overhead)
    cluster = profile.local_cluster(1)
    print(
        f"device: {profile.device}; {profile.dtype}: matmul {profile.matmul_tflops[profile.dtype]:.3g} TFLOP/s, "
        f"block efficiency {profile.compute_efficiency:.3f}, overhead {profile.layer_overhead_us:.1f} us/block"
    )
    print(f"{'configuration':<26}{'params':>12}{'predicted ms':>14}{'measured ms':>13}{'error':>8}")
    rows = []
    for shape, sample in zip(shapes, samples, strict=True):
        spec, measured = sample.model, sample.measured_s
        predicted = predict_step(cluster, spec, shape.batch, shape.seq_len)
        error = (predicted - measured) / measured
        rows.append(
            {
                "shape": dataclasses.asdict(shape),
                "params": spec.num_params,
                "predicted_s": predicted,
                "measured_s": measured,
                "error": error,
            }
        )
        print(f"{shape.label():<26}{spec.num_params:>12,}{predicted * 1e3:>14.2f}{measured * 1e3:>13.2f}{error:>+8.1%}")
    errors = [abs(r["error"]) for r in rows]
    print(f"mean |error| {sum(errors) / len(errors):.1%}, max |error| {max(errors):.1%} (target: within 10%)")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "cost_model_calibration",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": profile.device,
        "versions": profiling.versions(),
        "dtype": profile.dtype,
        "scale": scale,
        "repeats": repeats,
        "profile": json.loads(profile.to_json()),
        "results": rows,
        "mean_abs_error": sum(errors) / len(errors),
        "max_abs_error": max(errors),
    }
    path = args.out / f"cost_model_calibration_{device.platform}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
