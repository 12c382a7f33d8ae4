"""The prefix-cache mode of `bench/serve.py --prefix-cache`: time to first token with and without prefix caching,
for requests that share a long system prompt, same model, same engine settings, same run.

Every request is the same `system_len`-token system prompt followed by `user_len` tokens of its own. Two ways
they arrive, each run on an engine with `prefix_caching` on and on one with it off (both warmed up first, so no
compilation is timed):
- sequential: each request arrives when the previous one has finished; its TTFT is the time from `add_request`
  to the step that samples its first token. The first request finds nothing cached (reported apart as `cold`), the
  others find the system prompt's full pages cached (`warm`, their median);
- burst: all arrive at once; TTFT from the arrival of all to each one's first token (p50, p90). Requests admitted
  in the same step do not share the prefix they have not computed yet, so only those admitted later hit.
The ratio is uncached over cached TTFT. Both engines must give the same greedy tokens; the report says whether
they did. The engine is driven synchronously (`Engine.step`), so the figures are the engine's own, without HTTP.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
import time

import jax
import numpy as np
from flax import nnx
from record import provenance, save

from jaxhet.models import Llama, LlamaConfig
from jaxhet.serve import Engine, EngineConfig, SamplingParams
from jaxhet.tokenizers import ByteTokenizer


@dataclasses.dataclass(frozen=True)
class PrefixWorkload:
    system_len: int = 1000
    user_len: int = 32
    requests: int = 32
    output_len: int = 8
    batch: int = 8
    prefill_chunk: int = 512
    kv_format: str = "bfloat16"


def _prompts(workload: PrefixWorkload, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    system = rng.integers(0, 256, workload.system_len).tolist()
    return [system + rng.integers(0, 256, workload.user_len).tolist() for _ in range(workload.requests)]


def _engine_config(workload: PrefixWorkload, caching: bool) -> EngineConfig:
    page = 16
    max_len = -(-(workload.system_len + workload.user_len + workload.output_len + 1) // page) * page
    return EngineConfig(
        max_running=workload.batch,
        page_size=page,
        num_pages=workload.batch * (max_len // page) + 8,
        kv_format=workload.kv_format,
        max_model_len=max_len,
        prefill_chunk=workload.prefill_chunk,
        prefix_caching=caching,
    )


def _first_tokens(engine: Engine, ids: list[str], start: float) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Step until every request in `ids` has finished: seconds from `start` to each one's first token, and tokens."""
    first, final = {}, {}
    while any(i not in final for i in ids):
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.token_ids:
                first.setdefault(out.request_id, now - start)
            if out.finished:
                final[out.request_id] = out.token_ids
    return {i: first[i] for i in ids}, final


def _sequential(engine: Engine, prompts: list[list[int]], params: SamplingParams, tag: str):
    ttft, tokens = [], []
    for index, prompt in enumerate(prompts):
        request_id = f"{tag}-seq-{index}"
        start = time.perf_counter()
        engine.add_request(request_id, prompt, params)
        first, final = _first_tokens(engine, [request_id], start)
        ttft.append(first[request_id])
        tokens.append(final[request_id])
    return ttft, tokens


def _burst(engine: Engine, prompts: list[list[int]], params: SamplingParams, tag: str):
    ids = [f"{tag}-burst-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, params)
    first, final = _first_tokens(engine, ids, start)
    return [first[i] for i in ids], [final[i] for i in ids]


def _ms(seconds: list[float]) -> dict[str, float]:
    data = np.asarray(seconds) * 1e3
    return {f"p{q}": float(np.percentile(data, q)) for q in (50, 90)}


def _measure(model: Llama, workload: PrefixWorkload, caching: bool) -> dict:
    engine = Engine(model, ByteTokenizer(), _engine_config(workload, caching))
    engine.warmup()
    params = SamplingParams(max_tokens=workload.output_len, temperature=0.0)
    # A different system prompt for each scenario, so the burst does not find the sequential run's pages.
    seq_ttft, seq_tokens = _sequential(engine, _prompts(workload, seed=1), params, "a")
    burst_ttft, burst_tokens = _burst(engine, _prompts(workload, seed=2), params, "b")
    stats = engine.stats()
    return {
        "sequential": {"cold_ms": seq_ttft[0] * 1e3, "warm_ms": statistics.median(seq_ttft[1:]) * 1e3},
        "burst": _ms(burst_ttft),
        "prefix_cache_queries": stats.prefix_cache_queries,
        "prefix_cache_hits": stats.prefix_cache_hits,
        "tokens": seq_tokens + burst_tokens,
    }


def prefix_cache(model_config: LlamaConfig, workload: PrefixWorkload, out: pathlib.Path, *, smoke: bool) -> dict:
    """Measure TTFT with and without prefix caching, print a table and save the report under `out`."""
    model = Llama(model_config, rngs=nnx.Rngs(params=jax.random.key(0)))
    runs = {caching: _measure(model, workload, caching) for caching in (True, False)}
    same = runs[True].pop("tokens") == runs[False].pop("tokens")
    on, off = runs[True], runs[False]
    ratios = {
        "sequential_warm": off["sequential"]["warm_ms"] / on["sequential"]["warm_ms"],
        "burst_p50": off["burst"]["p50"] / on["burst"]["p50"],
    }
    device = jax.devices()[0].device_kind
    print(f"prefix cache, {workload.requests} requests sharing a {workload.system_len}-token system prompt, {device}")
    for name, run in (("cached", on), ("uncached", off)):
        seq, burst = run["sequential"], run["burst"]
        print(
            f"  {name:9s} sequential TTFT cold {seq['cold_ms']:8.1f} ms, warm p50 {seq['warm_ms']:8.1f} ms; "
            f"burst TTFT p50 {burst['p50']:8.1f} ms, p90 {burst['p90']:8.1f} ms; "
            f"hits {run['prefix_cache_hits']}/{run['prefix_cache_queries']} tokens"
        )
    print(
        f"  uncached/cached TTFT: sequential {ratios['sequential_warm']:.2f}x, burst p50 {ratios['burst_p50']:.2f}x; "
        f"same greedy tokens: {same}"
    )
    report = {
        **provenance("prefix_cache"),
        "model": dataclasses.asdict(model_config),
        "workload": dataclasses.asdict(workload),
        "engine": dataclasses.asdict(_engine_config(workload, True)),
        "cached": on,
        "uncached": off,
        "ratio_uncached_over_cached": ratios,
        "same_tokens": same,
    }
    save(report, out, smoke=smoke)
    return report
