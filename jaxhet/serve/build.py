"""Turn loaded models and (optionally) a serving plan into the deployments the HTTP app serves.

Without a plan, each model gets `replicas` engines on distinct local devices. With a `planners.ServePlan`, each
replica of the plan becomes an engine on the local device its device indices name (on a machine without GPUs,
the emulated cluster's devices are the CPU devices in order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax

import planners
from jaxhet.loading import LoadedModel
from jaxhet.serve.async_engine import AsyncEngine
from jaxhet.serve.config import EngineConfig
from jaxhet.serve.deployment import ModelDeployment
from jaxhet.serve.engine import Engine


def _engine(name: str, loaded: LoadedModel, config: EngineConfig, device: jax.Device) -> AsyncEngine:
    """A warmed-up (compiled) engine for `loaded` on `device`, stepping on its own thread."""
    engine = Engine(loaded.model, loaded.tokenizer, config, device=device)
    engine.warmup()
    return AsyncEngine(engine, name=name)


def build_deployments(
    models: Mapping[str, LoadedModel],
    config: EngineConfig,
    *,
    replicas: int = 1,
    plan: planners.ServePlan | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, ModelDeployment]:
    """Served name -> deployment of warmed-up engines."""
    devices = list(devices if devices is not None else jax.devices())
    engines: dict[str, list[AsyncEngine]] = {name: [] for name in models}
    if plan is None:
        if not 1 <= replicas <= len(devices):
            raise ValueError(f"replicas must be between 1 and the {len(devices)} local devices, got {replicas}")
        for name, loaded in models.items():
            engines[name] = [_engine(f"{name}-{i}", loaded, config, devices[i]) for i in range(replicas)]
    else:
        for index, replica in enumerate(plan.replicas):
            where = f"plan replica {index}"
            if replica.model not in models:
                raise ValueError(f"{where} serves {replica.model!r}, which has no weights; known: {sorted(models)}")
            if replica.tp != 1:
                raise ValueError(f"{where}: tp={replica.tp}, but the serving engine runs replicas on one device")
            if replica.role != "both":
                raise ValueError(f"{where}: role {replica.role!r}; the engine serves prefill and decode together")
            if replica.devices[0] >= len(devices):
                raise ValueError(f"{where} uses device {replica.devices[0]}, but {len(devices)} devices are here")
            name, device = replica.model, devices[replica.devices[0]]
            engines[name].append(_engine(f"{name}-{len(engines[name])}", models[name], config, device))
    return {name: ModelDeployment(name, found) for name, found in engines.items() if found}
