"""Processes and nodes (`meshes.distributed`) and the transfer layer's one-process behaviour (`meshes.transfer`)."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from meshes import HetMesh
from meshes.distributed import (
    Launch,
    LaunchError,
    check_local_devices,
    detect_launcher,
    node_processes,
    process_device_indices,
    set_host_device_count,
)
from meshes.transfer import Transfers, assemble, everywhere, put_host, replicated_over, restrict
from planners.cluster import ClusterSpec
from planners.errors import SpecError


def cluster(*nodes):
    return ClusterSpec.from_dict({"name": "c", "nodes": list(nodes)})


H100 = {"name": "h", "gpu": "H100", "count": 2}
L4 = {"name": "l", "gpu": "L4", "count": 3}


def test_nodes_run_on_their_position_or_their_process_field():
    assert node_processes(cluster(H100, L4), 2) == (0, 1)
    shared = cluster({**H100, "process": 1}, {**L4, "process": 0}, {**L4, "name": "l2", "process": 0})
    assert node_processes(shared, 2) == (1, 0, 0)
    assert process_device_indices(shared, (1, 0, 0), 0) == (2, 3, 4, 5, 6, 7)


def test_process_mismatches_are_named():
    with pytest.raises(LaunchError, match=r"nodes\[1\] \(node i runs on process i\) is 1, but the run has 1"):
        node_processes(cluster(H100, L4), 1)
    with pytest.raises(LaunchError, match=r"processes \[2\] run no node"):
        node_processes(cluster(H100, L4), 3)
    with pytest.raises(SpecError, match=r"nodes\[0\]\.process must be an integer >= 0"):
        cluster({**H100, "process": -1})


def test_launch_options_come_all_together_and_valid():
    with pytest.raises(LaunchError, match=r"missing \['--num-processes', '--process-id'\]"):
        Launch(coordinator="127.0.0.1:1234")
    with pytest.raises(LaunchError, match="HOST:PORT"):
        Launch("localhost", 2, 0)
    with pytest.raises(LaunchError, match=r"--process-id must be in 0\.\.1, got 2"):
        Launch("h:1", 2, 2)
    assert Launch("h:1", 2, 1).explicit and not Launch().explicit


def test_launchers_are_detected_from_their_environment():
    assert detect_launcher({"SLURM_NTASKS": "4", "SLURM_PROCID": "3"}) == ("SLURM", 4, 3)
    assert detect_launcher({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}) == ("Open MPI", 2, 1)
    assert detect_launcher({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert detect_launcher({}) is None


def test_host_device_count_replaces_the_flag():
    env = {"XLA_FLAGS": "--xla_dump_to=/x --xla_force_host_platform_device_count=8"}
    set_host_device_count(3, env)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/x --xla_force_host_platform_device_count=3"


def test_local_devices_must_be_the_nodes_devices():
    c = cluster(H100, L4)
    check_local_devices(c, (2, 3, 4), jax.devices()[:3], 1)
    with pytest.raises(LaunchError, match=r"process 1 runs 3 devices .* but has 2 local devices"):
        check_local_devices(c, (2, 3, 4), jax.devices()[:2], 1)


def test_one_process_binds_nodes_in_file_order():
    hm = HetMesh.from_cluster(cluster(H100, L4))
    assert [d.id for d in hm.devices] == [0, 1, 2, 3, 4]
    assert [g.kind for g in hm.groups] == ["H100", "L4"]


def test_moves_inside_one_process_are_exact_and_counted():
    devices = jax.devices()
    value = np.arange(48, dtype=np.float32).reshape(4, 12)
    tp4 = NamedSharding(Mesh(np.array(devices[:4]), ("tp",)), P(None, "tp"))
    tp3 = NamedSharding(Mesh(np.array(devices[4:7]), ("tp",)), P(None, "tp"))
    transfers = Transfers()
    x = put_host(value, tp4)
    y = transfers.move(x, tp3)
    assert y.sharding == tp3
    np.testing.assert_array_equal(np.asarray(y), value)
    assert transfers.log.between_groups == value.nbytes and transfers.log.between_processes == 0
    assert transfers.move(y, tp3) is y and transfers.log.moves == 1


def test_replicated_scalars_are_summed_viewed_and_put_together_without_copies():
    devices = jax.devices()
    transfers = Transfers()
    a = put_host(np.float32(2), replicated_over(devices[:2]))
    b = put_host(np.float32(3), SingleDeviceSharding(devices[5]))
    out = everywhere(devices[:6])
    total = transfers.sum_scalars([a, b], out)
    assert float(total) == 5.0 and total.sharding == out
    view = restrict(total, replicated_over(devices[1:3]))
    assert float(view) == 5.0 and {d.id for d in view.sharding.device_set} == {1, 2}
    whole = assemble([view, restrict(total, replicated_over([devices[0], *devices[3:6]]))], out)
    assert float(whole) == 5.0 and whole.sharding == out
    with pytest.raises(ValueError, match=r"no part covers devices \[0, 3, 4, 5\]"):
        assemble([view], out)


def test_copies_are_summed_by_a_ring_over_their_holders_into_each_layout():
    """Three groups of 2, 4 and 1 devices hold copies of two leaves (a third is held by one group only): each
    copy becomes the sum, bit for bit the same in every layout, by one reduce-scatter and all-gather over the
    holders' lane heads (no all-reduce into one group); the log counts a ring's 2(H-1) buffers."""
    devices = jax.devices()
    tp2 = Mesh(np.array(devices[:2]), ("tp",))
    tp4 = Mesh(np.array(devices[2:6]), ("tp",))
    one = SingleDeviceSharding(devices[6])
    rng = np.random.default_rng(0)
    values = [
        {"w": rng.normal(size=(4, 8)).astype(np.float32), "b": rng.normal(size=8).astype(np.float32)} for _ in range(3)
    ]
    layouts = [
        {"w": NamedSharding(tp2, P(None, "tp")), "b": NamedSharding(tp2, P())},
        {"w": NamedSharding(tp4, P("tp")), "b": NamedSharding(tp4, P("tp"))},
        {"w": one, "b": None},
    ]
    copies = [
        {k: None if s is None else put_host(v[k], s) for k, s in layout.items()}
        for v, layout in zip(values, layouts, strict=True)
    ]
    transfers = Transfers()
    summed = transfers.sum_copies(copies)
    for copy, layout in zip(summed, layouts, strict=True):
        np.testing.assert_array_equal(np.asarray(copy["w"]), np.asarray(summed[0]["w"]))
        assert copy["w"].sharding.is_equivalent_to(layout["w"], 2)
    np.testing.assert_allclose(np.asarray(summed[0]["w"]), sum(v["w"] for v in values), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(summed[1]["b"]), values[0]["b"] + values[1]["b"], rtol=1e-6)
    assert summed[2]["b"] is None
    # "w": 3 holders, 1 lane (gcd 2, 4, 1), 32 floats padded to 33; "b": 2 holders, 2 lanes, 8 floats.
    assert transfers.log.between_groups == 2 * 2 * 33 * 4 + 2 * 1 * 8 * 4
    rings = [
        program.lower(jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("holder", "lane")))).as_text()
        for (kind, *rest), program in transfers._programs.items()
        if kind == "ring"
        for shape, dtype, mesh in [rest]
    ]
    assert len(rings) == 2
    assert all("reduce_scatter" in text and "all_gather" in text and "all_reduce" not in text for text in rings)
