"""Cascade vs the large model alone at (nearly) equal quality, in the cost model and the serving simulator.

For a small -> large cascade on mixed clusters and a few arrival rates: the cascade plan whose quality is within
one point of the large model alone (`min_quality`, latency weight 1), against the large model serving every
request on its own least-latency deployment of the same cluster. Both are planned with the same MILP and
headroom, and simulated under the same Poisson trace (continuous batching, KV budget). The quality profile is the
built-in synthetic one (no measured confidences), so the numbers show the mechanism, not a benchmark's accuracy.

    python bench/planner_cascade.py [--requests 1500] [--out bench/results/planner_cascade.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import planners
from planners.simulate_serving import poisson_trace, simulate_serving

SETTINGS = (
    ("h100x4_l4x4", "llama-3-8b", "llama-3-70b", (2.0, 4.0)),
    ("examples/clusters/h100x16_l4x16.yaml", "llama-3-8b", "llama-3-70b", (8.0, 16.0)),
)
UTILIZATION = 0.8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500, help="requests per simulated trace")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "planner_cascade.json")
    args = parser.parse_args()
    profile = planners.CascadeProfile.synthetic(2)
    rows = []
    header = (
        f"{'cluster':<16}{'rate':>6}  {'plan':<18}{'quality':>8}{'pred s':>8}{'sim mean':>9}{'sim p90':>9}{'$/h':>7}"
    )
    print(header)
    for cluster_name, small, large, rates in SETTINGS:
        cluster = planners.ClusterSpec.load(cluster_name)
        models = [planners.ModelSpec.preset(small), planners.ModelSpec.preset(large)]
        for rate in rates:
            workload = planners.ServeWorkload(
                arrival_rate=rate, input_len=512, output_len=128, ttft_slo_s=2.0, tpot_slo_s=0.1
            )
            trace = poisson_trace(rate, args.requests, workload.input_len, workload.output_len)
            alone = planners.plan_serving(
                cluster, models[1:], workload, objective="min_latency", utilization=UTILIZATION
            )
            alone_sim = simulate_serving(alone, cluster, models[1:], workload, trace)
            alone_quality = sum(s.correct[1] for s in profile.samples) / len(profile.samples)
            plan = planners.plan_cascade(
                cluster, models, workload, profile, weight=1.0, min_quality=alone_quality - 0.01
            )
            sim = planners.simulate_cascade(plan, cluster, models, workload, profile, trace)
            alone_latency = [
                a + b * (workload.output_len - 1) for a, b in zip(alone_sim.ttft_s, alone_sim.tpot_s, strict=True)
            ]
            alone_latency.sort()
            entries = {
                f"{large} alone": (
                    alone_quality,
                    sum(r.routed_rps * r.latency_s for r in alone.replicas) / rate,
                    sum(alone_latency) / len(alone_latency),
                    alone_latency[int(0.9 * len(alone_latency))],
                    alone.price_per_hour,
                ),
                "cascade": (
                    plan.quality,
                    plan.latency_s,
                    sim.mean_latency_s,
                    sim.percentile(90),
                    plan.deployment.price_per_hour,
                ),
            }
            for name, (quality, predicted, mean, p90, price) in entries.items():
                print(
                    f"{cluster.name:<16}{rate:>6g}  {name:<18}"
                    f"{quality:>8.3f}{predicted:>8.2f}{mean:>9.2f}{p90:>9.2f}{price:>7.2f}"
                )
            rows.append(
                {
                    "cluster": cluster.name,
                    "rate": rate,
                    "thresholds": list(plan.thresholds),
                    "reach": list(plan.reach),
                    **{
                        name: dict(
                            zip(("quality", "predicted_s", "sim_mean_s", "sim_p90_s", "price_per_hour"), v, strict=True)
                        )
                        for name, v in entries.items()
                    },
                }
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "planner_cascade",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": "cost model and simulator only; synthetic quality profile",
        "workload": {"input_len": 512, "output_len": 128, "ttft_slo_s": 2.0, "tpot_slo_s": 0.1},
        "utilization": UTILIZATION,
        "results": rows,
    }
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
