"""Non-uniform meshes and HSPMD: asymmetric shardings over device groups of different kinds and sizes."""

from meshes.asymmetric_dp import AsymmetricDataParallel
from meshes.executor import PlanExecutor
from meshes.hetmesh import DeviceGroup, HetMesh
from meshes.optimizer import GroupedOptimizer
from meshes.schedules import pipeline_steps
from meshes.staged import StagedModel, StageProgram, StageSpec

__all__ = [
    "AsymmetricDataParallel",
    "DeviceGroup",
    "GroupedOptimizer",
    "HetMesh",
    "PlanExecutor",
    "StageProgram",
    "StageSpec",
    "StagedModel",
    "pipeline_steps",
]
