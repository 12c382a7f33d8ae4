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
    workload = TrainWorkload(global_batch=4, seq_len=128, recompute=False)
    plan = plan_training(CLUSTER, MODEL, workload, time_limit_s=10.0, num_workers=1, use_all_devices=True)
    assert max(stage.tp for replica in plan.replicas for stage in replica.stages) <= 2
    assert len(plan.devices) == 4
    best = best_plan(CLUSTER, MODEL, workload, use_all_devices=True)
    assert best is not None
    assert max(stage.tp for replica in best[1].replicas for stage in replica.stages) <= 2
    assert plan.estimate.iteration_s == pytest.approx(best[0], rel=1e-3)
