"""Turn loaded models and (optionally) a serving plan into the deployments the HTTP app serves.

Without a plan, each model gets `replicas` engines on distinct local devices. With a `planners.ServePlan`, each
replica of the plan becomes an engine (prefill, decode or both) on the local devices its device indices name,
tensor-parallel over them when it has several (on a machine without GPUs, the emulated cluster's devices are the
CPU devices in order). `place` checks a plan against the weights and devices at hand, naming the plan field at
fault; live re-planning (`jaxhet.serve.replan`) uses it too.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax

import planners
from jaxhet.loading import LoadedModel
from jaxhet.serve.async_engine import AsyncEngine
from jaxhet.serve.config import EngineConfig, FieldError
from jaxhet.serve.deployment import CascadeDeployment, ModelDeployment
from jaxhet.serve.engine import Engine


@dataclasses.dataclass(frozen=True)
class Placement:
    """One replica to run: `model` on `devices` (tensor-parallel over several) in `role` ("both", "prefill" or
    "decode"), the plan routing `routed_rps` requests/s to it. `key` is what a running replica is recognised by
    across plans; neither role nor routed rate is part of it, since a replica changes them without touching its
    weights."""

    model: str
    devices: tuple[jax.Device, ...]
    role: str
    routed_rps: float = 1.0

    @property
    def key(self) -> tuple[str, tuple[jax.Device, ...]]:
        return self.model, self.devices


def new_engine(placement: Placement, loaded: LoadedModel, config: EngineConfig, node: str = "local") -> AsyncEngine:
    """A warmed-up (compiled) engine for `loaded` on the placement's devices (of `node`), on its own thread; each
    device reads its block of the weights from `loaded.weights_dir` when they were left there."""
    engine = Engine(loaded.model, loaded.tokenizer, config, devices=placement.devices, weights_dir=loaded.weights_dir)
    engine.warmup()
    return AsyncEngine(engine, name=placement.model, node=node)


def _described(loaded: LoadedModel) -> dict[str, Any]:
    """What a deployment takes from the checkpoint beside the model: how to prompt it and sample from it."""
    return {"chat_template": loaded.chat_template, "sampling_defaults": loaded.sampling_defaults}


def _index_list(value: object) -> bool:
    return isinstance(value, Sequence) and all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in value
    )


def _place_one(
    where: str, replica: planners.ServeReplica, models: Mapping[str, LoadedModel], devices: Sequence[jax.Device]
) -> Placement:
    if replica.model not in models:
        message = f"{where}.model: {replica.model!r} has no weights in this server; known: {sorted(models)}"
        raise FieldError(f"{where}.model", message)
    indices = replica.devices
    if not indices or not _index_list(indices) or not all(0 <= i < len(devices) for i in indices):
        message = f"{where}.devices must list device indices in [0, {len(devices)}), got {list(indices)!r}"
        raise FieldError(f"{where}.devices", message)
    if len(set(indices)) != len(indices):
        raise FieldError(f"{where}.devices", f"{where}.devices names a device twice: {list(indices)}")
    if replica.tp != len(indices):
        message = f"{where}.tp is {replica.tp!r}, but the replica has {len(indices)} device(s)"
        raise FieldError(f"{where}.tp", message)
    kv_heads = models[replica.model].model.config.num_kv_heads
    if kv_heads % replica.tp:
        message = f"{where}.tp: tp={replica.tp} does not divide {replica.model!r}'s {kv_heads} kv heads"
        raise FieldError(f"{where}.tp", message)
    return Placement(replica.model, tuple(devices[i] for i in indices), replica.role, replica.routed_rps)


def place(
    plan: planners.ServePlan, models: Mapping[str, LoadedModel], devices: Sequence[jax.Device]
) -> list[Placement]:
    """The plan's replicas on `devices`; FieldError naming the field (`replicas[i].devices`, ...) of a replica
    these weights and devices cannot run, of one repeating another's model and devices, or `replicas` when a model
    has prefill replicas without decode ones (or the reverse)."""
    placements: dict[tuple, tuple[str, Placement]] = {}
    for index, replica in enumerate(plan.replicas):
        where = f"replicas[{index}]"
        placement = _place_one(where, replica, models, devices)
        if placement.key in placements:
            first = placements[placement.key][0]
            raise FieldError(where, f"{where} repeats {first}'s model and devices")
        placements[placement.key] = where, placement
    placed = [placement for _, placement in placements.values()]
    for model in {p.model for p in placed}:
        roles = {p.role for p in placed if p.model == model}
        if ("prefill" in roles) != ("decode" in roles):
            have, lack = ("prefill", "decode") if "prefill" in roles else ("decode", "prefill")
            raise FieldError("replicas", f"replicas: {model!r} has {have} replicas but no {lack} replica")
    return placed


def by_role(placed: Sequence[tuple[Placement, AsyncEngine]]) -> dict[str, dict[str, list[AsyncEngine]]]:
    """Model -> role -> its engines in plan order, each engine named after its model, role and position
    (`small-0` for whole-request replicas, `small-prefill-0`, `small-decode-0`) and given its placement's routed
    rate."""
    grouped: dict[str, dict[str, list[AsyncEngine]]] = {}
    for placement, engine in placed:
        engines = grouped.setdefault(placement.model, {}).setdefault(placement.role, [])
        role = "" if placement.role == "both" else f"-{placement.role}"
        engine.name = f"{placement.model}{role}-{len(engines)}"
        engine.routed_rps = placement.routed_rps
        engines.append(engine)
    return grouped


def deployment(name: str, loaded: LoadedModel, roles: Mapping[str, Sequence[AsyncEngine]]) -> ModelDeployment:
    """The deployment of `name` over engines by role (as `by_role` groups them)."""
    return ModelDeployment(
        name,
        roles.get("both", ()),
        prefill=roles.get("prefill", ()),
        decode=roles.get("decode", ()),
        **_described(loaded),
    )


def build_deployments(
    models: Mapping[str, LoadedModel],
    config: EngineConfig,
    *,
    replicas: int = 1,
    plan: planners.ServePlan | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, ModelDeployment]:
    """Served name -> deployment of warmed-up engines.

    A plan's replicas with role "both" serve requests whole; those with roles "prefill" and "decode" hand each
    request's KV cache from one to the other; a model may have both kinds (`ModelDeployment`).
    """
    devices = list(devices if devices is not None else jax.devices())
    if plan is None:
        if not 1 <= replicas <= len(devices):
            raise ValueError(f"replicas must be between 1 and the {len(devices)} local devices, got {replicas}")
        placements = [Placement(name, (devices[i],), "both") for name in models for i in range(replicas)]
    else:
        placements = place(plan, models, devices)
    placed = [(p, new_engine(p, models[p.model], config)) for p in placements]
    return {name: deployment(name, models[name], roles) for name, roles in by_role(placed).items()}


def build_cascade(
    models: Mapping[str, LoadedModel],
    config: EngineConfig,
    plan: planners.CascadePlan,
    *,
    name: str = "cascade",
    devices: Sequence[jax.Device] | None = None,
    decide_tokens: int = CascadeDeployment.decide_tokens,
) -> dict[str, ModelDeployment | CascadeDeployment]:
    """The deployments of a cascade plan: every model on the replicas the plan gives it, each servable by its own
    name, and the cascade itself under `name` (its models in plan order, escalating below the plan's thresholds,
    deciding on the first `decide_tokens` tokens of each answer)."""
    missing = [m for m in plan.models if m not in models]
    if missing:
        raise ValueError(f"the cascade plan needs weights for {missing}; given: {sorted(models)}")
    deployments = build_deployments(models, config, plan=plan.deployment, devices=devices)
    return add_cascade(deployments, plan, name, decide_tokens)


def add_cascade(
    deployments: Mapping[str, ModelDeployment],
    plan: planners.CascadePlan,
    name: str,
    decide_tokens: int = CascadeDeployment.decide_tokens,
) -> dict[str, ModelDeployment | CascadeDeployment]:
    """`deployments` (every model of the cascade placed, each servable by its own name) and the cascade itself
    under `name` (its models in plan order, escalating below the plan's thresholds, deciding on the first
    `decide_tokens` tokens of each answer)."""
    unplaced = [m for m in plan.models if m not in deployments]
    if unplaced:
        raise ValueError(f"the cascade plan gives no replica to {unplaced}")
    if name in deployments:
        raise ValueError(f"the cascade's name {name!r} is also a model's name; choose another")
    stages = [deployments[m] for m in plan.models]
    cascade = CascadeDeployment(name, stages, list(plan.thresholds), decide_tokens=decide_tokens)
    return {**deployments, name: cascade}
