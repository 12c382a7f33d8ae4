"""The OpenAI-compatible HTTP API over a set of deployments, as a FastAPI app.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both streaming over SSE or not), `GET /v1/models`,
`GET /health` (with the replica count of every model and role), `GET /metrics` (Prometheus), and `POST /admin/plan`,
which applies a new serving plan live (`jaxhet.serve.replan`; only on a server with an API key). Every refused
request gets a 4xx with an OpenAI-style error body that names the problem (bodies are read by `jaxhet.serve.body`,
so each way one can be wrong gets its own message), and a failure inside the server a JSON 500
(`jaxhet.serve.middleware`, which also checks the API key and counts responses). A client that leaves before its
answer is ready has its generation aborted, streamed or not, so its KV pages are freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxhet.chat_template import ChatTemplateError
from jaxhet.generation_config import SamplingDefaults
from jaxhet.serve.async_engine import EngineFailure
from jaxhet.serve.body import read_body, read_json
from jaxhet.serve.config import SamplingParams
from jaxhet.serve.deployment import CascadeDeployment, ModelDeployment
from jaxhet.serve.engine import RequestOutput
from jaxhet.serve.metrics import CONTENT_TYPE, ServerMetrics
from jaxhet.serve.middleware import RequestGuard
from jaxhet.serve.protocol import CLIENT_GONE, APIError, ChatCompletionRequest, CompletionRequest
from jaxhet.serve.remote import WorkerLink
from jaxhet.serve.replan import Fleet, ReplanRefused, ReplicaSource, parse_plan

Deployment = ModelDeployment | CascadeDeployment
_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """HTTP-level settings: an optional bearer key, the largest accepted body, how long a body may take to arrive,
    the default completion length."""

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    read_timeout_s: float = 30.0
    default_max_tokens: int = 16

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if not self.read_timeout_s > 0:
            raise ValueError(f"read_timeout_s must be > 0, got {self.read_timeout_s}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be at least 1, got {self.default_max_tokens}")


@dataclasses.dataclass(frozen=True)
class _Endpoint:
    """What an endpoint's responses are called (the object kinds of whole answers and stream chunks, the id prefix)
    and the request field its prompt comes from, for refusals that concern the prompt."""

    kind: str
    chunk_kind: str
    id_prefix: str
    prompt_field: str


COMPLETION = _Endpoint("text_completion", "text_completion", "cmpl", "prompt")
CHAT = _Endpoint("chat.completion", "chat.completion.chunk", "chatcmpl", "messages")


@dataclasses.dataclass
class _Generation:
    """One request on its way through a deployment, with the timestamps the latency metrics need."""

    index: int
    served_by: str
    output: RequestOutput
    arrival: float
    first_token: float | None = None


def create_app(
    deployments: Mapping[str, Deployment],
    config: ServerConfig = ServerConfig(),
    *,
    replicas: ReplicaSource | None = None,
    links: Sequence[WorkerLink] = (),
) -> FastAPI:
    """The app serving `deployments` (served name -> deployment); closes their engines on shutdown. With
    `replicas` (the weights and engine settings new replicas are built from), `POST /admin/plan` re-plans live;
    `links` reach the other processes of a multi-process server (`jaxhet.serve.processes`), stopped on shutdown.
    The app's `Fleet` is `app.state.fleet`."""
    fleet = Fleet(deployments, replicas, links)
    metrics = ServerMetrics(fleet)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await fleet.start()
        yield
        await fleet.close()

    app = FastAPI(title="jaxhet", lifespan=lifespan)
    app.state.fleet = fleet
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    routes = lambda: [route.path for route in app.routes]
    app.add_middleware(RequestGuard, api_key=config.api_key, requests=metrics.requests, routes=routes)
    api = _Api(fleet, config, metrics)
    app.get("/health")(api.health)
    app.get("/metrics")(lambda: Response(metrics.render(), media_type=CONTENT_TYPE))
    app.get("/v1/models")(api.models)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat_completions)
    app.post("/admin/plan")(api.admin_plan)
    return app


async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)


class _Api:
    """The endpoints over the fleet's deployments."""

    def __init__(self, fleet: Fleet, config: ServerConfig, metrics: ServerMetrics):
        self.fleet = fleet
        self.deployments = fleet.deployments  # the fleet changes this dict in place
        self.config = config
        self.metrics = metrics
        self.created = int(time.time())

    async def health(self) -> dict[str, Any]:
        """Up (the endpoint answers); "degraded" when another serving process is down, which `processes` names."""
        if not self.fleet.links:
            return {"status": "ok", "replicas": self.fleet.replica_counts()}
        processes = self.fleet.processes()
        status = "ok" if all(p["up"] for p in processes) else "degraded"
        return {"status": status, "replicas": self.fleet.replica_counts(), "processes": processes}

    async def admin_plan(self, request: Request) -> dict[str, Any]:
        """Apply the serving plan in the body (a `jaxhet plan serve -o` file) and answer what changed, once the
        removed replicas have drained. Without an API key anyone could reshape the server, so it is refused."""
        if self.config.api_key is None:
            message = (
                "POST /admin/plan changes what the server runs, so it needs the server started with an API key "
                "(--api-key or JAXHET_API_KEY)"
            )
            raise APIError(403, message, kind="permission_error")
        data = await read_json(request, max_bytes=self.config.max_body_bytes, timeout_s=self.config.read_timeout_s)
        try:
            report = await self.fleet.apply(parse_plan(data))
        except ReplanRefused as err:
            raise APIError(409, str(err)) from None
        except ValueError as err:
            raise APIError(400, str(err), param=getattr(err, "field", None)) from None
        return {**dataclasses.asdict(report), "replicas": self.fleet.replica_counts()}

    async def models(self) -> dict[str, Any]:
        data = [
            {"id": name, "object": "model", "created": self.created, "owned_by": "jaxhet"} for name in self.deployments
        ]
        return {"object": "list", "data": data}

    async def completions(self, request: Request):
        body = await self._body(request, CompletionRequest)
        deployment = self._deployment(body.model)
        ids = _prompt_ids(deployment, body.prompt)
        max_tokens = body.max_tokens or self.config.default_max_tokens
        params = _sampling(
            body, deployment.sampling_defaults, max_tokens, stop=body.stop_strings(), logprobs=body.logprobs
        )

        def render(generation: _Generation) -> dict[str, Any]:
            out = generation.output
            return {
                "index": generation.index,
                "text": out.text,
                "logprobs": _completion_logprobs(deployment, out) if body.logprobs is not None else None,
                "finish_reason": out.finish_reason,
            }

        def render_chunk(generation: _Generation, delta: str, first: bool) -> dict[str, Any] | None:
            out = generation.output
            if not delta and not out.finished:
                return None
            return {"index": generation.index, "text": delta, "logprobs": None, "finish_reason": out.finish_reason}

        return await self._complete(request, body, deployment, ids, params, COMPLETION, render, render_chunk)

    async def chat_completions(self, request: Request):
        body = await self._body(request, ChatCompletionRequest)
        deployment = self._deployment(body.model)
        try:
            ids = deployment.encode_chat([m.model_dump() for m in body.messages])
        except ChatTemplateError as err:
            raise APIError(400, str(err), param="messages") from None
        max_tokens = body.requested_max_tokens() or max(1, deployment.max_model_len - len(ids))
        stop = (*body.stop_strings(), *deployment.chat_template.stop)
        params = _sampling(
            body, deployment.sampling_defaults, max_tokens, stop=stop, logprobs=body.requested_logprobs()
        )

        def render(generation: _Generation) -> dict[str, Any]:
            out = generation.output
            return {
                "index": generation.index,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": _chat_logprobs(deployment, out) if body.logprobs else None,
                "finish_reason": out.finish_reason,
            }

        def render_chunk(generation: _Generation, delta: str, first: bool) -> dict[str, Any] | None:
            out = generation.output
            if not delta and not out.finished and not first:
                return None
            message = {"role": "assistant", "content": delta} if first else {"content": delta}
            return {"index": generation.index, "delta": message, "logprobs": None, "finish_reason": out.finish_reason}

        return await self._complete(request, body, deployment, ids, params, CHAT, render, render_chunk)

    async def _body(self, request: Request, model):
        config = self.config
        return await read_body(request, model, max_bytes=config.max_body_bytes, timeout_s=config.read_timeout_s)

    def _deployment(self, name: str) -> Deployment:
        if name not in self.deployments:
            served = sorted(self.deployments)
            raise APIError(404, f"model {name!r} does not exist; served models: {served}", param="model")
        return self.deployments[name]

    async def _start(
        self, deployment: Deployment, ids: list[int], params: SamplingParams, index: int, endpoint: _Endpoint
    ) -> tuple[_Generation, AsyncIterator[tuple[str, RequestOutput]]]:
        """Submit one choice and wait for its first output, so that a refusal is still a plain 4xx."""
        arrival = time.monotonic()
        stream = deployment.generate(uuid.uuid4().hex, ids, params)
        try:
            served_by, output = await anext(stream)
        except ValueError as err:
            field = getattr(err, "field", None)
            raise APIError(400, str(err), param=endpoint.prompt_field if field == "prompt" else field) from None
        except EngineFailure as err:
            raise _engine_error(err) from None
        generation = _Generation(index, served_by, output, arrival)
        self._note_progress(generation)
        return generation, stream

    async def _start_all(
        self, deployment: Deployment, ids: list[int], params: SamplingParams, n: int, endpoint: _Endpoint
    ):
        """Submit `n` choices together (seeded ones get seeds seed, seed + 1, ...); all start or none does."""
        seeds = [None if params.seed is None else params.seed + i for i in range(n)]
        choices = [dataclasses.replace(params, seed=seed) for seed in seeds]
        started = await asyncio.gather(
            *(self._start(deployment, ids, choice, i, endpoint) for i, choice in enumerate(choices)),
            return_exceptions=True,
        )
        failures = [s for s in started if isinstance(s, BaseException)]
        if failures:
            for result in started:
                if not isinstance(result, BaseException):
                    await result[1].aclose()
            raise failures[0]
        return started

    def _note_progress(self, generation: _Generation) -> None:
        now = time.monotonic()
        if generation.first_token is None and generation.output.token_ids:
            generation.first_token = now
        if generation.output.finished:
            tokens = len(generation.output.token_ids)
            first_token = generation.first_token or now
            self.metrics.observe_request(generation.served_by, generation.arrival, first_token, now, tokens)

    async def _follow(self, generation: _Generation, stream) -> AsyncIterator[_Generation]:
        """Yield the generation after each new output, finishing the stream (or aborting it if left early)."""
        async with contextlib.aclosing(stream):
            yield generation
            async for served_by, output in stream:
                generation.served_by, generation.output = served_by, output
                self._note_progress(generation)
                yield generation

    async def _complete(
        self, http: Request, request, deployment: Deployment, ids, params, endpoint: _Endpoint, render, render_chunk
    ):
        """Answer with `request.n` choices, whole (`render` each) or streamed as SSE chunks (`render_chunk`)."""
        started = await _unless_client_leaves(http, self._start_all(deployment, ids, params, request.n, endpoint))
        followers = [self._follow(generation, stream) for generation, stream in started]
        generations = [generation for generation, _ in started]
        response_id = f"{endpoint.id_prefix}-{uuid.uuid4().hex}"
        if not request.stream:
            await _unless_client_leaves(http, _finish(followers))
            completion = sum(len(g.output.token_ids) for g in generations)
            usage = {"prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion}
            choices = [render(g) for g in generations]
            return _envelope(response_id, endpoint.kind, generations[0].served_by, choices, usage=usage)

        async def events() -> AsyncIterator[str]:
            sent, fresh = [0] * len(generations), [True] * len(generations)
            try:
                async for current in _merged(followers):
                    i = current.index
                    choice = render_chunk(current, current.output.text[sent[i] :], first=fresh[i])
                    sent[i] = len(current.output.text)
                    if choice is not None:
                        fresh[i] = False
                        chunk = _envelope(response_id, endpoint.chunk_kind, current.served_by, [choice])
                        yield f"data: {json.dumps(chunk)}\n\n"
            except EngineFailure as err:
                yield f"data: {json.dumps(_engine_error(err).body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def _prompt_ids(deployment: Deployment, prompt: str | list[int]) -> list[int]:
    ids = deployment.encode(prompt)
    vocab = deployment.tokenizer.vocab_size
    if any(not 0 <= i < vocab for i in ids):
        raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
    return ids


def _first_set(*values: _T | None) -> _T:
    return next(v for v in values if v is not None)


def _sampling(request, defaults: SamplingDefaults, max_tokens: int, **extra) -> SamplingParams:
    """The request's sampling settings, each it leaves unset taken from the model's defaults, else the API's."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_first_set(request.temperature, defaults.temperature, 1.0),
            top_p=_first_set(request.top_p, defaults.top_p, 1.0),
            top_k=_first_set(request.top_k, defaults.top_k, 0),
            seed=request.seed,
            **extra,
        )
    except ValueError as err:
        raise APIError(400, str(err), param=getattr(err, "field", None)) from None


def _engine_error(err: EngineFailure) -> APIError:
    """A failure inside an engine is the request's 500; a replica lost with its process, a 503."""
    return APIError(getattr(err, "status", 500), str(err), kind="server_error")


async def _finish(followers: list[AsyncIterator[_Generation]]) -> None:
    """Run every choice to its end; a failure inside the engine is this request's 500."""
    try:
        async for _ in _merged(followers):
            pass
    except EngineFailure as err:
        raise _engine_error(err) from None


async def _unless_client_leaves(http: Request, work: Awaitable[_T]) -> _T:
    """The result of `work`, unless the client disconnects first: then `work` is cancelled (which aborts the
    generations it holds and frees their pages) and the request ends with status 499."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(http.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise APIError(CLIENT_GONE, "the client closed the connection before the answer was ready")
    return task.result()


async def _disconnected(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Return once the client has disconnected (the body has already been read, so nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _envelope(response_id: str, kind: str, model: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
    """An OpenAI response object (or stream chunk) of `kind` around its choices."""
    envelope = {"id": response_id, "object": kind, "created": int(time.time()), "model": model}
    return envelope | {"choices": choices} | extra


async def _merged(followers: list[AsyncIterator[_Generation]]) -> AsyncIterator[_Generation]:
    """The updates of several choices' streams as they come; leaving early (or a failure) closes them all."""
    updates: asyncio.Queue[_Generation | BaseException | None] = asyncio.Queue()

    async def pump(follower: AsyncIterator[_Generation]) -> None:
        try:
            async for generation in follower:
                await updates.put(generation)
        except Exception as err:  # noqa: BLE001 - handed to the consumer, which raises it
            await updates.put(err)
        finally:
            await updates.put(None)

    tasks = [asyncio.create_task(pump(f)) for f in followers]
    try:
        running = len(tasks)
        while running:
            item = await updates.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _token_text(deployment: Deployment, token: int) -> str:
    return deployment.tokenizer.decode([token])


def _completion_logprobs(deployment: Deployment, output: RequestOutput) -> dict[str, Any]:
    tokens = [_token_text(deployment, t) for t in output.token_ids]
    offsets, position = [], 0
    for text in tokens:
        offsets.append(position)
        position += len(text)
    top = None
    if output.top_logprobs is not None:
        top = [{_token_text(deployment, t): lp for t, lp in alts.items()} for alts in output.top_logprobs]
    return {"tokens": tokens, "token_logprobs": output.logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(deployment: Deployment, output: RequestOutput) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(deployment, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for index, (token, logprob) in enumerate(zip(output.token_ids, output.logprobs, strict=False)):
        alternatives = output.top_logprobs[index] if output.top_logprobs is not None else {}
        content.append({**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in alternatives.items()]})
    return {"content": content}
