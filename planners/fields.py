"""Small validators shared by the spec classes: each names the field it rejects."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from planners.errors import SpecError


def read_spec_file(path: Path, missing: str) -> Any:
    """The data of a .json or .yaml/.yml spec file: FileNotFoundError(`missing`) when there is none, SpecError
    naming the file when it does not parse."""
    if not path.is_file():
        raise FileNotFoundError(missing)
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise SpecError(f"{path}: cannot parse: {err}") from None


def positive_int(value: Any, field: str, *, error: type[ValueError] = SpecError) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise error(f"{field} must be a positive integer, got {value!r}")
    return value


def int_at_least(value: Any, least: int, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise SpecError(f"{field} must be an integer >= {least}, got {value!r}")
    return value


def positive_float(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SpecError(f"{field} must be a positive number, got {value!r}")
    return float(value)


def non_negative_float(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise SpecError(f"{field} must be a non-negative number, got {value!r}")
    return float(value)


def fraction(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise SpecError(f"{field} must be a number in (0, 1], got {value!r}")
    return float(value)


def one_of(value: Any, allowed: Sequence[str], field: str) -> str:
    if value not in allowed:
        raise SpecError(f"{field} must be one of {list(allowed)}, got {value!r}")
    return value


def mapping(
    data: Any,
    field: str,
    allowed: Sequence[str],
    required: Sequence[str] = (),
    *,
    error: type[ValueError] = SpecError,
) -> Mapping[str, Any]:
    """Check that `data` is a mapping with only `allowed` keys and every `required` one."""
    if not isinstance(data, Mapping):
        raise error(f"{field} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise error(f"{field}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    missing = [k for k in required if k not in data]
    if missing:
        raise error(f"{field}: missing required field(s) {missing}")
    return data
