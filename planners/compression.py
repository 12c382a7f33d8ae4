"""What a compressed stage edge costs: bytes per token on the wire, and the (de)quantisation time.

The codecs are `meshes.compression.CODECS` (named by `Stage.compress`); `planners` does not import `meshes`, so their
wire format is restated here as (bits per value, tile size) and a test checks that the two agree byte for byte.
One token of a `hidden`-wide edge tensor packs into `hidden * bits / 8` bytes of values plus a float32 scale per
tile of `gcd(hidden, tile)` channels; uncompressed it is `hidden` elements of the activation dtype.

(De)quantisation is priced as memory-bound work: encoding reads the tensor and writes its packed form on the
source stage's devices, decoding reads the packed form and writes the tensor on the destination's, each at the
device's achievable memory bandwidth. The Hadamard butterflies are not charged (a fused encode keeps a tile in
registers), and nothing here is calibrated against a measured codec on a GPU yet.
"""

from __future__ import annotations

import math

SCALE_BYTES = 4
# (bits per value, tile size) of each codec, as `meshes.compression.CODECS` encodes it; None: not compressed.
FORMATS: dict[str, tuple[int, int] | None] = {"none": None, "int8": (8, 128), "int4_hadamard": (4, 64)}


def edge_bytes_per_token(compress: str, hidden: int, act_bytes: float) -> float:
    """Bytes one token of a `hidden`-wide edge tensor puts on the wire under codec `compress` (uncompressed:
    `act_bytes` per element)."""
    form = FORMATS[compress]
    if form is None:
        return act_bytes * hidden
    bits, tile = form
    return hidden * bits / 8 + SCALE_BYTES * hidden / math.gcd(hidden, tile)


def codec_seconds(raw_bytes: float, packed_bytes: float, bandwidths: tuple[float, float]) -> float:
    """Encoding on the source (read `raw_bytes`, write `packed_bytes`) plus decoding on the destination (the
    reverse), at the two ends' memory bandwidths (bytes/s)."""
    return sum((raw_bytes + packed_bytes) / bandwidth for bandwidth in bandwidths)
