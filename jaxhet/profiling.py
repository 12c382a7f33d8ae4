"""Measuring this machine's devices for the cost model: matmul and attention throughput per dtype, device memory
bandwidth, host<->device copies, collective bandwidth across the local devices, and timed transformer steps.

Every figure comes from the fastest of a few timed runs after a warm-up (compilation excluded): other processes
on the machine can only add time, so the fastest run is the one closest to what the device does. The timed steps
(forward and backward of small Llama models) fit the cost model's compute efficiency and per-block overhead
(`planners.calibrate`), so `planners.MeasuredProfile` carries everything the cost model needs. Sizes come from a
`ProfileSizes` preset: "full" for GPUs, "small" for CPUs, "tiny" for tests.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxhet.models import Llama, LlamaConfig
from jaxhet.parallel import llama_loss_sum, llama_params
from planners import ModelSpec, SpecError
from planners.calibrate import StepSample, fit_efficiency
from planners.catalog import CATALOG
from planners.cluster import Link
from planners.measured import MeasuredProfile

DTYPES = ("float32", "bfloat16", "float16")
SCALES = ("tiny", "small", "full")


@dataclasses.dataclass(frozen=True)
class StepShape:
    """A small Llama (`hidden`, `layers`; FFN 2.6875x, heads of 64) over `batch` sequences of `seq_len` tokens."""

    hidden: int
    layers: int
    batch: int
    seq_len: int
    vocab: int = 1024

    def config(self, dtype: str) -> LlamaConfig:
        heads = max(1, self.hidden // 64)
        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.hidden * 43 // 16,
            num_layers=self.layers,
            num_heads=heads,
            num_kv_heads=heads,
            max_position_embeddings=max(2048, self.seq_len),
            dtype=dtype,
            param_dtype=dtype,
        )

    def label(self) -> str:
        return f"h{self.hidden} L{self.layers} b{self.batch} s{self.seq_len}"


@dataclasses.dataclass(frozen=True)
class ProfileSizes:
    """Problem sizes of one profiling run."""

    matmul: int
    attention: tuple[int, int, int, int]  # batch, sequence, heads, head_dim
    copy_bytes: int
    transfer_bytes: int
    collective_bytes: int
    steps: tuple[StepShape, ...]
    repeats: int

    @classmethod
    def preset(cls, scale: str) -> ProfileSizes:
        if scale not in SCALES:
            raise SpecError(f"scale must be one of {list(SCALES)}, got {scale!r}")
        if scale == "full":
            steps = tuple(StepShape(h, 4, b, 1024) for h, b in ((1024, 8), (2048, 4), (2048, 8), (4096, 2)))
            return cls(8192, (4, 4096, 16, 128), 1 << 30, 1 << 28, 1 << 28, steps, 10)
        if scale == "small":
            steps = tuple(StepShape(h, 2, b, 128) for h, b in ((128, 4), (256, 4), (256, 8), (512, 2)))
            return cls(1024, (2, 256, 4, 64), 1 << 26, 1 << 26, 1 << 24, steps, 5)
        steps = (StepShape(64, 1, 2, 16), StepShape(128, 1, 2, 16))
        return cls(128, (1, 32, 2, 16), 1 << 16, 1 << 16, 1 << 14, steps, 2)


def default_scale(device: jax.Device) -> str:
    return "small" if device.platform == "cpu" else "full"


def kind_of(device: jax.Device) -> str:
    """The catalog GPU kind whose name appears in the device's description (longest match), else the platform."""
    description = device.device_kind.upper().replace(" ", "").replace("-", "")
    matches = [k for k in CATALOG if k.upper().replace("-", "").replace("GB", "") in description]
    return max(matches, key=len) if matches else device.platform.upper()


def fastest_interleaved(runs: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Fastest wall time of each `run()` (its outputs waited for), after one warm-up call each, over `repeats`
    rounds of one run of each: a change in the machine's load affects all of them alike."""
    for run in runs:
        jax.block_until_ready(run())
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            jax.block_until_ready(run())
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def best_seconds(run: Callable[[], Any], repeats: int) -> float:
    """Fastest wall time of `run()` over `repeats` runs after a warm-up."""
    return fastest_interleaved([run], repeats)[0]


def _random(shape: Sequence[int], dtype: str, device: jax.Device, seed: int = 0) -> jax.Array:
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jax.device_put(jnp.asarray(x, dtype=dtype), device)


def matmul_tflops(sizes: Sequence[int], dtype: str, device: jax.Device, repeats: int) -> list[float]:
    """TFLOP/s of square `n`-sized matmuls, one per size, timed in interleaved rounds."""
    f = jax.jit(jnp.matmul)
    operands = [(_random((n, n), dtype, device, 0), _random((n, n), dtype, device, 1)) for n in sizes]
    seconds = fastest_interleaved([lambda a=a, b=b: f(a, b) for a, b in operands], repeats)
    return [2 * n**3 / t / 1e12 for n, t in zip(sizes, seconds, strict=True)]


def attention_tflops(shape: tuple[int, int, int, int], dtype: str, device: jax.Device, repeats: int) -> float:
    """Forward of `jax.nn.dot_product_attention` (non-causal): 4 * b * h * s^2 * d FLOPs."""
    b, s, h, d = shape
    q, k, v = (_random((b, s, h, d), dtype, device, i) for i in range(3))
    f = jax.jit(jax.nn.dot_product_attention)
    return 4 * b * h * s * s * d / best_seconds(lambda: f(q, k, v), repeats) / 1e12


def copy_gb_s(nbytes: int, device: jax.Device, repeats: int) -> float:
    """Device memory bandwidth: read and write `nbytes` (an elementwise scale)."""
    x = _random((nbytes // 4,), "float32", device)
    f = jax.jit(lambda x: x * 1.5)
    return 2 * nbytes / best_seconds(lambda: f(x), repeats) / 1e9


def host_device_gb_s(nbytes: int, device: jax.Device, repeats: int) -> tuple[float, float]:
    """Host-to-device and device-to-host copy bandwidth of `nbytes`."""
    host = np.ones(nbytes // 4, np.float32)
    to_device = best_seconds(lambda: jax.device_put(host, device), repeats)
    on_device = jax.device_put(host, device)
    to_host = best_seconds(lambda: np.array(on_device, copy=True), repeats)
    return nbytes / to_device / 1e9, nbytes / to_host / 1e9


def collective_link(devices: Sequence[jax.Device], nbytes: int, repeats: int) -> Link | None:
    """Alpha-beta link of a ring all-reduce over `devices`, fitted on a tiny and an `nbytes` buffer per device:
    `t = 2 (n - 1) alpha + 2 (n - 1) / n * bytes / bandwidth` (the cost model's formula)."""
    n = len(devices)
    if n < 2:
        return None
    mesh = Mesh(np.array(devices), ("d",))
    psum = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "d"), mesh=mesh, in_specs=P("d"), out_specs=P("d")))

    def seconds(per_device: int) -> float:
        x = jax.device_put(np.ones(n * (per_device // 4), np.float32), NamedSharding(mesh, P("d")))
        return best_seconds(lambda: psum(x), repeats)

    small, large = seconds(1024), seconds(nbytes)
    latency_s = max(small / (2 * (n - 1)), 0.0)
    gb_s = 2 * (n - 1) / n * (nbytes - 1024) / max(large - small, 1e-9) / 1e9
    return Link(gb_s, latency_s * 1e6)


def _training_step(shape: StepShape, dtype: str, device: jax.Device) -> tuple[Callable[[], Any], ModelSpec]:
    """Forward and backward (loss and gradients, no optimizer step) of a fresh Llama of `shape` on `device`."""
    config = shape.config(dtype)
    with jax.default_device(device):
        model = Llama(config, rngs=nnx.Rngs(0))
        params = llama_params(model)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (shape.batch, shape.seq_len + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones(ids[:, 1:].shape, np.float32)}
    params, batch = jax.device_put((params, batch), device)
    grad = jax.jit(jax.value_and_grad(llama_loss_sum(model)))
    return lambda: grad(params, batch), ModelSpec.from_hf_config(config.to_hf_dict(), name=shape.label())


def step_samples(
    shapes: Sequence[StepShape],
    dtype: str,
    device: jax.Device,
    repeats: int,
    on_step: Callable[[str], None] = lambda label: None,
) -> list[StepSample]:
    """Timed training steps of every shape, in interleaved rounds (one run of each shape per round, fastest run
    kept)."""
    steps = []
    for shape in shapes:
        on_step(f"training step {shape.label()}")
        steps.append(_training_step(shape, dtype, device))
    seconds = fastest_interleaved([run for run, _ in steps], repeats)
    return [
        StepSample(spec, shape.batch, shape.seq_len, t)
        for (_, spec), shape, t in zip(steps, shapes, seconds, strict=True)
    ]


def memory_gb(device: jax.Device) -> float:
    """The device's memory (its allocator's limit where it reports one, else the host's RAM)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"] / 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def usable_memory_gb(device: jax.Device) -> float | None:
    """What a process could still allocate on the device (its allocator's limit less what it holds), or None
    where the device reports no allocator figures (CPUs)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or not stats.get("bytes_limit"):
        return None
    return (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / 1e9


def measure(
    devices: Sequence[jax.Device],
    sizes: ProfileSizes,
    dtypes: Sequence[str],
    kind: str | None = None,
    on_step: Callable[[str], None] = lambda label: None,
) -> MeasuredProfile:
    """Measure `devices` (the first one for single-device figures); `dtypes[0]` is the dtype models run in, the one
    the cost model's figures and the timed steps use. `on_step(label)` is called before each measurement."""
    for i, dtype in enumerate(dtypes):
        if dtype not in DTYPES:
            raise SpecError(f"dtypes[{i}] must be one of {list(DTYPES)}, got {dtype!r}")
    if not dtypes:
        raise SpecError("dtypes must list at least one dtype")
    device, r = devices[0], sizes.repeats
    usable = usable_memory_gb(device)  # before the measurements hold any buffers
    matmul, attention = {}, {}
    curve_sizes = (*scaling_sizes(sizes.matmul), sizes.matmul)
    on_step(f"matmul {', '.join(map(str, curve_sizes))} {dtypes[0]}")
    curve = matmul_tflops(curve_sizes, dtypes[0], device, r)
    matmul[dtypes[0]] = curve[-1]
    # Throughput does not fall as matmuls grow: a size timed slower than a smaller one was disturbed.
    fractions = itertools.accumulate((min(1.0, t / curve[-1]) for t in curve), max)
    scaling = tuple(zip(curve_sizes, fractions, strict=True))
    for dtype in dtypes:
        if dtype != dtypes[0]:
            on_step(f"matmul {sizes.matmul}^3 {dtype}")
            matmul[dtype] = matmul_tflops([sizes.matmul], dtype, device, r)[0]
        on_step(f"attention {'x'.join(map(str, sizes.attention))} {dtype}")
        attention[dtype] = attention_tflops(sizes.attention, dtype, device, r)
    on_step(f"device copy {_size(sizes.copy_bytes)}")
    copy = copy_gb_s(sizes.copy_bytes, device, r)
    on_step(f"host<->device {_size(sizes.transfer_bytes)}")
    h2d, d2h = host_device_gb_s(sizes.transfer_bytes, device, r)
    on_step(f"all-reduce {_size(sizes.collective_bytes)} over {len(devices)} device(s)")
    link = collective_link(devices, sizes.collective_bytes, r)
    samples = step_samples(sizes.steps, dtypes[0], device, r, on_step)
    kind = kind or kind_of(device)
    memory = memory_gb(device)
    uncalibrated = MeasuredProfile(
        kind,
        f"{device.device_kind} ({device.platform})",
        len(devices),
        dtypes[0],
        matmul,
        attention,
        copy,
        memory,
        h2d,
        d2h,
        link,
        1.0,
        0.0,
        scaling,
        usable,
    )
    on_step("fitting the cost model")
    efficiency, overhead = fit_efficiency(uncalibrated.local_cluster(1), samples)
    calibration = tuple(
        {"shape": shape.label(), "params": s.model.num_params, "measured_s": s.measured_s}
        for shape, s in zip(sizes.steps, samples, strict=True)
    )
    return dataclasses.replace(
        uncalibrated,
        compute_efficiency=efficiency,
        layer_overhead_us=overhead,
        calibration=calibration,
        versions=versions(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def versions() -> dict[str, str]:
    import jaxlib

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": str(os.cpu_count()),
    }


def scaling_sizes(largest: int) -> tuple[int, ...]:
    """The smaller matmul sizes timed to see how throughput falls with size: halving down to 1/16 (at least 16)."""
    return tuple(n for n in (largest // 16, largest // 8, largest // 4, largest // 2) if n >= 16)


def step_count(sizes: ProfileSizes, dtypes: Sequence[str]) -> int:
    """How many times `measure` calls `on_step`."""
    return 2 * len(dtypes) + 3 + len(sizes.steps) + 1
