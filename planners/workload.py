"""Workloads: what a training iteration processes, and what traffic a deployment must serve."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from planners import fields
from planners.errors import SpecError


@dataclasses.dataclass(frozen=True)
class TrainWorkload:
    """`global_batch` sequences of `seq_len` tokens per iteration.

    `microbatch_sizes` are the micro-batch sizes the planner may pick from (each must divide `global_batch`;
    by default the powers of two up to 8 that do); `recompute` allows activation recomputation.
    """

    global_batch: int
    seq_len: int
    microbatch_sizes: tuple[int, ...] = ()
    recompute: bool = True

    def __post_init__(self) -> None:
        fields.positive_int(self.global_batch, "global_batch")
        fields.positive_int(self.seq_len, "seq_len")
        sizes = tuple(self.microbatch_sizes)
        for i, b in enumerate(sizes):
            fields.positive_int(b, f"microbatch_sizes[{i}]")
            if self.global_batch % b:
                raise SpecError(f"microbatch_sizes[{i}] = {b} does not divide global_batch = {self.global_batch}")
        if not sizes:
            sizes = tuple(b for b in (1, 2, 4, 8) if self.global_batch % b == 0)
        object.__setattr__(self, "microbatch_sizes", sizes)

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
class ServeWorkload:
    """Serving traffic and goals.

    Either `arrival_rate` (requests/s) with typical `input_len`/`output_len`, or a `trace` of requests (see
    `load_trace`). SLOs: time to first token and time per output token, in seconds; `budget_per_hour` caps the
    hourly price of the GPUs used (None: no cap).
    """

    arrival_rate: float = 1.0
    input_len: int = 512
    output_len: int = 128
    ttft_slo_s: float = 1.0
    tpot_slo_s: float = 0.1
    budget_per_hour: float | None = None
    trace: tuple[Request, ...] = ()

    def __post_init__(self) -> None:
        fields.positive_float(self.arrival_rate, "arrival_rate")
        fields.positive_int(self.input_len, "input_len")
        fields.positive_int(self.output_len, "output_len")
        fields.positive_float(self.ttft_slo_s, "ttft_slo_s")
        fields.positive_float(self.tpot_slo_s, "tpot_slo_s")
        if self.budget_per_hour is not None:
            fields.positive_float(self.budget_per_hour, "budget_per_hour")
        object.__setattr__(self, "trace", tuple(self.trace))

    @classmethod
    def from_trace(cls, path: str | Path, **goals: float | None) -> ServeWorkload:
        """Rate and mean lengths from a trace file; `goals` sets the SLOs and the budget."""
        trace = load_trace(path)
        span = trace[-1].arrival_s - trace[0].arrival_s
        rate = (len(trace) - 1) / span if span > 0 else float(len(trace))
        mean_in = round(sum(r.input_len for r in trace) / len(trace))
        mean_out = round(sum(r.output_len for r in trace) / len(trace))
        return cls(arrival_rate=rate, input_len=mean_in, output_len=mean_out, trace=trace, **goals)


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
