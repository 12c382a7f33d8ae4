"""Plain-data settings of the serving engine (`EngineConfig`) and of one request (`SamplingParams`).

Both validate on construction and raise `FieldError` (a `ValueError`) naming the field and what it accepts, so the
CLI and the HTTP layer can hand the message to the user as it is.
"""

from __future__ import annotations

import dataclasses
import numbers

import pallas_kernels as pk

PAGE_SIZES = (16, 32, 64)
MAX_TOP_LOGPROBS = 20


class FieldError(ValueError):
    """A refused value; `field` names the setting or request field it concerns, for an HTTP error's `param`."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _integer(name: str, value: object) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise FieldError(name, f"{name} must be an integer, got {value!r}")


def _at_least(name: str, value: int, low: int) -> None:
    _integer(name, value)
    if value < low:
        raise FieldError(name, f"{name} must be at least {low}, got {value}")


def _between(name: str, value: float, low: float, high: float, *, open_low: bool = False) -> None:
    """`value` a real number in [low, high] (or (low, high] with `open_low`); NaN and infinities fail."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or not (low < value if open_low else low <= value) or not value <= high:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise FieldError(name, f"{name} must be a number in {interval}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How one engine batches and caches.

    `max_running` sequences decode together; a step prefills at most `prefill_chunk` prompt tokens (longer prompts
    are split over steps, so decoding never stalls behind a long prompt); the KV cache is `num_pages` pages of
    `page_size` tokens stored as `kv_format`; a sequence holds at most `max_model_len` tokens, prompt included.
    Requests without a seed draw one from `seed`. With `prefix_caching`, full KV pages are shared between
    sequences with the same prefix and kept after they finish, so a repeated prefix (a system prompt) is prefilled
    once (`PageAllocator`); a cached page holds what recomputing it would write, up to floating-point summation
    order, so greedy outputs match those without it.
    """

    max_running: int = 16
    page_size: int = 16
    num_pages: int = 256
    kv_format: str = "bfloat16"
    max_model_len: int = 1024
    prefill_chunk: int = 128
    seed: int = 0
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        _at_least("max_running", self.max_running, 1)
        if self.page_size not in PAGE_SIZES:
            raise FieldError("page_size", f"page_size must be one of {list(PAGE_SIZES)}, got {self.page_size}")
        _at_least("num_pages", self.num_pages, 1)
        if self.kv_format not in pk.KV_FORMATS:
            raise FieldError("kv_format", f"kv_format must be one of {list(pk.KV_FORMATS)}, got {self.kv_format!r}")
        _at_least("max_model_len", self.max_model_len, 2)
        if self.max_model_len % self.page_size:
            message = f"max_model_len must be a multiple of page_size={self.page_size}, got {self.max_model_len}"
            raise FieldError("max_model_len", message)
        _at_least("prefill_chunk", self.prefill_chunk, 8)
        if not isinstance(self.prefix_caching, bool):
            raise FieldError("prefix_caching", f"prefix_caching must be True or False, got {self.prefix_caching!r}")
        if self.num_pages * self.page_size < self.max_model_len:
            raise FieldError(
                "num_pages",
                f"num_pages={self.num_pages} pages of page_size={self.page_size} tokens hold "
                f"{self.num_pages * self.page_size} tokens, fewer than one sequence of max_model_len="
                f"{self.max_model_len}; raise num_pages to at least {self.pages_per_sequence} or lower max_model_len",
            )

    @property
    def pages_per_sequence(self) -> int:
        return self.max_model_len // self.page_size


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops.

    Greedy when `temperature` is 0; `top_k` 0 and `top_p` 1 disable those filters. Generation stops at the
    tokenizer's EOS, at any of the `stop` strings (which are cut from the text), or after `max_tokens` tokens.
    `logprobs`: how many most likely alternatives to report per token (None: only the chosen token's log-prob).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        _at_least("max_tokens", self.max_tokens, 1)
        _between("temperature", self.temperature, 0, 100)
        _between("top_p", self.top_p, 0, 1, open_low=True)
        _at_least("top_k", self.top_k, 0)
        if self.seed is not None:
            _integer("seed", self.seed)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise FieldError("stop", f"stop must hold non-empty strings, got {list(self.stop)!r}")
        if self.logprobs is not None:
            _between("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS)
            _integer("logprobs", self.logprobs)
