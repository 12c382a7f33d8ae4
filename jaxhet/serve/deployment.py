"""What a served model name stands for: replicas of one model balanced by load, or a cascade of such models.

Both answer `generate(request_id, prompt, params)` with a stream of `(served_by, RequestOutput)` pairs, so the
HTTP layer does not care which one a name resolves to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence

from jaxhet.chat_template import TRANSCRIPT, ChatTemplate, ChatTemplateError
from jaxhet.generation_config import SamplingDefaults
from jaxhet.serve.async_engine import AsyncEngine
from jaxhet.serve.config import SamplingParams
from jaxhet.serve.engine import RequestOutput
from jaxhet.tokenizers import Tokenizer


@dataclasses.dataclass
class ModelDeployment:
    """One model served by one or more replicas (engines on their own devices); requests go to the least loaded.

    `chat_template` builds chat prompts (None: chat requests are refused); `sampling_defaults` fill the sampling
    settings a request leaves unset.
    """

    name: str
    replicas: Sequence[AsyncEngine]
    chat_template: ChatTemplate | None = None
    sampling_defaults: SamplingDefaults = SamplingDefaults()

    def __post_init__(self) -> None:
        if not self.replicas:
            raise ValueError(f"model {self.name!r} needs at least one replica")

    @property
    def engines(self) -> list[AsyncEngine]:
        """Every engine this deployment runs."""
        return list(self.replicas)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.replicas[0].engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.replicas[0].engine.config.max_model_len

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text prompt (with BOS when the tokenizer has one); id prompts are taken as they are."""
        if not isinstance(prompt, str):
            return list(prompt)
        ids = self.tokenizer.encode(prompt)
        return [self.tokenizer.bos_id, *ids] if self.tokenizer.bos_id is not None else ids

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of the prompt the chat template makes of `messages`, opening the assistant's reply."""
        if self.chat_template is None:
            raise ChatTemplateError(
                f"model {self.name!r} has no chat template (neither chat_template.jinja nor a chat_template in "
                "tokenizer_config.json); start the server with --chat-template FILE, or --chat-template "
                f"{TRANSCRIPT} for a plain 'Role: content' transcript, or use /v1/completions"
            )
        return self.chat_template.encode(self.tokenizer, messages)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[tuple[str, RequestOutput]]:
        async for output in _least_loaded(self.replicas).generate(request_id, prompt_token_ids, params):
            yield self.name, output


def _least_loaded(replicas: Sequence[AsyncEngine]) -> AsyncEngine:
    return min(replicas, key=lambda r: r.load)


@dataclasses.dataclass
class DisaggregatedDeployment(ModelDeployment):
    """One model with prefill and decode on separate replicas: a prefill replica computes the prompt's cache and
    first token, then hands the cache pages to a decode replica, which generates the rest.

    Long prompts then never stall decoding, and each phase can run on the GPU kind that suits it (compute-bound
    prefill on fast matmul units, bandwidth-bound decode on fast memory). `replicas` are the decode replicas.
    """

    prefill: Sequence[AsyncEngine] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prefill:
            raise ValueError(f"model {self.name!r} needs at least one prefill replica")

    @property
    def engines(self) -> list[AsyncEngine]:
        return [*self.prefill, *self.replicas]

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[tuple[str, RequestOutput]]:
        handoff = None
        async for output in _least_loaded(self.prefill).generate(request_id, prompt_token_ids, params, hand_off=True):
            if output.handoff is None:
                yield self.name, output
                continue
            handoff = output.handoff
            yield self.name, dataclasses.replace(output, finished=False, finish_reason=None, handoff=None)
        if handoff is not None:
            async for output in _least_loaded(self.replicas).resume(request_id, handoff, params):
                yield self.name, output


def mean_logprob(output: RequestOutput) -> float:
    """The cascade's confidence in an answer: the mean log-probability of its tokens (-inf for no tokens)."""
    return sum(output.logprobs) / len(output.logprobs) if output.logprobs else float("-inf")


@dataclasses.dataclass
class CascadeDeployment:
    """Models tried from smallest to largest: stage i's answer is kept when its `mean_logprob` reaches
    `thresholds[i]`, otherwise the request escalates to stage i + 1; the last stage always answers.

    Every stage but the answering one runs to completion before the decision, so a streamed cascade answer
    arrives in one piece.
    """

    name: str
    stages: Sequence[ModelDeployment]
    thresholds: Sequence[float]
    escalations: list[int] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if len(self.stages) < 2 or len(self.thresholds) != len(self.stages) - 1:
            raise ValueError(
                f"cascade {self.name!r} needs at least two models and one threshold fewer than models, "
                f"got {len(self.stages)} models and {len(self.thresholds)} thresholds"
            )
        vocabularies = {stage.tokenizer.vocab_size for stage in self.stages}
        if len(vocabularies) > 1:
            raise ValueError(
                f"cascade {self.name!r} needs models sharing one tokenizer, got vocabularies {vocabularies}"
            )
        self.escalations = [0] * (len(self.stages) - 1)

    @property
    def max_model_len(self) -> int:
        return min(stage.max_model_len for stage in self.stages)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.stages[0].tokenizer

    @property
    def chat_template(self) -> ChatTemplate | None:
        return self.stages[0].chat_template

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        return self.stages[0].sampling_defaults

    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.stages[0].encode(prompt)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return self.stages[0].encode_chat(messages)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[tuple[str, RequestOutput]]:
        for index, (stage, threshold) in enumerate(zip(self.stages, self.thresholds, strict=False)):
            final = None
            async for _, output in stage.generate(f"{request_id}-{index}", prompt_token_ids, params):
                final = output
            if final is not None and mean_logprob(final) >= threshold:
                yield stage.name, dataclasses.replace(final, request_id=request_id)
                return
            self.escalations[index] += 1
        last = self.stages[-1]
        async for _, output in last.generate(request_id, prompt_token_ids, params):
            yield last.name, output
