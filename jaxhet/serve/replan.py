"""Live re-planning: change the replicas a server runs while it serves, dropping no request.

`Fleet.apply` takes a new serving plan and compares it with the running replicas, each known by its model and
devices (`Placement.key`): replicas in both stay (the same engines, weights untouched, even when their role
changes between prefill, decode and both); replicas only in the plan are built and warmed up on a worker thread
while the old ones serve; then every model's routing switches at once (`ModelDeployment.route`), and replicas
only in the old deployment finish the requests they hold (drain) before their engines stop and free their
devices. `parse_plan` reads the JSON `jaxhet plan serve` writes, naming the field at fault.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax

import planners
from jaxhet.loading import LoadedModel
from jaxhet.serve.async_engine import AsyncEngine
from jaxhet.serve.build import Placement, by_role, deployment, new_engine, place
from jaxhet.serve.config import EngineConfig, FieldError
from jaxhet.serve.deployment import CascadeDeployment, ModelDeployment
from jaxhet.serve.remote import WorkerLink

Deployment = ModelDeployment | CascadeDeployment
SERVE_PLAN = "jaxhet.serve_plan"
DRAIN_POLL_S = 0.01


class ReplanRefused(RuntimeError):
    """This server cannot re-plan at all (no weights to build replicas from, or it serves a cascade)."""


@dataclasses.dataclass(frozen=True)
class ReplicaSource:
    """What new replicas are built from: the weights of every model the server may run, the engine settings, and
    the local devices a plan's device indices name (default: all of them, in order)."""

    models: Mapping[str, LoadedModel]
    config: EngineConfig
    devices: tuple[jax.Device, ...] = ()

    def local_devices(self) -> tuple[jax.Device, ...]:
        return self.devices or tuple(jax.devices())


@dataclasses.dataclass(frozen=True)
class ReplanReport:
    """What one re-plan did: replicas kept (`role_changes` of them in a new role), started (built and warmed up)
    and removed, and the requests the removed ones still held at the switch (all finished before they stopped)."""

    kept: int
    role_changes: int
    started: int
    removed: int
    drained_requests: int


def parse_plan(data: Any) -> planners.ServePlan:
    """The serving plan in a decoded JSON body; FieldError naming the field (`format`, `replicas`,
    `replicas[i]`) when it is not one."""
    if not isinstance(data, dict):
        raise FieldError("format", f"a serving plan is a JSON object with format {SERVE_PLAN!r}")
    if data.get("format") != SERVE_PLAN:
        message = f"format must be {SERVE_PLAN!r} (what `jaxhet plan serve -o` writes), got {data.get('format')!r}"
        raise FieldError("format", message)
    replicas = data.get("replicas")
    if not isinstance(replicas, list) or not replicas:
        raise FieldError("replicas", "replicas must be a non-empty list of replicas")
    for index, replica in enumerate(replicas):
        try:
            planners.ServeReplica(**{**replica, "classes": ()})
        except (TypeError, ValueError) as err:
            raise FieldError(f"replicas[{index}]", f"replicas[{index}] is not a serving replica: {err}") from None
    try:
        return planners.ServePlan.from_json(json.dumps(data))
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"not a serving plan: {err}") from None


class Fleet:
    """The deployments a server runs (served name -> deployment) and, with a `ReplicaSource`, re-planning them.

    `deployments` is one dict, changed in place and only between two awaits, so a request sees either the old
    routing or the new one. `started` counts the replicas re-plans built. `links` reach the other processes of a
    multi-process server (`jaxhet.serve.processes`), whose replicas the deployments route to too.
    """

    def __init__(
        self,
        deployments: Mapping[str, Deployment],
        source: ReplicaSource | None = None,
        links: Sequence[WorkerLink] = (),
    ):
        self.deployments: dict[str, Deployment] = dict(deployments)
        self.source = source
        self.links = list(links)
        self.started = 0
        self._draining: list[AsyncEngine] = []
        self._lock = asyncio.Lock()

    def models(self) -> list[ModelDeployment]:
        """Every model deployment, a cascade's stages included."""
        models: dict[str, ModelDeployment] = {}
        for served in self.deployments.values():
            for model in served.stages if isinstance(served, CascadeDeployment) else [served]:
                models[model.name] = model
        return list(models.values())

    def cascades(self) -> list[CascadeDeployment]:
        return [d for d in self.deployments.values() if isinstance(d, CascadeDeployment)]

    def engines(self) -> dict[str, list[AsyncEngine]]:
        """Model -> the engines its routing uses now (replicas being drained left out)."""
        return {model.name: model.engines for model in self.models()}

    def replica_counts(self) -> dict[str, dict[str, int]]:
        """Model -> role -> number of replicas serving in it."""
        return {model.name: {role: len(e) for role, e in model.roles().items()} for model in self.models()}

    def processes(self) -> list[dict[str, Any]]:
        """The other processes of a multi-process server: nodes, and whether each answers (else why not)."""
        return [
            {"process": link.process, "nodes": list(link.nodes), "up": link.up, "reason": link.down_reason}
            for link in self.links
        ]

    async def start(self) -> None:
        """Connect to the other processes (on the server's event loop)."""
        for link in self.links:
            await link.start()

    async def close(self) -> None:
        """Stop every engine, those being drained included, once their requests finish; then the other
        processes."""
        for engine in [*(e for engines in self.engines().values() for e in engines), *self._draining]:
            await engine.close()
        for link in self.links:
            await link.stop()

    def _running(self) -> dict[tuple, tuple[AsyncEngine, str]]:
        """Placement key -> (engine, role) of every replica the routing uses now."""
        running = {}
        for model in self.models():
            for role, engines in model.roles().items():
                for engine in engines:
                    running[(model.name, engine.devices)] = engine, role
        return running

    async def apply(self, plan: planners.ServePlan) -> ReplanReport:
        """Run `plan` from now on (see the module's docstring); returns once removed replicas have stopped.
        FieldError if the plan cannot run here (nothing changes), ReplanRefused if this server cannot re-plan."""
        if self.links:
            raise ReplanRefused(
                "this server's replicas run on several processes; live re-planning applies within one process "
                "(restart the processes with the new plan)"
            )
        source = self.source
        if source is None:
            raise ReplanRefused("this server was not given the models' weights, so it cannot start replicas")
        if self.cascades():
            raise ReplanRefused("this server runs a cascade; live re-planning applies to serving plans only")
        async with self._lock:
            wanted = place(plan, source.models, source.local_devices())
            running = self._running()
            fresh = [p for p in wanted if p.key not in running]
            built: dict[tuple, AsyncEngine] = {}
            try:
                await asyncio.to_thread(self._build, fresh, built)
            except BaseException:
                for engine in built.values():
                    await engine.close()
                raise
            engines = {**{key: engine for key, (engine, _) in running.items()}, **built}
            keys = {p.key for p in wanted}
            removed = [engine for key, (engine, _) in running.items() if key not in keys]
            report = ReplanReport(
                kept=len(running) - len(removed),
                role_changes=sum(1 for p in wanted if p.key in running and running[p.key][1] != p.role),
                started=len(built),
                removed=len(removed),
                drained_requests=sum(engine.load for engine in removed),
            )
            self._switch([(p, engines[p.key]) for p in wanted])
            await self._drain(removed)
            return report

    def _build(self, placements: Sequence[Placement], built: dict[tuple, AsyncEngine]) -> None:
        """Warmed-up engines for `placements` into `built` (on a worker thread: the event loop serves on meanwhile;
        if one fails, those already in `built` are the caller's to stop)."""
        source = self.source
        assert source is not None
        for placement in placements:
            built[placement.key] = new_engine(placement, source.models[placement.model], source.config)
            self.started += 1

    def _switch(self, placed: Sequence[tuple[Placement, AsyncEngine]]) -> None:
        """Route every model to its new replicas in one go (no await: no request sees half of it)."""
        assert self.source is not None
        grouped = by_role(placed)
        for name, roles in grouped.items():
            current = self.deployments.get(name)
            if isinstance(current, ModelDeployment):
                current.route(roles.get("both", ()), roles.get("prefill", ()), roles.get("decode", ()))
            else:
                self.deployments[name] = deployment(name, self.source.models[name], roles)
        for name in [n for n in self.deployments if n not in grouped]:
            del self.deployments[name]

    async def _drain(self, removed: Sequence[AsyncEngine]) -> None:
        """Wait until the removed engines hold no request, then stop them."""
        self._draining += removed
        while any(engine.load for engine in removed):
            await asyncio.sleep(DRAIN_POLL_S)
        for engine in removed:
            await engine.close()
            self._draining.remove(engine)
