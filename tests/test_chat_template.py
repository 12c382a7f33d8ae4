"""Chat templates and stop tokens of Hugging Face checkpoints: prompts built as `transformers` builds them, stops at
every EOS id a checkpoint lists, sampling defaults from `generation_config.json`, and chat refused with a 400 for a
model without a template. Tokenizers are trained here with the `tokenizers` library; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jax
import pytest
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxhet.chat_template import ChatTemplateError, load_chat_template
from jaxhet.loading import load_model
from jaxhet.models import Llama, LlamaConfig, save_pretrained
from jaxhet.serve import (
    BackgroundServer,
    Engine,
    EngineConfig,
    ModelDeployment,
    SamplingParams,
    build_deployments,
    create_app,
)
from jaxhet.tokenizers import load_tokenizer

ENGINE = EngineConfig(max_running=4, page_size=16, num_pages=32, kv_format="float32", max_model_len=128)
CORPUS = ["You are a helpful assistant.", "What is the capital of France? Paris.", "def f(x):\n    return x * 2\n"]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": " Four. "},
    {"role": "user", "content": "And in French?"},
]

# Llama 3 Instruct's template, as its tokenizer_config.json ships it.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# ChatML as Qwen2 writes it, over several indented lines (so trim_blocks and lstrip_blocks matter).
CHATML = """{% for message in messages %}
    {% if loop.first and messages[0]['role'] != 'system' %}
{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {% endif %}
    {{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|im_start|>assistant\n' }}
{% endif %}
"""
CHATML_SPECIALS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _checkpoint(
    directory: Path,
    special_tokens: list[str],
    tokenizer_config: dict,
    *,
    generation_config: dict | None = None,
    seed: int = 0,
) -> Path:
    """A random tiny Llama with a byte-level BPE tokenizer trained here on CORPUS, in Hugging Face format."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens, initial_alphabet=alphabet)
    tokenizer.train_from_iterator(CORPUS * 10, trainer)
    config = LlamaConfig.tiny(vocab_size=tokenizer.get_vocab_size(), num_layers=2, dtype="float32")
    save_pretrained(Llama(config, rngs=nnx.Rngs(params=jax.random.key(seed))), directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    files = {"tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer_config}}
    files |= {"generation_config.json": generation_config} if generation_config is not None else {}
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content))
    return directory


def _transformers_ids(directory: Path, messages: list[dict]) -> list[int]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict | transformers.BatchEncoding) else ids)


@pytest.mark.parametrize(
    ("template", "specials", "tokens", "messages"),
    [
        (LLAMA3, LLAMA3_SPECIALS, LLAMA3_TOKENS, MESSAGES),
        (CHATML, CHATML_SPECIALS, CHATML_TOKENS, MESSAGES),
        (CHATML, CHATML_SPECIALS, CHATML_TOKENS, MESSAGES[1:2]),  # no system message: the template adds one
    ],
    ids=["llama3", "chatml", "chatml-default-system"],
)
def test_prompt_ids_equal_transformers_apply_chat_template(tmp_path, template, specials, tokens, messages):
    directory = _checkpoint(tmp_path, tokens, {**specials, "chat_template": template})
    chat = load_chat_template(directory)
    ids = chat.encode(load_tokenizer(directory), messages)
    assert ids == _transformers_ids(directory, messages)
    assert chat.origin.endswith("tokenizer_config.json chat_template")


def test_a_chat_template_jinja_file_is_preferred_and_an_override_replaces_both(tmp_path):
    directory = _checkpoint(tmp_path, CHATML_TOKENS, {**CHATML_SPECIALS, "chat_template": "unused"})
    (directory / "chat_template.jinja").write_text(CHATML)
    assert load_chat_template(directory).source == CHATML
    override = tmp_path / "mine.jinja"
    override.write_text("{{ messages[-1]['content'] }}")
    assert load_chat_template(directory, override).render(MESSAGES) == "And in French?"
    with pytest.raises(ChatTemplateError, match="no such file"):
        load_chat_template(directory, tmp_path / "missing.jinja")


def test_raise_exception_tojson_and_loop_controls_render_as_in_transformers(tmp_path):
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% continue %}{% endif %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 1) %}"
        "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
        "{{ m | tojson }}<br>{% endfor %}"
    )
    directory = _checkpoint(tmp_path, CHATML_TOKENS, {**CHATML_SPECIALS, "chat_template": template})
    chat = load_chat_template(directory)
    messages = [{"role": "system", "content": "<é>"}, {"role": "user", "content": "a & b"}]
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    assert chat.render(messages) == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        chat.render(messages[1:])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        load_chat_template(directory, _write(tmp_path / "broken.jinja", "{% for m in messages %}"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _seeded(engine: Engine, prompt: list[int], max_tokens: int):
    """A sampled but reproducible continuation (a random tiny model's greedy one repeats a single token)."""
    (output,) = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0))
    return output


def test_generation_stops_at_either_eos_id_of_generation_config(tmp_path):
    directory = _checkpoint(tmp_path, CHATML_TOKENS, {}, seed=3)
    loaded = load_model(hf_dir=directory)
    prompt = loaded.tokenizer.encode("What is the capital")
    free = _seeded(Engine(loaded.model, loaded.tokenizer, ENGINE), prompt, 12).token_ids
    first_seen = {token: index for index, token in reversed(list(enumerate(free)))}
    assert len(first_seen) >= 3, f"the model should say three different tokens, said {free}"
    (early, early_at), (late, late_at) = sorted(first_seen.items(), key=lambda item: item[1])[1:3]
    unused = next(i for i in range(loaded.tokenizer.vocab_size) if i not in free)
    config = json.loads((directory / "config.json").read_text())
    for eos_ids, stop, stop_at in [([late, early], early, early_at), ([unused, late], late, late_at)]:
        config["eos_token_id"] = eos_ids[0]
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
        tokenizer = load_tokenizer(directory)
        assert tokenizer.stop_ids == set(eos_ids) and tokenizer.eos_id == eos_ids[0]
        output = _seeded(Engine(loaded.model, tokenizer, ENGINE), prompt, 12)
        assert output.token_ids == free[: stop_at + 1] and output.token_ids[-1] == stop
        assert output.finish_reason == "stop"


def test_the_end_of_turn_token_the_tokenizer_config_names_is_a_stop_id(tmp_path):
    directory = _checkpoint(tmp_path, LLAMA3_TOKENS, LLAMA3_SPECIALS, generation_config={"eos_token_id": [1]})
    end_of_turn = Tokenizer.from_file(str(directory / "tokenizer.json")).token_to_id("<|eot_id|>")
    tokenizer = load_tokenizer(directory)
    assert tokenizer.stop_ids == {1, end_of_turn} and tokenizer.eos_id == 1


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    directory = _checkpoint(
        tmp_path_factory.mktemp("chatml"),
        CHATML_TOKENS,
        {**CHATML_SPECIALS, "chat_template": CHATML},
        generation_config={"temperature": 0.0, "top_p": 0.9},
    )
    loaded = load_model(hf_dir=directory)
    deployment = build_deployments({"chatml": loaded}, ENGINE)["chatml"]
    base = ModelDeployment("base", deployment.replicas)  # the same model, without a template
    with BackgroundServer(create_app({"chatml": deployment, "base": base})) as server:
        yield server, directory


def test_the_server_chats_through_the_template_and_samples_with_the_checkpoint_defaults(chat_server):
    server, directory = chat_server
    expected = _transformers_ids(directory, MESSAGES)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        chat = http.post("/v1/chat/completions", json={"model": "chatml", "messages": MESSAGES, "max_tokens": 6})
        completion = http.post(
            "/v1/completions", json={"model": "chatml", "prompt": expected, "max_tokens": 6, "temperature": 0}
        )
    assert chat.status_code == 200 and completion.status_code == 200
    assert chat.json()["usage"]["prompt_tokens"] == len(expected)
    # generation_config.json's temperature 0 makes the request without a temperature greedy.
    assert chat.json()["choices"][0]["message"]["content"] == completion.json()["choices"][0]["text"]


def test_a_chat_request_to_a_model_without_a_template_gets_a_400_naming_the_problem(chat_server):
    server, _ = chat_server
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "base", "messages": MESSAGES})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages"
    assert "has no chat template" in error["message"] and "--chat-template" in error["message"]
