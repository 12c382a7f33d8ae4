"""`jaxhet train` on a plan whose replicas split their optimizer moments across one another (ZeRO across the
holders of each layer): a CP2 x TP2 group that also splits its parameters over CP (zero 3, FSDP) beside a TP2 + TP1
pipeline (zero 1). The single-device loss at every step, and checkpoints that hold whole moments, so a run resumed
from one continues exactly."""

import shutil

import numpy as np

from jaxhet.train import train
from planners import ClusterSpec, Replica, Stage, TrainPlan
from tests.test_train import small_config

KINDS = tuple(d.kind for d in ClusterSpec.load("examples/clusters/emulated8.yaml").devices)


def zero_plan() -> TrainPlan:
    def stage(devices, layers, tp, zero=1):
        return Stage(tuple(devices), KINDS[devices[0]], tp, layers, False, zero=zero)

    return TrainPlan(
        (
            Replica((stage([0, 1, 2, 3], (0, 2), 2, zero=3),), 2, 2, cp=2),
            Replica((stage([4, 5], (0, 1), 2), stage([6], (1, 2), 1)), 4, 1),
        ),
        2,
        8,
        32,
        device_kinds=KINDS,
    )


def test_moments_split_across_replicas_train_as_one_device_and_resume_exactly(tmp_path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(zero_plan().to_json())
    single = train(small_config(tmp_path / "single", steps="4", plan="single"))
    config = small_config(tmp_path / "zero", steps="4", save_every="2", plan=str(plan_file))
    full = train(config)
    # float32 on both paths; the plan reorders sums (micro-batches, replicas, TP partial sums, the reduce-scatter).
    np.testing.assert_allclose(full.losses, single.losses, rtol=1e-5)
    shutil.rmtree(tmp_path / "zero" / "run" / "4")  # as if the run had died after step 2's checkpoint
    resumed = train(config, resume=True)
    assert (resumed.start_step, resumed.end_step) == (2, 4)
    assert resumed.losses == full.losses[2:]
