"""Where and when a benchmark ran, and where its JSON result goes, the same way for every script in `bench/`.

A result file is named `{benchmark}_{platform}[_smoke]_{date}.json` and opens with the benchmark's name, the date
(UTC), the device kind and count, the host and the versions that produced it, so anyone can rerun it with the same
script and compare.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import pathlib
import platform
from typing import Any

import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(benchmark: str) -> dict[str, Any]:
    """The fields every result starts with."""
    devices = jax.devices()
    return dict(
        benchmark=benchmark,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=devices[0].device_kind,
        device_count=len(devices),
        platform=devices[0].platform,
        host=platform.node(),
        versions={"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
    )


def save(report: dict[str, Any], out: pathlib.Path, *, smoke: bool = False) -> pathlib.Path:
    """Write `report` (which starts with `provenance`) into `out` and say where."""
    stamp = report["date"].replace(":", "")
    path = out / f"{report['benchmark']}_{report['platform']}{'_smoke' if smoke else ''}_{stamp}.json"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {path}")
    return path
