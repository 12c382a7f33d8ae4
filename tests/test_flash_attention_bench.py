"""`bench/attention.py --smoke` runs end to end (interpret mode off GPU) and writes its JSON report."""

from __future__ import annotations

import importlib.util
import json
import pathlib

BENCH = pathlib.Path(__file__).parent.parent / "bench" / "attention.py"


def test_attention_bench_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = bench.main(["--smoke", "--out", str(tmp_path)])
    report = json.loads(path.read_text())
    assert report["smoke"] and report["jax_version"] and report["device"]
    dense = [r for r in report["rows"] if r["kind"] == "dense"]
    sparse = [r for r in report["rows"] if r["kind"] == "block_sparse"]
    assert {(r["impl"].split("[")[0], r["causal"]) for r in dense} == {("pallas flash", False), ("jax.nn", False)}
    assert [r["target_density"] for r in sparse] == [0.5]
    assert sparse[0]["fwd_vs_dense"] > 0 and sparse[0]["fwd_vs_ideal"] > 0
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in report["rows"])
    assert "pallas flash" in capsys.readouterr().out
