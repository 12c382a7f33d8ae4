"""Serving benchmark: the continuous-batching engine against a naive batched `jax.jit` generate loop, same run.

Requests arrive as a Poisson process at each rate; every request has a random prompt and a fixed output length.
- engine: `jaxhet.serve.AsyncEngine` in this process (no HTTP, so the figures are the engine's own), continuous
  batching over a paged KV cache; TTFT is arrival to first token, TPOT the mean gap between later tokens;
- naive: what a user writes without a server: whenever the previous batch is done, take up to `--batch` waiting
  requests, pad them, and run `jaxhet.generate.generate` to the longest output; a request's tokens all arrive
  when its batch ends, so its TTFT is its completion time.
Both report output tokens/s over the whole trace. Decode efficiency: the engine's decode step at full batch, as
bytes it must read (weights + KV cache) per second, against a copy measured in the same run.

    python bench/serve.py                      # GPU: ~1B Llama-style model, bf16, rates 2/8/32 req/s
    python bench/serve.py --smoke              # any machine: tiny model, a handful of requests
    python bench/serve.py --soak               # any machine: 10-minute HTTP soak of a `jaxhet serve` process,
                                               # valid and hostile traffic (serve_soak.py); --soak SECONDS
    python bench/serve.py --soak --smoke       # the same for a few seconds
    python bench/serve.py --prefix-cache       # time to first token with and without prefix caching, 32 requests
                                               # sharing a 1,000-token system prompt (serve_prefix.py): the ~1B
                                               # model on a GPU, the tiny one on a CPU; --smoke: a few, shorter
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from record import provenance, save

from jaxhet.generate import SamplingConfig, generate
from jaxhet.models import Llama, LlamaConfig
from jaxhet.serve import AsyncEngine, Engine, EngineConfig, SamplingParams
from jaxhet.tokenizers import ByteTokenizer

ONE_B = dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=8, intermediate_size=5632)


@dataclasses.dataclass(frozen=True)
class Trace:
    arrivals: tuple[float, ...]
    prompts: tuple[tuple[int, ...], ...]
    output_len: int


def poisson_trace(rate: float, count: int, prompt_len: int, output_len: int, vocab: int, seed: int) -> Trace:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, count))
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, count)
    prompts = tuple(tuple(int(t) for t in rng.integers(0, 256, n)) for n in lengths)
    return Trace(tuple(float(a) for a in arrivals), prompts, output_len)


def _percentiles(values: list[float]) -> dict[str, float]:
    data = np.asarray(values) * 1e3
    return {f"p{q}": float(np.percentile(data, q)) for q in (50, 90, 99)}


async def _run_engine(engine: AsyncEngine, trace: Trace) -> dict:
    params = SamplingParams(max_tokens=trace.output_len, temperature=0.0)
    start = time.monotonic()
    ttft, tpot, tokens = [], [], 0

    async def one(index: int) -> None:
        nonlocal tokens
        await asyncio.sleep(max(0.0, start + trace.arrivals[index] - time.monotonic()))
        arrival, first = time.monotonic(), None
        async for out in engine.generate(f"r{index}", list(trace.prompts[index]), params):
            if first is None and out.token_ids:
                first = time.monotonic()
        done = time.monotonic()
        ttft.append(first - arrival)
        if len(out.token_ids) > 1:
            tpot.append((done - first) / (len(out.token_ids) - 1))
        tokens += len(out.token_ids)

    await asyncio.gather(*(one(i) for i in range(len(trace.arrivals))))
    elapsed = time.monotonic() - start
    return {"tokens_per_s": tokens / elapsed, "ttft_ms": _percentiles(ttft), "tpot_ms": _percentiles(tpot)}


def _naive_batch(model: Llama, prompts: list[list[int]], batch: int, output_len: int) -> list[list[int]]:
    """One padded batch through `generate`: always `batch` rows, so shapes (and compilations) stay fixed."""
    rows = prompts + [prompts[0]] * (batch - len(prompts))
    return generate(model, rows, SamplingConfig(max_new_tokens=output_len), jax.random.key(0))[: len(prompts)]


def _run_naive(model: Llama, trace: Trace, batch: int) -> dict:
    start, done, ttft, tokens = time.monotonic(), 0, [], 0
    while done < len(trace.arrivals):
        now = time.monotonic() - start
        if trace.arrivals[done] > now:
            time.sleep(trace.arrivals[done] - now)
            now = trace.arrivals[done]
        ready = [i for i in range(done, min(done + batch, len(trace.arrivals))) if trace.arrivals[i] <= now]
        outputs = _naive_batch(model, [list(trace.prompts[i]) for i in ready], batch, trace.output_len)
        finished = time.monotonic() - start
        ttft += [finished - trace.arrivals[i] for i in ready]
        tokens += sum(len(o) for o in outputs)
        done += len(ready)
    elapsed = time.monotonic() - start
    return {"tokens_per_s": tokens / elapsed, "ttft_ms": _percentiles(ttft)}


def _copy_bandwidth(size_bytes: int) -> float:
    x = jnp.ones((size_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    jax.block_until_ready(copy(x))
    samples = []
    for _ in range(10):
        begin = time.perf_counter()
        jax.block_until_ready(copy(x))
        samples.append(time.perf_counter() - begin)
    return 2 * x.nbytes / statistics.median(samples)


def _decode_efficiency(engine: Engine, model: Llama, context: int, batch: int, steps: int, copy_bw: float) -> dict:
    """Time full-batch decode steps at about `context` tokens each and relate the bytes they read to the copy speed."""
    params = SamplingParams(max_tokens=steps, temperature=0.0)
    rng = np.random.default_rng(1)
    for i in range(batch):
        engine.add_request(f"d{i}", [int(t) for t in rng.integers(0, 256, context)], params)
    while engine.stats().generated_tokens < batch:  # every prompt prefilled and its first token sampled
        engine.step()
    begin, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    step_s = (time.perf_counter() - begin) / max(steps, 1)
    weight_bytes = sum(p.nbytes for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    cfg = model.config
    kv_itemsize = {"int8": 1, "int4": 0.5}.get(engine.config.kv_format, jnp.dtype(engine.config.kv_format).itemsize)
    kv_bytes = 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * kv_itemsize
    achieved = (weight_bytes + kv_bytes) / step_s
    return {"step_ms": step_s * 1e3, "bytes_per_step": weight_bytes + kv_bytes, "fraction_of_copy": achieved / copy_bw}


def _prefix_cache(args: argparse.Namespace) -> None:
    from serve_prefix import PrefixWorkload, prefix_cache

    if args.smoke:
        workload = PrefixWorkload(system_len=100, user_len=8, requests=6, output_len=4, batch=2, prefill_chunk=64)
    else:
        workload = PrefixWorkload(kv_format=args.kv_format)
    if args.smoke or jax.default_backend() == "cpu":
        config = LlamaConfig.tiny(vocab_size=ByteTokenizer.vocab_size, dtype="float32")
        workload = dataclasses.replace(workload, kv_format="float32")
    else:
        config = LlamaConfig(**ONE_B, dtype="bfloat16", param_dtype="bfloat16")
    prefix_cache(config, workload, args.out, smoke=args.smoke)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model and trace, any machine")
    parser.add_argument("--rates", type=float, nargs="+", default=[2.0, 8.0, 32.0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="decode batch of both the engine and the naive loop")
    parser.add_argument("--kv-format", default="bfloat16")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    parser.add_argument(
        "--soak",
        type=float,
        nargs="?",
        const=0.0,
        metavar="SECONDS",
        help="instead: the HTTP soak of serve_soak.py, for SECONDS (600; 5 with --smoke unless given)",
    )
    parser.add_argument(
        "--prefix-cache", action="store_true", help="instead: TTFT with and without prefix caching (serve_prefix.py)"
    )
    args = parser.parse_args()
    if args.prefix_cache:
        _prefix_cache(args)
        return
    if args.soak is not None:
        from serve_soak import soak

        seconds = args.soak or (5.0 if args.smoke else 600.0)  # a bare --soak takes the default length
        soak(seconds, args.out, workers=4 if args.smoke else 8, smoke=args.smoke)
        return
    if args.smoke:
        args.rates, args.requests, args.prompt_len, args.output_len, args.batch = [20.0], 6, 24, 8, 4
        config = LlamaConfig.tiny(vocab_size=ByteTokenizer.vocab_size, dtype="float32")
    else:
        config = LlamaConfig(**ONE_B, dtype="bfloat16", param_dtype="bfloat16")
    model = Llama(config, rngs=nnx.Rngs(params=jax.random.key(0)))
    max_len = args.prompt_len + args.output_len + 16
    engine_config = EngineConfig(
        max_running=args.batch,
        page_size=16,
        num_pages=args.batch * (-(-max_len // 16)) + 8,
        kv_format=args.kv_format,
        max_model_len=max_len,
        prefill_chunk=max(args.prompt_len, 64),
    )
    engine = Engine(model, ByteTokenizer(), engine_config)
    engine.warmup()
    copy_bw = _copy_bandwidth(1 << 26 if args.smoke else 1 << 30)
    decode = _decode_efficiency(engine, model, args.prompt_len, args.batch, args.output_len, copy_bw)
    served = AsyncEngine(engine, name="bench")
    rows = []
    for rate in args.rates:
        trace = poisson_trace(rate, args.requests, args.prompt_len, args.output_len, config.vocab_size, seed=0)
        buckets = {1 << (len(p) - 1).bit_length() for p in trace.prompts}  # generate's power-of-two padding
        for length in buckets:  # compile every bucket before timing
            _naive_batch(model, [[0] * length], args.batch, args.output_len)
        engine_row = asyncio.run(_run_engine(served, trace))
        naive_row = _run_naive(model, trace, args.batch)
        rows.append({"rate": rate, "engine": engine_row, "naive": naive_row})
        print(
            f"rate {rate:6.1f}/s  engine {engine_row['tokens_per_s']:9.1f} tok/s "
            f"(TTFT p50 {engine_row['ttft_ms']['p50']:8.1f} ms, TPOT p50 {engine_row['tpot_ms']['p50']:7.2f} ms)  "
            f"naive {naive_row['tokens_per_s']:9.1f} tok/s (TTFT p50 {naive_row['ttft_ms']['p50']:8.1f} ms)  "
            f"ratio {engine_row['tokens_per_s'] / naive_row['tokens_per_s']:.2f}x"
        )
    asyncio.run(served.close())
    print(
        f"decode at batch {args.batch}, context {args.prompt_len}: {decode['step_ms']:.2f} ms/step, "
        f"{decode['fraction_of_copy']:.0%} of a measured copy ({copy_bw / 1e9:.0f} GB/s)"
    )
    report = {
        **provenance("serve"),
        "model": dataclasses.asdict(config),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"engine": dataclasses.asdict(engine_config)},
        "copy_bytes_per_s": copy_bw,
        "decode": decode,
        "rows": rows,
    }
    save(report, args.out, smoke=args.smoke)


if __name__ == "__main__":
    main()
