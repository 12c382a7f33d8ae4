"""The cascade planner: routing thresholds and a deployment for a cascade of models, small to large (Cascadia).

A request goes to the first model; it escalates to the next while the answering model's confidence is below that
model's threshold (`planners.cascade_profile`). Thresholds set the share of traffic each model receives and the
cascade's quality; the deployment sets its latency. The two levels are solved as in Cascadia (arXiv 2506.04203):

- inner: for the traffic a threshold vector sends to each model, the serving MILP (`plan_serving`, objective
  `min_latency`) chooses GPUs, replicas and routing with the least mean service time per request within the budget,
  keeping `utilization` headroom for queueing. The cascade's predicted latency is the mean over requests of the time
  spent in every model they visit (a request that escalates pays for the small model's answer too);
- outer: over a grid of thresholds (quantiles of each model's confidences), the (latency, quality) points are
  normalised by the ideal and nadir points of their Pareto front, and the weighted Tchebycheff scalarisation
  `max(w * latency_gap, (1 - w) * quality_gap)` picks the plan for the latency weight `w` (among the points that
  reach `min_quality` when one is set). Sweeping `w` traces the front, unsupported points included.

Inner solves are shared between threshold vectors that send the same traffic. The plan records the front and, for
comparison, each model serving all traffic alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from planners import fields
from planners.cascade_profile import CascadeProfile
from planners.cluster import ClusterSpec
from planners.errors import PlanningError, SpecError
from planners.model import ModelSpec
from planners.serve import ServePlan, ServeReplica, plan_serving
from planners.workload import ServeWorkload

FORMAT = "jaxhet.cascade_plan"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class CascadePoint:
    """One routing choice: thresholds, the share of requests reaching each model, and what it achieves."""

    thresholds: tuple[float, ...]
    reach: tuple[float, ...]
    quality: float
    latency_s: float
    price_per_hour: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", tuple(self.thresholds))
        object.__setattr__(self, "reach", tuple(self.reach))


@dataclasses.dataclass(frozen=True)
class SingleModel:
    """A baseline: one model serving every request on its own best deployment."""

    model: str
    quality: float
    latency_s: float
    price_per_hour: float


@dataclasses.dataclass(frozen=True)
class CascadePlan:
    """A cascade deployment: `models` in cascade order, one threshold per non-final model, the replicas of every
    model (`deployment`), the predicted mean latency (seconds, queueing aside) and quality of the chosen point, the
    Pareto `front` it was chosen from, and the single-model baselines."""

    models: tuple[str, ...]
    thresholds: tuple[float, ...]
    deployment: ServePlan
    latency_s: float
    quality: float
    reach: tuple[float, ...]
    arrival_rate: float
    weight: float
    min_quality: float | None
    front: tuple[CascadePoint, ...]
    single: tuple[SingleModel, ...]
    cluster: str = ""

    def __post_init__(self) -> None:
        for name in ("models", "thresholds", "reach", "front", "single"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.models) < 2:
            raise SpecError(f"models must list at least 2 models, got {list(self.models)}")
        if len(self.thresholds) != len(self.models) - 1:
            raise SpecError(f"thresholds must have {len(self.models) - 1} entries, got {len(self.thresholds)}")

    def replicas(self, model: str) -> tuple[ServeReplica, ...]:
        """The deployment of one model of the cascade."""
        if model not in self.models:
            raise SpecError(f"model must be one of {list(self.models)}, got {model!r}")
        return tuple(r for r in self.deployment.replicas if r.model == model)

    def to_json(self, indent: int | None = 2) -> str:
        data = dataclasses.asdict(self)
        data["deployment"] = json.loads(self.deployment.to_json())
        return json.dumps({"format": FORMAT, "version": VERSION, **data}, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> CascadePlan:
        data: dict[str, Any] = json.loads(text)
        if data.pop("format", None) != FORMAT:
            raise SpecError(f"format must be {FORMAT!r}")
        if data.pop("version", None) != VERSION:
            raise SpecError(f"version must be {VERSION}")
        data["deployment"] = ServePlan.from_json(json.dumps(data["deployment"]))
        data["front"] = tuple(CascadePoint(**p) for p in data["front"])
        data["single"] = tuple(SingleModel(**s) for s in data["single"])
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CascadePlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cascade plan not found: {path}")
        return cls.from_json(path.read_text())


def pareto_front(points: Sequence[CascadePoint]) -> tuple[CascadePoint, ...]:
    """The points no other point beats on both latency (lower) and quality (higher), by increasing latency."""
    front: list[CascadePoint] = []
    for p in sorted(points, key=lambda p: (p.latency_s, -p.quality)):
        if not front or p.quality > front[-1].quality:
            front.append(p)
    return tuple(front)


def tchebycheff(
    points: Sequence[CascadePoint], weight: float, front: Sequence[CascadePoint]
) -> tuple[CascadePoint, float]:
    """The point minimising `max(w * latency_gap, (1 - w) * quality_gap)`, gaps normalised by `front`'s ideal and
    nadir points; ties go to lower latency, then higher quality. Returns the point and its scalarised value."""
    best_latency, worst_latency = front[0].latency_s, front[-1].latency_s
    best_quality, worst_quality = front[-1].quality, front[0].quality
    latency_span = worst_latency - best_latency or 1.0
    quality_span = best_quality - worst_quality or 1.0

    def value(p: CascadePoint) -> float:
        return max(
            weight * (p.latency_s - best_latency) / latency_span,
            (1 - weight) * (best_quality - p.quality) / quality_span,
        )

    chosen = min(points, key=lambda p: (value(p), p.latency_s, -p.quality))
    return chosen, value(chosen)


@dataclasses.dataclass
class _Inner:
    """Inner solves, shared between threshold vectors that send each model the same traffic."""

    cluster: ClusterSpec
    models: Sequence[ModelSpec]
    workload: ServeWorkload
    options: dict[str, Any]
    solved: dict[tuple[int, ...], ServePlan | PlanningError] = dataclasses.field(default_factory=dict)

    def deploy(self, counts: tuple[int, ...], total: int) -> ServePlan | PlanningError:
        """The least-latency deployment for `counts[i] / total` of the arrival rate at model `i`."""
        if counts not in self.solved:
            used = [(m, self.workload.arrival_rate * n / total) for m, n in zip(self.models, counts, strict=True) if n]
            try:
                self.solved[counts] = plan_serving(
                    self.cluster,
                    [m for m, _ in used],
                    self.workload,
                    objective="min_latency",
                    rates=[r for _, r in used],
                    **self.options,
                )
            except PlanningError as err:
                self.solved[counts] = err
        return self.solved[counts]


def mean_latency(plan: ServePlan, arrival_rate: float) -> float:
    """Mean time a request spends in the deployment's replicas, over all requests of the cascade."""
    return sum(r.routed_rps * r.latency_s for r in plan.replicas) / arrival_rate


def plan_cascade(
    cluster: ClusterSpec,
    models: Sequence[ModelSpec],
    workload: ServeWorkload,
    profile: CascadeProfile | None = None,
    *,
    weight: float = 0.5,
    min_quality: float | None = None,
    grid: int = 11,
    utilization: float = 0.8,
    disaggregate: bool = True,
    current: CascadePlan | None = None,
    time_limit_s: float = 10.0,
) -> CascadePlan:
    """Thresholds and deployment for the cascade `models` (small to large) serving `workload.arrival_rate`.

    `profile` gives confidences and correctness per request (default: `CascadeProfile.synthetic`); `weight` in
    [0, 1] trades latency (1: latency only) against quality (0: quality only); `min_quality` rules out points below
    it; `grid` thresholds per non-final model are tried. With `current` (the cascade running now, e.g. before a
    workload shift), every deployment keeps as many of its replicas in place as its optimum allows. Raises
    `PlanningError` when no threshold vector can be deployed, or none reaches `min_quality`.
    """
    if len(models) < 2:
        raise SpecError(f"models must list at least 2 models (small to large), got {len(models)}")
    profile = profile if profile is not None else CascadeProfile.synthetic(len(models))
    names = tuple(m.name for m in models)
    if profile.num_models != len(models):
        raise SpecError(f"profile describes {profile.num_models} models, the cascade has {len(models)}: {list(names)}")
    if profile.models and profile.models != names:
        raise SpecError(f"profile.models must be the cascade's models {list(names)}, got {list(profile.models)}")
    if not 0 <= weight <= 1:
        raise SpecError(f"weight must be in [0, 1], got {weight!r}")
    if min_quality is not None and not 0 <= min_quality <= 1:
        raise SpecError(f"min_quality must be in [0, 1], got {min_quality!r}")
    fields.int_at_least(grid, 2, "grid")
    options = {"utilization": utilization, "disaggregate": disaggregate, "time_limit_s": time_limit_s}
    inner = _Inner(cluster, models, workload, {**options, "current": current.deployment if current else None})
    total = len(profile.samples)
    points, plans, seen = [], {}, set()
    for thresholds in itertools.product(*(profile.candidates(i, grid) for i in range(len(models) - 1))):
        stops = profile.stops(thresholds)
        if stops in seen:
            continue
        seen.add(stops)
        counts = profile.reach_counts(stops)
        deployed = inner.deploy(counts, total)
        if isinstance(deployed, PlanningError):
            continue
        point = CascadePoint(
            thresholds,
            tuple(n / total for n in counts),
            profile.quality(stops),
            mean_latency(deployed, workload.arrival_rate),
            deployed.price_per_hour,
        )
        points.append(point)
        plans[point] = deployed
    if not points:
        first = inner.deploy((total,) + (0,) * (len(models) - 1), total)
        raise PlanningError(f"cascade: no thresholds can be deployed, not even without escalation: {first}")
    front = pareto_front(points)
    eligible = points if min_quality is None else [p for p in points if p.quality >= min_quality]
    if not eligible:
        best = max(p.quality for p in points)
        raise PlanningError(
            f"quality: the best deployable thresholds reach quality {best:.3f}, below min_quality {min_quality}"
        )
    chosen, _ = tchebycheff(eligible, weight, front)
    return CascadePlan(
        models=names,
        thresholds=chosen.thresholds,
        deployment=plans[chosen],
        latency_s=chosen.latency_s,
        quality=chosen.quality,
        reach=chosen.reach,
        arrival_rate=workload.arrival_rate,
        weight=weight,
        min_quality=min_quality,
        front=front,
        single=_single_models(inner, profile, total),
        cluster=cluster.name,
    )


def _single_models(inner: _Inner, profile: CascadeProfile, total: int) -> tuple[SingleModel, ...]:
    """Each model alone on its best deployment (models that cannot serve all traffic are left out)."""
    out = []
    for i, model in enumerate(inner.models):
        alone = dataclasses.replace(inner, models=[model], options={**inner.options, "current": None}, solved={})
        deployed = alone.deploy((total,), total)
        if isinstance(deployed, ServePlan):
            quality = sum(s.correct[i] for s in profile.samples) / total
            rate = inner.workload.arrival_rate
            out.append(SingleModel(model.name, quality, mean_latency(deployed, rate), deployed.price_per_hour))
    return tuple(out)
