"""The token sequence of one document."""

from __future__ import annotations

import numpy as np

from jaxhet.tokenizers import Tokenizer

# A document needs at least one (input, target) pair to teach anything.
MIN_DOCUMENT_TOKENS = 2


def document_tokens(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """`[bos] + tokens + [eos]` (each special only when the tokenizer has it) as int32; empty text gives none."""
    ids = tokenizer.encode(text)
    if not ids:
        return np.zeros(0, np.int32)
    prefix = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    suffix = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    return np.asarray(prefix + ids + suffix, dtype=np.int32)
