"""Messages between the processes of a multi-process server: frames over asyncio TCP streams.

A frame is an 8-byte prefix (the lengths of the two parts, big-endian), a JSON header, and a binary payload
(arrays laid end to end, their shapes and dtypes in the header). Arrays cross as their raw bytes: the payload of a
KV handoff is exactly the pages' bytes.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

PREFIX = struct.Struct("!II")
MAX_HEADER_BYTES = 1 << 24


class FrameError(ConnectionError):
    """The peer sent something that is not a frame (or closed the stream in the middle of one)."""


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    """The next frame's header and payload; FrameError when the stream ends or holds no frame."""
    try:
        header_len, payload_len = PREFIX.unpack(await reader.readexactly(PREFIX.size))
        if header_len > MAX_HEADER_BYTES:
            raise FrameError(f"a frame header of {header_len} bytes is over the {MAX_HEADER_BYTES}-byte limit")
        header = json.loads(await reader.readexactly(header_len))
        payload = await reader.readexactly(payload_len) if payload_len else b""
    except asyncio.IncompleteReadError as err:
        raise FrameError("the peer closed the connection") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FrameError(f"a frame header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise FrameError("a frame header must be a JSON object")
    return header, payload


async def write_frame(writer: asyncio.StreamWriter, header: dict[str, Any], payload: bytes = b"") -> None:
    """Send one frame and wait until the transport has taken it."""
    encoded = json.dumps(header).encode()
    writer.write(PREFIX.pack(len(encoded), len(payload)) + encoded + payload)
    await writer.drain()


def pack_arrays(arrays: Sequence[Any]) -> tuple[list[dict[str, Any]], bytes]:
    """Specs (shape, dtype) and the raw bytes of `arrays` (device arrays are read to the host first)."""
    host = [np.asarray(a) for a in arrays]
    specs = [{"shape": list(a.shape), "dtype": a.dtype.name} for a in host]
    return specs, b"".join(np.ascontiguousarray(a).tobytes() for a in host)


def unpack_arrays(specs: Sequence[dict[str, Any]], payload: bytes) -> list[np.ndarray]:
    """The arrays `pack_arrays` packed (read-only views of `payload`); FrameError if the sizes disagree."""
    arrays, offset = [], 0
    for spec in specs:
        dtype = jnp.dtype(spec["dtype"])
        count = int(np.prod(spec["shape"], dtype=np.int64))
        arrays.append(np.frombuffer(payload, dtype, count, offset).reshape(spec["shape"]))
        offset += count * dtype.itemsize
    if offset != len(payload):
        raise FrameError(f"a payload of {len(payload)} bytes does not hold arrays of {offset} bytes")
    return arrays
