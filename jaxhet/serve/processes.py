"""Serving a plan on several processes, one per node of its cluster (JAX's multi-controller launch, as for
training): every process builds the plan's replicas on its own devices; the endpoint process (0) serves HTTP and
routes to its own engines and, through `RemoteReplica`s, to the other processes' (`jaxhet.serve.worker`).

Set-up, through JAX's coordination service: the endpoint posts a random run token; each worker posts the address
it listens on (the interface facing the coordinator, an ephemeral port) once its engines are warm; the endpoint
waits for them all. A replica must sit on one process (its tensor-parallel steps are local); the plan's device
indices are the cluster's flat device indices, mapped onto each process's local devices in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import socket
from collections.abc import Mapping, Sequence

import jax

import planners
from jaxhet.loading import LoadedModel
from jaxhet.serve.async_engine import AsyncEngine
from jaxhet.serve.build import Placement, by_role, deployment, new_engine, place
from jaxhet.serve.config import EngineConfig, FieldError
from jaxhet.serve.deployment import ModelDeployment
from jaxhet.serve.remote import RemoteReplica, WorkerLink
from jaxhet.serve.worker import ReplicaWorker
from meshes.distributed import (
    Runtime,
    broadcast_text,
    coordinator_host,
    process_device_indices,
    publish_text,
    read_text,
)

TOKEN_KEY = "serve-token"
ADDRESS_KEY = "serve-worker"


@dataclasses.dataclass(frozen=True)
class ServeProcesses:
    """This process's place in a multi-process server: the run, and the cluster the plan's indices refer to."""

    runtime: Runtime
    cluster: planners.ClusterSpec

    def nodes_of(self, process: int) -> list[str]:
        return [n.name for n, p in zip(self.cluster.nodes, self.runtime.process_of_node, strict=True) if p == process]

    def flat_devices(self) -> list[jax.Device]:
        """The run's JAX devices indexed by the cluster's flat device index (each process's in id order)."""
        flat: list[jax.Device | None] = [None] * self.cluster.num_devices
        for process in range(self.runtime.num_processes):
            mine = sorted((d for d in jax.devices() if d.process_index == process), key=lambda d: d.id)
            indices = process_device_indices(self.cluster, self.runtime.process_of_node, process)
            for index, device in zip(indices, mine, strict=True):
                flat[index] = device
        return [d for d in flat if d is not None]

    def placements(self, plan: planners.ServePlan, models: Mapping[str, LoadedModel]) -> list[Placement]:
        """The plan's replicas placed on the run's devices (`check_one_process` has passed)."""
        return place(plan, models, self.flat_devices())

    def local_engines(
        self, placed: Sequence[Placement], models: Mapping[str, LoadedModel], config: EngineConfig
    ) -> dict[int, AsyncEngine]:
        """Plan replica index -> a warmed-up engine, for the replicas on this process's devices."""
        nodes = ",".join(self.nodes_of(self.runtime.process_id))
        return {
            index: new_engine(p, models[p.model], config, node=nodes)
            for index, p in enumerate(placed)
            if p.devices[0].process_index == self.runtime.process_id
        }


def check_one_process(plan: planners.ServePlan, cluster: planners.ClusterSpec, process_of_node: Sequence[int]) -> None:
    """FieldError for a replica whose devices span processes (its steps are local to one): checked by every
    process before JAX starts, so all of them refuse the plan alike."""
    for index, replica in enumerate(plan.replicas):
        where = f"replicas[{index}].devices"
        if any(not 0 <= d < cluster.num_devices for d in replica.devices):
            raise FieldError(where, f"{where} must be device indices in [0, {cluster.num_devices}) of {cluster.name!r}")
        spanned = sorted({process_of_node[cluster.devices[d].node] for d in replica.devices})
        if len(spanned) > 1:
            message = f"{where} span processes {spanned}; a serving replica must sit on one process (node)"
            raise FieldError(where, message)


def run_worker(
    processes: ServeProcesses, plan: planners.ServePlan, models: Mapping[str, LoadedModel], config: EngineConfig
) -> None:
    """A worker process's whole life: build and warm its replicas, serve them to the endpoint until it says stop
    (EndpointLost if it goes away first)."""
    runtime = processes.runtime
    engines = processes.local_engines(processes.placements(plan, models), models, config)
    token = broadcast_text(TOKEN_KEY, None, runtime)
    host = _facing(coordinator_host())
    asyncio.run(
        ReplicaWorker(engines, token).serve(host, on_listening=lambda at: publish_text(ADDRESS_KEY, at, runtime))
    )


def endpoint_deployments(
    processes: ServeProcesses, plan: planners.ServePlan, models: Mapping[str, LoadedModel], config: EngineConfig
) -> tuple[dict[str, ModelDeployment], list[WorkerLink]]:
    """The endpoint's deployments (its own engines and the other processes' replicas, in plan order and named as
    one process names them) and a link per other process, once every worker listens."""
    runtime = processes.runtime
    placed = processes.placements(plan, models)
    token = secrets.token_hex(16)
    broadcast_text(TOKEN_KEY, token, runtime)
    local = processes.local_engines(placed, models, config)
    remote = sorted({p.devices[0].process_index for p in placed} - {runtime.process_id})
    links = {
        process: WorkerLink(process, processes.nodes_of(process), read_text(ADDRESS_KEY, process), token)
        for process in remote
    }
    engines = []
    for index, placement in enumerate(placed):
        link = links.get(placement.devices[0].process_index)
        engines.append((placement, local[index] if link is None else _remote(link, index, placement, models, config)))
    grouped = by_role(engines)
    return {name: deployment(name, models[name], roles) for name, roles in grouped.items()}, list(links.values())


def _remote(
    link: WorkerLink, index: int, placement: Placement, models: Mapping[str, LoadedModel], config: EngineConfig
) -> RemoteReplica:
    loaded = models[placement.model]
    return RemoteReplica(link, index, placement.model, placement.devices, loaded.tokenizer, config.max_model_len)


def _facing(host: str) -> str:
    """This machine's address on the interface that routes to `host` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(host), 9))
        return probe.getsockname()[0]
