"""Incremental text of a generation: append-only, never showing a broken character or the start of a stop string.

A streamed client must never have to take text back, so what is released excludes a trailing incomplete UTF-8
sequence (decoded as U+FFFD until its last byte arrives) and any tail that could still become one of the stop
strings; at the end everything left is released, and a stop string found is cut off with what follows it.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxhet.tokenizers import Tokenizer

_INCOMPLETE = "\ufffd"


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextStream:
    """The released text of one sequence as its tokens arrive."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.text = ""

    def update(self, token_ids: list[int], *, final: bool) -> bool:
        """Decode `token_ids` (all generated so far) and release what is safe; True if a stop string was hit."""
        full = self.tokenizer.decode(token_ids)
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._release(full[:cut])
            return True
        if not final:
            full = full.rstrip(_INCOMPLETE) if full.endswith(_INCOMPLETE) else full
            full = full[: len(full) - _held_back(full, self.stops)]
        self._release(full)
        return False

    def _release(self, text: str) -> None:
        # Only ever extend: a tokenizer whose decoding of a longer sequence rewrites earlier text keeps the old text.
        if text.startswith(self.text):
            self.text = text
