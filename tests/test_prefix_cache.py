"""Prefix caching in the paged KV cache: chain keys, the reference-counting allocator and its LRU pool, and the
engine with caching against the engine without it (greedy, token for token) for requests sharing a long system
prompt, arriving together, after earlier ones finished, and under memory pressure."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from jaxhet.models import Llama, LlamaConfig
from jaxhet.serve import Engine, EngineConfig, SamplingParams
from jaxhet.serve.paged_cache import PageAllocator, page_keys
from jaxhet.tokenizers import ByteTokenizer

PAGE = 16
SYSTEM = 1000  # tokens of the shared system prompt
CACHED_SYSTEM = SYSTEM // PAGE * PAGE  # its full pages: what a request with another suffix can find cached
GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def model() -> Llama:
    config = LlamaConfig.tiny(vocab_size=ByteTokenizer.vocab_size, num_layers=2, dtype="float32")
    return Llama(config, rngs=nnx.Rngs(params=jax.random.key(3)))


def _random(rng: np.random.Generator, count: int) -> list[int]:
    return rng.integers(0, 256, count).tolist()


@pytest.fixture(scope="module")
def shared() -> list[list[int]]:
    """36 prompts: one 1,000-token system prompt, then a user turn of 1 to 40 tokens of each prompt's own."""
    rng = np.random.default_rng(0)
    system = _random(rng, SYSTEM)
    return [system + _random(rng, int(n)) for n in rng.integers(1, 41, 36)]


def _engine(model, caching: bool, **overrides) -> Engine:
    fields = dict(max_running=8, page_size=PAGE, num_pages=536, kv_format="float32", max_model_len=1056)
    config = EngineConfig(**{**fields, "prefill_chunk": 256, "prefix_caching": caching, **overrides})
    return Engine(model, ByteTokenizer(), config)


def _tokens(engine: Engine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(prompts, params)]


def test_chain_keys_name_whole_prefixes():
    rng = np.random.default_rng(1)
    tokens = _random(rng, 5 * PAGE + 3)
    keys = page_keys(tokens, PAGE)
    assert len(keys) == 5 and len(set(keys)) == 5  # the partial last page has no key
    assert page_keys(tokens[: 3 * PAGE] + _random(rng, 2 * PAGE), PAGE)[:3] == keys[:3]
    changed = [tokens[0] ^ 1, *tokens[1:]]  # one token of the first page: every later key changes too
    assert not set(page_keys(changed, PAGE)) & set(keys)
    assert page_keys(tokens, PAGE, keys[:2]) == keys  # extending known keys equals computing them all
    assert page_keys(tokens[PAGE:], PAGE)[0] != keys[1]  # same tokens after another prefix: another key


def test_allocator_shares_counts_references_and_evicts_the_oldest_freed_page():
    allocator = PageAllocator(6)
    first = allocator.allocate(3)
    for page, key in zip(first, (b"a", b"ab", b"abc"), strict=True):
        allocator.register(page, key)
    allocator.register(first[2], b"other")  # a registered page keeps its key
    assert allocator.lookup([b"a", b"ab", b"x", b"abc"]) == first[:2]
    allocator.acquire(first[:2])
    assert [allocator.refcount(p) for p in first] == [2, 2, 1] and allocator.num_used == 3
    allocator.free(first)
    assert allocator.num_used == 2 and allocator.num_cached == 1 and allocator.num_free == 4
    allocator.free(first[:2])  # the sharer leaves: every page cached, none held
    assert allocator.num_used == 0 and allocator.num_cached == 3 and allocator.num_free == 6
    assert allocator.lookup([b"a", b"ab", b"abc"]) == first
    plain = allocator.allocate(3)  # plain free pages go first
    assert not set(plain) & set(first) and allocator.num_cached == 3
    (evicted,) = allocator.allocate(1)  # then the oldest freed: the deepest page, freed first
    assert evicted == first[2] and allocator.lookup([b"a", b"ab", b"abc"]) == first[:2]
    allocator.register(evicted, b"ab")  # a key already cached is not taken over
    assert allocator.lookup([b"ab"]) == [first[1]]
    assert allocator.allocate(3) is None and allocator.num_free == 2
    allocator.free([*plain, evicted])
    assert allocator.num_used == 0 and allocator.num_free == 6


def test_32_requests_sharing_a_1000_token_system_prompt_equal_uncached_runs(model, shared):
    # Eight arrive at once (admitted together, none can use another's pages yet), the others as earlier ones
    # finish (they hit pages still held by running requests or freed into the pool); then four more after all
    # have finished, hitting only freed pages.
    first, later = shared[:32], shared[32:]
    cached, uncached = _engine(model, caching=True), _engine(model, caching=False)
    assert _tokens(cached, first) == _tokens(uncached, first)
    stats = cached.stats()
    assert stats.prefix_cache_queries == stats.prompt_tokens == sum(map(len, first))
    assert stats.prefix_cache_hits == 24 * CACHED_SYSTEM
    assert stats.kv_pages_used == 0 and stats.kv_pages_cached > 0  # no references left, the prefix kept
    assert _tokens(cached, later) == _tokens(uncached, later)
    after = cached.stats()
    assert after.prefix_cache_hits - stats.prefix_cache_hits == 4 * CACHED_SYSTEM
    # No reference left, and every distinct full page cached once (a request ends with all but its last token
    # computed; the first eight computed the system prompt eight times, only the first copy was kept).
    distinct = CACHED_SYSTEM // PAGE + sum(
        (len(p) + GREEDY.max_tokens - 1) // PAGE - CACHED_SYSTEM // PAGE for p in shared
    )
    assert after.kv_pages_used == 0 and after.kv_pages_cached == distinct


def test_a_request_shares_the_pages_a_running_one_has_computed(model, shared):
    first, second = shared[0][: SYSTEM + 1], shared[1]
    longer = SamplingParams(max_tokens=40, temperature=0)
    engine = _engine(model, caching=True)
    engine.add_request("a", first, longer)
    while engine.stats().generated_tokens == 0:  # until a's prompt is prefilled
        engine.step()
    used = engine.stats().kv_pages_used
    engine.add_request("b", second, GREEDY)
    engine.step()
    own = -(-len(second) // PAGE) - CACHED_SYSTEM // PAGE
    assert engine.stats().kv_pages_used == used + own  # b holds a's system-prompt pages, plus its own tail
    assert engine.stats().prefix_cache_hits == CACHED_SYSTEM
    final = {}
    while engine.has_unfinished():
        final.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    uncached = _engine(model, caching=False)
    assert final["a"] == _tokens(uncached, [first], longer)[0]
    assert final["b"] == _tokens(uncached, [second])[0]
    assert engine.stats().kv_pages_used == 0


def test_a_prompt_of_whole_pages_recomputes_its_last_page_in_a_page_of_its_own(model, shared):
    prompt = shared[0][: 4 * PAGE]
    longer = [*prompt, 7]
    uncached = _engine(model, caching=False)
    engine = _engine(model, caching=True)
    assert _tokens(engine, [prompt]) == _tokens(uncached, [prompt])
    assert _tokens(engine, [prompt]) == _tokens(uncached, [prompt])  # three pages hit, the fourth recomputed
    assert engine.stats().prefix_cache_hits == 3 * PAGE
    assert _tokens(engine, [longer]) == _tokens(uncached, [longer])  # all four hit: the fourth was left intact
    assert engine.stats().prefix_cache_hits == 7 * PAGE


SMALL = dict(max_running=3, num_pages=24, max_model_len=256, prefill_chunk=64)  # 24 pages: one 16-page sequence


@pytest.fixture(scope="module")
def two_systems() -> list[list[int]]:
    """Two 150-token system prompts (9 full pages each), then 5 tokens of a user turn each, alternating."""
    rng = np.random.default_rng(2)
    systems = [_random(rng, 150), _random(rng, 150)]
    return [systems[i % 2] + _random(rng, 5) for i in range(8)]


def test_eviction_and_preemption_under_memory_pressure_keep_the_tokens(model, two_systems):
    # Outputs grow by 40 tokens, so running sequences are preempted, and cached pages are evicted for new ones.
    params = SamplingParams(max_tokens=40, temperature=0)
    cached = _engine(model, caching=True, **SMALL)
    expected = _tokens(_engine(model, caching=False, **SMALL), two_systems, params)
    assert _tokens(cached, two_systems, params) == expected
    stats = cached.stats()
    assert stats.preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.kv_pages_used == 0 and stats.kv_pages_cached <= SMALL["num_pages"]


def test_the_oldest_freed_pages_are_evicted_first(model, two_systems):
    # A request ends holding 13 pages (155 + 40 tokens, all but the last computed), 12 of them full. After one
    # request on each system prompt, another on the second needs 4 pages and finds 1 free: it evicts the first
    # request's last three full pages, its deepest first, so the first prompt then hits 8 of its 9 pages.
    params = SamplingParams(max_tokens=40, temperature=0)
    s1, s2a, s2b = two_systems[0], two_systems[1], two_systems[3]
    cached, uncached = _engine(model, caching=True, **SMALL), _engine(model, caching=False, **SMALL)
    hits = []
    for prompt in (s1, s2a, s2b, s1):
        assert _tokens(cached, [prompt], params) == _tokens(uncached, [prompt], params)
        hits.append(cached.stats().prefix_cache_hits - sum(hits))
    assert hits == [0, 0, 9 * PAGE, 8 * PAGE]


@pytest.mark.parametrize("kv_format", ["int8", "int4"])
def test_quantized_caches_give_the_same_tokens_with_and_without_prefix_caching(model, two_systems, kv_format):
    # A cached page holds the keys and values recomputing it would store (quantized the same way), so only the
    # summation order of the prefill differs.
    small = {**SMALL, "kv_format": kv_format}
    cached = _engine(model, caching=True, **small)
    assert _tokens(cached, two_systems) == _tokens(_engine(model, caching=False, **small), two_systems)
    assert cached.stats().prefix_cache_hits > 0


def test_without_prefix_caching_nothing_is_looked_up_or_kept(model, shared):
    engine = _engine(model, caching=False)
    engine.generate(shared[:2], GREEDY)
    stats = engine.stats()
    assert stats.prefix_cache_queries == stats.prefix_cache_hits == stats.kv_pages_cached == 0


def test_prefix_caching_must_be_a_bool():
    with pytest.raises(ValueError, match="prefix_caching must be True or False, got 'yes'"):
        EngineConfig(prefix_caching="yes")
