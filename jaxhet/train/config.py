"""`jaxhet train` configuration: plain frozen data, from a YAML file plus `key=value` overrides, validated."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from jaxhet.data import DataConfig
from jaxhet.models.config import DTYPES, TRAINABLE_BACKENDS, ConfigError

PLAN_CHOICES = ("auto", "single")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to `min_lr_ratio * learning_rate`, and global-norm clipping."""

    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip <= 0:
            raise ConfigError(f"optim.grad_clip must be > 0, got {self.grad_clip}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train, on what, for how long, and where checkpoints go.

    `model` is "tiny" (a small Llama sized for CPUs, shaped further by `num_layers`, `hidden_size`, ...) or a local
    Hugging Face Llama directory to fine-tune. `plan` is "auto" (ask the planner for `cluster`), "single" (one
    device: the reference every plan must match) or a plan JSON file. `use_all_devices` makes the planner keep
    every device of `cluster` busy, so that an emulated cluster runs a truly heterogeneous plan; turn it off to let
    the planner leave devices idle where its cost model says that is faster. `dtype` is the compute dtype:
    "bfloat16" runs matmuls and activations in bfloat16 while parameters, gradients and optimizer state stay float32
    master copies (mixed precision); the loss is always computed in float32.
    """

    model: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 344
    dtype: str = "float32"
    attention_backend: str = "xla"
    data: DataConfig = DataConfig(seq_len=128, batch_size=16, max_documents=2000)
    optim: OptimConfig = OptimConfig()
    steps: int = 300
    plan: str = "auto"
    cluster: str = "emulated8"
    use_all_devices: bool = True
    checkpoint_dir: str = "runs/latest"
    save_every: int = 100
    keep: int = 3
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "save_every", "keep", "log_every", "num_layers", "hidden_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.attention_backend not in TRAINABLE_BACKENDS:
            raise ConfigError(
                f"attention_backend must be one of {', '.join(TRAINABLE_BACKENDS)} for training, "
                f"got {self.attention_backend!r}"
            )
        if self.plan not in PLAN_CHOICES and not Path(self.plan).is_file():
            raise ConfigError(
                f"plan must be one of {', '.join(PLAN_CHOICES)} or an existing plan file, got {self.plan!r}"
            )
        if self.data.length_buckets is not None and self.plan not in PLAN_CHOICES:
            raise ConfigError(
                f"plan must be one of {', '.join(PLAN_CHOICES)} with data.length_buckets (each bucket is planned for "
                f"its own batch shape; a plan file fits one), got {self.plan!r}"
            )
        _check_directory_path("checkpoint_dir", Path(self.checkpoint_dir))

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Mapping[str, str] | None = None) -> TrainConfig:
        """Read a YAML file (optional), then apply dotted `key=value` overrides such as `data.seq_len=64`."""
        values: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} not found")
            loaded = _yaml(path.read_text(), str(path)) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path} must hold a mapping of fields")
            values = loaded
        for key, raw in (overrides or {}).items():
            _override(values, key, _yaml(raw, f"--set {key}"))
        return _build(cls, values, "")

    def to_yaml(self) -> str:
        """The config as YAML that `load` reads back to an equal config."""
        return yaml.safe_dump(_plain(dataclasses.asdict(self)), sort_keys=False)


def _plain(value: Any) -> Any:
    """Dataclass fields as YAML's plain types: tuples become lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _yaml(text: str, source: str) -> Any:
    """Parsed YAML; ConfigError naming `source` and, where YAML knows it, the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None


def _override(values: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` in nested `values`; ConfigError if a part of it is already set to a plain value."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {key}: every part of a dotted key must be non-empty")
    target = values
    for depth, parent in enumerate(parts[:-1]):
        target = target.setdefault(parent, {})
        if not isinstance(target, dict):
            prefix = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {key} conflicts with {prefix}={target!r}: {prefix} is not a group of fields")
    if isinstance(target.get(parts[-1]), dict) and not isinstance(value, dict):
        raise ConfigError(f"--set {key}={value!r} conflicts with the fields already set under {key}")
    target[parts[-1]] = value


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _check_directory_path(name: str, directory: Path) -> None:
    """ConfigError if `directory` can never be a directory: it, or the nearest part of it that exists, is a file."""
    existing = _nearest_existing(directory)
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"{name}: {existing} is a file, so {directory} cannot be a directory")


def check_writable_directory(name: str, directory: Path) -> None:
    """ConfigError unless `directory` is, or can be made, a directory this process writes in: the nearest part of
    it that exists must be a directory it may write (a read-only file system or missing permission is refused).
    Only writers check this: a run directory on read-only storage still serves."""
    _check_directory_path(name, directory)
    existing = _nearest_existing(directory)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}: {existing} is not writable, so {directory} cannot be written")


# What a checkpoint's arrays and data position are shaped by: a resumed run must keep each as it was saved.
RESUME_FIXED = (
    "model",
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "seed",
    "data.source",
    "data.tokenizer",
    "data.seq_len",
    "data.batch_size",
    "data.seed",
    "data.max_documents",
    "data.validation_fraction",
    "data.length_buckets",
)


def check_resume(saved: TrainConfig, requested: TrainConfig) -> None:
    """Refuse to resume `saved` (the run directory's config.yaml) as `requested` when a field the checkpoint's
    shapes or data position depend on changed, naming it (ConfigError). Other fields may change; how a changed
    schedule reads is `jaxhet.train.step.schedule_change`."""
    for name in RESUME_FIXED:
        before, after = _dotted(saved, name), _dotted(requested, name)
        if before != after:
            raise ConfigError(
                f"--resume cannot change {name} (the run was saved with {before!r}, now {after!r}); "
                f"start a new checkpoint_dir instead"
            )


def changed_fields(before: TrainConfig, after: TrainConfig, names: tuple[str, ...]) -> list[str]:
    """`name old → new` for each of the dotted `names` whose value differs."""
    return [f"{n} {_dotted(before, n)} → {_dotted(after, n)}" for n in names if _dotted(before, n) != _dotted(after, n)]


def _dotted(config: Any, name: str) -> Any:
    for part in name.split("."):
        config = getattr(config, part)
    return config


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """Instantiate a frozen dataclass from a mapping, converting types and naming unknown or mistyped fields."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown field {prefix}{unknown[0]}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{name} must be a mapping of fields")
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _convert(value, kind, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def _convert(value: Any, kind: Any, name: str) -> Any:
    options = (
        typing.get_args(kind)
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
        else (kind,)
    )
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option in (int, str, bool) and type(value) is option:
            return value
        if option is str and isinstance(value, (int, float)):
            return str(value)
        if typing.get_origin(option) is tuple:  # the dataclass checks the value and names what it allows
            return tuple(value) if isinstance(value, list) else value
    allowed = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{name} must be {allowed}, got {value!r}")
