"""Cluster, model and workload specs, a cost model, and OR-Tools planners for heterogeneous training and serving.

```python
cluster = planners.ClusterSpec.load("examples/clusters/h100x4_l4x4.yaml")   # YAML, JSON, or a built-in name
model = planners.ModelSpec.preset("llama-2-7b")                             # or ModelSpec.from_hf_config(path)
plan = planners.plan_training(cluster, model, planners.TrainWorkload(global_batch=32, seq_len=2048))
planners.TrainPlan.from_json(plan.to_json()) == plan
splan = planners.plan_serving(cluster, [model], planners.ServeWorkload(arrival_rate=5.0, budget_per_hour=10.0))
cascade = planners.plan_cascade(cluster, [small, large], workload, planners.CascadeProfile.load("profile.json"))
```
"""

from planners.cascade import CascadePlan, CascadePoint, plan_cascade
from planners.cascade_profile import CascadeProfile, CascadeSample
from planners.catalog import CATALOG, GPUSpec
from planners.cluster import ClusterSpec, Device, Link, Node
from planners.cost_model import TrainCosts, evaluate_train_plan, memory_excess
from planners.errors import PlanningError, SpecError
from planners.measured import MeasuredProfile
from planners.model import PRESETS, ModelSpec
from planners.plan import COMPRESSIONS, ZERO_STAGES, PlanError, PlanEstimate, Replica, Stage, TrainPlan
from planners.profile import DeviceProfile
from planners.serve import OBJECTIVES as SERVE_OBJECTIVES
from planners.serve import ClassShare, ServePlan, ServeReplica, plan_serving, replan_serving
from planners.simulate import simulate_pipeline, simulate_replica
from planners.simulate_cascade import CascadeStats, simulate_cascade
from planners.simulate_serving import ServeStats, poisson_trace, simulate_serving
from planners.spread import Spread, plan_spread
from planners.topology import Level, Topology
from planners.train import SolveInfo, plan_training, plan_training_with_info, replan_training
from planners.workload import Request, RequestClass, ServeWorkload, TrainWorkload, load_trace

__all__ = [
    "CATALOG",
    "COMPRESSIONS",
    "PRESETS",
    "SERVE_OBJECTIVES",
    "ZERO_STAGES",
    "CascadePlan",
    "CascadePoint",
    "CascadeProfile",
    "CascadeSample",
    "CascadeStats",
    "ClassShare",
    "ClusterSpec",
    "Device",
    "DeviceProfile",
    "GPUSpec",
    "Level",
    "Link",
    "MeasuredProfile",
    "ModelSpec",
    "Node",
    "PlanError",
    "PlanEstimate",
    "PlanningError",
    "Replica",
    "Request",
    "RequestClass",
    "ServeWorkload",
    "ServePlan",
    "ServeReplica",
    "ServeStats",
    "SolveInfo",
    "SpecError",
    "Spread",
    "Stage",
    "Topology",
    "TrainCosts",
    "TrainPlan",
    "TrainWorkload",
    "evaluate_train_plan",
    "load_trace",
    "memory_excess",
    "plan_cascade",
    "plan_serving",
    "plan_spread",
    "poisson_trace",
    "plan_training",
    "plan_training_with_info",
    "replan_serving",
    "replan_training",
    "simulate_cascade",
    "simulate_pipeline",
    "simulate_replica",
    "simulate_serving",
]
