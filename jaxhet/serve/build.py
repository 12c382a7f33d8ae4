"""Turn loaded models and (optionally) a serving plan into the deployments the HTTP app serves.

Without a plan, each model gets `replicas` engines on distinct local devices. With a `planners.ServePlan`, each
replica of the plan becomes an engine (prefill, decode or both) on the local devices its device indices name,
tensor-parallel over them when it has several (on a machine without GPUs, the emulated cluster's devices are the
CPU devices in order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

import planners
from jaxhet.loading import LoadedModel
from jaxhet.serve.async_engine import AsyncEngine
from jaxhet.serve.config import EngineConfig
from jaxhet.serve.deployment import CascadeDeployment, DisaggregatedDeployment, ModelDeployment
from jaxhet.serve.engine import Engine


def _engine(name: str, loaded: LoadedModel, config: EngineConfig, devices: Sequence[jax.Device]) -> AsyncEngine:
    """A warmed-up (compiled) engine for `loaded` on `devices` (tensor-parallel over several), on its own thread;
    each device reads its block of the weights from `loaded.weights_dir` when they were left there."""
    engine = Engine(loaded.model, loaded.tokenizer, config, devices=devices, weights_dir=loaded.weights_dir)
    engine.warmup()
    return AsyncEngine(engine, name=name)


def _described(loaded: LoadedModel) -> dict[str, Any]:
    """What a deployment takes from the checkpoint beside the model: how to prompt it and sample from it."""
    return {"chat_template": loaded.chat_template, "sampling_defaults": loaded.sampling_defaults}


def build_deployments(
    models: Mapping[str, LoadedModel],
    config: EngineConfig,
    *,
    replicas: int = 1,
    plan: planners.ServePlan | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, ModelDeployment]:
    """Served name -> deployment of warmed-up engines.

    A plan's replicas with role "both" serve requests whole; a model whose replicas are split into "prefill" and
    "decode" roles becomes a `DisaggregatedDeployment` that hands each request's KV cache from one to the other.
    """
    devices = list(devices if devices is not None else jax.devices())
    if plan is None:
        if not 1 <= replicas <= len(devices):
            raise ValueError(f"replicas must be between 1 and the {len(devices)} local devices, got {replicas}")
        return {
            name: _deployment(name, loaded, config, {"both": [[devices[i]] for i in range(replicas)]})
            for name, loaded in models.items()
        }
    placed: dict[str, dict[str, list[list[jax.Device]]]] = {}
    for index, replica in enumerate(plan.replicas):
        where = f"plan replica {index}"
        if replica.model not in models:
            raise ValueError(f"{where} serves {replica.model!r}, which has no weights; known: {sorted(models)}")
        if max(replica.devices) >= len(devices):
            raise ValueError(f"{where} uses device {max(replica.devices)}, but {len(devices)} devices are here")
        kv_heads = models[replica.model].model.config.num_kv_heads
        if kv_heads % replica.tp:
            raise ValueError(f"{where}: tp={replica.tp} does not divide {replica.model!r}'s {kv_heads} kv heads")
        group = [devices[d] for d in replica.devices]
        placed.setdefault(replica.model, {}).setdefault(replica.role, []).append(group)
    return {name: _deployment(name, models[name], config, roles) for name, roles in placed.items()}


def _deployment(
    name: str, loaded: LoadedModel, config: EngineConfig, roles: Mapping[str, list[list[jax.Device]]]
) -> ModelDeployment:
    if set(roles) == {"both"}:
        engines = [_engine(f"{name}-{i}", loaded, config, d) for i, d in enumerate(roles["both"])]
        return ModelDeployment(name, engines, **_described(loaded))
    if set(roles) != {"prefill", "decode"}:
        raise ValueError(
            f"the plan gives {name!r} replicas with roles {sorted(roles)}; a model is served either by 'both' "
            "replicas or by 'prefill' and 'decode' replicas together"
        )

    def engines(role: str) -> list[AsyncEngine]:
        return [_engine(f"{name}-{role}-{i}", loaded, config, d) for i, d in enumerate(roles[role])]

    return DisaggregatedDeployment(name, engines("decode"), prefill=engines("prefill"), **_described(loaded))


def build_cascade(
    models: Mapping[str, LoadedModel],
    config: EngineConfig,
    plan: planners.CascadePlan,
    *,
    name: str = "cascade",
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, ModelDeployment | CascadeDeployment]:
    """The deployments of a cascade plan: every model on the replicas the plan gives it, each servable by its own
    name, and the cascade itself under `name` (its models in plan order, escalating below the plan's thresholds)."""
    missing = [m for m in plan.models if m not in models]
    if missing:
        raise ValueError(f"the cascade plan needs weights for {missing}; given: {sorted(models)}")
    deployments: dict[str, ModelDeployment | CascadeDeployment] = dict(
        build_deployments(models, config, plan=plan.deployment, devices=devices)
    )
    unplaced = [m for m in plan.models if m not in deployments]
    if unplaced:
        raise ValueError(f"the cascade plan gives no replica to {unplaced}")
    if name in deployments:
        raise ValueError(f"the cascade's name {name!r} is also a model's name; choose another")
    deployments[name] = CascadeDeployment(name, [deployments[m] for m in plan.models], list(plan.thresholds))
    return deployments
