"""What a Hugging Face checkpoint says about generating from it, beside its weights: the token ids that end a
reply (`eos_token_id` of `config.json` and `generation_config.json`, each an int or a list) and the sampling
settings a request that leaves them unset gets (`temperature`, `top_p`, `top_k` of `generation_config.json`).

Like vLLM, the sampling defaults are taken as written and `do_sample` is not consulted: a checkpoint that ships a
temperature means it.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from pathlib import Path
from typing import Any

from jaxhet.models.config import ConfigError

GENERATION_CONFIG = "generation_config.json"


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when there is no such file; anything else there is a `ConfigError`."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _ids(value: Any, where: str) -> list[int]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
        raise ConfigError(f"{where}: eos_token_id must be a token id or a list of them, got {value!r}")
    return values


def eos_token_ids(directory: Path) -> list[int]:
    """Every EOS id of the checkpoint in `directory`, `config.json`'s first, without repeats."""
    found = []
    for name in ("config.json", GENERATION_CONFIG):
        found += _ids(read_json(directory / name).get("eos_token_id"), str(directory / name))
    return list(dict.fromkeys(found))


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """Sampling settings for requests that leave them unset; None: the API's own default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    @classmethod
    def from_checkpoint(cls, directory: Path) -> SamplingDefaults:
        """The defaults `generation_config.json` in `directory` sets (none without that file)."""
        path = directory / GENERATION_CONFIG
        config = read_json(path)
        checks = {
            "temperature": (lambda v: 0 <= v <= 2, "a number in [0, 2]"),
            "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
            "top_k": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
        }
        values = {}
        for name, (valid, accepted) in checks.items():
            value = config.get(name)
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not valid(value):
                raise ConfigError(f"{path}: {name} must be {accepted}, got {value!r}")
            values[name] = value
        return cls(**values)
