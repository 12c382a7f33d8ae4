"""The serving engine's KV cache: fixed-size pages in one pool per layer, handed out by a free-list allocator.

A sequence owns a list of pages (its block-table row), so memory is committed one page at a time as it grows and
returned at once when it finishes, is aborted or is preempted. Keys and values are stored in any of
`pallas_kernels.KV_FORMATS`; int8 and int4 pools carry their scales beside them. The model sees the pools only
through the `LayerCache` interface (`append`, `attend`), exactly as it sees a contiguous `KVCache`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Int

import pallas_kernels as pk
from jaxhet.models.attention import StoredKV, cache_attention
from jaxhet.models.config import ConfigError, LlamaConfig
from jaxhet.models.llama import chunk_slots
from pallas_kernels.kv_cache import has_scale, kv_format_of, scale_shape, stored_head_dim


@struct.dataclass
class LayerPool:
    """One layer's pages: data `[num_pages, page_size, kv_heads, head_dim']` and, for integer formats, scales."""

    k: Array
    v: Array
    k_scale: Array | None
    v_scale: Array | None

    @classmethod
    def create(cls, config: LlamaConfig, num_pages: int, page_size: int, kv_format: str) -> LayerPool:
        rows = (num_pages, page_size, config.num_kv_heads)
        data_shape = (*rows, stored_head_dim(kv_format, config.head_dim))
        data_dtype = jnp.uint8 if kv_format == "int4" else jnp.dtype(kv_format)

        def scales() -> Array | None:
            if not has_scale(kv_format):
                return None
            return jnp.zeros((*rows, *scale_shape(kv_format, config.head_dim)), jnp.float32)

        # Four distinct buffers: the pools are donated to every step, and one buffer cannot be donated twice.
        return cls(jnp.zeros(data_shape, data_dtype), jnp.zeros(data_shape, data_dtype), scales(), scales())

    @property
    def kv_format(self) -> str:
        return kv_format_of(self.k)


@struct.dataclass
class PagedLayerCache:
    """A `LayerCache` over one layer's pool, addressed through the batch's block tables."""

    pool: LayerPool
    block_tables: Int[Array, "batch pages"]

    def append(self, k, v, lengths, input_lengths) -> PagedLayerCache:
        positions, real = chunk_slots(lengths, input_lengths, k.shape[1])
        num_pages, page_size = self.pool.k.shape[:2]
        table_index = jnp.minimum(positions // page_size, self.block_tables.shape[1] - 1)
        pages = jnp.take_along_axis(self.block_tables, table_index, axis=1)
        # Padding tokens go to a page index past the pool and are dropped.
        pages = jnp.where(real, pages, num_pages)
        slots = positions % page_size
        k_data, k_scale = pk.quantize_kv(k, self.pool.kv_format)
        v_data, v_scale = pk.quantize_kv(v, self.pool.kv_format)

        def put(pool: Array | None, new: Array | None) -> Array | None:
            return None if pool is None else pool.at[pages, slots].set(new.astype(pool.dtype), mode="drop")

        pool = LayerPool(
            k=put(self.pool.k, k_data),
            v=put(self.pool.v, v_data),
            k_scale=put(self.pool.k_scale, k_scale),
            v_scale=put(self.pool.v_scale, v_scale),
        )
        return PagedLayerCache(pool, self.block_tables)

    def attend(self, q, lengths, input_lengths, backend, window):
        """A window at least the cache's length changes nothing; a shorter one the paged decode kernel lacks."""
        pool = self.pool
        max_len = self.block_tables.shape[1] * pool.k.shape[1]
        if window is not None and window < max_len:
            raise ConfigError(
                f"the paged decode kernel has no sliding window: serve this model (sliding_window={window}) with "
                f"max_model_len at most {window}"
            )
        kv = StoredKV(pool.k, pool.v, pool.k_scale, pool.v_scale, self.block_tables)
        return cache_attention(q, kv, lengths, input_lengths, backend=backend)


@struct.dataclass
class PagedKVCache:
    """Every layer's pool plus the batch's block tables and cached lengths: a `Cache` for `Llama.extend`."""

    pools: tuple[LayerPool, ...]
    block_tables: Int[Array, "batch pages"]
    lengths: Int[Array, " batch"]

    def layer(self, index: int) -> PagedLayerCache:
        return PagedLayerCache(self.pools[index], self.block_tables)

    def with_layers(self, layers: list[PagedLayerCache], lengths: Int[Array, " batch"]) -> PagedKVCache:
        return PagedKVCache(tuple(c.pool for c in layers), self.block_tables, lengths)


def create_pools(config: LlamaConfig, num_pages: int, page_size: int, kv_format: str) -> tuple[LayerPool, ...]:
    """Zeroed pools for every layer (jit it with `out_shardings` to create them where they will live)."""
    return tuple(LayerPool.create(config, num_pages, page_size, kv_format) for _ in range(config.num_layers))


class PageAllocator:
    """Free list of page indices: `allocate(n)` hands out n pages or None, `free(pages)` takes them back."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        if count > len(self._free):
            return None
        taken = self._free[len(self._free) - count :]
        del self._free[len(self._free) - count :]
        return taken[::-1]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
