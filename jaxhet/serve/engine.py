"""`Engine`: continuous batching over a paged KV cache, one step at a time.

Each `step` (1) admits waiting requests while a batch slot and the pages for their whole prompt are free (keeping
one page of headroom per running sequence), (2) gives every decoding sequence the page its next token needs,
preempting the most recently admitted sequences when the pool runs dry (their pages are freed and they are
recomputed from their tokens later: no output is lost or changed), and (3) runs one decode batch and one prefill
batch whose prompt chunks share a fixed token budget, so a long prompt never stalls the decoders. Sampling keys
come from each request's seed and token index, so a seeded request gives the same tokens whatever it is batched
with, and greedy requests give what they would give alone.

With `EngineConfig.prefix_caching` (the default), a request is admitted holding the cached pages of its longest
cached run of full prompt pages (shared read-only with whoever else holds them, or taken back from the pool of
freed ones) and prefills from the first token after them; at least its last prompt token is always computed, so it
has logits to sample from, and it writes only into its own pages past the shared ones. Each page a sequence fills
is registered for later requests. Requests admitted in the same step do not share the prefix they all still have
to compute.

A request can also be split across two engines, prefill on one and decode on another (`hand_off=True`, then
`add_handoff` with the output's `KVHandoff`): the decode engine imports the prompt's cache pages instead of
recomputing them.

A failure that concerns one request (filling its row of the step's inputs, importing its pages, decoding its
token) fails that request alone: it ends with `finish_reason="error"` and `error` set, and the rest of the batch
steps on unchanged. Only a failure of the batched device program itself escapes `step`.

The engine is single-threaded; `AsyncEngine` runs it on its own thread for the HTTP server.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np

from jaxhet.models.llama import Llama
from jaxhet.serve.config import EngineConfig, FieldError, SamplingParams
from jaxhet.serve.detokenize import TextStream
from jaxhet.serve.paged_cache import LayerPool, PageAllocator, page_keys
from jaxhet.serve.runner import ModelRunner, StepInputs, StepOutputs
from jaxhet.tokenizers import Tokenizer

_SEED_RANGE = 2**31
_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class KVHandoff:
    """A sequence leaving a prefill engine after its first token: tokens, sampling state and its cached keys and
    values: `cached_tokens` of them, in exactly the pages that hold them, exported from the prefill engine's pools
    in their stored format (scales included) as runs of power-of-two page counts (`runner.page_runs`)."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    seed: int
    cached_tokens: int
    pages: tuple[tuple[LayerPool, ...], ...]
    page_size: int
    kv_format: str

    @property
    def nbytes(self) -> int:
        """Bytes of cache handed over: every page's keys, values and scales, in every layer."""
        return sum(leaf.nbytes for leaf in jax.tree.leaves(self.pages))


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """Everything one request has produced so far; `text` only ever grows between outputs of one request.

    A request added with `hand_off=True` ends after its first token with `finish_reason="handoff"` and `handoff`
    set, for a decode engine's `add_handoff` to continue it. A request that failed on its own ends with
    `finish_reason="error"` and `error` saying why.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None
    finished: bool
    finish_reason: str | None
    handoff: KVHandoff | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """Queue depths, KV-page use and running totals, as /metrics reports them. `kv_pages_cached`: free pages still
    holding a cached prefix; `prefix_cache_queries`: tokens of the sequences looked up in the prefix cache at
    admission (a preempted sequence is looked up again), `prefix_cache_hits`: those of them found cached."""

    waiting: int = 0
    running: int = 0
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    kv_pages_cached: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


@dataclasses.dataclass
class _Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    admitted: int
    text: TextStream
    generated: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    keys: list[bytes] = dataclasses.field(default_factory=list)
    computed: int = 0
    hand_off: bool = False
    imported: KVHandoff | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def pending(self) -> int:
        """Tokens whose keys/values are not cached yet; the last of them is fed to predict the next token."""
        return len(self.prompt) + len(self.generated) - self.computed


class Engine:
    """Serve one model on `devices` (default: the first device; several split the model tensor-parallel): add
    requests, call `step` until `has_unfinished` is False. With `weights_dir`, the weights are read from that
    Hugging Face directory straight into the devices' layout (see `ModelRunner`)."""

    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        *,
        devices: Sequence[jax.Device] | None = None,
        weights_dir: Path | None = None,
    ):
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.vocab_size = model.config.vocab_size
        self._runner = ModelRunner(model, self.config, devices=devices, weights_dir=weights_dir)
        self._allocator = PageAllocator(self.config.num_pages)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._requests: dict[str, _Sequence] = {}
        self._seeds = np.random.default_rng(self.config.seed)
        self._admissions = itertools.count()
        self._totals = collections.Counter()
        self._failed: list[RequestOutput] = []

    @property
    def devices(self) -> tuple[jax.Device, ...]:
        """The devices the model and its KV cache live on (several: split tensor-parallel)."""
        return self._runner.devices

    @property
    def attention_backend(self) -> str:
        """The attention backend every step runs (`runner.serving_backend`: `sage` over an int8 cache)."""
        return self._runner.attention_backend

    def warmup(self) -> None:
        """Compile every step shape, so that no request waits for a compilation."""
        self._runner.warmup()

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *, hand_off: bool = False
    ) -> None:
        """Queue a request; ValueError (naming the problem) if it can never be served.

        With `hand_off`, the request stops after its first token and its output carries a `KVHandoff`.
        """
        self._check(request_id, prompt_token_ids, params)
        seed = params.seed if params.seed is not None else int(self._seeds.integers(_SEED_RANGE))
        self._enqueue(
            _Sequence(
                request_id=request_id,
                prompt=list(prompt_token_ids),
                params=params,
                seed=seed % _SEED_RANGE,
                admitted=-1,
                text=TextStream(self.tokenizer, params.stop),
                hand_off=hand_off,
            )
        )

    def add_handoff(self, request_id: str, handoff: KVHandoff, params: SamplingParams) -> None:
        """Continue a sequence prefilled by another engine (same model, page size and KV format) from its cache."""
        if (handoff.page_size, handoff.kv_format) != (self.config.page_size, self.config.kv_format):
            raise ValueError(
                f"a handoff with page_size={handoff.page_size}, kv_format={handoff.kv_format!r} cannot enter an "
                f"engine with page_size={self.config.page_size}, kv_format={self.config.kv_format!r}"
            )
        self._check(request_id, handoff.prompt_token_ids, params)
        sequence = _Sequence(
            request_id=request_id,
            prompt=list(handoff.prompt_token_ids),
            params=params,
            seed=handoff.seed,
            admitted=-1,
            text=TextStream(self.tokenizer, params.stop),
            generated=list(handoff.token_ids),
            logprobs=list(handoff.logprobs),
            top_logprobs=list(handoff.top_logprobs),
            imported=handoff,
        )
        sequence.text.update(sequence.generated, final=False)
        self._enqueue(sequence)

    def _check(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Refuse, naming the field, what this engine could never finish: the KV cache holds at least one
        `max_model_len` sequence (`EngineConfig`), so a request within that length always runs to its end."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise FieldError("prompt", "prompt must hold at least one token")
        limit = self.config.max_model_len
        if len(prompt_token_ids) >= limit:
            message = f"prompt has {len(prompt_token_ids)} tokens; this model takes at most {limit - 1}"
            raise FieldError("prompt", message)
        if len(prompt_token_ids) + params.max_tokens > limit:
            raise FieldError(
                "max_tokens",
                f"prompt ({len(prompt_token_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"{limit} tokens one sequence may hold (max_model_len; the KV cache holds "
                f"{self.config.num_pages * self.config.page_size}); lower max_tokens to at most "
                f"{limit - len(prompt_token_ids)}",
            )
        if any(not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise FieldError("prompt", f"prompt token ids must lie in [0, {self.vocab_size})")
        if params.top_k > self.vocab_size:
            vocab = self.vocab_size
            raise FieldError("top_k", f"top_k must be at most the vocabulary size {vocab} (0: off), got {params.top_k}")

    def _enqueue(self, sequence: _Sequence) -> None:
        self._requests[sequence.request_id] = sequence
        self._waiting.append(sequence)

    def abort_request(self, request_id: str) -> None:
        """Drop a request wherever it is and free its pages at once; unknown ids are ignored."""
        sequence = self._requests.pop(request_id, None)
        if sequence is None:
            return
        if sequence in self._waiting:
            self._waiting.remove(sequence)
        else:
            self._running.remove(sequence)
        self._release(sequence)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def stats(self) -> EngineStats:
        return EngineStats(
            waiting=len(self._waiting),
            running=len(self._running),
            kv_pages_used=self._allocator.num_used,
            kv_pages_total=self._allocator.num_pages,
            kv_pages_cached=self._allocator.num_cached,
            **self._totals,
        )

    def step(self) -> list[RequestOutput]:
        """Advance every running sequence by one decode token or one prompt chunk; outputs of those that sampled
        and of those that failed."""
        self._admit()
        decoding = self._reserve_decode_pages([s for s in self._running if s.pending == 1])
        prefilling = [s for s in self._running if s.pending > 1]
        outputs = []
        if decoding:
            outputs += self._run_decode(decoding)
        if prefilling:
            outputs += self._run_prefill(prefilling)
        self._totals["steps"] += 1
        failed, self._failed = self._failed, []
        return failed + outputs

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        """Run `prompts` to completion together and return their final outputs in order."""
        ids = [f"generate-{i}" for i in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts, strict=True):
            self.add_request(request_id, prompt, params)
        final: dict[str, RequestOutput] = {}
        while any(i not in final for i in ids):
            final.update((out.request_id, out) for out in self.step() if out.finished)
        return [final[i] for i in ids]

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.config.page_size)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.config.max_running:
            sequence = self._waiting[0]
            needed = self._pages_for(len(sequence.tokens))
            cached = self._cached_prefix(sequence)
            reclaimed = sum(1 for page in cached if not self._allocator.refcount(page))
            if self._allocator.num_free - reclaimed - (needed - len(cached)) < len(self._running):
                return
            first_admission = sequence.admitted < 0
            self._allocator.acquire(cached)  # before allocating, which could evict them
            sequence.pages = cached + self._allocator.allocate(needed - len(cached))
            sequence.computed = len(cached) * self.config.page_size
            sequence.admitted = next(self._admissions)
            self._running.append(self._waiting.popleft())
            if sequence.imported is not None:
                self._guarded(sequence, self._import, sequence)
                continue
            if first_admission:
                self._totals["prompt_tokens"] += len(sequence.prompt)
            if self.config.prefix_caching:
                self._totals["prefix_cache_queries"] += len(sequence.tokens)
                self._totals["prefix_cache_hits"] += sequence.computed

    def _cached_prefix(self, sequence: _Sequence) -> list[int]:
        """Cached pages of the sequence's longest cached run of full pages, short of its last token (which must be
        computed for its logits); none for an imported sequence, whose pages are all written by the import."""
        if not self.config.prefix_caching or sequence.imported is not None:
            return []
        lookable = (len(sequence.tokens) - 1) // self.config.page_size
        return self._allocator.lookup(self._keys(sequence, lookable))

    def _keys(self, sequence: _Sequence, count: int) -> list[bytes]:
        """The chain keys of the sequence's first `count` (full) pages."""
        if len(sequence.keys) < count:
            page_size = self.config.page_size
            sequence.keys = page_keys(sequence.tokens[: count * page_size], page_size, sequence.keys)
        return sequence.keys[:count]

    def _register(self, sequence: _Sequence, first: int) -> None:
        """Offer the sequence's pages from index `first` that are now full to the prefix cache."""
        if not self.config.prefix_caching:
            return
        full = sequence.computed // self.config.page_size
        for index, key in enumerate(self._keys(sequence, full)[first:], start=first):
            self._allocator.register(sequence.pages[index], key)

    def _import(self, sequence: _Sequence) -> None:
        imported, sequence.imported = sequence.imported, None
        self._runner.import_pages(sequence.pages[: self._pages_for(imported.cached_tokens)], imported.pages)
        sequence.computed = imported.cached_tokens
        self._register(sequence, 0)

    def _guarded(self, sequence: _Sequence, work: Callable[..., _T], *args: Any) -> _T | None:
        """`work(*args)` for one sequence; if it raises, that sequence alone fails (its pages freed, an error
        output queued for this step) and None is returned."""
        try:
            return work(*args)
        except Exception as err:  # noqa: BLE001 - whatever went wrong concerns this request, not its neighbours
            self.abort_request(sequence.request_id)
            self._failed.append(
                RequestOutput(
                    request_id=sequence.request_id,
                    prompt_token_ids=sequence.prompt,
                    token_ids=list(sequence.generated),
                    text=sequence.text.text,
                    logprobs=list(sequence.logprobs),
                    top_logprobs=None,
                    finished=True,
                    finish_reason="error",
                    error=f"{type(err).__name__}: {err}",
                )
            )
            return None

    def _reserve_decode_pages(self, decoding: list[_Sequence]) -> list[_Sequence]:
        """Give each decoding sequence room for its next token, preempting the newest sequences when needed."""
        for sequence in decoding:
            while sequence in self._running and self._pages_for(sequence.computed + 1) > len(sequence.pages):
                page = self._allocator.allocate(1)
                if page is not None:
                    sequence.pages += page
                else:
                    self._preempt(max(self._running, key=lambda s: s.admitted))
        # A later sequence's preemption may have taken an earlier one's place in the batch.
        return [s for s in decoding if s in self._running]

    def _preempt(self, sequence: _Sequence) -> None:
        self._running.remove(sequence)
        self._release(sequence)
        sequence.computed = 0
        self._waiting.appendleft(sequence)
        self._totals["preemptions"] += 1

    def _release(self, sequence: _Sequence) -> None:
        self._allocator.free(sequence.pages)
        sequence.pages = []

    def _inputs(
        self, rows: int, width: int, chunks: list[tuple[_Sequence, int]]
    ) -> tuple[StepInputs, list[tuple[_Sequence, int]]]:
        """The step's inputs, one row per chunk in order, and the chunks they hold: a chunk whose row cannot be
        filled fails its request and leaves the row blank for the next one."""
        inputs = StepInputs.empty(rows, width, self.config.pages_per_sequence)
        kept: list[tuple[_Sequence, int]] = []
        for sequence, size in chunks:
            if self._guarded(sequence, _fill_row, inputs, len(kept), sequence, size):
                kept.append((sequence, size))
            else:
                blank = StepInputs.empty(1, width, self.config.pages_per_sequence)
                for field in dataclasses.fields(StepInputs):
                    getattr(inputs, field.name)[len(kept)] = getattr(blank, field.name)[0]
        return inputs, kept

    def _run_decode(self, decoding: list[_Sequence]) -> list[RequestOutput]:
        inputs, chunks = self._inputs(self._runner.decode_rows(len(decoding)), 1, [(s, 1) for s in decoding])
        return self._advance(chunks, self._runner.run(inputs)) if chunks else []

    def _run_prefill(self, prefilling: list[_Sequence]) -> list[RequestOutput]:
        rows, width = self._runner.prefill_shape(len(prefilling))
        chunks = [(sequence, min(sequence.pending, width)) for sequence in prefilling[:rows]]
        inputs, chunks = self._inputs(rows, width, chunks)
        return self._advance(chunks, self._runner.run(inputs)) if chunks else []

    def _advance(self, chunks: list[tuple[_Sequence, int]], results: StepOutputs) -> list[RequestOutput]:
        """Account for the tokens just cached; rows that reached their last token take the sampled one."""
        outputs = []
        for row, (sequence, size) in enumerate(chunks):
            first = sequence.computed // self.config.page_size
            sequence.computed += size
            self._register(sequence, first)
            if sequence.pending == 0:
                output = self._guarded(sequence, self._accept, sequence, results, row)
                outputs += [output] if output is not None else []
        return outputs

    def _accept(self, sequence: _Sequence, results: StepOutputs, row: int) -> RequestOutput:
        token = int(results.tokens[row])
        params = sequence.params
        sequence.generated.append(token)
        sequence.logprobs.append(float(results.logprobs[row]))
        if params.logprobs is not None:
            count = params.logprobs
            top = zip(results.top_ids[row, :count].tolist(), results.top_logprobs[row, :count].tolist(), strict=True)
            sequence.top_logprobs.append(dict(top))
        self._totals["generated_tokens"] += 1
        finish = None
        if token in self.tokenizer.stop_ids:
            finish = "stop"
        elif len(sequence.generated) >= params.max_tokens or len(sequence.tokens) >= self.config.max_model_len:
            finish = "length"
        if sequence.text.update(sequence.generated, final=finish is not None):
            finish = "stop"
        handoff = None
        if finish is None and sequence.hand_off:
            finish, handoff = "handoff", self._handoff(sequence)
        if finish is not None:
            self._running.remove(sequence)
            self._release(sequence)
            del self._requests[sequence.request_id]
        return RequestOutput(
            request_id=sequence.request_id,
            prompt_token_ids=sequence.prompt,
            token_ids=list(sequence.generated),
            text=sequence.text.text,
            logprobs=list(sequence.logprobs),
            top_logprobs=list(sequence.top_logprobs) if params.logprobs is not None else None,
            finished=finish is not None,
            finish_reason=finish,
            handoff=handoff,
        )

    def _handoff(self, sequence: _Sequence) -> KVHandoff:
        return KVHandoff(
            prompt_token_ids=sequence.prompt,
            token_ids=list(sequence.generated),
            logprobs=list(sequence.logprobs),
            top_logprobs=list(sequence.top_logprobs),
            seed=sequence.seed,
            cached_tokens=sequence.computed,
            pages=self._runner.export_pages(sequence.pages[: self._pages_for(sequence.computed)]),
            page_size=self.config.page_size,
            kv_format=self.config.kv_format,
        )


def _fill_row(inputs: StepInputs, row: int, sequence: _Sequence, size: int) -> bool:
    """Write `size` of the sequence's pending tokens and its sampling settings into row `row`; True once done."""
    params = sequence.params
    inputs.tokens[row, :size] = sequence.tokens[sequence.computed : sequence.computed + size]
    inputs.block_tables[row, : len(sequence.pages)] = sequence.pages
    inputs.lengths[row] = sequence.computed
    inputs.input_lengths[row] = size
    inputs.seeds[row] = sequence.seed
    inputs.counts[row] = len(sequence.generated)
    inputs.temperature[row] = params.temperature
    inputs.top_k[row] = params.top_k
    inputs.top_p[row] = params.top_p
    return True
