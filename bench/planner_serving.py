"""Serving planner in the cost model: which GPU kinds win per request size, and mixed vs homogeneous fleets.

Two checks of findings reported for heterogeneous serving (e.g. Melange; arXiv 2502.00722), in this project's
cost model only (no measurements):
1. min-cost serving of a fixed rate, per request-size class: the price with each single GPU kind available vs
   with all kinds available, and the kinds the mixed plan buys;
2. max throughput under a price budget: the mixed fleet (colocated replicas only, and with prefill/decode
   disaggregation allowed) vs the best single-kind fleet, and the SLO attainment the serving simulator finds for
   the mixed plan under Poisson arrivals at 90% of its planned capacity.

    python bench/planner_serving.py [--model llama-2-7b] [--out bench/results/planner_serving.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import planners
from planners.simulate_serving import poisson_trace, simulate_serving

KINDS = ("H100", "A100-80GB", "L40S", "L4", "A10G")
SIZES = {"short": (128, 32), "medium": (512, 128), "long": (2048, 512)}
RATE = 8.0
BUDGETS = (5.0, 10.0, 20.0)


def fleet(kinds: tuple[str, ...]) -> planners.ClusterSpec:
    """Two 8-GPU nodes of each kind."""
    nodes = [{"name": k.lower(), "gpu": k, "count": 8, "repeat": 2} for k in kinds]
    return planners.ClusterSpec.from_dict({"name": "+".join(kinds), "nodes": nodes})


def solve(
    kinds: tuple[str, ...],
    model: planners.ModelSpec,
    workload: planners.ServeWorkload,
    objective: str,
    disaggregate: bool = True,
) -> planners.ServePlan | None:
    try:
        return planners.plan_serving(fleet(kinds), [model], workload, objective=objective, disaggregate=disaggregate)
    except planners.PlanningError:
        return None


def mix(plan: planners.ServePlan) -> str:
    """GPUs bought per kind and role, e.g. '2xH100 + 4xL40S(decode)'."""
    counts: dict[str, int] = {}
    for r in plan.replicas:
        key = r.kind if r.role == "both" else f"{r.kind}({r.role})"
        counts[key] = counts.get(key, 0) + r.tp
    return " + ".join(f"{n}x{k}" for k, n in sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--out", type=Path, default=Path("bench/results/planner_serving.json"))
    args = parser.parse_args()
    model = planners.ModelSpec.resolve(args.model)
    results: dict[str, list] = {"min_cost": [], "max_throughput": []}

    print(f"1. min-cost $/h to serve {RATE} req/s of {model.name} (TTFT <= 2 s, TPOT <= 0.1 s)")
    print(f"{'size':>7} " + " ".join(f"{k:>10}" for k in KINDS) + f" {'mixed':>8}  mixed buys")
    for name, (inp, out) in SIZES.items():
        workload = planners.ServeWorkload(
            arrival_rate=RATE, input_len=inp, output_len=out, ttft_slo_s=2.0, tpot_slo_s=0.1
        )
        single = {k: solve((k,), model, workload, "min_cost") for k in KINDS}
        mixed = solve(KINDS, model, workload, "min_cost")
        cells = " ".join(f"{p.price_per_hour:>10.2f}" if p else f"{'-':>10}" for p in single.values())
        print(
            f"{name:>7} {cells} {mixed.price_per_hour if mixed else float('nan'):>8.2f}  {mix(mixed) if mixed else '-'}"
        )
        results["min_cost"].append(
            {
                "size": name,
                "input_len": inp,
                "output_len": out,
                "single": {k: p.price_per_hour if p else None for k, p in single.items()},
                "mixed": mixed.price_per_hour if mixed else None,
                "mixed_gpus": mix(mixed) if mixed else None,
            }
        )

    print(f"\n2. max requests/s of {model.name} (medium requests) within a budget")
    print(f"{'$/h':>6} {'best single kind':>22} {'mixed colocated':>16} {'mixed':>8} {'sim SLO @90%':>13}  mixed buys")
    inp, out = SIZES["medium"]
    for budget in BUDGETS:
        workload = planners.ServeWorkload(
            arrival_rate=1.0, input_len=inp, output_len=out, ttft_slo_s=2.0, tpot_slo_s=0.1, budget_per_hour=budget
        )
        single = {k: solve((k,), model, workload, "max_throughput") for k in KINDS}
        best_kind = max(single, key=lambda k: single[k].throughput_scale if single[k] else 0.0)
        best = single[best_kind]
        mixed = solve(KINDS, model, workload, "max_throughput")
        colocated = solve(KINDS, model, workload, "max_throughput", disaggregate=False)
        best_txt = f"{best.throughput_scale:.1f} ({best_kind})" if best else "-"
        attained = None
        if mixed:
            trace = poisson_trace(0.9 * mixed.throughput_scale, 3000, inp, out)
            attained = simulate_serving(mixed, fleet(KINDS), [model], workload, trace).slo_attainment
        print(
            f"{budget:>6.1f} {best_txt:>22} {colocated.throughput_scale if colocated else 0.0:>16.1f} "
            f"{mixed.throughput_scale if mixed else 0.0:>8.1f} {attained or 0.0:>13.3f}  {mix(mixed) if mixed else '-'}"
        )
        results["max_throughput"].append(
            {
                "budget_per_hour": budget,
                "best_single_kind": best_kind,
                "best_single_rps": best.throughput_scale if best else None,
                "mixed_colocated_rps": colocated.throughput_scale if colocated else None,
                "mixed_rps": mixed.throughput_scale if mixed else None,
                "simulated_slo_attainment_at_90pct": attained,
                "mixed_gpus": mix(mixed) if mixed else None,
            }
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": model.name, **results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
