"""Llama, Qwen2 (q/k/v biases), Mistral (sliding window) and Qwen3 (per-head q/k norms, explicit head_dim) as
configurations of the one Llama-family decoder: parity with `transformers` (CPU torch, float32, random weights made
here) in logits, incremental decoding, greedy generation and a save round trip."""

import asyncio
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

import planners  # noqa: E402
from jaxhet import ConfigError, KVCache, Llama, load_pretrained, save_pretrained  # noqa: E402
from jaxhet.generate import SamplingConfig, generate  # noqa: E402
from jaxhet.loading import load_model_dir  # noqa: E402
from jaxhet.models import LlamaConfig  # noqa: E402
from jaxhet.parallel import megatron_specs, shard_config  # noqa: E402
from jaxhet.serve import Engine, EngineConfig, SamplingParams, build_deployments  # noqa: E402
from jaxhet.tokenizers import ByteTokenizer  # noqa: E402

# Float32 on both sides; the two differ only in summation order (~1e-6 at these sizes).
ATOL = 1e-4
# Our own full forward against our own cache path: same kernels, attention over a padded cache (~1e-7).
DECODE_ATOL = 1e-5
SHAPE = dict(
    vocab_size=89,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
)
# name -> (model_type, config class, model class, fields beyond SHAPE)
ARCHITECTURES = {
    "llama": ("llama", transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": ("qwen2", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "mistral": ("mistral", transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 5}),
    # head_dim 24, not hidden_size / heads = 16: Qwen3 states it explicitly.
    "qwen3": ("qwen3", transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 24}),
    "qwen3_attention_bias": (
        "qwen3",
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        {"head_dim": 24, "attention_bias": True},
    ),
}


def _hf_model(name: str):
    _, config_class, model_class, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = config_class(**SHAPE, **extra, attn_implementation="eager")
    model = model_class(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb them so their mapping is tested
        for param_name, param in model.named_parameters():
            if param_name.endswith(("norm.weight", ".bias")):
                param.add_(0.1 * torch.randn_like(param))
    return model


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.numpy()


def _saved_hf_config(tmp_path, name: str) -> dict:
    _hf_model(name).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = _hf_model(request.param)
    hf_model.save_pretrained(directory)
    return request.param, hf_model, load_pretrained(directory)


def test_logits_equal_transformers_at_an_odd_length(pair):
    name, hf_model, model = pair
    assert model.config.architecture == ARCHITECTURES[name][0]
    ids = np.random.default_rng(1).integers(0, SHAPE["vocab_size"], size=(2, 13))  # longer than Mistral's window
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), _hf_logits(hf_model, ids), atol=ATOL, rtol=0)


def test_incremental_decoding_equals_the_full_forward(pair):
    _, _, model = pair
    ids = jnp.asarray(np.random.default_rng(4).integers(0, SHAPE["vocab_size"], size=(2, 13)))
    full = np.asarray(model(ids))
    cache = KVCache.create(model.config, batch=2, max_len=16)
    logits, cache = model.extend(ids[:, :5], cache)  # a prefill of 5, then 8 one-token steps past Mistral's window
    np.testing.assert_allclose(logits, full[:, :5], atol=DECODE_ATOL, rtol=0)
    for t in range(5, 13):
        logits, cache = model.extend(ids[:, t : t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=DECODE_ATOL, rtol=0)


def test_greedy_generation_equals_transformers_generate(pair):
    _, hf_model, model = pair
    prompt = np.random.default_rng(2).integers(0, SHAPE["vocab_size"], size=(1, 9))
    with torch.no_grad():
        expected = hf_model.generate(
            torch.from_numpy(prompt).long(), max_new_tokens=10, do_sample=False, pad_token_id=0
        )[0, 9:].tolist()
    (ours,) = generate(model, prompt.tolist(), SamplingConfig(max_new_tokens=10), jax.random.key(0))
    assert ours == expected


def test_a_saved_model_loads_back_in_transformers(pair, tmp_path):
    name, hf_model, model = pair
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == ARCHITECTURES[name][0]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf_model)
    assert reloaded.state_dict().keys() == hf_model.state_dict().keys()
    ids = np.random.default_rng(3).integers(0, SHAPE["vocab_size"], size=(1, 11))
    np.testing.assert_allclose(_hf_logits(reloaded, ids), _hf_logits(hf_model, ids), atol=ATOL, rtol=0)


def test_an_unsupported_architecture_is_refused_naming_the_supported_ones(tmp_path):
    config = _saved_hf_config(tmp_path, "qwen2")
    config.update(architectures=["GemmaForCausalLM"], model_type="gemma")
    (tmp_path / "config.json").write_text(json.dumps(config))
    supported = "LlamaForCausalLM.*Qwen2ForCausalLM.*MistralForCausalLM.*Qwen3ForCausalLM"
    with pytest.raises(ConfigError, match=f"GemmaForCausalLM.*{supported}"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"use_sliding_window": True}, "Qwen3's use_sliding_window is not supported"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "Qwen3's layer_types must all be 'full_attention'"),
    ],
    ids=["use_sliding_window", "layer_types"],
)
def test_qwen3_sliding_window_layers_are_refused_naming_the_field(fields, message, tmp_path):
    config = _saved_hf_config(tmp_path, "qwen3")
    config.update(fields)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        load_pretrained(tmp_path)


def test_qwen3_head_dim_defaults_as_transformers_does():
    hf_config = transformers.Qwen3Config(**SHAPE)
    assert hf_config.head_dim == 128
    hf = {**hf_config.to_dict(), "architectures": ["Qwen3ForCausalLM"]}
    del hf["head_dim"]
    assert LlamaConfig.from_hf_dict(hf).head_dim == 128


def test_qk_norm_belongs_to_qwen3_only():
    with pytest.raises(ConfigError, match="qk_norm.*qwen3"):
        LlamaConfig.tiny(qk_norm=True)
    with pytest.raises(ConfigError, match="qk_norm.*qwen3"):
        LlamaConfig.tiny(architecture="qwen3")


def test_qwen3_under_tensor_parallelism_splits_heads_and_replicates_the_qk_norms():
    config = LlamaConfig.tiny(architecture="qwen3", qk_norm=True, num_layers=1, num_kv_heads=4, head_dim=24)
    local = shard_config(config, 2, "tp")
    assert (local.num_heads, local.num_kv_heads, local.head_dim) == (2, 2, 24)
    params = nnx.state(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))).to_pure_dict()
    attn = megatron_specs(params, 2, "tp")["layers"][0]["self_attn"]
    assert attn["q_norm"]["weight"] == jax.sharding.PartitionSpec()
    assert attn["k_norm"]["weight"] == jax.sharding.PartitionSpec()
    assert attn["q_proj"]["kernel"] == jax.sharding.PartitionSpec(None, "tp")


def test_a_qwen3_checkpoint_served_on_a_tp2_replica_generates_as_one_device(tmp_path):
    _hf_model("qwen3").save_pretrained(tmp_path)
    loaded = load_model_dir(tmp_path, lazy=True)  # what `jaxhet serve --model DIR` does
    replica = planners.ServeReplica(
        model="m", kind="cpu", tp=2, devices=(0, 1), max_batch=1, capacity_rps=1.0, routed_rps=1.0
    )
    plan = planners.ServePlan((replica,), "min_latency", throughput_scale=1.0, price_per_hour=0.0, rates={"m": 1.0})
    config = EngineConfig(
        max_running=1, page_size=16, num_pages=4, kv_format="float32", max_model_len=32, prefill_chunk=16
    )
    (deployment,) = build_deployments({"m": loaded}, config, plan=plan).values()
    prompt = [3, 14, 15, 88, 65, 35, 8]

    async def served() -> list[int]:
        greedy = SamplingParams(max_tokens=6, temperature=0)
        outputs = [out async for _, out in deployment.generate("r", prompt, greedy)]
        await asyncio.gather(*(r.close() for r in deployment.replicas))
        return outputs[-1].token_ids

    whole = load_pretrained(tmp_path)
    (want,) = generate(whole, [prompt], SamplingConfig(max_new_tokens=6), jax.random.key(0))
    assert asyncio.run(served()) == want


def test_serving_a_sliding_window_model_past_its_window_is_refused():
    config = LlamaConfig.tiny(vocab_size=259, num_layers=1, architecture="mistral", sliding_window=16)
    engine = Engine(Llama(config, rngs=nnx.Rngs(0)), ByteTokenizer(), EngineConfig(max_model_len=32, num_pages=4))
    with pytest.raises(ConfigError, match="sliding_window=16.*max_model_len at most 16"):
        engine.warmup()
