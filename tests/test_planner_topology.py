"""Topology-aware placement: a cluster file's switch levels (racks, pods), the links the cost model takes from them,
the plans' spread over them, and the planner's preference for less spread placements at equal iteration time;
checked against exhaustive enumeration on small topologies, against random placements on a 64-node, 2-pod
cluster, and against the placements the planner made before topologies existed."""

import dataclasses
import random
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import planners
from jaxhet.cli import app
from planners.brute_force import all_plans
from planners.cells import split_cell
from planners.cost_model import boundary_link, evaluate_train_plan, memory_excess, span_link
from planners.spread import plan_spread

EXAMPLE = Path(__file__).parent.parent / "examples" / "clusters" / "two_pods_64_nodes.yaml"
RACK, POD, TOP = planners.Link(25.0, 5.0), planners.Link(12.5, 10.0), planners.Link(3.0, 30.0)


def topology(racks: dict[str, list[str]], pods: dict[str, list[str]] | None = None) -> list[dict]:
    levels = [{"level": "rack", "link": {"gb_s": RACK.gb_s, "latency_us": RACK.latency_us}, "groups": racks}]
    if pods:
        levels.append({"level": "pod", "link": {"gb_s": POD.gb_s, "latency_us": POD.latency_us}, "groups": pods})
    return levels


def four_nodes(**extra) -> dict:
    nodes = [{"name": n, "gpu": "L4", "count": 2} for n in ("a", "b", "c", "d")]
    link = {"gb_s": TOP.gb_s, "latency_us": TOP.latency_us}
    return {"name": "four", "nodes": nodes, "inter_node_link": link, **extra}


TWO_PODS = topology({"r0": ["a", "b"], "r1": ["c"], "r2": ["d"]}, {"p0": ["r0", "r1"], "p1": ["r2"]})


def test_levels_and_links_follow_the_switches() -> None:
    cluster = planners.ClusterSpec.from_dict(four_nodes(topology=TWO_PODS))
    assert cluster.topology.top == 3
    assert [cluster.level_of(n) for n in ([0], [0, 1], [0, 2], [1, 2], [0, 3], [0, 1, 2])] == [0, 1, 2, 2, 3, 2]
    assert cluster.link_of([1]) == cluster.nodes[1].intra_link
    assert [cluster.link_of(n) for n in ([0, 1], [0, 2], [2, 3])] == [RACK, POD, TOP]
    # device d sits on node d // 2
    assert span_link(cluster, [(0, 1)]) == cluster.nodes[0].intra_link
    assert span_link(cluster, [(0, 4), (6, 7)]) == POD and span_link(cluster, [(0, 1), (2, 6)]) == TOP

    def stage(*devices: int) -> planners.Stage:
        return planners.Stage(devices, "L4", 1, (0, 1))

    assert boundary_link(cluster, stage(0), stage(1)) == cluster.nodes[0].intra_link
    assert boundary_link(cluster, stage(0), stage(2)) == RACK and boundary_link(cluster, stage(4), stage(6)) == TOP
    costs = planners.TrainCosts(cluster, planners.ModelSpec.preset("tiny"), 128)
    assert costs.dp_link([0, 1]) == RACK and costs.dp_link([3]) == cluster.nodes[3].intra_link


def test_repeat_entries_are_named_whole_and_the_example_loads() -> None:
    spec = {
        "nodes": [{"name": "x", "gpu": "H100", "count": 4, "repeat": 3}, {"name": "y", "gpu": "L4", "count": 2}],
        "topology": topology({"r0": ["x"], "r1": ["y"]}),
    }
    cluster = planners.ClusterSpec.from_dict(spec)
    assert cluster.topology.paths == {"x-0": ("r0",), "x-1": ("r0",), "x-2": ("r0",), "y": ("r1",)}
    example = planners.ClusterSpec.load(EXAMPLE)
    assert len(example.nodes) == 64 and [lv.name for lv in example.topology.levels] == ["rack", "pod"]
    assert example.level_of(range(8)) == 1 and example.level_of(range(32)) == 2 and example.level_of([0, 63]) == 3


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"racks": {}}, r"topology must be a non-empty list"),
        ([{"level": "rack", "groups": {"r0": ["a"]}}], r"topology\[0\]: missing required field\(s\) \['link'\]"),
        ([{"level": "rack", "link": {"gb_s": 1}, "groups": {"r0": ["a"]}, "x": 1}], r"unknown field\(s\) \['x'\]"),
        (topology({"r0": ["a", "b", "c", "e"], "r1": ["d"]}), r"r0: unknown name 'e'; allowed: \['a', 'b'"),
        (topology({"r0": ["a", "b", "c"], "r1": ["c", "d"]}), r"'c' is in both 'r0' and 'r1'"),
        (topology({"r0": ["a", "b", "c"]}), r"\['d'\] are in no group; every one of \['a', 'b', 'c', 'd'\]"),
        (topology({"r0": ["a", "b"], "r1": ["c", "d"]}, {"p0": ["r0"]}), r"topology\[1\].groups: \['r1'\] are in no"),
        (topology({"r0": ["a", "b"], "r1": []}), r"groups.r1 must be a non-empty list of names"),
        (topology({"r0": ["a", "b", "c", "d"]}) * 2, r"topology\[1\].level 'rack' repeats"),
        (
            [{"level": "rack", "link": {"gb_s": 0}, "groups": {"r0": ["a", "b", "c", "d"]}}],
            r"topology\[0\].link.gb_s must be a positive number",
        ),
    ],
)
def test_bad_topologies_name_the_field(section: object, message: str) -> None:
    with pytest.raises(planners.SpecError, match=message):
        planners.ClusterSpec.from_dict(four_nodes(topology=section))


def test_a_topology_needs_unique_node_names() -> None:
    spec = four_nodes(topology=topology({"r0": ["a", "b", "c"]}))
    spec["nodes"][3]["name"] = "a"
    with pytest.raises(planners.SpecError, match=r"unique node names; repeated: \['a'\]"):
        planners.ClusterSpec.from_dict(spec)


def test_spread_of_groups() -> None:
    cluster = planners.ClusterSpec.from_dict(four_nodes(topology=TWO_PODS))

    def replica(*stages: tuple[int, ...]) -> planners.Replica:
        built = tuple(planners.Stage(d, "L4", len(d), (i, i + 1)) for i, d in enumerate(stages))
        return planners.Replica(built, 1, 1)

    def spread(*replicas: planners.Replica) -> planners.Spread:
        kinds = tuple(d.kind for d in cluster.devices)
        return plan_spread(planners.TrainPlan(replicas, 2, len(replicas), 128, device_kinds=kinds), cluster)

    assert spread(replica((0, 1), (2, 3))) == planners.Spread(stage=0, pp=1, dp=0)
    assert spread(replica((0,), (1,)), replica((2,), (3,))) == planners.Spread(stage=0, pp=0, dp=1)
    assert spread(replica((0,), (4,)), replica((2,), (6,))).max == 3
    assert spread(replica((0, 1, 2, 3), (4, 5))) == planners.Spread(stage=1, pp=2, dp=1)
    assert spread(replica((0,), (1,))).describe(cluster) == "stage node, pipeline node, data-parallel node (max node)"


# Placements the planner made on the built-in clusters before topologies existed (all solved to optimality).
BEFORE = {
    ("emulated8", 4, 256, (1, 2)): (9.190774766169154e-05, [[(0,)], [(1,)]]),
    ("emulated8", 8, 512, (2,)): (0.00013857320303879993, [[(0,)], [(1,)], [(2,)], [(3,)]]),
    ("h100x4_l4x4", 4, 256, (1, 2)): (9.190774766169154e-05, [[(0,)], [(1,)]]),
    ("h100x4_l4x4", 8, 512, (2,)): (0.00013857320303879993, [[(0,)], [(1,)], [(2,)], [(3,)]]),
}


@pytest.mark.parametrize(("name", "batch", "seq_len", "sizes"), list(BEFORE))
def test_presets_without_topology_plan_as_before(name: str, batch: int, seq_len: int, sizes: tuple[int, ...]) -> None:
    model = planners.ModelSpec("m2", 1000, 256, 1024, 2, 8, 2)
    workload = planners.TrainWorkload(batch, seq_len, microbatch_sizes=sizes)
    plan, info = planners.plan_training_with_info(
        planners.ClusterSpec.load(name), model, workload, time_limit_s=20, num_workers=1
    )
    iteration, devices = BEFORE[name, batch, seq_len, sizes]
    assert info.status == "OPTIMAL"
    assert plan.estimate.iteration_s == pytest.approx(iteration, rel=1e-12)
    assert [[s.devices for s in r.stages] for r in plan.replicas] == devices


def small_instance(seed: int) -> tuple[planners.ClusterSpec, planners.ModelSpec, planners.TrainWorkload]:
    """3-4 nodes of 1-2 GPUs (one or two kinds) in 2-3 racks, under one or two pods or none; level links either
    all as fast as the inter-node link (every placement of a shape costs the same) or faster; a 2-3 block model."""
    rng = random.Random(seed)
    sizes = rng.choice([[1, 1, 1], [2, 1, 1], [1, 1, 1, 1], [2, 1, 1, 1]])
    kinds = rng.sample(["H100", "L4", "A100-40GB"], 2)
    names = [f"n{i}" for i in range(len(sizes))]
    nodes = [{"name": n, "gpu": rng.choice(kinds), "count": c} for n, c in zip(names, sizes, strict=True)]
    racks = {f"r{i}": [] for i in range(rng.choice([2, 3]))}
    for i, n in enumerate(rng.sample(names, len(names))):
        racks[f"r{i % len(racks)}"].append(n)
    top = {"gb_s": rng.choice([1.0, 12.5]), "latency_us": 10}
    same = rng.random() < 0.5
    levels = [{"level": "rack", "link": top if same else {"gb_s": 50.0, "latency_us": 2}, "groups": racks}]
    if rng.random() < 0.5:
        keys = list(racks)
        pods = {"p0": keys[:1], "p1": keys[1:]} if rng.random() < 0.5 else {"p0": keys}
        levels.append({"level": "pod", "link": top if same else {"gb_s": 25.0, "latency_us": 5}, "groups": pods})
    spec = {"name": f"t{seed}", "nodes": nodes, "inter_node_link": top, "topology": levels}
    spec["gpus"] = {k: {"memory_gb": rng.choice([0.5, 8.0])} for k in kinds}
    cluster = planners.ClusterSpec.from_dict(spec)
    hidden = rng.choice([256, 1024])
    model = planners.ModelSpec("m", 1000, hidden, 4 * hidden, rng.choice([2, 3]), 8, 2)
    batch = rng.choice([2, 4])
    return (
        cluster,
        model,
        planners.TrainWorkload(batch, 256, microbatch_sizes=(1, 2), recompute=False, zero_stages=(0,)),
    )


def enumerate_plans(cluster, model, workload) -> list[tuple[float, int]]:
    """(iteration time, spread score) of every plan of the search space that fits in memory."""
    out = []
    for plan in all_plans(cluster, model, workload):
        estimate = evaluate_train_plan(plan, cluster, model)
        if not memory_excess(plan, cluster, estimate):
            out.append((estimate.iteration_s, plan_spread(plan, cluster).score))
    return out


def interleaved_racks() -> tuple[planners.ClusterSpec, planners.ModelSpec, planners.TrainWorkload]:
    """4 single-L4 nodes, racks {n0, n3} and {n1, n2} (not in file order), every link as fast as the next: the
    model needs two devices, and a pipeline in one rack is exactly as fast as one across the racks (without the
    spread term the planner takes devices 3 and 2, across the racks)."""
    link = {"gb_s": 12.5, "latency_us": 10}
    spec = {
        "nodes": [{"name": f"n{i}", "gpu": "L4", "count": 1} for i in range(4)],
        "inter_node_link": link,
        "gpus": {"L4": {"memory_gb": 0.5}},
        "topology": [{"level": "rack", "link": link, "groups": {"r0": ["n0", "n3"], "r1": ["n1", "n2"]}}],
    }
    model = planners.ModelSpec("m", 1000, 1024, 4096, 2, 8, 2)
    workload = planners.TrainWorkload(2, 256, microbatch_sizes=(1,), zero_stages=(0,))
    return planners.ClusterSpec.from_dict(spec), model, workload


def test_the_maximum_spread_is_the_level_of_all_the_plans_nodes() -> None:
    checked = 0
    for seed in range(3):
        cluster, model, workload = small_instance(seed)
        node = [d.node for d in cluster.devices]
        for plan in all_plans(cluster, model, workload):
            assert plan_spread(plan, cluster).max == cluster.level_of(node[d] for d in plan.devices), seed
            checked += 1
    assert checked > 100


def test_planner_matches_enumeration_of_time_then_spread() -> None:
    decided = 0
    for cluster, model, workload in [interleaved_racks(), *(small_instance(seed) for seed in range(8))]:
        scored = enumerate_plans(cluster, model, workload)
        assert scored, cluster.name
        plan, info = planners.plan_training_with_info(cluster, model, workload, time_limit_s=30, num_workers=1)
        fastest = min(t for t, _ in scored)
        iteration, score = plan.estimate.iteration_s, plan_spread(plan, cluster).score
        assert info.status == "OPTIMAL", cluster.name
        assert iteration == pytest.approx(fastest, rel=1e-3), cluster.name
        as_fast = [s for t, s in scored if t <= iteration * (1 + 1e-9)]
        assert score == min(as_fast), cluster.name  # no plan at least as fast is less spread
        decided += max(as_fast) > score
    assert decided >= 1  # equally fast placements differing in spread, where the term picked the least spread


def test_node_order_leaves_time_and_spread_unchanged() -> None:
    for seed in range(8, 12):
        cluster, model, workload = small_instance(seed)
        reference = planners.plan_training(cluster, model, workload, time_limit_s=30, num_workers=1)
        n = len(cluster.nodes)
        for order in (list(range(n))[::-1], random.Random(seed).sample(range(n), n)):
            shuffled = dataclasses.replace(cluster, nodes=tuple(cluster.nodes[i] for i in order))
            plan = planners.plan_training(shuffled, model, workload, time_limit_s=30, num_workers=1)
            assert plan.estimate.iteration_s == pytest.approx(reference.estimate.iteration_s, rel=1e-9), seed
            assert plan_spread(plan, shuffled) == plan_spread(reference, cluster), seed


def relabelled(
    plan: planners.TrainPlan, cluster: planners.ClusterSpec, model: planners.ModelSpec, rng: random.Random
) -> planners.TrainPlan:
    """`plan` with its nodes swapped at random for others of the same class: a random feasible placement of the
    same shape (same kinds, counts and memory per stage)."""
    offsets, mapping = cluster.node_offsets(), list(range(cluster.num_devices))
    for members in cluster.node_classes():
        for src, dst in zip(members, rng.sample(members, len(members)), strict=True):
            for i in range(cluster.nodes[src].count):
                mapping[offsets[src] + i] = offsets[dst] + i
    moved = plan.with_devices(mapping, [d.kind for d in cluster.devices], cluster.name)
    estimate = evaluate_train_plan(moved, cluster, model)
    assert not memory_excess(moved, cluster, estimate)
    return dataclasses.replace(moved, estimate=estimate)


@pytest.mark.parametrize("equal_links", [False, True])
def test_64_nodes_2_pods_less_spread_than_random_placements(equal_links: bool) -> None:
    cluster = planners.ClusterSpec.load(EXAMPLE)
    if equal_links:  # every placement of a shape costs the same: only the spread tells them apart
        levels = tuple(dataclasses.replace(lv, link=cluster.inter_link) for lv in cluster.topology.levels)
        cluster = dataclasses.replace(cluster, topology=dataclasses.replace(cluster.topology, levels=levels))
    model = planners.ModelSpec("m", 1000, 256, 1024, 4, 8, 2)
    workload = planners.TrainWorkload(64, 256, microbatch_sizes=(1, 2))
    plan = planners.plan_training(cluster, model, workload, time_limit_s=6, num_workers=1)
    spread = plan_spread(plan, cluster)
    rng = random.Random(0)
    others = [relabelled(plan, cluster, model, rng) for _ in range(5)]
    for other in others:
        assert spread.max <= plan_spread(other, cluster).max and spread.pp <= plan_spread(other, cluster).pp
        if equal_links:
            assert other.estimate.iteration_s == pytest.approx(plan.estimate.iteration_s, rel=1e-12)
        else:
            assert plan.estimate.iteration_s <= other.estimate.iteration_s * (1 + 1e-12)
    assert any(spread.score < plan_spread(o, cluster).score for o in others)
    assert spread.pp <= 1  # every pipeline inside one rack


def test_cells_take_whole_racks_whatever_the_node_order() -> None:
    cluster = planners.ClusterSpec.load(EXAMPLE)
    shuffled = dataclasses.replace(cluster, nodes=tuple(random.Random(1).sample(cluster.nodes, 64)))
    for c in (cluster, shuffled):
        cell = split_cell(c, 8)  # 4 H100 nodes and 4 L4 nodes each
        assert cell is not None and cell.copies_level == 3
        for kind in ("H100", "L4"):
            assert cell.cluster.level_of(n for n, node in enumerate(cell.cluster.nodes) if node.kind == kind) == 1


def test_plan_train_shows_the_spread(tmp_path: Path) -> None:
    spec = four_nodes(topology=TWO_PODS)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec))
    args = ["plan", "train", "--cluster", str(path), "--global-batch", "4", "--time-limit", "3", "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "spread: stage node, pipeline " in result.output and "(max " in result.output
