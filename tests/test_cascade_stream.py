"""A cascade decides on the first `decide_tokens` tokens of a stage's answer, then streams the chosen model's answer
as it is generated: scripted stages show the order of events exactly, and a real server on 127.0.0.1 spoken to with
the official `openai` client shows the same over HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from jaxhet.cli import app
from jaxhet.serve import BackgroundServer, CascadeDeployment, EngineConfig, ServerConfig, build_deployments, create_app
from jaxhet.serve.config import SamplingParams
from jaxhet.serve.engine import RequestOutput
from jaxhet.tokenizers import ByteTokenizer
from tests.tiny_models import tiny_loaded

ENGINE = EngineConfig(max_running=4, page_size=16, num_pages=64, kv_format="float32", max_model_len=192)


class _ScriptedStage:
    """A stand-in model: its answer is `length` tokens, each of log-probability `logprobs[n]` (the last value for
    later tokens), one output per token; after `pause_after` tokens it waits for `resume` to be set."""

    def __init__(self, name: str, logprobs: list[float], length: int, pause_after: int | None = None):
        self.name, self.logprobs, self.length, self.pause_after = name, logprobs, length, pause_after
        self.tokenizer = ByteTokenizer()
        self.resume = asyncio.Event()
        self.events: list[str] = []

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.events.append(f"{self.name} started")
        try:
            for n in range(1, self.length + 1):
                if n - 1 == self.pause_after:
                    await self.resume.wait()
                logprobs = [self.logprobs[min(i, len(self.logprobs) - 1)] for i in range(n)]
                done = n == self.length
                yield (
                    self.name,
                    RequestOutput(
                        request_id,
                        prompt_token_ids,
                        [65] * n,
                        "A" * n,
                        logprobs,
                        None,
                        done,
                        "length" if done else None,
                    ),
                )
        finally:
            self.events.append(f"{self.name} closed")


async def _next(stream, timeout_s: float = 30.0):
    """The stream's next item, failing (not hanging) if it waits for something that never comes."""
    return await asyncio.wait_for(anext(stream), timeout_s)


def test_a_kept_stage_streams_before_it_finishes():
    async def run():
        small = _ScriptedStage("small", [-0.1], length=40, pause_after=6)
        large = _ScriptedStage("large", [-0.1], length=40)
        cascade = CascadeDeployment("c", [small, large], [-1.0], decide_tokens=4)
        stream = cascade.generate("req", [1, 2], SamplingParams())
        first_six = [await _next(stream) for _ in range(6)]  # small is paused at token 7: nothing has finished
        assert [len(out.token_ids) for _, out in first_six] == [1, 2, 3, 4, 5, 6]
        assert all(name == "small" and out.request_id == "req" and not out.finished for name, out in first_six)
        small.resume.set()
        rest = [pair async for pair in stream]
        assert [len(out.token_ids) for _, out in rest] == list(range(7, 41)) and rest[-1][1].finished
        assert cascade.escalations == [0] and large.events == []

    asyncio.run(run())


def test_an_unconfident_prefix_escalates_without_waiting_for_the_rest():
    async def run():
        small = _ScriptedStage("small", [-5.0], length=40, pause_after=4)  # never resumed: only 4 tokens come
        large = _ScriptedStage("large", [-0.1], length=10)
        cascade = CascadeDeployment("c", [small, large], [-1.0], decide_tokens=4)
        stream = cascade.generate("req", [1, 2], SamplingParams())
        name, first = await _next(stream)
        assert (name, len(first.token_ids), first.request_id) == ("large", 1, "req")
        assert small.events == ["small started", "small closed"]  # aborted before the large model started
        assert large.events == ["large started"]
        rest = [pair async for pair in stream]
        assert len(rest[-1][1].token_ids) == 10 and rest[-1][1].finished
        assert cascade.escalations == [1]

    asyncio.run(run())


def test_only_the_first_decide_tokens_count_and_a_short_answer_is_judged_whole():
    async def run(small: _ScriptedStage) -> tuple[str, RequestOutput]:
        large = _ScriptedStage("large", [-0.1], length=3)
        cascade = CascadeDeployment("c", [small, large], [-1.0], decide_tokens=4)
        outputs = [pair async for pair in cascade.generate("req", [1], SamplingParams())]
        return outputs[-1]

    confident_start = _ScriptedStage("small", [-0.1, -0.1, -0.1, -0.1, -9.0], length=20)  # mean of all: below -1
    assert asyncio.run(run(confident_start))[0] == "small"
    unconfident_start = _ScriptedStage("small", [-9.0, -0.1], length=20)  # mean of the first 4: -2.325
    assert asyncio.run(run(unconfident_start))[0] == "large"
    short = _ScriptedStage("small", [-0.1], length=2)
    name, final = asyncio.run(run(short))
    assert name == "small" and len(final.token_ids) == 2 and final.finished


@pytest.mark.parametrize("decide_tokens", [0, -1])
def test_decide_tokens_below_one_is_refused_by_name(decide_tokens):
    stages = [_ScriptedStage("small", [-0.1], 2), _ScriptedStage("large", [-0.1], 2)]
    with pytest.raises(ValueError, match="decide_tokens"):
        CascadeDeployment("c", stages, [-1.0], decide_tokens=decide_tokens)


def test_the_serve_command_refuses_zero_decide_tokens():
    result = CliRunner().invoke(app, ["serve", "--cascade-decide-tokens", "0"])
    assert result.exit_code == 2 and "cascade-decide-tokens" in result.output


@pytest.fixture(scope="module")
def server():
    deployments = build_deployments({"small": tiny_loaded(1), "large": tiny_loaded(2, layers=3)}, ENGINE)
    stages = [deployments["small"], deployments["large"]]
    deployments["keep"] = CascadeDeployment("keep", stages, [float("-inf")], decide_tokens=4)
    deployments["escalate"] = CascadeDeployment("escalate", stages, [float("inf")], decide_tokens=4)
    with BackgroundServer(create_app(deployments, ServerConfig())) as background:
        yield background


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _metric(url: str, name: str, **labels: str) -> float:
    samples = (s for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text) for s in family.samples)
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.parametrize(("cascade", "answerer"), [("keep", "small"), ("escalate", "large")])
def test_streamed_and_whole_cascade_answers_are_equal(client, cascade, answerer):
    whole = client.completions.create(model=cascade, prompt="def f(x):\n", max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(model=cascade, prompt="def f(x):\n", max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert whole.model == answerer and {c.model for c in chunks} == {answerer}

    messages = [{"role": "user", "content": "Say hi."}]
    whole = client.chat.completions.create(model=cascade, messages=messages, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(model=cascade, messages=messages, max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_kept_answer_arrives_in_many_chunks(client):
    """Before, the cascade sent the small model's whole answer as one output (one content chunk)."""
    stream = client.completions.create(model="keep", prompt="while True:\n", max_tokens=40, temperature=0, stream=True)
    texts, seen = [], ""
    for chunk in stream:
        if chunk.choices[0].text:
            seen += chunk.choices[0].text
            texts.append(seen)
    assert len(texts) > 4  # more than the 4 held-back outputs of the decision: later outputs came one by one
    assert all(len(a) < len(b) for a, b in zip(texts, texts[1:], strict=False))


def test_an_escalated_answer_is_the_large_models_and_frees_the_small_models_pages(server, client):
    body = dict(prompt="while True:\n", max_tokens=150, temperature=0)
    escalations = _metric(server.url, "jaxhet_cascade_escalations_total", cascade="escalate", stage="small")
    small_tokens = _metric(server.url, "jaxhet_generation_tokens_total", model="small")
    small_pages = _metric(server.url, "jaxhet_kv_pages_used", model="small")
    escalated = client.completions.create(model="escalate", **body)
    direct = client.completions.create(model="large", **body)
    assert escalated.model == "large" and escalated.choices[0].text == direct.choices[0].text
    assert escalated.choices[0].finish_reason == direct.choices[0].finish_reason
    after = _metric(server.url, "jaxhet_cascade_escalations_total", cascade="escalate", stage="small")
    assert after == escalations + 1
    deadline = time.monotonic() + 30
    while _metric(server.url, "jaxhet_kv_pages_used", model="small") > small_pages and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _metric(server.url, "jaxhet_kv_pages_used", model="small") == small_pages
    assert _metric(server.url, "jaxhet_generation_tokens_total", model="small") - small_tokens < 150  # aborted early
