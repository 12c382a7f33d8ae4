"""Cluster, model and workload specs, a cost model, and OR-Tools planners for heterogeneous training and serving."""

from planners.plan import PlanError, PlanEstimate, Replica, Stage, TrainPlan

__all__ = ["PlanError", "PlanEstimate", "Replica", "Stage", "TrainPlan"]
