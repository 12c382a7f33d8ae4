"""Workloads: what a training iteration processes, and what traffic a deployment must serve.

Serving traffic is one or several request classes, each with its rate, prompt and output lengths and SLOs, so a
planner can send short requests to small GPUs and long ones to big GPUs. A workload file (YAML or JSON) gives them:

```yaml
budget_per_hour: 40        # optional; ttft_slo_s and tpot_slo_s here are the classes' defaults
ttft_slo_s: 2.0
tpot_slo_s: 0.1
classes:
  - {name: chat, rate: 8.0, input_len: 256, output_len: 128}
  - {name: documents, rate: 1.0, input_len: 8192, output_len: 256, ttft_slo_s: 4.0}
```
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from planners import fields
from planners.errors import SpecError
from planners.plan import COMPRESSIONS, ZERO_STAGES


@dataclasses.dataclass(frozen=True)
class TrainWorkload:
    """`global_batch` sequences of `seq_len` tokens per iteration.

    `microbatch_sizes` are the micro-batch sizes the planner may pick from (each must divide `global_batch`;
    by default the powers of two up to 8 that do); `recompute` allows activation recomputation and `zero_stages`
    are the ZeRO stages (`planners.plan.ZERO_STAGES`) the planner may give a stage, each chosen per stage where it
    makes the plan fit or faster. `compress` is the lossiest stage-edge codec the planner may turn on
    (`planners.plan.COMPRESSIONS`, least lossy first; "none": never): it compresses an edge where that makes the
    plan faster under the cost model.
    """

    global_batch: int
    seq_len: int
    microbatch_sizes: tuple[int, ...] = ()
    recompute: bool = True
    compress: str = "none"
    zero_stages: tuple[int, ...] = ZERO_STAGES

    def __post_init__(self) -> None:
        fields.positive_int(self.global_batch, "global_batch")
        fields.one_of(self.compress, COMPRESSIONS, "compress")
        fields.positive_int(self.seq_len, "seq_len")
        if not isinstance(self.recompute, bool):
            raise SpecError(f"recompute must be true or false, got {self.recompute!r}")
        self._check_zero_stages()
        sizes = tuple(self.microbatch_sizes)
        for i, b in enumerate(sizes):
            fields.positive_int(b, f"microbatch_sizes[{i}]")
            if self.global_batch % b:
                raise SpecError(f"microbatch_sizes[{i}] = {b} does not divide global_batch = {self.global_batch}")
        if not sizes:
            sizes = tuple(b for b in (1, 2, 4, 8) if self.global_batch % b == 0)
        object.__setattr__(self, "microbatch_sizes", sizes)

    def _check_zero_stages(self) -> None:
        zeros = tuple(self.zero_stages) if isinstance(self.zero_stages, list | tuple) else None
        if not zeros:
            raise SpecError(f"zero_stages must list at least one of {list(ZERO_STAGES)}, got {self.zero_stages!r}")
        for i, z in enumerate(zeros):
            if z not in ZERO_STAGES or isinstance(z, bool):
                raise SpecError(f"zero_stages[{i}] must be one of {list(ZERO_STAGES)}, got {z!r}")
        if len(set(zeros)) != len(zeros):
            raise SpecError(f"zero_stages repeats a stage: {list(zeros)}")
        object.__setattr__(self, "zero_stages", tuple(sorted(zeros)))

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len


@dataclasses.dataclass(frozen=True)
class Request:
    """One request of a trace: arrival time (s) and prompt/output lengths in tokens."""

    arrival_s: float
    input_len: int
    output_len: int


@dataclasses.dataclass(frozen=True)
class RequestClass:
    """Requests of similar lengths: `rate` requests/s of `input_len` prompt and `output_len` generated tokens, with
    their time-to-first-token and time-per-output-token SLOs in seconds."""

    name: str
    rate: float
    input_len: int
    output_len: int
    ttft_slo_s: float = 1.0
    tpot_slo_s: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"request class name must be a non-empty string, got {self.name!r}")
        where = f"classes.{self.name}"
        fields.positive_float(self.rate, f"{where}.rate")
        fields.positive_int(self.input_len, f"{where}.input_len")
        fields.positive_int(self.output_len, f"{where}.output_len")
        fields.positive_float(self.ttft_slo_s, f"{where}.ttft_slo_s")
        fields.positive_float(self.tpot_slo_s, f"{where}.tpot_slo_s")

    def distance(self, request: Request) -> float:
        """How far `request`'s lengths are from the class's, in log space."""
        return abs(math.log(request.input_len / self.input_len)) + abs(math.log(request.output_len / self.output_len))


@dataclasses.dataclass(frozen=True)
class ServeWorkload:
    """Serving traffic and goals.

    Either `arrival_rate` (requests/s) with typical `input_len`/`output_len`, or a `trace` of requests (see
    `load_trace`), or several request `classes` (then `arrival_rate` is their total rate and the lengths and SLOs
    above are ignored; see `of_classes`). SLOs: time to first token and time per output token, in seconds;
    `budget_per_hour` caps the hourly price of the GPUs used (None: no cap).
    """

    arrival_rate: float = 1.0
    input_len: int = 512
    output_len: int = 128
    ttft_slo_s: float = 1.0
    tpot_slo_s: float = 0.1
    budget_per_hour: float | None = None
    trace: tuple[Request, ...] = ()
    classes: tuple[RequestClass, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise SpecError(f"classes: names must be unique, got {names}")
        total = sum(c.rate for c in self.classes)
        if self.classes and not math.isclose(self.arrival_rate, total, rel_tol=1e-9):
            raise SpecError(f"arrival_rate must be the classes' total rate {total}, got {self.arrival_rate}")
        fields.positive_float(self.arrival_rate, "arrival_rate")
        fields.positive_int(self.input_len, "input_len")
        fields.positive_int(self.output_len, "output_len")
        fields.positive_float(self.ttft_slo_s, "ttft_slo_s")
        fields.positive_float(self.tpot_slo_s, "tpot_slo_s")
        if self.budget_per_hour is not None:
            fields.positive_float(self.budget_per_hour, "budget_per_hour")
        object.__setattr__(self, "trace", tuple(self.trace))

    @classmethod
    def of_classes(
        cls, classes: Sequence[RequestClass], budget_per_hour: float | None = None, trace: Sequence[Request] = ()
    ) -> ServeWorkload:
        """A workload of several request classes (their rates add up to `arrival_rate`)."""
        if not classes:
            raise SpecError("classes must list at least one request class")
        total = sum(c.rate for c in classes)
        return cls(
            arrival_rate=total,
            input_len=round(sum(c.rate * c.input_len for c in classes) / total),
            output_len=round(sum(c.rate * c.output_len for c in classes) / total),
            ttft_slo_s=min(c.ttft_slo_s for c in classes),
            tpot_slo_s=min(c.tpot_slo_s for c in classes),
            budget_per_hour=budget_per_hour,
            trace=tuple(trace),
            classes=tuple(classes),
        )

    @property
    def request_classes(self) -> tuple[RequestClass, ...]:
        """The classes, or the one class of the workload's rate, lengths and SLOs."""
        if self.classes:
            return self.classes
        return (
            RequestClass("all", self.arrival_rate, self.input_len, self.output_len, self.ttft_slo_s, self.tpot_slo_s),
        )

    def for_class(self, request_class: RequestClass) -> ServeWorkload:
        """The one-class workload of `request_class` (what the serving cost model prices), with this budget."""
        c = request_class
        return ServeWorkload(c.rate, c.input_len, c.output_len, c.ttft_slo_s, c.tpot_slo_s, self.budget_per_hour)

    def class_of(self, request: Request) -> RequestClass:
        """The class a request belongs to: the one nearest in (log) prompt and output lengths."""
        return min(self.request_classes, key=lambda c: c.distance(request))

    @classmethod
    def from_trace(
        cls, path: str | Path, input_edges: Sequence[int] = (), *, budget_per_hour: float | None = None, **slos: float
    ) -> ServeWorkload:
        """Rate and mean lengths from a trace file; `slos` sets `ttft_slo_s` and `tpot_slo_s`. With `input_edges`
        (increasing prompt lengths), one request class per bucket `edges[i-1] <= input_len < edges[i]` that holds
        requests, each with its share of the rate, its mean lengths and the SLOs; without, one class."""
        trace = load_trace(path)
        span = trace[-1].arrival_s - trace[0].arrival_s
        rate = (len(trace) - 1) / span if span > 0 else float(len(trace))
        edges = list(input_edges)
        for i, edge in enumerate(edges):
            fields.positive_int(edge, f"input_edges[{i}]")
        if edges != sorted(set(edges)):
            raise SpecError(f"input_edges must be strictly increasing, got {edges}")
        bounds = [0, *edges, math.inf]
        classes = []
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            bucket = [r for r in trace if lo <= r.input_len < hi]
            if bucket:
                name = f"prompt {lo}-{hi - 1}" if hi != math.inf else f"prompt >= {lo}"
                classes.append(_class_of_requests(name, bucket, rate * len(bucket) / len(trace), slos))
        if len(classes) == 1:
            c = classes[0]
            return cls(rate, c.input_len, c.output_len, c.ttft_slo_s, c.tpot_slo_s, budget_per_hour, trace)
        return cls.of_classes(classes, budget_per_hour, trace)

    @classmethod
    def from_dict(cls, data: Any) -> ServeWorkload:
        """A workload from a mapping (a workload file: `classes`, or `arrival_rate` with the lengths; SLOs and
        `budget_per_hour`, the SLOs being the classes' defaults)."""
        allowed = [f.name for f in dataclasses.fields(cls) if f.name != "trace"]
        d = dict(fields.mapping(data, "workload", allowed))
        if "classes" not in d:
            return cls(**d)
        if not isinstance(d["classes"], list):
            raise SpecError(f"classes must be a list of request classes, got {type(d['classes']).__name__}")
        extra = sorted(set(d) - {"classes", "budget_per_hour", "ttft_slo_s", "tpot_slo_s"})
        if extra:
            raise SpecError(f"workload: {extra} cannot be given with classes (each class has its own)")
        slos = {k: d[k] for k in ("ttft_slo_s", "tpot_slo_s") if k in d}
        allowed_class = [f.name for f in dataclasses.fields(RequestClass)]
        classes = [
            RequestClass(
                **{
                    **slos,
                    **fields.mapping(c, f"classes[{i}]", allowed_class, ["name", "rate", "input_len", "output_len"]),
                }
            )
            for i, c in enumerate(d["classes"])
        ]
        return cls.of_classes(classes, d.get("budget_per_hour"))

    @classmethod
    def load(cls, path: str | Path) -> ServeWorkload:
        """Read a workload file (.yaml/.yml or .json)."""
        path = Path(path)
        return cls.from_dict(fields.read_spec_file(path, f"workload file not found: {path}"))


def _class_of_requests(name: str, requests: list[Request], rate: float, slos: dict[str, float]) -> RequestClass:
    mean_in = round(sum(r.input_len for r in requests) / len(requests))
    mean_out = round(sum(r.output_len for r in requests) / len(requests))
    return RequestClass(name, rate, mean_in, mean_out, **slos)


def load_trace(path: str | Path) -> tuple[Request, ...]:
    """Read a CSV trace with header `arrival_s,input_len,output_len` (one request per row, sorted by time)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        expected = ["arrival_s", "input_len", "output_len"]
        if reader.fieldnames != expected:
            raise SpecError(f"{path}: header must be {','.join(expected)}, got {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                rows.append(Request(float(row["arrival_s"]), int(row["input_len"]), int(row["output_len"])))
            except (TypeError, ValueError):
                raise SpecError(f"{path}:{line}: expected a number, an integer and an integer, got {row}") from None
    if not rows:
        raise SpecError(f"{path}: the trace has no requests")
    return tuple(sorted(rows, key=lambda r: r.arrival_s))
