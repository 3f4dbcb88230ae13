"""`create_app`: the OpenAI-compatible HTTP API of `lucid serve`, as a FastAPI application.

    POST /v1/chat/completions   POST /v1/completions   (stream true/false: server-sent events)
    POST /v1/embeddings         GET  /v1/models
    POST /tokenize              POST /detokenize        GET /health   GET /metrics
    GET  /, /explore/...        the explorer page (lucidlm.server.explorer)

Generation goes through the `Engine` (continuous batching on one engine thread); request
bodies are checked by `openai_schema`, answers built by `responses`. Every mistake gets a
4xx in OpenAI's error format and the server goes on serving; a bug of ours gets a 500 with
a one-line message, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from typing import AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..errors import ContextOverflowError, InvalidArgumentError, LucidError
from .engine import Engine, EngineClosedError, GenerationJob, QueueFullError, Ticket
from .explorer import explorer_routes
from .http_errors import APIError, error_body, error_response, from_lucid_error
from .metrics import Metrics
from .middleware import BearerAuth, BodyLimit, RequestCounter
from .openai_schema import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, JobBuilder,
                            TokenizeRequest, chat_messages, check_token_ids)
from .responses import ResponseBuilder

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class ServedModels:
    """The models behind the `model` field: the generator and, optionally, an encoder for
    /v1/embeddings. A model answers to its served id (the file or catalogue name without
    directories) and to its LucidModel name."""

    def __init__(self, generator, embedder=None, generator_id: str | None = None):
        self.generator, self.embedder = generator, embedder
        self.generator_id = generator_id or os.path.basename(generator.name)
        self.embedder_id = os.path.basename(embedder.name) if embedder is not None else None

    def ids(self) -> list[str]:
        return [i for i in (self.generator_id, self.embedder_id) if i is not None]

    def find(self, name: str | None, purpose: str):
        """The model `name` names (None: the one for `purpose`, "generate" or "embed")."""
        if name is None:
            if purpose == "embed" and self.embedder is None:
                raise APIError(404, "this server has no embedding model (lucid serve --embedding-model NAME)",
                               param="model", code="model_not_found")
            return self.embedder if purpose == "embed" else self.generator
        if name in (self.generator_id, self.generator.name):
            return self.generator
        if self.embedder is not None and name in (self.embedder_id, self.embedder.name):
            return self.embedder
        raise APIError(404, f"The model `{name}` does not exist; this server has: {', '.join(self.ids())}",
                       param="model", code="model_not_found")

    def for_generation(self, name: str | None):
        model = self.find(name, "generate")
        if model is not self.generator:
            raise APIError(400, f"`{name}` is an embedding model: use /v1/embeddings", param="model")
        return model

    def for_embedding(self, name: str | None):
        model = self.find(name, "embed")
        if model is not self.embedder:
            raise APIError(400, f"`{name}` generates text: /v1/embeddings needs an encoder such as minilm-l6-v2",
                           param="model")
        return model


def _sse(data: dict | str) -> str:
    """One server-sent event."""
    if not isinstance(data, str):
        data = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that stop as soon as the client leaves, whatever ASGI version
    the server speaks, and always end with `on_close()` (which frees the request's slot)."""

    def __init__(self, content: AsyncIterator[str], on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as group:
                async def stream():
                    with contextlib.suppress(OSError):  # the client closed the connection
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.on_close()
            await self.body_iterator.aclose()


def _failure(error: BaseException, fields: set[str]) -> APIError:
    """What the client is told when its request failed inside the engine."""
    if isinstance(error, LucidError):
        return from_lucid_error(error, fields)
    if isinstance(error, EngineClosedError):
        return APIError(503, str(error), type="server_error", code="shutting_down")
    return APIError(500, f"internal error: {type(error).__name__}", type="server_error")


def create_app(model, *, embedding_model=None, api_key: str | None = None, max_queue: int = 64,
               max_batch: int = 16, max_body_bytes: int = 1_000_000, default_max_tokens: int = 256,
               model_id: str | None = None) -> FastAPI:
    """The FastAPI app serving `model` (a decoder LucidModel) and optionally `embedding_model`.

    api_key: require `Authorization: Bearer KEY` on every route but /health. max_batch: rows
    decoded together; max_queue: requests waiting beyond those (more get 429).
    default_max_tokens: the limit when a request gives no max_tokens. model_id: the name in
    /v1/models (default: the model's file or catalogue name).
    """
    limits = dict(max_queue=max_queue, max_batch=max_batch, max_body_bytes=max_body_bytes,
                  default_max_tokens=default_max_tokens)
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}")
    if embedding_model is not None and not embedding_model.is_encoder:
        raise LucidError(f"{embedding_model.name} is not an encoder: the embedding model must be one, "
                         "such as minilm-l6-v2")
    metrics = Metrics()
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, metrics=metrics)
    served = ServedModels(model, embedding_model, model_id)
    jobs = JobBuilder(model, max_batch=max_batch, max_queue=max_queue, default_max_tokens=default_max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    # No /docs or /redoc: they load their scripts from a CDN. /openapi.json stays.
    app = FastAPI(title="LucidLM", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    # ----- errors -----

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        errors = e.errors()
        # Of a union's alternatives (content: a string or a list of parts), the error that got furthest
        # into the body says most (an image part: "...0.type: Input should be 'text'").
        first = max(errors, key=lambda error: len(error.get("loc", ())))
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
        content_type = request.headers.get("content-type", "")
        if not loc and "json" not in content_type:  # curl -d sends form encoding: the JSON is never parsed
            return error_response(415, f"send the body as JSON with 'Content-Type: application/json' "
                                       f"(got {content_type or 'no Content-Type'})")
        where = ".".join(loc)
        message = f"{where}: {first['msg']}" if where else f"the body: {first['msg']}"
        return error_response(400, message, param=loc[0] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        path = request.url.path
        message = {404: f"no route {path}", 405: f"{request.method} is not allowed on {path}"}.get(e.status_code,
                                                                                             str(e.detail))
        return error_response(e.status_code, message, code="not_found" if e.status_code == 404 else None,
                              headers=getattr(e, "headers", None))

    @app.exception_handler(LucidError)
    async def lucid_error(request: Request, e: LucidError):
        return error_response(400, str(e))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}", type="server_error")

    # ----- generation -----

    def submit(job_list: list[GenerationJob]) -> Ticket:
        try:
            return engine.submit(job_list)
        except QueueFullError as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineClosedError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None

    async def collect(request: Request, ticket: Ticket) -> list:
        """Every delta of a ticket; the request is cancelled if the client leaves first."""
        async def watch_disconnect():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            engine.cancel(ticket)

        watcher = asyncio.create_task(watch_disconnect())
        try:
            return [delta async for delta in ticket]
        finally:
            watcher.cancel()
            engine.cancel(ticket)  # no-op once finished

    async def events(ticket: Ticket, builder: ResponseBuilder, n_choices: int, include_usage: bool, fields):
        for chunk in builder.opening_chunks(n_choices):
            yield _sse(chunk)
        try:
            async for delta in ticket:
                for chunk in builder.chunks(delta):
                    yield _sse(chunk)
        except Exception as e:  # the status line has gone: report the error in the stream
            failure = _failure(e, fields)
            yield _sse(error_body(failure.message, failure.type, failure.param, failure.code))
        else:
            if ticket.usage is None:  # cancelled: nobody is listening
                return
            if include_usage:
                yield _sse(builder.usage_chunk(ticket.usage))
        yield _sse("[DONE]")

    async def generate(request: Request, kind: str, body, job_list: list[GenerationJob]) -> Response:
        fields = set(type(body).model_fields)
        with_logprobs = bool(body.logprobs) if kind == "chat" else body.logprobs is not None
        n_choices = sum(job.n for job in job_list)
        builder = ResponseBuilder(kind, served.generator_id, with_logprobs)
        ticket = submit(job_list)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return EventStream(events(ticket, builder, n_choices, include_usage, fields),
                               on_close=lambda: engine.cancel(ticket))
        try:
            deltas = await collect(request, ticket)
        except Exception as e:
            raise _failure(e, fields) from None
        if ticket.usage is None:  # the client left; this answer reaches nobody
            return Response(status_code=499)
        return JSONResponse(builder.whole(deltas, n_choices, ticket.usage))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        served.for_generation(body.model)
        return await generate(request, "chat", body, await asyncio.to_thread(jobs.chat, body))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        served.for_generation(body.model)
        return await generate(request, "completion", body, await asyncio.to_thread(jobs.completion, body))

    # ----- embeddings, models, tokens -----

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        encoder = served.for_embedding(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if any(not isinstance(t, str) for t in texts):
            raise APIError(400, "input must be a string or a list of strings (token ids are not accepted)",
                           param="input")
        width = encoder.config.d_model
        if body.dimensions is not None and body.dimensions != width:
            raise APIError(400, f"dimensions: this model's embeddings have {width}", param="dimensions")

        def embed():
            return encoder.embed(texts), sum(len(encoder.tokenizer.encode(t)) for t in texts)

        try:
            vectors, n_tokens = await engine.run_exclusive(embed)
        except LucidError as e:  # every mistake embed() reports is about the input texts
            code = "context_length_exceeded" if isinstance(e, ContextOverflowError) else None
            raise APIError(400, str(e), param="input", code=code) from None
        rows = vectors.float().numpy()
        if body.encoding_format == "base64":  # little-endian float32, as OpenAI sends it
            data = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in rows]
        else:
            data = [row.tolist() for row in rows]
        return {"object": "list", "model": served.embedder_id, "usage": {"prompt_tokens": n_tokens,
                                                                         "total_tokens": n_tokens},
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)]}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "lucidlm"}
                                           for i in served.ids()]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        m = served.find(body.model, "generate")
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")

        def work():
            if body.messages is not None:
                text = m.apply_chat_template(chat_messages(body.messages), body.add_generation_prompt)
                return m.tokenizer.encode(text)
            return m.tokenizer.encode(body.prompt, add_special=body.add_special_tokens)

        try:
            ids = await asyncio.to_thread(work)
        except LucidError as e:
            raise from_lucid_error(e, set(TokenizeRequest.model_fields)) from None
        out = {"tokens": ids, "count": len(ids), "max_model_len": m.config.context_length}
        if body.return_token_strs:
            out["token_strs"] = [m.tokenizer.decode([i]) for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        m = served.find(body.model, "generate")
        check_token_ids(body.tokens, m.tokenizer.vocab_size, "tokens")
        return {"prompt": m.tokenizer.decode(body.tokens)}

    # ----- operations -----

    @app.get("/health")
    async def health():
        if not engine.alive:
            return error_response(503, "the engine has stopped", type="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(engine.gauges()), media_type=PROMETHEUS_TEXT)

    app.router.routes.extend(explorer_routes(engine))

    routes = {getattr(r, "path", "") for r in app.router.routes if "{" not in getattr(r, "path", "{")}
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(RequestCounter, metrics=metrics, routes=routes)
    return app
