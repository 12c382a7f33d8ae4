"""The serving engine's KV cache: fixed-size pages in one pool per layer, handed out by a reference-counting
allocator with a prefix cache.

A sequence holds a list of pages (its block-table row), so memory is committed one page at a time as it grows and
returned at once when it finishes, is aborted or is preempted. Full pages are keyed by a chain hash of every token
up to their end (`page_keys`), so sequences with a common prefix share its pages read-only, and a finished
sequence's pages stay findable until the allocator needs them (`PageAllocator`). Keys and values are stored in any of
`pallas_kernels.KV_FORMATS`; int8 and int4 pools carry their scales beside them. The model sees the pools only
through the `LayerCache` interface (`append`, `attend`), exactly as it sees a contiguous `KVCache`.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
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


def page_keys(tokens: Sequence[int], page_size: int, known: Sequence[bytes] = ()) -> list[bytes]:
    """Chain keys of the full pages of `tokens`: page i's key hashes page i-1's key and page i's token ids, so two
    sequences share a key exactly when they share every token up to the end of that page (up to a BLAKE2b
    collision, 2^-128). `known` holds keys already computed for a prefix of the pages and is extended."""
    keys = list(known)
    for index in range(len(keys), len(tokens) // page_size):
        digest = hashlib.blake2b(keys[-1] if keys else b"", digest_size=16)
        digest.update(np.asarray(tokens[index * page_size : (index + 1) * page_size], np.int64).tobytes())
        keys.append(digest.digest())
    return keys


class PageAllocator:
    """Page indices with reference counts, and a prefix cache of full pages.

    A page is private (one owner, refcount 1), shared (several sequences hold the same full page read-only) or
    free. A full page can be `register`ed under its `page_keys` key; a later sequence whose prefix has that key
    `acquire`s the same page instead of recomputing it. A registered page whose last holder frees it keeps its key
    in a least-recently-freed pool: it still counts as free, and `allocate` takes plain free pages first, then
    evicts the pool's oldest (the key is forgotten). Nothing but `register` ever maps a key to a page, so a page
    is found only for the prefix its owner computed into it.
    """

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        self._refs: dict[int, int] = {}
        self._pool: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out: plain free ones plus cached ones held by nobody."""
        return len(self._free) + len(self._pool)

    @property
    def num_used(self) -> int:
        """Pages some sequence holds (refcount above zero)."""
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Free pages that still hold a registered prefix (the pool `allocate` evicts from)."""
        return len(self._pool)

    def refcount(self, page: int) -> int:
        return self._refs.get(page, 0)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """Pages of the longest run of `keys`, from the first, that are registered (nothing is taken)."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def acquire(self, pages: Sequence[int]) -> None:
        """Take one more reference to each of `pages` (from `lookup`), out of the pool if nobody held it."""
        for page in pages:
            self._pool.pop(page, None)
            self._refs[page] = self._refs.get(page, 0) + 1

    def allocate(self, count: int) -> list[int] | None:
        """`count` private pages, or None (nothing taken) if fewer are free."""
        if count > self.num_free:
            return None
        taken = [self._take() for _ in range(count)]
        for page in taken:
            self._refs[page] = 1
        return taken

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        page, _ = self._pool.popitem(last=False)
        del self._page_of[self._key_of.pop(page)]
        return page

    def register(self, page: int, key: bytes) -> None:
        """Record that held `page` is full and holds the prefix `key`; a key or page already registered is kept."""
        if key not in self._page_of and page not in self._key_of:
            self._page_of[key] = page
            self._key_of[page] = key

    def free(self, pages: Sequence[int]) -> None:
        """Drop one reference to each of `pages`. A page nobody holds any more returns to the free list, or, if
        registered, to the pool's newest end; the last page goes first, so a prefix's deeper pages are evicted
        before the shallower ones every longer prefix needs."""
        for page in reversed(pages):
            count = self._refs.pop(page) - 1
            if count:
                self._refs[page] = count
            elif page in self._key_of:
                self._pool[page] = None
            else:
                self._free.append(page)
