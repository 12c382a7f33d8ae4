"""Processes and nodes: which process runs which nodes of a cluster, and starting JAX's multi-controller runtime.

A heterogeneous cluster puts GPU kinds on different machines, so a run is one process per node
(`jax.distributed`): node `i` of the cluster file runs on process `i` unless the node says `process: K` (several
nodes may share a process). A launch is explicit (`coordinator`, `num_processes`, `process_id`), detected from a
launcher's environment (SLURM, Open MPI; JAX's own auto-detection then connects), or a single process.

On CPU every process emulates exactly its own nodes' devices: `start` sets the host platform's device count before
JAX creates its backends, and uses gloo for collectives. On GPUs it checks that the local devices are the nodes'
GPUs (count and kind) and names any mismatch.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence

from planners.cluster import ClusterSpec

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
LAUNCHERS = {  # launcher: (environment variable of the process count, of this process's rank)
    "SLURM": ("SLURM_NTASKS", "SLURM_PROCID"),
    "Open MPI": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
}


class LaunchError(ValueError):
    """A multi-process launch is inconsistent: the message names the option or the process."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a run. All three fields, or none (then a launcher's environment, or one process).

    `heartbeat_timeout_s` bounds how long the others take to notice a dead process and stop (non-zero). With
    `recoverable` they do not stop (JAX's `jax_enable_recoverability`): a server keeps its endpoint up when a
    process serving replicas dies; a training run leaves it off, so that every process stops."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = 20
    initialization_timeout_s: int = 120
    recoverable: bool = False

    def __post_init__(self) -> None:
        given = {
            "--coordinator": self.coordinator,
            "--num-processes": self.num_processes,
            "--process-id": self.process_id,
        }
        if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
            missing = [k for k, v in given.items() if v is None]
            raise LaunchError(
                f"a multi-process launch needs --coordinator, --num-processes and --process-id; missing {missing}"
            )
        if self.coordinator is not None and not re.fullmatch(r"[^:\s]+:\d+", self.coordinator):
            raise LaunchError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
        if self.num_processes is not None and self.num_processes < 1:
            raise LaunchError(f"--num-processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or 0):
            raise LaunchError(f"--process-id must be in 0..{(self.num_processes or 1) - 1}, got {self.process_id}")

    @property
    def explicit(self) -> bool:
        return self.coordinator is not None


@dataclasses.dataclass(frozen=True)
class Runtime:
    """This process's place in a run: its id, the process count, and the process running each node."""

    process_id: int
    num_processes: int
    process_of_node: tuple[int, ...]

    @property
    def is_main(self) -> bool:
        """Process 0 plans, and writes every file a run leaves (metrics, plan, config, pictures)."""
        return self.process_id == 0

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


def detect_launcher(environ: Mapping[str, str]) -> tuple[str, int, int] | None:
    """(launcher, process count, rank) when a launcher started more than one process, else None."""
    for name, (size_var, rank_var) in LAUNCHERS.items():
        if size_var in environ and rank_var in environ and int(environ[size_var]) > 1:
            return name, int(environ[size_var]), int(environ[rank_var])
    return None


def node_processes(cluster: ClusterSpec, num_processes: int) -> tuple[int, ...]:
    """The process of every node: its `process` field, else its position; every process must get a node."""
    out = []
    for i, node in enumerate(cluster.nodes):
        process = i if node.process is None else node.process
        if not 0 <= process < num_processes:
            where = f"nodes[{i}].process" if node.process is not None else f"nodes[{i}] (node i runs on process i)"
            raise LaunchError(
                f"{where} is {process}, but the run has {num_processes} processes (0..{num_processes - 1})"
            )
        out.append(process)
    idle = sorted(set(range(num_processes)) - set(out))
    if idle:
        raise LaunchError(f"processes {idle} run no node of cluster {cluster.name!r}; give nodes a `process:` field")
    return tuple(out)


def process_device_indices(cluster: ClusterSpec, process_of_node: Sequence[int], process: int) -> tuple[int, ...]:
    """Flat indices (`ClusterSpec.devices`) of the devices of `process`'s nodes, in flat order."""
    return tuple(d.index for d in cluster.devices if process_of_node[d.node] == process)


def set_host_device_count(count: int, environ: dict | None = None) -> None:
    """Make the CPU platform show `count` devices (must run before JAX creates its backends)."""
    environ = os.environ if environ is None else environ
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\d+", "", environ.get("XLA_FLAGS", "")).strip()
    environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()


def start(cluster: ClusterSpec | None, launch: Launch, environ: Mapping[str, str] | None = None) -> Runtime:
    """Join the run `launch` describes for `cluster` (or detect a launcher; or stay one process). Without a
    cluster (`jaxhet profile`) each process keeps the local devices it has."""
    environ = os.environ if environ is None else environ
    detected = None if launch.explicit else detect_launcher(environ)
    nodes = 0 if cluster is None else len(cluster.nodes)
    if not launch.explicit and detected is None:
        return Runtime(0, 1, (0,) * nodes)
    num, pid = (launch.num_processes, launch.process_id) if launch.explicit else detected[1:]
    process_of_node, expected = (), ()
    if cluster is not None:
        process_of_node = node_processes(cluster, num)
        expected = process_device_indices(cluster, process_of_node, pid)
        set_host_device_count(len(expected))
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_recoverability", launch.recoverable)
    jax.distributed.initialize(
        launch.coordinator,
        launch.num_processes,
        launch.process_id,
        heartbeat_timeout_seconds=launch.heartbeat_timeout_s,
        initialization_timeout=launch.initialization_timeout_s,
    )
    if cluster is not None:
        check_local_devices(cluster, expected, jax.local_devices(), pid)
    return Runtime(jax.process_index(), jax.process_count(), process_of_node)


def check_local_devices(cluster: ClusterSpec, expected: Sequence[int], local: Sequence, process: int) -> None:
    """This process's devices must be its nodes' devices: the same count and, on GPUs, the same kinds."""
    if len(local) != len(expected):
        raise LaunchError(
            f"process {process} runs {len(expected)} devices of cluster {cluster.name!r} "
            f"(flat indices {list(expected)}) but has {len(local)} local devices"
        )
    kinds = [cluster.devices[i].kind for i in expected]
    for device, kind in zip(local, kinds, strict=True):
        if device.platform == "gpu" and _normalise(kind) not in _normalise(device.device_kind):
            raise LaunchError(
                f"process {process}: device {device.id} is a {device.device_kind!r}, the cluster says {kind}"
            )


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().split("-")[0])


AGREE_TIMEOUT_S = 900  # how long a process waits for the others at an agreement (a plan being made, a compile)


def _key(name: str, process: int) -> str:
    return f"jaxhet/{name}/{process}"


def _client():
    from jax._src import distributed

    if distributed.global_state.client is None:
        raise LaunchError("this process has not joined a multi-process run (meshes.distributed.start)")
    return distributed.global_state.client


def all_texts(name: str, text: str, runtime: Runtime) -> list[str]:
    """Every process's `text`, in process order. `name` must be used once per run, and alike on every process.

    Agreements go through the coordination service's key-value store, not a collective: a collective's first use
    on a device set has a fixed 30 s rendezvous (gloo), and a process may be busy for longer (making the plan,
    compiling) while the others wait here."""
    if not runtime.multi_process:
        return [text]
    publish_text(name, text, runtime)
    return [read_text(name, p) for p in range(runtime.num_processes)]


def publish_text(name: str, text: str, runtime: Runtime) -> None:
    """Post this process's `text` under `name` (once per run) for others to `read_text`, without waiting."""
    _client().key_value_set(_key(name, runtime.process_id), text)


def read_text(name: str, process: int) -> str:
    """What `process` posted under `name`, waiting for it up to `AGREE_TIMEOUT_S`."""
    return _client().blocking_key_value_get(_key(name, process), AGREE_TIMEOUT_S * 1000)


def coordinator_host() -> str:
    """The host of the run's coordinator (process 0): the address other processes are known to reach it by."""
    from jax._src import distributed

    _client()
    return (distributed.global_state.coordinator_address or "127.0.0.1").rsplit(":", 1)[0]


def broadcast_text(name: str, text: str | None, runtime: Runtime) -> str:
    """`text` from process 0 on every process (the plan is made once, by process 0, and run by all)."""
    if not runtime.multi_process:
        assert text is not None
        return text
    key = _key(name, 0)
    if runtime.is_main:
        _client().key_value_set(key, text or "")
        return text or ""
    return _client().blocking_key_value_get(key, AGREE_TIMEOUT_S * 1000)


def any_process(name: str, flag: bool, runtime: Runtime) -> bool:
    """True on every process when `flag` is true on any (a stop request that reached one process)."""
    return "1" in all_texts(name, "1" if flag else "0", runtime)


def meet(name: str, processes: Sequence[int]) -> None:
    """Wait until every process of `processes` has reached `meet` with the same `name` (then all go on)."""
    _client().wait_at_barrier(f"jaxhet/{name}", AGREE_TIMEOUT_S * 1000, sorted(processes))
