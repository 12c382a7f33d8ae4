"""Routing inside a model's deployment: a request goes to the replica whose load is least for the requests/s the
plan routes to it, replicas that are down are skipped, and a plan's routed rates reach the engines."""

from __future__ import annotations

import asyncio

import jax
import pytest
from flax import nnx

import planners
from jaxhet.loading import LoadedModel
from jaxhet.models.config import LlamaConfig
from jaxhet.models.llama import Llama
from jaxhet.serve.async_engine import ReplicaLost
from jaxhet.serve.build import by_role, place
from jaxhet.serve.config import SamplingParams
from jaxhet.serve.deployment import ModelDeployment
from jaxhet.serve.engine import RequestOutput
from jaxhet.tokenizers import ByteTokenizer


class HeldReplica:
    """A stand-in replica whose requests stay open until `release` is set: its load is what routing sees."""

    def __init__(self, name: str, routed_rps: float, available: bool = True):
        self.name, self.routed_rps, self.available, self.node = name, routed_rps, available, "n0"
        self.load = self.started = 0
        self.release = asyncio.Event()

    async def generate(self, request_id, prompt_token_ids, params, *, hand_off=False):
        self.load += 1
        self.started += 1
        try:
            await self.release.wait()
            yield RequestOutput(request_id, prompt_token_ids, [1], "x", [0.0], None, True, "length")
        finally:
            self.load -= 1


async def _route(deployment: ModelDeployment, replicas: list[HeldReplica], requests: int) -> list[int]:
    """Start `requests` requests that stay open, then release them all: how many each replica took."""

    async def one(i: int) -> None:
        async for _ in deployment.generate(str(i), [1, 2], SamplingParams(max_tokens=1)):
            pass

    tasks = [asyncio.ensure_future(one(i)) for i in range(requests)]
    while sum(r.started for r in replicas) < requests:
        await asyncio.sleep(0)
    for replica in replicas:
        replica.release.set()
    await asyncio.gather(*tasks)
    return [r.started for r in replicas]


def test_requests_follow_the_plans_routed_rates_and_skip_replicas_that_are_down():
    fast, slow = HeldReplica("fast", 3.0), HeldReplica("slow", 1.0)
    assert asyncio.run(_route(ModelDeployment("m", [fast, slow]), [fast, slow], 40)) == [30, 10]
    idle, busy, down = HeldReplica("idle", 0.0), HeldReplica("busy", 1.0), HeldReplica("down", 5.0, available=False)
    assert asyncio.run(_route(ModelDeployment("m", [idle, busy, down]), [idle, busy, down], 8)) == [0, 8, 0]
    gone = ModelDeployment("m", [HeldReplica("a", 1.0, available=False)])
    with pytest.raises(ReplicaLost, match=r"model 'm': no whole or prefill replica is up \(a on node n0 down\)"):
        asyncio.run(anext(gone.generate("r", [1, 2], SamplingParams(max_tokens=1))))


def test_a_plans_routed_rates_reach_its_engines():
    config = LlamaConfig.tiny(vocab_size=ByteTokenizer.vocab_size, num_layers=1, dtype="float32")
    tiny = LoadedModel(Llama(config, rngs=nnx.Rngs(params=jax.random.key(0))), ByteTokenizer(), "tiny")
    common = dict(model="tiny", kind="cpu", max_batch=4, capacity_rps=4.0, tp=1)
    replicas = [planners.ServeReplica(devices=(d,), routed_rps=r, **common) for d, r in ((0, 3.0), (1, 1.5))]
    plan = planners.ServePlan(tuple(replicas), "max_throughput", 1.0, 0.0, {"tiny": 4.5})
    placed = place(plan, {"tiny": tiny}, jax.devices())
    engines = [HeldReplica("", 1.0) for _ in placed]
    by_role(list(zip(placed, engines, strict=True)))
    assert [(e.name, e.routed_rps) for e in engines] == [("tiny-0", 3.0), ("tiny-1", 1.5)]
