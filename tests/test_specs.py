"""Specs: cluster files, the GPU catalog, model presets and HF configs, workloads; errors name the bad field."""

import json
from pathlib import Path

import pytest

import planners
from planners.catalog import CATALOG, lookup
from planners.presets import CLUSTERS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "clusters"


def test_example_cluster_h100_l4() -> None:
    cluster = planners.ClusterSpec.load(EXAMPLES / "h100x4_l4x4.yaml")
    assert [d.kind for d in cluster.devices] == ["H100"] * 4 + ["L4"] * 4
    assert [d.node for d in cluster.devices] == [0] * 4 + [1] * 4
    assert cluster.nodes[0].intra_link.gb_s > cluster.inter_link.gb_s
    assert cluster.kinds_summary() == "4xH100 + 4xL4"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_loads(path: Path) -> None:
    cluster = planners.ClusterSpec.load(path)
    assert cluster.num_devices == len(cluster.devices) > 0


def test_builtin_clusters_match_example_files() -> None:
    for name in CLUSTERS:
        assert planners.ClusterSpec.load(name) == planners.ClusterSpec.load(EXAMPLES / f"{name}.yaml")
    assert planners.ClusterSpec.load("emulated8").num_devices == 8


def test_json_and_repeat(tmp_path: Path) -> None:
    spec = {"name": "big", "nodes": [{"name": "h", "gpu": "h100", "count": 8, "repeat": 3}]}
    path = tmp_path / "big.json"
    path.write_text(json.dumps(spec))
    cluster = planners.ClusterSpec.load(path)
    assert cluster.num_devices == 24 and [n.name for n in cluster.nodes] == ["h-0", "h-1", "h-2"]
    assert cluster.nodes[0].kind == "H100"


def test_profile_and_custom_gpu_overrides() -> None:
    cluster = planners.ClusterSpec.from_dict(
        {
            "nodes": [{"gpu": "L4", "count": 2}, {"gpu": "Mine", "count": 1}],
            "gpus": {
                "Mine": {"tflops": 50, "memory_gb": 8, "memory_bw_gb_s": 400, "price_per_hour": 0.1, "nvlink_gb_s": 10}
            },
            "profiles": {"L4": {"compute_efficiency": 0.3, "tflops": 100}},
        }
    )
    assert cluster.profile("L4").tflops == 100 and cluster.profile("L4").compute_efficiency == 0.3
    assert cluster.profile("Mine").memory_gb == 8
    measured = cluster.with_profiles({"L4": {"memory_bw_gb_s": 250.0}})
    assert measured.profile("L4").memory_bw_gb_s == 250.0 and measured.profile("L4").tflops == 100
    with pytest.raises(planners.SpecError, match=r"profiles.L4: unknown field\(s\) \['speed'\]"):
        cluster.with_profiles({"L4": {"speed": 1}})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"nodes": [{"gpu": "H1000", "count": 4}]}, "nodes[0].gpu: unknown GPU kind 'H1000'"),
        ({"nodes": [{"gpu": "H100", "count": 0}]}, "nodes[0].count must be a positive integer"),
        ({"nodes": [{"gpu": "H100", "count": 2, "cnt": 3}]}, "nodes[0]: unknown field(s) ['cnt']"),
        ({"nodes": [{"gpu": "H100"}]}, "nodes[0]: missing required field(s) ['count']"),
        ({"nodes": []}, "nodes must be a non-empty list"),
        ({"nodes": [{"gpu": "H100", "count": 1}], "inter_node_link": {"gb_s": -1}}, "inter_node_link.gb_s"),
        ({"nodes": [{"gpu": "H100", "count": 1}], "profiles": {"L4": {}}}, "profiles: unknown field(s) ['L4']"),
        (
            {"nodes": [{"gpu": "H100", "count": 1}], "profiles": {"H100": {"compute_efficiency": 2}}},
            "profiles.H100.compute_efficiency must be a number in (0, 1]",
        ),
    ],
)
def test_cluster_errors_name_the_field(spec: dict, message: str) -> None:
    with pytest.raises(planners.SpecError) as err:
        planners.ClusterSpec.from_dict(spec)
    assert message in str(err.value)


def test_cluster_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="built-in clusters"):
        planners.ClusterSpec.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [{gpu: H100, count: two}]")
    with pytest.raises(planners.SpecError, match=r"bad.yaml: nodes\[0\].count"):
        planners.ClusterSpec.load(bad)


def test_catalog_has_the_required_kinds_with_sources() -> None:
    required = ["H100", "H200", "A100-80GB", "A100-40GB", "L40S", "A10G", "L4", "T4", "V100", "RTX4090", "RTX3090"]
    assert set(required) <= set(CATALOG)
    for gpu in CATALOG.values():
        assert gpu.tflops > 0 and gpu.memory_gb > 0 and gpu.memory_bw_gb_s > 0 and gpu.price_per_hour > 0
        assert len(gpu.source) > 20
    assert lookup("a100").name == "A100-80GB" and lookup("rtx-4090").name == "RTX4090"
    assert CATALOG["H100"].tflops > CATALOG["L4"].tflops > CATALOG["T4"].tflops


def test_model_presets() -> None:
    tiny = planners.ModelSpec.preset("tiny")
    assert (tiny.vocab_size, tiny.hidden_size, tiny.ffn_size, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads) == (
        264,
        128,
        344,
        4,
        4,
        2,
    )
    assert abs(planners.ModelSpec.preset("llama-2-7b").num_params / 6.74e9 - 1) < 0.01
    assert abs(planners.ModelSpec.preset("llama-2-70b").num_params / 68.98e9 - 1) < 0.01
    assert abs(planners.ModelSpec.preset("llama-3-8b").num_params / 8.03e9 - 1) < 0.01
    assert abs(planners.ModelSpec.preset("opt-30b").num_params / 29.97e9 - 1) < 0.02
    with pytest.raises(planners.SpecError, match="unknown preset 'gpt-5'"):
        planners.ModelSpec.preset("gpt-5")


def test_model_from_hf_config(tmp_path: Path) -> None:
    llama = {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(llama))
    spec = planners.ModelSpec.from_hf_config(tmp_path)
    assert dataclass_shape(spec) == dataclass_shape(planners.ModelSpec.preset("llama-2-7b"))
    assert planners.ModelSpec.resolve(str(tmp_path / "config.json")).hidden_size == 4096
    opt = {
        "model_type": "opt",
        "vocab_size": 50272,
        "hidden_size": 7168,
        "ffn_dim": 28672,
        "num_hidden_layers": 48,
        "num_attention_heads": 56,
    }
    assert dataclass_shape(planners.ModelSpec.from_hf_config(opt)) == dataclass_shape(
        planners.ModelSpec.preset("opt-30b")
    )
    with pytest.raises(planners.SpecError, match="missing field 'num_attention_heads'"):
        planners.ModelSpec.from_hf_config({"model_type": "llama"})
    with pytest.raises(planners.SpecError, match="model.num_heads"):
        planners.ModelSpec("x", 10, 100, 10, 1, 3, 1)


def dataclass_shape(spec: planners.ModelSpec) -> tuple:
    return (
        spec.vocab_size,
        spec.hidden_size,
        spec.ffn_size,
        spec.num_layers,
        spec.num_heads,
        spec.num_kv_heads,
        spec.gated_mlp,
        spec.tied_embeddings,
    )


def test_workloads(tmp_path: Path) -> None:
    assert planners.TrainWorkload(12, 128).microbatch_sizes == (1, 2, 4)
    with pytest.raises(planners.SpecError, match=r"microbatch_sizes\[0\] = 5 does not divide global_batch = 12"):
        planners.TrainWorkload(12, 128, microbatch_sizes=(5,))
    with pytest.raises(planners.SpecError, match="seq_len must be a positive integer"):
        planners.TrainWorkload(12, 0)
    with pytest.raises(planners.SpecError, match="tpot_slo_s"):
        planners.ServeWorkload(tpot_slo_s=0)
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,input_len,output_len\n0.0,100,10\n0.5,300,30\n1.0,200,20\n")
    serve = planners.ServeWorkload.from_trace(trace, ttft_slo_s=2.0)
    assert serve.arrival_rate == 2.0 and serve.input_len == 200 and serve.output_len == 20 and len(serve.trace) == 3
    trace.write_text("t,in,out\n0,1,1\n")
    with pytest.raises(planners.SpecError, match="header must be arrival_s,input_len,output_len"):
        planners.load_trace(trace)


def test_qwen3_head_dim_wider_than_hidden_over_heads_counts_its_attention_parameters() -> None:
    # Qwen3-0.6B's shape: 16 heads of 128 (2048 wide) on a 1024-wide residual, 8 KV heads.
    qwen3 = {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
    }
    spec = planners.ModelSpec.from_hf_config(qwen3)
    assert spec.head_dim == 128
    attention = 2 * 1024 * 16 * 128 + 2 * 1024 * 8 * 128
    assert spec.layer_params == attention + 3 * 1024 * 3072 + 2 * 1024
    assert abs(spec.num_params / 0.596e9 - 1) < 0.01  # the published 0.6B counts 0.596e9 (q/k norms aside)
