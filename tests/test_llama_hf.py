"""Parity with Hugging Face transformers' LlamaForCausalLM (CPU torch, float32), loading and saving both ways."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxhet import CheckpointError, ConfigError, load_pretrained, save_pretrained  # noqa: E402

# Float32 on both sides; differences come only from summation order, ~1e-6 at these sizes.
ATOL = 1e-4

CONFIGS = {
    "gqa_untied": dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "mha_tied": dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    ),
    "llama3_rope": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
        max_position_embeddings=256,
    ),
    "odd_heads_explicit_head_dim": dict(
        hidden_size=60,
        intermediate_size=100,
        num_hidden_layers=3,
        num_attention_heads=5,
        num_key_value_heads=1,
        head_dim=16,
    ),
    "biases": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_bias=True,
        mlp_bias=True,
    ),
}


def make_hf_model(seed: int, **overrides):
    torch.manual_seed(seed)
    fields = dict(vocab_size=97, rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False)
    fields.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    # Random init leaves norm weights at 1 and biases at 0; perturb them so the mapping of every tensor is tested.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.numpy()


@pytest.fixture
def token_ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 97, size=(2, 37))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, token_ids, tmp_path):
    hf_model = make_hf_model(1, **CONFIGS[name])
    hf_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    ours = np.asarray(model(jnp.asarray(token_ids)))
    np.testing.assert_allclose(ours, hf_logits(hf_model, token_ids), atol=ATOL, rtol=0)


def test_sharded_checkpoint_loads(token_ids, tmp_path):
    hf_model = make_hf_model(2, **CONFIGS["gqa_untied"])
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_pretrained(tmp_path)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(token_ids))), hf_logits(hf_model, token_ids), atol=ATOL)


@pytest.mark.parametrize("max_shard_bytes", [None, 30_000], ids=["single_file", "sharded"])
@pytest.mark.parametrize("name", ["gqa_untied", "mha_tied", "llama3_rope"])
def test_save_pretrained_loads_in_transformers(name, max_shard_bytes, token_ids, tmp_path):
    hf_model = make_hf_model(3, **CONFIGS[name])
    hf_model.save_pretrained(tmp_path / "source")
    model = load_pretrained(tmp_path / "source")
    if max_shard_bytes is None:
        save_pretrained(model, tmp_path / "ours")
    else:
        save_pretrained(model, tmp_path / "ours", max_shard_bytes=max_shard_bytes)
        assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(hf_logits(reloaded, token_ids), hf_logits(hf_model, token_ids), atol=ATOL)
    ours = np.asarray(load_pretrained(tmp_path / "ours")(jnp.asarray(token_ids)))
    np.testing.assert_allclose(ours, hf_logits(hf_model, token_ids), atol=ATOL)


def test_bfloat16_checkpoint_loads_close_to_float32(token_ids, tmp_path):
    hf_model = make_hf_model(4, **CONFIGS["gqa_untied"])
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config.param_dtype == "bfloat16"
    assert model.embed_tokens.embedding.get_value().dtype == jnp.bfloat16
    reference = hf_logits(hf_model.float(), token_ids)
    ours = np.asarray(load_pretrained(tmp_path, dtype="float32")(jnp.asarray(token_ids)))
    # The weights are exactly representable in bf16, so float32 compute over them matches torch float32.
    np.testing.assert_allclose(ours, reference, atol=ATOL)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_missing_weights_file_is_named(tmp_path):
    make_hf_model(5, **CONFIGS["biases"]).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tmp_path)


def test_missing_config_is_named(tmp_path):
    make_hf_model(5, **CONFIGS["biases"]).save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(tmp_path)


def test_unsupported_architecture_is_named(tmp_path):
    make_hf_model(5, **CONFIGS["biases"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(architectures=["GemmaForCausalLM"], model_type="gemma")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="GemmaForCausalLM"):
        load_pretrained(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    make_hf_model(5, **CONFIGS["biases"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 72
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(64, 32\), the config implies \(72, 32\)",
    ):
        load_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    make_hf_model(5, **CONFIGS["biases"]).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        load_pretrained(tmp_path)


def test_unknown_rope_type_is_named(tmp_path):
    make_hf_model(5, **CONFIGS["biases"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="rope_type must be one of default, llama3"):
        load_pretrained(tmp_path)


def test_the_model_never_imports_its_checkpoint_format():
    """The converter depends on the model, not both ways: no import of `jaxhet.models.hf` anywhere in llama.py."""
    import ast
    import inspect

    from jaxhet.models import llama

    tree = ast.parse(inspect.getsource(llama))
    imported = set()  # every module, and every name taken from a module ("module.name"), llama.py imports
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    assert "jaxhet.models.config.LlamaConfig" in imported  # the walk does see its imports
    assert not {name for name in imported if name == "jaxhet.models.hf" or name.startswith("jaxhet.models.hf.")}


def test_the_model_class_spells_the_converter_as_its_methods(tmp_path):
    """`Llama.from_pretrained` / `model.save_pretrained`, the public names, are the converter's functions."""
    from flax import nnx

    import jaxhet

    model = jaxhet.Llama(jaxhet.LlamaConfig.tiny(vocab_size=40, num_layers=1, dtype="float32"), rngs=nnx.Rngs(0))
    model.save_pretrained(tmp_path)
    loaded = jaxhet.Llama.from_pretrained(tmp_path)
    ids = jnp.arange(7)[None] % 40
    np.testing.assert_array_equal(loaded(ids), model(ids))
