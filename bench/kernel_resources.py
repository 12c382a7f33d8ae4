"""Registers, spills, shared memory, grid and MMA instructions of every Pallas kernel, compiled for sm_90a on CPU.

Compiles each case of `pallas_kernels.sm90_report` deviceless for an H100 (no GPU needed; the dev extra's CUDA
plugin and nvcc wheels are), prints one table row per kernel and writes bench/results/kernel_resources_sm90.json
with the provenance (jax, jaxlib, plugin and ptxas versions, date) and the shapes of every case.

    python bench/kernel_resources.py                 # all cases
    python bench/kernel_resources.py --only decode   # cases whose name contains "decode"
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pallas_kernels import sm90_report  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def _mma_summary(mma: dict[str, int]) -> str:
    """`wgmma m64n64k16 bf16` style short names of the MMA instruction kinds."""
    short = set()
    for kind in mma:
        family = "wgmma" if kind.startswith("wgmma") else "mma.sync"
        shape = re.search(r"\.(m\d+n\d+k\d+)\.", kind)[1]
        operand = kind.rstrip(".").split(".")[-1 if family == "wgmma" else -2]
        short.add(f"{family} {shape} {operand}")
    return ", ".join(sorted(short)) or "none"


def table(report: dict) -> str:
    """A markdown table: one row per (case, kernel)."""
    lines = [
        "| case | kernel | grid | threads | regs | spill (B) | shared (B) | MMA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, row in report["cases"].items():
        for name, k in row["kernels"].items():
            grid = "×".join(map(str, k["grid"]))
            lines.append(
                f"| {case} | {name} | {grid} | {k['threads']} | {k['registers']} | {k['spill_bytes']} | "
                f"{k['shared_memory']} | {_mma_summary(k['mma'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="compile only the cases whose name contains this")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "kernel_resources_sm90.json")
    args = parser.parse_args()
    report = sm90_report.report([c for c in sm90_report.cases() if args.only in c.name])
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
