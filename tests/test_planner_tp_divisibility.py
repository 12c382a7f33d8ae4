"""The training planner only chooses TP degrees that split the model's heads, kv heads and FFN width evenly."""

import pytest

from planners import ClusterSpec, ModelSpec, TrainWorkload, plan_training
from planners.brute_force import best_plan

# A node of 4 devices invites TP 4, but 2 kv heads allow at most TP 2.
CLUSTER = ClusterSpec.from_dict({"nodes": [{"name": "a", "gpu": "H100", "count": 4}]})
MODEL = ModelSpec("narrow", vocab_size=264, hidden_size=128, ffn_size=344, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("tp,allowed", [(1, True), (2, True), (4, False), (8, False)])
def test_supports_tp(tp, allowed):
    assert MODEL.supports_tp(tp) is allowed


def test_planner_and_brute_force_skip_tp_degrees_the_heads_do_not_allow():
    workload = TrainWorkload(global_batch=4, seq_len=128, recompute=False, zero_stages=(0,))
    plan = plan_training(CLUSTER, MODEL, workload, time_limit_s=10.0, num_workers=1, use_all_devices=True)
    assert max(stage.tp for replica in plan.replicas for stage in replica.stages) <= 2
    assert len(plan.devices) == 4
    best = best_plan(CLUSTER, MODEL, workload, use_all_devices=True)
    assert best is not None
    assert max(stage.tp for replica in best[1].replicas for stage in replica.stages) <= 2
    assert plan.estimate.iteration_s == pytest.approx(best[0], rel=1e-3)


def test_serving_skips_tp_degrees_the_kv_heads_do_not_allow():
    """A 13B-sized model with 2 kv heads on a 4xL4 node: TP 4 would split 2 kv heads four ways."""
    from planners import ServeWorkload, plan_serving
    from planners.serve import candidate_configs

    cluster = ClusterSpec.from_dict({"nodes": [{"gpu": "L4", "count": 4}]})
    model = ModelSpec("gqa13b", 32000, 5120, 13824, 40, 40, 2)
    workload = ServeWorkload(arrival_rate=1.0, input_len=512, output_len=128, ttft_slo_s=5.0, tpot_slo_s=0.5)
    assert {c.perf.tp for c in candidate_configs(cluster, [model], workload)} == {2}
    plan = plan_serving(cluster, [model], workload, time_limit_s=5.0)
    assert plan.replicas and all(r.tp == 2 for r in plan.replicas)
