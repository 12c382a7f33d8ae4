"""Packed rows to model inputs: inputs, next-token targets, loss weights and segment ids."""

from __future__ import annotations

import numpy as np


def batch_from_rows(tokens: np.ndarray, segments: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of `seq_len + 1` tokens with their segment ids to a batch of `seq_len` positions.

    A target is the token after its input within the packed row; its weight is 1 only where that next token
    belongs to the same document (same segment), so no loss crosses a document boundary. Packing fills every row,
    so there is no padding.
    """
    same_segment = segments[:, :-1] == segments[:, 1:]
    return {
        "input_ids": np.ascontiguousarray(tokens[:, :-1], dtype=np.int32),
        "targets": np.ascontiguousarray(tokens[:, 1:], dtype=np.int32),
        "weights": same_segment.astype(np.float32),
        "segment_ids": np.ascontiguousarray(segments[:, :-1], dtype=np.int32),
    }
