"""Qwen2 (q/k/v biases) and Mistral (sliding window) as configurations of the one Llama-family decoder: parity with
`transformers` (CPU torch, float32, random weights made here) in logits, greedy generation and a save round trip."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from jaxhet import ConfigError, Llama  # noqa: E402
from jaxhet.generate import SamplingConfig, generate  # noqa: E402
from jaxhet.models import LlamaConfig  # noqa: E402
from jaxhet.serve import Engine, EngineConfig  # noqa: E402
from jaxhet.tokenizers import ByteTokenizer  # noqa: E402

ATOL = 1e-4
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
ARCHITECTURES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 5}),
}


def _hf_model(name: str):
    config_class, model_class, extra = ARCHITECTURES[name]
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


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = _hf_model(request.param)
    hf_model.save_pretrained(directory)
    return request.param, hf_model, Llama.from_pretrained(directory)


def test_logits_equal_transformers_at_an_odd_length(pair):
    name, hf_model, model = pair
    assert model.config.architecture == name
    ids = np.random.default_rng(1).integers(0, SHAPE["vocab_size"], size=(2, 13))  # longer than Mistral's window
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), _hf_logits(hf_model, ids), atol=ATOL, rtol=0)


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
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf_model)
    ids = np.random.default_rng(3).integers(0, SHAPE["vocab_size"], size=(1, 11))
    np.testing.assert_allclose(_hf_logits(reloaded, ids), _hf_logits(hf_model, ids), atol=ATOL, rtol=0)


def test_an_unsupported_architecture_is_refused_naming_the_supported_ones(tmp_path):
    _hf_model("qwen2").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(architectures=["GemmaForCausalLM"], model_type="gemma")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="GemmaForCausalLM.*LlamaForCausalLM.*Qwen2ForCausalLM.*MistralForCausalLM"):
        Llama.from_pretrained(tmp_path)


def test_serving_a_sliding_window_model_past_its_window_is_refused():
    config = LlamaConfig.tiny(vocab_size=259, num_layers=1, architecture="mistral", sliding_window=16)
    engine = Engine(Llama(config, rngs=nnx.Rngs(0)), ByteTokenizer(), EngineConfig(max_model_len=32, num_pages=4))
    with pytest.raises(ConfigError, match="sliding_window=16.*max_model_len at most 16"):
        engine.warmup()
