"""What the serving processes tell each other, as frame headers and payloads (`jaxhet.serve.frames`): sampling
settings, request outputs, engine snapshots, and KV handoffs whose payload is exactly the handed-over pages."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxhet.serve.async_engine import EngineSnapshot
from jaxhet.serve.config import SamplingParams
from jaxhet.serve.engine import EngineStats, KVHandoff, RequestOutput
from jaxhet.serve.frames import pack_arrays, unpack_arrays
from jaxhet.serve.paged_cache import LayerPool

POOL_FIELDS = ("k", "v", "k_scale", "v_scale")


def params_to_json(params: SamplingParams) -> dict[str, Any]:
    return dataclasses.asdict(params)


def params_from_json(data: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**{**data, "stop": tuple(data.get("stop", ()))})


def _top_from_json(top: list[dict[str, float]] | None) -> list[dict[int, float]] | None:
    """JSON turns the token-id keys of top log-probabilities into strings; this turns them back."""
    return None if top is None else [{int(k): v for k, v in row.items()} for row in top]


def output_to_json(output: RequestOutput) -> dict[str, Any]:
    """Every field of `output` but its handoff (sent as a payload beside it)."""
    return {f.name: getattr(output, f.name) for f in dataclasses.fields(output) if f.name != "handoff"}


def output_from_json(data: dict[str, Any], handoff: KVHandoff | None = None) -> RequestOutput:
    return RequestOutput(**{**data, "top_logprobs": _top_from_json(data["top_logprobs"]), "handoff": handoff})


def snapshot_to_json(snapshot: EngineSnapshot) -> dict[str, Any]:
    return {"stats": dataclasses.asdict(snapshot.stats), "tokens_by_second": snapshot.tokens_by_second}


def snapshot_from_json(data: dict[str, Any]) -> EngineSnapshot:
    seconds = tuple((int(s), int(n)) for s, n in data["tokens_by_second"])
    return EngineSnapshot(EngineStats(**data["stats"]), seconds)


def handoff_to_frame(handoff: KVHandoff) -> tuple[dict[str, Any], bytes]:
    """Header and payload of a handoff: the payload is every handed-over page's keys, values and scales, layer by
    layer and run by run (`handoff.nbytes` bytes, nothing else)."""
    fields = [name for name in POOL_FIELDS if getattr(handoff.pages[0][0], name) is not None] if handoff.pages else []
    arrays = [getattr(pool, name) for run in handoff.pages for pool in run for name in fields]
    specs, payload = pack_arrays(arrays)
    meta = {f.name: getattr(handoff, f.name) for f in dataclasses.fields(handoff) if f.name != "pages"}
    layers = len(handoff.pages[0]) if handoff.pages else 0
    return {**meta, "runs": len(handoff.pages), "layers": layers, "fields": fields, "arrays": specs}, payload


def handoff_from_frame(header: dict[str, Any], payload: bytes) -> KVHandoff:
    """The handoff `handoff_to_frame` sent, its pages as host arrays (the decode engine places them)."""
    arrays = iter(unpack_arrays(header["arrays"], payload))
    fields, pages = header["fields"], []
    for _ in range(header["runs"]):
        run = []
        for _ in range(header["layers"]):
            values = {name: next(arrays) for name in fields}
            run.append(LayerPool(**{name: values.get(name) for name in POOL_FIELDS}))
        pages.append(tuple(run))
    meta = {f.name: header[f.name] for f in dataclasses.fields(KVHandoff) if f.name != "pages"}
    return KVHandoff(**{**meta, "top_logprobs": _top_from_json(meta["top_logprobs"]), "pages": tuple(pages)})
