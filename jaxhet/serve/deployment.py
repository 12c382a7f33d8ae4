"""What a served model name stands for: replicas of one model balanced by load (whole, or prefill handing over to
decode), or a cascade of such models.

Both answer `generate(request_id, prompt, params)` with a stream of `(served_by, RequestOutput)` pairs, so the
HTTP layer does not care which one a name resolves to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence

from jaxhet.chat_template import TRANSCRIPT, ChatTemplate, ChatTemplateError
from jaxhet.generation_config import SamplingDefaults
from jaxhet.serve.async_engine import AsyncEngine, ReplicaLost
from jaxhet.serve.config import SamplingParams
from jaxhet.serve.engine import RequestOutput
from jaxhet.tokenizers import Tokenizer

MIN_ROUTED_RPS = 1e-9  # a replica the plan routes nothing to takes requests only when no other one is up


@dataclasses.dataclass
class ModelDeployment:
    """One model served by replicas (engines on their own devices) in up to three roles.

    `replicas` serve requests whole. `prefill` replicas compute a prompt's cache and first token, then hand the cache
    pages to a `decode` replica, which generates the rest: long prompts then never stall decoding, and each phase
    can run on the GPU kind that suits it (compute-bound prefill, bandwidth-bound decode). A request starts on the
    least loaded of the whole and prefill replicas, and a handed-over one continues on the least loaded decode
    replica, load measured against the requests/s the plan routes to each (`routed_rps`; alike without a plan).
    `chat_template` builds chat prompts (None: chat requests are refused); `sampling_defaults` fill the sampling
    settings a request leaves unset.

    `route` replaces the replica lists at once (live re-planning). A request picks its replica when it starts, and
    its decode replica when its prefill ends, so after `route` returns no request starts on a replica left out,
    and those already running finish where they are.
    """

    name: str
    replicas: Sequence[AsyncEngine] = ()
    chat_template: ChatTemplate | None = None
    sampling_defaults: SamplingDefaults = SamplingDefaults()
    prefill: Sequence[AsyncEngine] = ()
    decode: Sequence[AsyncEngine] = ()

    def __post_init__(self) -> None:
        self.route(self.replicas, self.prefill, self.decode)

    def route(
        self, replicas: Sequence[AsyncEngine], prefill: Sequence[AsyncEngine], decode: Sequence[AsyncEngine]
    ) -> None:
        """Serve from now on with these replicas; ValueError (nothing changed) if some role cannot be served."""
        if not replicas and not prefill:
            raise ValueError(f"model {self.name!r} needs at least one replica (role 'both' or 'prefill')")
        if bool(prefill) != bool(decode):
            have, lack = ("prefill", "decode") if prefill else ("decode", "prefill")
            raise ValueError(f"model {self.name!r} has {have} replicas but no {lack} replica")
        self.replicas, self.prefill, self.decode = list(replicas), list(prefill), list(decode)

    @property
    def engines(self) -> list[AsyncEngine]:
        """Every engine this deployment runs."""
        return [*self.replicas, *self.prefill, *self.decode]

    def roles(self) -> dict[str, list[AsyncEngine]]:
        """Role -> the engines serving in it, for the roles that have any."""
        lists = {"both": self.replicas, "prefill": self.prefill, "decode": self.decode}
        return {role: list(engines) for role, engines in lists.items() if engines}

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engines[0].tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engines[0].max_model_len

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

    def _entry(self) -> AsyncEngine:
        """The replica a request starts on: the least loaded whole or prefill one, prefill ones only while a decode
        replica is up (a prefill nobody can continue is not started)."""
        decoding = any(r.available for r in self.decode)
        if self.prefill and not decoding and not self.replicas:
            return _least_loaded(self.name, "decode", self.decode)  # none is up: raises, naming them
        return _least_loaded(self.name, "whole or prefill", [*self.replicas, *(self.prefill if decoding else ())])

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[tuple[str, RequestOutput]]:
        entry = self._entry()
        if not any(entry is p for p in self.prefill):
            async for output in entry.generate(request_id, prompt_token_ids, params):
                yield self.name, output
            return
        handoff = None
        async for output in entry.generate(request_id, prompt_token_ids, params, hand_off=True):
            if output.handoff is None:
                yield self.name, output
                continue
            handoff = output.handoff
            yield self.name, dataclasses.replace(output, finished=False, finish_reason=None, handoff=None)
        if handoff is not None:
            async for output in _least_loaded(self.name, "decode", self.decode).resume(request_id, handoff, params):
                yield self.name, output


def _least_loaded(model: str, role: str, replicas: Sequence[AsyncEngine]) -> AsyncEngine:
    """Of `replicas` that take requests (one on a process that died does not), the one whose load with this request
    is least for the traffic routed to it (`(load + 1) / routed_rps`: a replica the plan routes 3x the requests/s
    to holds 3x the requests; the first on a tie); ReplicaLost naming them when none is up."""
    up = [r for r in replicas if r.available]
    if not up:
        down = ", ".join(f"{r.name} on node {r.node}" for r in replicas)
        raise ReplicaLost(f"model {model!r}: no {role} replica is up ({down} down)")
    return min(up, key=lambda r: (r.load + 1) / max(r.routed_rps, MIN_ROUTED_RPS))


def mean_logprob(output: RequestOutput, tokens: int | None = None) -> float:
    """The cascade's confidence in an answer: the mean log-probability of its first `tokens` tokens (all of them
    by default; -inf for no tokens)."""
    logprobs = output.logprobs[:tokens]
    return sum(logprobs) / len(logprobs) if logprobs else float("-inf")


@dataclasses.dataclass
class CascadeDeployment:
    """Models tried from smallest to largest, deciding on a prefix of each stage's answer.

    Stage i (all but the last) generates until its answer has `decide_tokens` tokens or finishes sooner; the
    outputs so far are held back. When the `mean_logprob` of those first `decide_tokens` tokens reaches
    `thresholds[i]`, the cascade commits to stage i: it yields the held-back outputs, then each later output of
    stage i as it is produced. Otherwise it leaves stage i's stream, which aborts that request and frees its KV
    pages, counts one more in `escalations[i]`, and tries stage i + 1. The last stage always answers, streamed
    from its first token. Outputs carry the cascade's `request_id` and are served by the answering stage's name.
    """

    name: str
    stages: Sequence[ModelDeployment]
    thresholds: Sequence[float]
    decide_tokens: int = 16
    escalations: list[int] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if len(self.stages) < 2 or len(self.thresholds) != len(self.stages) - 1:
            raise ValueError(
                f"cascade {self.name!r} needs at least two models and one threshold fewer than models, "
                f"got {len(self.stages)} models and {len(self.thresholds)} thresholds"
            )
        if self.decide_tokens < 1:
            raise ValueError(f"cascade {self.name!r} needs decide_tokens > 0, got {self.decide_tokens}")
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
        for index, stage in enumerate(self.stages):
            last = index == len(self.thresholds)
            stream = stage.generate(f"{request_id}-{index}", prompt_token_ids, params)
            try:
                held = [] if last else await self._prefix(stream)
                if last or self._keeps(held, self.thresholds[index]):
                    async for served_by, output in self._answer(held, stream):
                        yield served_by, dataclasses.replace(output, request_id=request_id)
                    return
            finally:
                await stream.aclose()  # an escalated stage's request is aborted here, freeing its KV pages
            self.escalations[index] += 1

    async def _prefix(self, stream: AsyncIterator[tuple[str, RequestOutput]]) -> list[tuple[str, RequestOutput]]:
        """A stage's outputs up to the first with `decide_tokens` tokens, or up to the finished one if sooner."""
        held = []
        async for served_by, output in stream:
            held.append((served_by, output))
            if output.finished or len(output.token_ids) >= self.decide_tokens:
                break
        return held

    def _keeps(self, held: list[tuple[str, RequestOutput]], threshold: float) -> bool:
        """Whether the cascade commits to the stage whose held-back outputs are `held`."""
        return bool(held) and mean_logprob(held[-1][1], self.decide_tokens) >= threshold

    @staticmethod
    async def _answer(
        held: list[tuple[str, RequestOutput]], stream: AsyncIterator[tuple[str, RequestOutput]]
    ) -> AsyncIterator[tuple[str, RequestOutput]]:
        """The committed stage's held-back outputs, then its later ones as they are produced."""
        for pair in held:
            yield pair
        async for pair in stream:
            yield pair
