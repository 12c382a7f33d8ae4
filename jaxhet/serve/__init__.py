"""Serving: a continuous-batching engine over a paged, quantized KV cache, and an OpenAI-compatible HTTP server.

`Engine` is the synchronous core (add requests, step); `AsyncEngine` runs one on its own thread for asyncio code;
`create_app` builds the FastAPI app over deployments (`ModelDeployment`, whose replicas serve whole requests or
hand them from prefill to decode, and `CascadeDeployment`) that `build_deployments` makes from loaded models and an
optional serving plan, and `build_cascade` from a cascade plan; given a `ReplicaSource`, the app takes new serving
plans live (`Fleet`, `POST /admin/plan`). `BackgroundServer` runs it on 127.0.0.1 from Python (tests, notebooks),
`jaxhet serve` from the shell.
"""

from jaxhet.serve.app import ServerConfig, create_app
from jaxhet.serve.async_engine import AsyncEngine
from jaxhet.serve.build import build_cascade, build_deployments
from jaxhet.serve.config import EngineConfig, SamplingParams
from jaxhet.serve.deployment import CascadeDeployment, ModelDeployment
from jaxhet.serve.engine import Engine, EngineStats, KVHandoff, RequestOutput
from jaxhet.serve.replan import Fleet, ReplanReport, ReplicaSource
from jaxhet.serve.server import BackgroundServer

__all__ = [
    "AsyncEngine",
    "BackgroundServer",
    "CascadeDeployment",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Fleet",
    "KVHandoff",
    "ModelDeployment",
    "ReplanReport",
    "ReplicaSource",
    "RequestOutput",
    "SamplingParams",
    "ServerConfig",
    "build_cascade",
    "build_deployments",
    "create_app",
]
