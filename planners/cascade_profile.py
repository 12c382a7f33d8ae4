"""What a model cascade's routing thresholds buy: per-request confidences and correctness of each model, as data.

A cascade of `k` models answers a request with model 0; while the answering model's confidence (the mean
log-probability of its answer's tokens) is below that model's threshold, the request escalates to the next model.
Which requests escalate and whether the final answer is right are measured offline, one sample per request of an
evaluation set, and stored as JSON:

```json
{"format": "jaxhet.cascade_profile", "models": ["llama-3-8b", "llama-3-70b"],
 "samples": [{"confidence": [-0.41], "correct": [true, true]}, {"confidence": [-1.7], "correct": [false, true]}]}
```

`confidence` has one entry per non-final model, `correct` one per model (`models` is optional and, when given,
must match the cascade's models). From the samples follow, for any thresholds, the fraction of requests reaching
each model and the cascade's quality (the fraction answered correctly). `CascadeProfile.synthetic` builds a
plausible profile (harder requests get lower confidence and fewer right answers) when none was measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from planners import fields
from planners.errors import SpecError

FORMAT = "jaxhet.cascade_profile"


@dataclasses.dataclass(frozen=True)
class CascadeSample:
    """One evaluation request: each non-final model's confidence in its answer, and whether each model was right."""

    confidence: tuple[float, ...]
    correct: tuple[bool, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "confidence", tuple(float(c) for c in self.confidence))
        object.__setattr__(self, "correct", tuple(self.correct))

    def stop(self, thresholds: Sequence[float]) -> int:
        """The model that answers: the first whose confidence reaches its threshold (the last model otherwise)."""
        for i, (c, t) in enumerate(zip(self.confidence, thresholds, strict=True)):
            if c >= t:
                return i
        return len(self.confidence)


@dataclasses.dataclass(frozen=True)
class CascadeProfile:
    """Samples of a `num_models`-model cascade; `models` names the models they were measured on (optional)."""

    samples: tuple[CascadeSample, ...]
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", tuple(self.samples))
        object.__setattr__(self, "models", tuple(self.models))
        if not self.samples:
            raise SpecError("samples must list at least one request")
        k = len(self.samples[0].correct)
        if k < 2:
            raise SpecError(f"samples[0].correct must have one entry per model (at least 2), got {k}")
        if self.models and len(self.models) != k:
            raise SpecError(f"models names {len(self.models)} models but samples[0].correct has {k} entries")
        for i, s in enumerate(self.samples):
            if len(s.correct) != k:
                raise SpecError(f"samples[{i}].correct must have {k} entries, got {len(s.correct)}")
            if len(s.confidence) != k - 1:
                raise SpecError(f"samples[{i}].confidence must have {k - 1} entries, got {len(s.confidence)}")
            if not all(isinstance(b, bool) for b in s.correct):
                raise SpecError(f"samples[{i}].correct must hold true/false values, got {list(s.correct)}")
            if not all(math.isfinite(c) for c in s.confidence):
                raise SpecError(f"samples[{i}].confidence must hold finite numbers, got {list(s.confidence)}")

    @property
    def num_models(self) -> int:
        return len(self.samples[0].correct)

    def stops(self, thresholds: Sequence[float]) -> tuple[int, ...]:
        """The answering model of every sample."""
        if len(thresholds) != self.num_models - 1:
            raise SpecError(f"thresholds must have {self.num_models - 1} entries, got {len(thresholds)}")
        return tuple(s.stop(thresholds) for s in self.samples)

    def reach_counts(self, stops: Sequence[int]) -> tuple[int, ...]:
        """How many samples reach each model, given their answering models."""
        return tuple(sum(1 for s in stops if s >= i) for i in range(self.num_models))

    def quality(self, stops: Sequence[int]) -> float:
        """Fraction of samples answered correctly, given their answering models."""
        return sum(s.correct[i] for s, i in zip(self.samples, stops, strict=True)) / len(self.samples)

    def candidates(self, stage: int, grid: int) -> tuple[float, ...]:
        """`grid` thresholds for model `stage` escalating 0%, ..., 100% of the samples (quantiles of its
        confidences; the last lies just above the highest confidence)."""
        fields.int_at_least(grid, 2, "grid")
        values = sorted(s.confidence[stage] for s in self.samples)
        n = len(values)
        out = []
        for j in range(grid):
            k = round(j * n / (grid - 1))
            out.append(values[k] if k < n else values[-1] + max(1e-6, 1e-6 * abs(values[-1])))
        return tuple(dict.fromkeys(out))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "models": list(self.models),
            "samples": [{"confidence": list(s.confidence), "correct": list(s.correct)} for s in self.samples],
        }

    @classmethod
    def from_dict(cls, data: Any) -> CascadeProfile:
        d = fields.mapping(data, "profile", ("format", "models", "samples"), ("samples",))
        if d.get("format", FORMAT) != FORMAT:
            raise SpecError(f"format must be {FORMAT!r}, got {d['format']!r}")
        if not isinstance(d["samples"], list):
            raise SpecError("samples must be a list of {confidence, correct} entries")
        samples = []
        for i, entry in enumerate(d["samples"]):
            e = fields.mapping(entry, f"samples[{i}]", ("confidence", "correct"), ("confidence", "correct"))
            for name in ("confidence", "correct"):
                if not isinstance(e[name], list):
                    raise SpecError(f"samples[{i}].{name} must be a list, got {e[name]!r}")
            if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in e["confidence"]):
                raise SpecError(f"samples[{i}].confidence must hold numbers, got {e['confidence']}")
            samples.append(CascadeSample(tuple(e["confidence"]), tuple(e["correct"])))
        return cls(tuple(samples), tuple(str(m) for m in d.get("models", [])))

    @classmethod
    def load(cls, path: str | Path) -> CascadeProfile:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cascade profile not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SpecError(f"{path}: cannot parse: {err}") from None
        try:
            return cls.from_dict(data)
        except SpecError as err:
            raise SpecError(f"{path}: {err}") from None

    @classmethod
    def synthetic(cls, num_models: int = 2, count: int = 2000, seed: int = 0) -> CascadeProfile:
        """A made-up profile: each request has a difficulty in [0, 1); model `i` answers it right when the
        difficulty (plus noise) is below its skill (0.55 for the smallest up to 0.9 for the largest), and its
        confidence falls with the difficulty and drops further when its answer is wrong."""
        fields.int_at_least(num_models, 2, "num_models")
        fields.positive_int(count, "count")
        rng = random.Random(seed)
        samples = []
        for _ in range(count):
            difficulty = rng.random()
            skill = [0.55 + 0.35 * i / (num_models - 1) for i in range(num_models)]
            correct = tuple(difficulty + rng.gauss(0.0, 0.1) < s for s in skill)
            confidence = tuple(
                min(0.0, -0.2 - difficulty - (0.0 if correct[i] else 0.4) + rng.gauss(0.0, 0.15))
                for i in range(num_models - 1)
            )
            samples.append(CascadeSample(confidence, correct))
        return cls(tuple(samples))
