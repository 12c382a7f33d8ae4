"""The continuous-batching engine against the plain generator: same tokens whatever the batching, chunking,
preemption or cache format, seeded sampling independent of batch neighbours, stop handling, and no compilation
after warm-up."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest
from flax import nnx

from jaxhet.generate import SamplingConfig, generate
from jaxhet.loading import load_model
from jaxhet.models import Llama, LlamaConfig
from jaxhet.serve import Engine, EngineConfig, SamplingParams
from jaxhet.serve import runner as runner_module
from jaxhet.serve.paged_cache import LayerPool
from jaxhet.tokenizers import ByteTokenizer
from jaxhet.train import TrainConfig, train

GREEDY = SamplingParams(max_tokens=10, temperature=0)
LENGTHS = (5, 37, 1, 70, 12, 3, 100, 9, 44, 17)


@pytest.fixture(scope="module")
def model() -> Llama:
    config = LlamaConfig.tiny(vocab_size=ByteTokenizer.vocab_size, num_layers=2, dtype="float32")
    return Llama(config, rngs=nnx.Rngs(params=jax.random.key(3)))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def solo(model, prompts) -> list[list[int]]:
    """Each prompt generated alone by the plain jitted generator."""
    sampling = SamplingConfig(max_new_tokens=GREEDY.max_tokens)
    return [generate(model, [p], sampling, jax.random.key(0))[0] for p in prompts]


def _engine(model, **overrides) -> Engine:
    fields = dict(max_running=4, page_size=16, num_pages=32, kv_format="float32", max_model_len=160, prefill_chunk=32)
    return Engine(model, ByteTokenizer(), EngineConfig(**{**fields, **overrides}))


def test_batched_and_chunked_generation_equals_solo_runs(model, prompts, solo):
    engine = _engine(model)
    outputs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == solo
    stats = engine.stats()
    assert stats.prompt_tokens == sum(LENGTHS) and stats.generated_tokens == GREEDY.max_tokens * len(LENGTHS)
    assert stats.kv_pages_used == 0 and stats.running == stats.waiting == 0
    assert all(o.finish_reason == "length" for o in outputs)


def test_preempted_sequences_are_recomputed_without_changing_their_tokens(model, prompts):
    # Each sequence grows from one page to four; seven pages cannot hold three of them, so the newest are preempted.
    growing = [p[:15] for p in prompts if len(p) >= 15][:4]
    expected = generate(model, growing, SamplingConfig(max_new_tokens=40), jax.random.key(0))
    engine = _engine(model, num_pages=7, max_model_len=112)
    outputs = engine.generate(growing, SamplingParams(max_tokens=40, temperature=0))
    assert [o.token_ids for o in outputs] == expected
    assert engine.stats().preemptions > 0 and engine.stats().kv_pages_used == 0


@pytest.mark.parametrize(("kv_format", "min_equal"), [("bfloat16", 9), ("int8", 9), ("int4", 6)])
def test_quantized_caches_mostly_keep_the_greedy_tokens(model, prompts, solo, kv_format, min_equal):
    outputs = _engine(model, kv_format=kv_format).generate(prompts, GREEDY)
    assert sum(o.token_ids == s for o, s in zip(outputs, solo, strict=True)) >= min_equal


def test_seeded_sampling_does_not_depend_on_the_batch(model, prompts):
    params = SamplingParams(max_tokens=8, temperature=1.2, top_p=0.9, top_k=40, seed=11)
    alone = _engine(model).generate([prompts[0]], params)[0].token_ids
    engine = _engine(model)
    together = engine.generate(prompts[:4], params)[0].token_ids
    other_seed = _engine(model).generate([prompts[0]], SamplingParams(max_tokens=8, temperature=1.2, seed=12))
    assert alone == together
    assert other_seed[0].token_ids != alone


def test_stop_strings_cut_the_text_and_streamed_text_only_grows(model):
    tokenizer = ByteTokenizer()
    engine = _engine(model, max_running=2)
    prompt = tokenizer.encode("hello")
    full = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    stop = full.text[3:5]
    engine.add_request("r", prompt, SamplingParams(max_tokens=12, temperature=0, stop=(stop,)))
    texts = []
    while engine.has_unfinished():
        texts += [o.text for o in engine.step()]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert texts[-1] == full.text[: full.text.index(stop)]


def test_eos_ends_a_request_with_reason_stop(model, prompts, solo):
    eos = solo[0][4]
    engine = Engine(model, _EosTokenizer(eos), _engine(model).config)
    (output,) = engine.generate([prompts[0]], GREEDY)
    assert output.token_ids == solo[0][: solo[0].index(eos) + 1]
    assert output.finish_reason == "stop"


class _EosTokenizer(ByteTokenizer):
    def __init__(self, eos: int):
        self.eos_id = eos
        self.stop_ids = frozenset({eos})


def test_logprobs_report_the_chosen_token_and_its_alternatives(model, prompts):
    (output,) = _engine(model).generate([prompts[1]], SamplingParams(max_tokens=4, temperature=0, logprobs=3))
    assert len(output.logprobs) == len(output.top_logprobs) == 4
    for token, chosen, alternatives in zip(output.token_ids, output.logprobs, output.top_logprobs, strict=True):
        assert len(alternatives) == 3 and max(alternatives, key=alternatives.get) == token
        assert alternatives[token] == pytest.approx(chosen) and chosen <= 0


def test_abort_frees_pages_and_unknown_ids_are_ignored(model, prompts):
    engine = _engine(model)
    engine.add_request("a", prompts[3], GREEDY)
    engine.step()
    assert engine.stats().kv_pages_used > 0
    engine.abort_request("a")
    engine.abort_request("never-added")
    assert engine.stats().kv_pages_used == 0 and not engine.has_unfinished()


@pytest.mark.parametrize(
    ("prompt", "params", "needle"),
    [
        ([], GREEDY, "at least one token"),
        ([1] * 160, GREEDY, "at most 159"),
        ([1] * 155, GREEDY, "max_tokens"),
        ([300], GREEDY, "[0, 259)"),
        ([1], SamplingParams(max_tokens=4, top_k=2**31), "top_k must be at most the vocabulary size 259"),
    ],
)
def test_requests_that_can_never_be_served_are_refused(model, prompt, params, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        _engine(model).add_request("r", prompt, params)


@pytest.mark.parametrize(
    ("field", "poison", "error"), [("top_k", 2**31, "OverflowError"), ("logprobs", "3", "TypeError")]
)
def test_a_request_failing_inside_the_step_fails_alone(model, prompts, solo, field, poison, error):
    # A value forced in after admission breaks filling the step's inputs (top_k) or taking the sampled token
    # (logprobs); only the request holding it may fail.
    poisoned = dataclasses.replace(GREEDY)
    engine = _engine(model)
    for i in range(3):
        engine.add_request(f"victim-{i}", prompts[i], GREEDY)
    engine.add_request("poisoned", prompts[3], poisoned)
    object.__setattr__(poisoned, field, poison)
    final = {}
    while engine.has_unfinished():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    assert final["poisoned"].finish_reason == "error" and final["poisoned"].error.startswith(error)
    assert [final[f"victim-{i}"].token_ids for i in range(3)] == solo[:3]
    assert engine.stats().kv_pages_used == 0 and engine.stats().running == 0


def test_duplicate_request_ids_are_refused(model):
    engine = _engine(model)
    engine.add_request("r", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("r", [3], GREEDY)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"page_size": 8}, "page_size"),
        ({"kv_format": "fp8"}, "kv_format"),
        ({"max_model_len": 100}, "multiple"),
        ({"num_pages": 8, "page_size": 16, "max_model_len": 256}, "num_pages=8 .* max_model_len=256"),
    ],
)
def test_engine_config_names_the_bad_field(fields, needle):
    with pytest.raises(ValueError, match=needle):
        EngineConfig(**fields)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"top_p": 0}, "top_p"),
        ({"logprobs": 21}, "logprobs"),
        ({"top_k": float("nan")}, "top_k must be an integer"),
        ({"temperature": float("nan")}, "temperature must be a number in [0, 100]"),
        ({"top_p": float("inf")}, "top_p must be a number in (0, 1]"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"max_tokens": True}, "max_tokens must be an integer"),
    ],
)
def test_sampling_params_name_the_bad_field(fields, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        SamplingParams(**fields)


def test_no_compilation_after_warmup(model, prompts):
    engine = _engine(model, kv_format="int8")
    engine.warmup()
    compiled = runner_module._step._cache_size()
    engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.7, seed=1))
    engine.generate(prompts[:3], GREEDY)
    assert runner_module._step._cache_size() == compiled


@pytest.mark.parametrize("kv_format", ["float32", "int4"])
def test_prefill_on_one_device_and_decode_on_another_equals_one_engine(model, prompts, kv_format):
    cpu = jax.devices()
    whole = _engine(model, kv_format=kv_format).generate(prompts[:5], GREEDY)
    config = _engine(model, kv_format=kv_format).config
    prefill = Engine(model, ByteTokenizer(), config, devices=cpu[:1])
    decode = Engine(model, ByteTokenizer(), config, devices=cpu[1:2])
    for i, prompt in enumerate(prompts[:5]):
        prefill.add_request(f"r{i}", prompt, GREEDY, hand_off=True)
    handoffs = {}
    while prefill.has_unfinished():
        handoffs.update((o.request_id, o.handoff) for o in prefill.step())
    assert prefill.stats().kv_pages_used == 0
    for request_id, handoff in handoffs.items():
        assert len(handoff.token_ids) == 1 and handoff.cached_tokens == len(handoff.prompt_token_ids)
        used_pages = -(-handoff.cached_tokens // config.page_size)
        assert handoff.nbytes == used_pages * _page_bytes(model, config)  # the used pages, not the block table
        decode.add_handoff(request_id, handoff, GREEDY)
    final = {}
    while decode.has_unfinished():
        final.update((o.request_id, o) for o in decode.step() if o.finished)
    assert [final[f"r{i}"].token_ids for i in range(5)] == [o.token_ids for o in whole]
    assert decode.stats().prompt_tokens == 0  # the decode engine imported the prompts' cache, it did not recompute


def _page_bytes(model: Llama, config: EngineConfig) -> int:
    """Bytes of one KV page in every layer (keys, values and their scales), from a one-page pool's arrays."""
    one_page = LayerPool.create(model.config, 1, config.page_size, config.kv_format)
    return model.config.num_layers * sum(leaf.nbytes for leaf in jax.tree.leaves(one_page))


@pytest.mark.parametrize("kv_format", ["float32", "int4"])
def test_a_five_token_prompt_hands_over_one_page_per_layer(model, prompts, solo, kv_format):
    config = _engine(model, kv_format=kv_format, max_model_len=256).config
    prefill = Engine(model, ByteTokenizer(), config)
    prefill.add_request("r", prompts[0], GREEDY, hand_off=True)  # 5 tokens
    (output,) = prefill.step()
    assert output.handoff.nbytes == _page_bytes(model, config)  # of the 16 pages a 256-token block table names
    decode = Engine(model, ByteTokenizer(), config, devices=jax.devices()[1:2])
    decode.add_handoff("r", output.handoff, GREEDY)
    final = None
    while decode.has_unfinished():
        final = next((o for o in decode.step() if o.finished), final)
    whole = _engine(model, kv_format=kv_format).generate([prompts[0]], GREEDY)[0]
    assert final.token_ids == whole.token_ids


def test_a_handoff_into_an_engine_with_another_cache_format_is_refused(model, prompts):
    prefill = _engine(model, kv_format="int8")
    prefill.add_request("r", prompts[0], GREEDY, hand_off=True)
    (output,) = prefill.step()
    with pytest.raises(ValueError, match="kv_format='int8'"):
        _engine(model, kv_format="bfloat16").add_handoff("r", output.handoff, GREEDY)


def test_a_handoff_from_another_model_fails_alone_and_the_batch_steps_on(model, prompts, solo):
    # A real failure inside a step, not a refusal at admission: the pages a 3-layer model's prefill engine hands
    # over (same page size, format and length) cannot be written into this 2-layer engine's pools.
    config = LlamaConfig.tiny(vocab_size=ByteTokenizer.vocab_size, num_layers=3, dtype="float32")
    prefill = _engine(Llama(config, rngs=nnx.Rngs(params=jax.random.key(4))))
    prefill.add_request("foreign", prompts[4], GREEDY, hand_off=True)
    (handoff,) = [o.handoff for o in prefill.step()]
    engine = _engine(model)
    for i in range(3):
        engine.add_request(f"victim-{i}", prompts[i], GREEDY)
    engine.step()
    engine.add_handoff("foreign", handoff, GREEDY)
    final = {}
    while engine.has_unfinished():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    assert final["foreign"].finish_reason == "error" and final["foreign"].error.startswith("ValueError")
    assert [final[f"victim-{i}"].token_ids for i in range(3)] == solo[:3]
    assert engine.stats().kv_pages_used == 0
    assert engine.generate([prompts[5]], GREEDY)[0].token_ids == solo[5]  # the engine serves on


def test_a_trained_run_is_served_as_the_generator_continues_it(tmp_path):
    overrides = {"num_layers": "2", "hidden_size": "64", "intermediate_size": "160", "data.seq_len": "32"}
    overrides |= {"data.batch_size": "4", "data.max_documents": "20", "steps": "2", "plan": "single"}
    train(TrainConfig.load(None, {**overrides, "checkpoint_dir": str(tmp_path / "run")}))
    loaded = load_model(run=tmp_path / "run")
    prompt = [loaded.tokenizer.bos_id, *loaded.tokenizer.encode("import os")]
    config = EngineConfig(max_running=2, num_pages=8, kv_format="float32", max_model_len=64, prefill_chunk=32)
    engine = Engine(loaded.model, loaded.tokenizer, config)
    (served,) = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0))
    (expected,) = generate(loaded.model, [prompt], SamplingConfig(max_new_tokens=8), jax.random.key(0))
    assert served.token_ids == expected[: len(served.token_ids)]
    assert len(served.token_ids) == 8 or served.token_ids[-1] == loaded.tokenizer.eos_id


def test_a_tensor_parallel_engine_equals_solo_runs_and_hands_off_to_one_device(model, prompts, solo):
    cpu = jax.devices()
    config = _engine(model).config
    split = Engine(model, ByteTokenizer(), config, devices=cpu[2:4])
    assert [o.token_ids for o in split.generate(prompts[:4], GREEDY)] == solo[:4]
    split.add_request("r", prompts[1], GREEDY, hand_off=True)
    handed = None
    while handed is None:  # a 37-token prompt takes two 32-token prefill chunks
        handed = next(iter(split.step()), None)
    single = Engine(model, ByteTokenizer(), config, devices=cpu[4:5])
    single.add_handoff("r", handed.handoff, GREEDY)
    final = None
    while single.has_unfinished():
        final = next((o for o in single.step() if o.finished), final)
    assert final.token_ids == solo[1]
