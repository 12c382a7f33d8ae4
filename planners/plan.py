"""The training plan: plain data shared by the planner (which writes it) and the HSPMD executor (which runs it).

A `TrainPlan` says, for one training iteration of `global_batch` sequences of `seq_len` tokens on a model with
`num_layers` transformer blocks:

- `replicas`: the data-parallel replicas. Every replica holds a full copy of the model, split into a pipeline of
  its own depth. Replicas may differ in everything: depth, device kinds, TP degrees, layer split, batch share.
- `Replica.stages`: the pipeline stages in order. Stage `i` sends activations to stage `i + 1` (and receives their
  gradients back). Each stage owns the half-open block range `layers = (start, stop)`; the stages of one replica
  cover `0 .. num_layers` contiguously, in order. The token embedding lives with the first stage and the final norm
  plus the LM head with the last stage (when the embedding is tied, both ends hold a copy and their gradients are
  summed).
- `Stage.devices`: indices into the cluster's flat device list (`ClusterSpec.devices`, node by node, in order),
  all of GPU kind `Stage.kind`. A stage runs tensor parallelism of degree `Stage.tp` and context parallelism of
  the replica's degree `Replica.cp`, so `len(devices) == tp * cp`; device `devices[c * tp + t]` is TP rank `t` of
  context-parallel rank `c`. No device appears twice in a plan. Devices absent from every stage are idle.
- Batch: replica `r` processes `num_microbatches * microbatch_size` sequences per iteration (its batch share); the
  shares sum to `global_batch`. Its pipeline runs `schedule` ("1f1b" or "gpipe") over its own micro-batches.
  Gradients are combined across replicas weighted by tokens, so the update equals the single-device mean over the
  global batch.
- `Stage.recompute`: recompute the stage's block activations in the backward pass instead of storing them.
- `Stage.zero`: the ZeRO stage of its state, one of `ZERO_STAGES`: 0 keeps each moment laid out like its
  parameter; 1 also splits it over the stage's devices that hold the parameter whole (ZeRO-1 inside the group) and,
  for leaves whose every holding stage (in any replica) has `zero` >= 1, across those holders too (each holds
  its part of the summed gradient, updates it, and the parameters are all-gathered back); 3 splits the parameters
  themselves, with their gradients and moments, over the stage's devices that would hold them whole (FSDP inside
  the group: each block's parameters gathered for its forward and again for its backward, gradients
  reduce-scattered), and across holders as 1.
- `Stage.compress`: how the activations this stage sends to the next stage, and the gradients it receives back
  from it, cross the edge: one of `COMPRESSIONS` (`meshes.compression` describes the codecs); "none" on the last
  stage, which sends nothing onward. Plans written without the field load as "none".
- `estimate`: what the cost model predicted for this plan (optional; informative only, never needed to run it).
- `solve`: how the planner found it (optional, informative): the solver status ("OPTIMAL": no plan of the
  planner's search space is faster under the cost model; "FEASIBLE": the best found within the time limit), the
  proven lower bound on the iteration time, the relative gap between the two, and the wall time.

Compared with HSPMD's strategy format (DP count, per-replica stage layer counts, per-replica micro-batch counts,
per-stage TP, per-replica CP, rank-to-device mapping, recompute layers), everything is here: the stage layer
counts are `plan.layer_counts()`, the micro-batch counts `[r.num_microbatches for r in plan.replicas]`.

`TrainPlan.to_json()` / `TrainPlan.from_json(text)` round-trip exactly (version 2 adds `solve`, version 3
`Stage.zero` and `Stage.compress`, version 4 `zero` 3; older plans, which lack them, still load); construction
validates every invariant above and raises `PlanError` naming the offending field (e.g. `replicas[1].stages[0].tp`).
After losing devices, `planners.replan_training(cluster, failed, ...)` returns a plan over the survivors in the
original numbering.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from planners import fields as validators

FORMAT = "jaxhet.train_plan"
VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
ZERO_STAGES = (0, 1, 3)
STATUSES = ("OPTIMAL", "FEASIBLE")
SCHEDULES = ("1f1b", "gpipe")
COMPRESSIONS = ("none", "int8", "int4_hadamard")


class PlanError(ValueError):
    """A plan violates an invariant; the message names the field."""


def _positive_int(value: Any, field: str) -> None:
    validators.positive_int(value, field, error=PlanError)


def _expect_keys(data: Any, allowed: Sequence[str], required: Sequence[str], where: str) -> Mapping[str, Any]:
    return validators.mapping(data, where or "plan", allowed, required, error=PlanError)


def _dotted(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline stage: a device group of one GPU kind running blocks `layers[0] <= i < layers[1]`."""

    devices: tuple[int, ...]
    kind: str
    tp: int
    layers: tuple[int, int]
    recompute: bool = False
    zero: int = 0
    compress: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "layers", tuple(self.layers))
        self.check("")

    def check(self, where: str) -> None:
        """Validate the stage on its own; `where` prefixes field names in errors."""
        if not self.devices:
            raise PlanError(f"{_dotted(where, 'devices')} must not be empty")
        for i, d in enumerate(self.devices):
            if not isinstance(d, int) or isinstance(d, bool) or d < 0:
                raise PlanError(f"{_dotted(where, f'devices[{i}]')} must be a non-negative integer, got {d!r}")
        if len(set(self.devices)) != len(self.devices):
            raise PlanError(f"{_dotted(where, 'devices')} repeats a device: {list(self.devices)}")
        if not isinstance(self.kind, str) or not self.kind:
            raise PlanError(f"{_dotted(where, 'kind')} must be a non-empty GPU kind name, got {self.kind!r}")
        _positive_int(self.tp, _dotted(where, "tp"))
        if len(self.layers) != 2 or not all(isinstance(x, int) for x in self.layers):
            raise PlanError(f"{_dotted(where, 'layers')} must be a pair [start, stop), got {list(self.layers)}")
        if not 0 <= self.layers[0] < self.layers[1]:
            raise PlanError(f"{_dotted(where, 'layers')} must satisfy 0 <= start < stop, got {list(self.layers)}")
        if not isinstance(self.recompute, bool):
            raise PlanError(f"{_dotted(where, 'recompute')} must be true or false, got {self.recompute!r}")
        if self.zero not in ZERO_STAGES or isinstance(self.zero, bool):
            raise PlanError(f"{_dotted(where, 'zero')} must be one of {list(ZERO_STAGES)}, got {self.zero!r}")
        if self.compress not in COMPRESSIONS:
            raise PlanError(f"{_dotted(where, 'compress')} must be one of {list(COMPRESSIONS)}, got {self.compress!r}")

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "devices": list(self.devices),
            "kind": self.kind,
            "tp": self.tp,
            "layers": list(self.layers),
            "recompute": self.recompute,
            "zero": self.zero,
            "compress": self.compress,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "stage") -> Stage:
        fields = ("devices", "kind", "tp", "layers", "recompute", "zero", "compress")
        d = _expect_keys(data, fields, fields[:4], where)
        for name in ("devices", "layers"):
            if not isinstance(d[name], list):
                raise PlanError(f"{where}.{name} must be a list, got {d[name]!r}")
        try:
            return cls(
                devices=tuple(d["devices"]),
                kind=d["kind"],
                tp=d["tp"],
                layers=tuple(d["layers"]),
                recompute=d.get("recompute", False),
                zero=d.get("zero", 0),
                compress=d.get("compress", "none"),
            )
        except PlanError as err:
            raise PlanError(f"{where}.{err}") from None


@dataclasses.dataclass(frozen=True)
class Replica:
    """One data-parallel replica: a pipeline over `stages`, fed `num_microbatches` micro-batches per iteration."""

    stages: tuple[Stage, ...]
    num_microbatches: int
    microbatch_size: int
    cp: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        self.check("")

    def check(self, where: str) -> None:
        """Validate the replica on its own (stage ranges contiguous from 0, device counts = tp * cp)."""
        if not self.stages:
            raise PlanError(f"{_dotted(where, 'stages')} must not be empty")
        _positive_int(self.num_microbatches, _dotted(where, "num_microbatches"))
        _positive_int(self.microbatch_size, _dotted(where, "microbatch_size"))
        _positive_int(self.cp, _dotted(where, "cp"))
        expected_start = 0
        for i, stage in enumerate(self.stages):
            at = _dotted(where, f"stages[{i}]")
            if not isinstance(stage, Stage):
                raise PlanError(f"{at} must be a Stage, got {type(stage).__name__}")
            if stage.layers[0] != expected_start:
                raise PlanError(
                    f"{at}.layers starts at {stage.layers[0]} but the previous stage stops at {expected_start}; "
                    "stages must cover the layers contiguously from 0"
                )
            expected_start = stage.layers[1]
            if i == len(self.stages) - 1 and stage.compress != "none":
                raise PlanError(
                    f"{at}.compress is {stage.compress!r} but the last stage sends nothing onward; it must be 'none'"
                )
            if len(stage.devices) != stage.tp * self.cp:
                raise PlanError(
                    f"{at}.devices has {len(stage.devices)} devices but tp * cp = {stage.tp} * {self.cp} "
                    f"= {stage.tp * self.cp}"
                )

    @property
    def batch_share(self) -> int:
        """Sequences this replica processes per iteration."""
        return self.num_microbatches * self.microbatch_size

    @property
    def devices(self) -> tuple[int, ...]:
        return tuple(d for s in self.stages for d in s.devices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [s.to_dict() for s in self.stages],
            "num_microbatches": self.num_microbatches,
            "microbatch_size": self.microbatch_size,
            "cp": self.cp,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "replica") -> Replica:
        fields = ("stages", "num_microbatches", "microbatch_size", "cp")
        d = _expect_keys(data, fields, fields[:3], where)
        if not isinstance(d["stages"], list):
            raise PlanError(f"{where}.stages must be a list, got {d['stages']!r}")
        stages = tuple(Stage.from_dict(s, f"{where}.stages[{i}]") for i, s in enumerate(d["stages"]))
        try:
            return cls(stages, d["num_microbatches"], d["microbatch_size"], d.get("cp", 1))
        except PlanError as err:
            raise PlanError(f"{where}.{err}") from None


@dataclasses.dataclass(frozen=True)
class PlanEstimate:
    """The cost model's prediction for a plan (seconds, GB); informative only."""

    iteration_s: float
    replica_s: tuple[float, ...]
    grad_sync_s: float
    peak_memory_gb: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "replica_s", tuple(float(x) for x in self.replica_s))
        object.__setattr__(self, "peak_memory_gb", tuple(tuple(float(x) for x in r) for r in self.peak_memory_gb))

    def to_dict(self) -> dict[str, Any]:
        return {
            "iteration_s": self.iteration_s,
            "replica_s": list(self.replica_s),
            "grad_sync_s": self.grad_sync_s,
            "peak_memory_gb": [list(r) for r in self.peak_memory_gb],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "estimate") -> PlanEstimate:
        fields = ("iteration_s", "replica_s", "grad_sync_s", "peak_memory_gb")
        d = _expect_keys(data, fields, fields, where)
        try:
            return cls(float(d["iteration_s"]), d["replica_s"], float(d["grad_sync_s"]), d["peak_memory_gb"])
        except (TypeError, ValueError) as err:
            raise PlanError(f"{where}: {err}") from None


@dataclasses.dataclass(frozen=True)
class SolveInfo:
    """How the training planner found a plan: solver status, a proven lower bound on the iteration time (seconds,
    over the searched space, to ~1e-4), the relative gap `(iteration - bound) / iteration`, the wall time of the
    whole call and its limit, and the cells, micro-batch size and number of sub-problems of the search."""

    status: str
    lower_bound_s: float
    gap: float
    solve_s: float
    time_limit_s: float
    cells: int
    microbatch_size: int
    solves: int

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise PlanError(f"solve.status must be one of {list(STATUSES)}, got {self.status!r}")
        for name in ("lower_bound_s", "gap", "solve_s", "time_limit_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
                raise PlanError(f"solve.{name} must be a non-negative number, got {value!r}")
        for name in ("cells", "microbatch_size", "solves"):
            _positive_int(getattr(self, name), f"solve.{name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "solve") -> SolveInfo:
        names = [f.name for f in dataclasses.fields(cls)]
        d = _expect_keys(data, names, names, where)
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """A complete training strategy for one cluster and model; see the module docstring for the semantics."""

    replicas: tuple[Replica, ...]
    num_layers: int
    global_batch: int
    seq_len: int
    device_kinds: tuple[str, ...] = ()
    schedule: str = "1f1b"
    model: str = ""
    cluster: str = ""
    estimate: PlanEstimate | None = None
    solve: SolveInfo | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "replicas", tuple(self.replicas))
        object.__setattr__(self, "device_kinds", tuple(self.device_kinds))
        self._check()

    def _check(self) -> None:
        _positive_int(self.num_layers, "num_layers")
        _positive_int(self.global_batch, "global_batch")
        _positive_int(self.seq_len, "seq_len")
        if self.schedule not in SCHEDULES:
            raise PlanError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not self.replicas:
            raise PlanError("replicas must not be empty")
        if not all(isinstance(k, str) and k for k in self.device_kinds):
            raise PlanError(f"device_kinds must be a list of GPU kind names, got {list(self.device_kinds)}")
        seen: dict[int, str] = {}
        for r, replica in enumerate(self.replicas):
            if not isinstance(replica, Replica):
                raise PlanError(f"replicas[{r}] must be a Replica, got {type(replica).__name__}")
            last = replica.stages[-1]
            if last.layers[1] != self.num_layers:
                raise PlanError(
                    f"replicas[{r}].stages[{len(replica.stages) - 1}].layers stops at {last.layers[1]} "
                    f"but num_layers is {self.num_layers}"
                )
            for s, stage in enumerate(replica.stages):
                for i, d in enumerate(stage.devices):
                    at = f"replicas[{r}].stages[{s}].devices[{i}]"
                    if d in seen:
                        raise PlanError(f"{at}: device {d} is already used by {seen[d]}")
                    seen[d] = f"replicas[{r}].stages[{s}]"
                    if self.device_kinds:
                        if d >= len(self.device_kinds):
                            raise PlanError(f"{at}: device {d} is out of range (cluster has {len(self.device_kinds)})")
                        if self.device_kinds[d] != stage.kind:
                            raise PlanError(
                                f"replicas[{r}].stages[{s}].kind is {stage.kind!r} but device {d} is "
                                f"{self.device_kinds[d]!r}"
                            )
        total = sum(r.batch_share for r in self.replicas)
        if total != self.global_batch:
            raise PlanError(
                f"replicas' batch shares (num_microbatches * microbatch_size) sum to {total}, "
                f"but global_batch is {self.global_batch}"
            )

    def layer_counts(self) -> list[list[int]]:
        """Per replica, the number of blocks per stage (HSPMD's stage layer-count lists)."""
        return [[s.num_layers for s in r.stages] for r in self.replicas]

    def with_devices(self, mapping: Sequence[int], device_kinds: Sequence[str], cluster: str = "") -> TrainPlan:
        """The same plan with device `d` renamed `mapping[d]`, on a cluster whose devices have `device_kinds`
        (e.g. a plan made for the survivors of a failure, expressed in the original cluster's numbering)."""
        replicas = tuple(
            dataclasses.replace(
                r,
                stages=tuple(dataclasses.replace(s, devices=tuple(mapping[d] for d in s.devices)) for s in r.stages),
            )
            for r in self.replicas
        )
        return dataclasses.replace(
            self, replicas=replicas, device_kinds=tuple(device_kinds), cluster=cluster or self.cluster
        )

    @property
    def devices(self) -> tuple[int, ...]:
        """Every device the plan uses, replica by replica, stage by stage."""
        return tuple(d for r in self.replicas for d in r.devices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "cluster": self.cluster,
            "num_layers": self.num_layers,
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "schedule": self.schedule,
            "device_kinds": list(self.device_kinds),
            "replicas": [r.to_dict() for r in self.replicas],
            "estimate": None if self.estimate is None else self.estimate.to_dict(),
            "solve": None if self.solve is None else self.solve.to_dict(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> TrainPlan:
        fields = (
            "format",
            "version",
            "model",
            "cluster",
            "num_layers",
            "global_batch",
            "seq_len",
            "schedule",
            "device_kinds",
            "replicas",
            "estimate",
            "solve",
        )
        d = _expect_keys(data, fields, ("num_layers", "global_batch", "seq_len", "replicas"), "")
        if d.get("format", FORMAT) != FORMAT:
            raise PlanError(f"format must be {FORMAT!r}, got {d['format']!r}")
        if d.get("version", VERSION) not in READABLE_VERSIONS:
            raise PlanError(f"version must be one of {list(READABLE_VERSIONS)}, got {d['version']!r}")
        if not isinstance(d["replicas"], list):
            raise PlanError(f"replicas must be a list, got {d['replicas']!r}")
        replicas = tuple(Replica.from_dict(r, f"replicas[{i}]") for i, r in enumerate(d["replicas"]))
        kinds = d.get("device_kinds", [])
        if not isinstance(kinds, list):
            raise PlanError(f"device_kinds must be a list of GPU kind names, got {kinds!r}")
        estimate, solve = d.get("estimate"), d.get("solve")
        return cls(
            replicas=replicas,
            num_layers=d["num_layers"],
            global_batch=d["global_batch"],
            seq_len=d["seq_len"],
            device_kinds=tuple(kinds),
            schedule=d.get("schedule", "1f1b"),
            model=d.get("model", ""),
            cluster=d.get("cluster", ""),
            estimate=None if estimate is None else PlanEstimate.from_dict(estimate),
            solve=None if solve is None else SolveInfo.from_dict(solve),
        )

    @classmethod
    def from_json(cls, text: str) -> TrainPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"plan is not valid JSON: {err}") from None
        return cls.from_dict(data)
