"""Fitting the cost model's efficiency factors to measured training steps on one device.

A step here is the forward and backward pass of a whole model over one batch on one device (no optimizer step,
which the cost model leaves out too). Its prediction is the cost model's iteration time of the one-device plan.
With peak FLOP/s and memory bandwidth fixed (measured by `jaxhet profile`), two factors remain: the compute
efficiency of transformer blocks relative to the profile's peak (a plain matmul; fused blocks may beat a lone
matmul of one size, so the factor may exceed 1), and a fixed per-block overhead. Predicted time is
linear in the overhead, so for every efficiency on a fine grid the overhead has a closed form (least squares of
relative errors, not negative); the pair with the smallest relative error wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from planners.cluster import ClusterSpec
from planners.cost_model import evaluate_train_plan
from planners.errors import SpecError
from planners.model import ModelSpec
from planners.plan import Replica, Stage, TrainPlan

GRID = 400
LOWEST_EFFICIENCY = 0.01
HIGHEST_EFFICIENCY = 4.0


@dataclasses.dataclass(frozen=True)
class StepSample:
    """One timed step: `model` over `batch` sequences of `seq_len` tokens took `measured_s` seconds."""

    model: ModelSpec
    batch: int
    seq_len: int
    measured_s: float


def single_device_plan(model: ModelSpec, batch: int, seq_len: int, kind: str) -> TrainPlan:
    """The whole model on device 0, one micro-batch of `batch` sequences, no recomputation."""
    stage = Stage((0,), kind, 1, (0, model.num_layers))
    return TrainPlan((Replica((stage,), 1, batch),), model.num_layers, batch, seq_len, model=model.name)


def predict_step(cluster: ClusterSpec, model: ModelSpec, batch: int, seq_len: int) -> float:
    """The cost model's time for one step on the cluster's first device."""
    plan = single_device_plan(model, batch, seq_len, cluster.devices[0].kind)
    return evaluate_train_plan(plan, cluster, model).iteration_s


def fit_efficiency(cluster: ClusterSpec, samples: Sequence[StepSample]) -> tuple[float, float]:
    """`(efficiency, layer_overhead_us)` for the kind of the cluster's first device that best predict the samples
    (smallest sum of squared relative errors); `efficiency` scales that kind's `tflops` (its compute efficiency
    is ignored)."""
    if not samples:
        raise SpecError("samples must list at least one timed step")
    kind = cluster.devices[0].kind
    peak = cluster.profile(kind).tflops
    best: tuple[float, float, float] | None = None
    for i in range(GRID):
        efficiency = LOWEST_EFFICIENCY * (HIGHEST_EFFICIENCY / LOWEST_EFFICIENCY) ** (i / (GRID - 1))
        figures = {"tflops": peak * efficiency, "compute_efficiency": 1.0, "layer_overhead_us": 0.0}
        trial = cluster.with_profiles({kind: figures})
        # Relative terms: predicted / measured = r + q * overhead.
        r = [predict_step(trial, s.model, s.batch, s.seq_len) / s.measured_s for s in samples]
        q = [s.model.num_layers * 1e-6 / s.measured_s for s in samples]
        overhead = max(0.0, sum(qi * (1 - ri) for ri, qi in zip(r, q, strict=True)) / sum(qi * qi for qi in q))
        error = sum((ri + qi * overhead - 1) ** 2 for ri, qi in zip(r, q, strict=True))
        if best is None or error < best[0]:
            best = (error, efficiency, overhead)
    assert best is not None
    return best[1], best[2]
