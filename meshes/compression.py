"""Compression of what crosses a pipeline stage edge: activations forward, their gradients backward.

A stage-edge tensor has shape [batch, seq, hidden]. Its hidden dimension is cut into tiles of `tile` channels
(`gcd(hidden, codec.tile)`, a power of two), and every (row, token, tile) gets its own float32 absmax scale, so one
outlier channel only coarsens the quantization of its own tile. The codecs (`CODECS`, the values of
`planners.Stage.compress`):

- `none`: the tensor itself.
- `int8`: symmetric int8 per tile (`q = round(x / s)`, `s = absmax / 127`).
- `int4_hadamard` (tile-wise adaptive Hadamard quantization after TAH-Quant, arXiv 2506.01352; the rule that
  picks a tile's rotation is this module's own, and the paper's per-token bit allocation is not done): each tile is
  quantized to 4 bits (`s = absmax / 7`, values in [-7, 7]) either as it is or after an orthonormal Walsh–Hadamard
  rotation (`H / sqrt(tile)`, Sylvester order, computed by the fast transform in plain jnp), whichever
  reconstructs the tile with the smaller squared error; the choice rides in the sign of the tile's scale
  (negative: rotated), so it costs no bytes. The rotation spreads an outlier's energy over the whole tile, which
  lowers the tile's absmax against its norm. Two 4-bit values are packed into each uint8, so the wire form really
  is smaller: per tile of 64 channels 32 bytes of values plus a 4-byte scale, against 256 bytes in float32 (7.1x)
  or 128 in bf16 (3.6x).

`Codec.encode(x)` returns the packed form, a dict of arrays (`values`, and `scales` unless `none`) whose leading
[batch, seq] dimensions are those of `x`, so it takes the same sharding along them; `Codec.decode(packed, dtype)`
returns the tensor. Both are pure jnp and jittable. `EdgeMover` carries a tensor across a stage edge in the
packed form: encoded on the source devices, moved by `meshes.transfer.Transfers` (whose log then counts the
packed bytes), decoded on the destination devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Sharding

from meshes.transfer import Transfers, empty_array, is_local

Packed = dict[str, jax.Array]


def fwht(x: jax.Array) -> jax.Array:
    """The orthonormal Walsh–Hadamard transform over the last axis (a power of two): `x @ H / sqrt(n)` with `H`
    Sylvester's Hadamard matrix, in `log2(n)` butterfly passes. Its own inverse."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two length, got {n}")
    lead, h = x.shape[:-1], 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
        h *= 2
    return x / jnp.sqrt(jnp.asarray(n, x.dtype))


def pack_int4(q: jax.Array) -> jax.Array:
    """Integers in [-8, 7] (last axis even) as uint8, two per byte: element 2i in the low nibble, 2i+1 in the high."""
    if q.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even last dimension, got {q.shape[-1]}")
    nibbles = (q.astype(jnp.int32) + 8).astype(jnp.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """The inverse of `pack_int4`, as int32."""
    low = (packed & 0xF).astype(jnp.int32) - 8
    high = (packed >> 4).astype(jnp.int32) - 8
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


@dataclasses.dataclass(frozen=True)
class Codec:
    """Tile-wise absmax quantization to `bits` (8 or 4; 0: no compression) over tiles of up to `tile` channels;
    with `rotate`, each tile adaptively Hadamard-rotated first (see the module docstring)."""

    name: str
    bits: int
    tile: int
    rotate: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (0, 4, 8):
            raise ValueError(f"Codec.bits must be one of [0, 4, 8], got {self.bits!r}")
        if self.tile < 1 or self.tile & (self.tile - 1):
            raise ValueError(f"Codec.tile must be a power of two, got {self.tile!r}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def tile_of(self, hidden: int) -> int:
        """The tile size used on a hidden dimension of `hidden` channels (a power of two dividing it)."""
        return math.gcd(hidden, self.tile)

    def encode(self, x: jax.Array) -> Packed:
        """The packed form of `x` [..., hidden]: `values` (int8, or uint8 holding two 4-bit values) and float32
        `scales` [..., hidden / tile] (negative where the tile was rotated)."""
        if self.bits == 0:
            return {"values": x}
        tiles = self._tiles(x.astype(jnp.float32))
        q, scale = self._quantize(tiles)
        if self.rotate:
            turned = fwht(tiles)
            q_rot, scale_rot = self._quantize(turned)
            rotated = _squared_error(q_rot, scale_rot, turned) < _squared_error(q, scale, tiles)
            q = jnp.where(rotated[..., None], q_rot, q)
            scale = jnp.where(rotated, -scale_rot, scale)
        flat = q.reshape(*x.shape)
        values = pack_int4(flat) if self.bits == 4 else flat.astype(jnp.int8)
        return {"values": values, "scales": scale}

    def decode(self, packed: Packed, dtype: Any) -> jax.Array:
        """The tensor `packed` (from `encode`) stands for, in `dtype`."""
        values = packed["values"]
        if self.bits == 0:
            return values.astype(dtype)
        q = unpack_int4(values) if self.bits == 4 else values.astype(jnp.int32)
        scales = packed["scales"]
        tiles = self._tiles(q.astype(jnp.float32), tile=q.shape[-1] // scales.shape[-1]) * jnp.abs(scales)[..., None]
        if self.rotate:
            tiles = jnp.where((scales < 0)[..., None], fwht(tiles), tiles)
        return tiles.reshape(q.shape).astype(dtype)

    def _tiles(self, x: jax.Array, tile: int | None = None) -> jax.Array:
        tile = tile or self.tile_of(x.shape[-1])
        return x.reshape(*x.shape[:-1], x.shape[-1] // tile, tile)

    def _quantize(self, tiles: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Integer values and the absmax scale of every tile (0 for an all-zero tile)."""
        scale = jnp.max(jnp.abs(tiles), axis=-1) / self.qmax
        safe = jnp.where(scale > 0, scale, 1.0)
        q = jnp.clip(jnp.round(tiles / safe[..., None]), -self.qmax, self.qmax).astype(jnp.int32)
        return q, scale


def _squared_error(q: jax.Array, scale: jax.Array, tiles: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(q * scale[..., None] - tiles), axis=-1)


CODECS = {
    "none": Codec("none", 0, 1),
    "int8": Codec("int8", 8, 128),
    "int4_hadamard": Codec("int4_hadamard", 4, 64, rotate=True),
}


class EdgeMover:
    """Moves stage-edge tensors between device groups through `transfers`, compressed by a named codec.

    The codec's programs run where their devices are: `encode` on the source sharding (on a process holding none
    of the source devices only the packed form's global handles are made, shaped by `jax.eval_shape`), the packed
    arrays cross by `Transfers.tree`, `decode` runs on the destination sharding. With codec `none` it is exactly
    `Transfers.move`. Each (codec, shape, dtype, sharding) program is compiled once."""

    def __init__(self, transfers: Transfers):
        self.transfers = transfers

    def move(self, x: jax.Array, dst: Sharding, codec: str) -> jax.Array:
        """`x` placed on `dst`, having crossed in `codec`'s packed form."""
        if codec == "none":
            return self.transfers.move(x, dst)
        chosen, src = CODECS[codec], x.sharding
        encode = self.transfers.program(("encode", codec, x.shape, x.dtype, src), chosen.encode, src)
        if is_local(src):
            packed = encode(x)
        else:
            shapes = jax.eval_shape(chosen.encode, x)
            packed = jax.tree.map(lambda s: empty_array(s.shape, s.dtype, src), shapes)
        moved = self.transfers.tree(packed, jax.tree.map(lambda _: dst, packed))
        if not is_local(dst):
            return empty_array(x.shape, x.dtype, dst)
        decode = self.transfers.program(
            ("decode", codec, x.shape, x.dtype, dst), lambda p: chosen.decode(p, x.dtype), dst
        )
        return decode(moved)
