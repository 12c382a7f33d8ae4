"""KV-cache storage formats: quantisation, dequantisation and paged layout, shared by kernels and the serving engine.

Formats (`KV_FORMATS`), chosen per cache:
- `float32`, `bfloat16`, `float16`: values stored as they are, no scale;
- `int8`: symmetric, one float32 scale per token and head (`scale[..., kv_heads]`), values in [-127, 127];
- `int4`: symmetric, one float32 scale per group of `group_size` channels along head_dim
  (`scale[..., kv_heads, head_dim // group_size]`), values in [-7, 7] stored offset by 8 and packed two per byte
  (`uint8[..., kv_heads, head_dim // 2]`; channel 2i in the low nibble, 2i + 1 in the high one).

The storage dtype identifies the format (`kv_format_of`), so attention entry points need no format argument.

Layouts: a contiguous cache is `[batch, max_len, kv_heads, head_dim']`; a paged cache is a pool of pages
`[num_pages, page_size, kv_heads, head_dim']` addressed per sequence by `block_tables[batch, pages_per_seq]`
(page j of sequence b holds its tokens j*page_size ..); scales follow the same layout minus the channel axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

KV_FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")
DEFAULT_INT4_GROUP = 32
_INT8_MAX = 127.0
_INT4_MAX = 7.0
_INT4_OFFSET = 8


def check_kv_format(kv_format: str) -> str:
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format must be one of {list(KV_FORMATS)}, got {kv_format!r}")
    return kv_format


def kv_format_of(data: Array) -> str:
    """The format a cache array is stored in, read off its dtype (uint8 means packed int4)."""
    dtype = jnp.dtype(data.dtype)
    if dtype == jnp.int8:
        return "int8"
    if dtype == jnp.uint8:
        return "int4"
    if dtype.name in KV_FORMATS:
        return dtype.name
    raise ValueError(f"a KV cache must be stored as one of {list(KV_FORMATS)} (int4 as uint8), got {dtype.name}")


def stored_head_dim(kv_format: str, head_dim: int) -> int:
    """Channels per head as stored: int4 packs two channels per byte."""
    return head_dim // 2 if check_kv_format(kv_format) == "int4" else head_dim


def scale_shape(kv_format: str, head_dim: int, group_size: int = DEFAULT_INT4_GROUP) -> tuple[int, ...]:
    """Trailing shape of the scales per (token, head): (groups,) for int4, () for int8 (float formats have none)."""
    if check_kv_format(kv_format) == "int4":
        _check_group(head_dim, group_size)
        return (head_dim // group_size,)
    return ()


def has_scale(kv_format: str) -> bool:
    return check_kv_format(kv_format) in ("int8", "int4")


def _check_group(head_dim: int, group_size: int) -> None:
    if group_size < 2 or group_size % 2 or head_dim % group_size:
        raise ValueError(f"group_size must be even and divide head_dim={head_dim}, got {group_size}")


def quantize_kv(
    x: Float[Array, "... head_dim"], kv_format: str, *, group_size: int = DEFAULT_INT4_GROUP
) -> tuple[Array, Float[Array, "*scale"] | None]:
    """Store `x` (keys or values, channels last) in `kv_format`: returns (data, scale), scale None for floats."""
    check_kv_format(kv_format)
    if not has_scale(kv_format):
        return x.astype(kv_format), None
    x = x.astype(jnp.float32)
    if kv_format == "int8":
        scale = jnp.max(jnp.abs(x), axis=-1) / _INT8_MAX
        safe = jnp.where(scale > 0, scale, 1.0)
        data = jnp.clip(jnp.round(x / safe[..., None]), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
        return data, scale
    head_dim = x.shape[-1]
    _check_group(head_dim, group_size)
    grouped = x.reshape(*x.shape[:-1], head_dim // group_size, group_size)
    scale = jnp.max(jnp.abs(grouped), axis=-1) / _INT4_MAX
    safe = jnp.where(scale > 0, scale, 1.0)
    levels = jnp.clip(jnp.round(grouped / safe[..., None]), -_INT4_MAX, _INT4_MAX).astype(jnp.int32) + _INT4_OFFSET
    levels = levels.reshape(x.shape)
    packed = levels[..., 0::2] | (levels[..., 1::2] << 4)
    return packed.astype(jnp.uint8), scale


def dequantize_kv(
    data: Array, scale: Float[Array, "*scale"] | None, *, dtype: jnp.dtype = jnp.float32
) -> Float[Array, "... head_dim"]:
    """Values of a cache array stored by `quantize_kv` (format read off `data.dtype`), as `dtype`."""
    kv_format = kv_format_of(data)
    if not has_scale(kv_format):
        return data.astype(dtype)
    if scale is None:
        raise ValueError(f"a {kv_format} cache needs its scales")
    if kv_format == "int8":
        return (data.astype(jnp.float32) * scale[..., None]).astype(dtype)
    packed = data.astype(jnp.int32)
    levels = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*data.shape[:-1], 2 * data.shape[-1])
    groups = scale.shape[-1]
    grouped = (levels - _INT4_OFFSET).astype(jnp.float32).reshape(*levels.shape[:-1], groups, -1)
    return (grouped * scale[..., None]).reshape(levels.shape).astype(dtype)


def scatter_pages(
    cache: Array, page_size: int, *, key: jax.Array | None = None, spare_pages: int = 0
) -> tuple[Array, Int[Array, "batch pages"]]:
    """A contiguous cache (or its scales) `[batch, max_len, ...]` as a page pool and its block tables.

    The sequence is zero-padded to whole pages; with `key` the pages are placed in a random order in the pool,
    which gets `spare_pages` unused pages too (as a serving engine's pool would), so block tables matter.
    """
    batch, max_len = cache.shape[:2]
    pages = -(-max_len // page_size)
    num_pages = batch * pages + spare_pages
    order = jnp.arange(num_pages) if key is None else jax.random.permutation(key, num_pages)
    tables = order[: batch * pages].reshape(batch, pages).astype(jnp.int32)
    padded = jnp.pad(cache, [(0, 0), (0, pages * page_size - max_len)] + [(0, 0)] * (cache.ndim - 2))
    pool = jnp.zeros((num_pages, page_size, *cache.shape[2:]), cache.dtype)
    pool = pool.at[tables.reshape(-1)].set(padded.reshape(batch * pages, page_size, *cache.shape[2:]))
    return pool, tables


def gather_pages(pool: Array, block_tables: Int[Array, "batch pages"]) -> Array:
    """A paged pool `[num_pages, page_size, ...]` as contiguous rows `[batch, pages * page_size, ...]`."""
    rows = pool[block_tables]
    return rows.reshape(block_tables.shape[0], -1, *pool.shape[2:])


def contiguous_kv(
    cache: Array, scale: Array | None, block_tables: Int[Array, "batch pages"] | None, dtype: jnp.dtype
) -> Float[Array, "batch kv_len kv_heads head_dim"]:
    """Dequantised `[batch, kv_len, kv_heads, head_dim]` view of a contiguous or paged cache."""
    if block_tables is not None:
        cache = gather_pages(cache, block_tables)
        scale = None if scale is None else gather_pages(scale, block_tables)
    return dequantize_kv(cache, scale, dtype=dtype)


def valid_token_mask(lengths: Int[Array, " batch"], kv_len: int) -> jax.Array:
    """[batch, kv_len] mask of the cached tokens each sequence holds."""
    return jnp.arange(kv_len)[None, :] < lengths[:, None]
