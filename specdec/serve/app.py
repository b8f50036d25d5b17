"""The ASGI app (Starlette): routes, body limits, the queue hand-off, streaming, disconnects, metrics.

Every generation runs on :class:`specdec.serve.queue.GenerationQueue`'s one worker thread; the event loop only
parses, queues and relays. A streamed request's text reaches its event stream through ``call_soon_threadsafe``; when
the client goes away (Starlette cancels the stream on ``http.disconnect``; a whole-response request polls for it)
the request's cancel flag stops its generation at the next step, or before it starts if it is still waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from contextlib import asynccontextmanager
from functools import partial

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from specdec.serve.errors import ApiError
from specdec.serve.generation import GenerationCancelled, GenerationService
from specdec.serve.metrics import Metrics
from specdec.serve.queue import GenerationQueue, QueueFull
from specdec.serve.responses import DONE, ResponseShape, sse
from specdec.serve.schema import parse_request

log = logging.getLogger("specdec.serve")
CLIENT_GONE = 499  # nginx's "client closed request": counted in /metrics, never seen by a client
DISCONNECT_POLL_S = 0.25  # how often a whole-response request checks that its client is still there


class Server:
    """What the routes share: the generation service, its queue, the metrics and the body limit."""

    def __init__(self, service: GenerationService, max_waiting: int = 16, max_body_bytes: int = 1 << 20):
        self.service = service
        self.queue = GenerationQueue(max_waiting)
        self.metrics = Metrics(service.model_name)
        self.max_body_bytes = max_body_bytes


def create_app(service: GenerationService, max_waiting: int = 16, max_body_bytes: int = 1 << 20) -> Starlette:
    """The app serving ``service``: at most ``max_waiting`` requests wait for the engine (more get 429), bodies
    over ``max_body_bytes`` get 413. ``app.state.server`` holds the :class:`Server`."""
    server = Server(service, max_waiting, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(server.queue.close)

    routes = [Route("/health", partial(health, server)), Route("/metrics", partial(metrics, server)),
              Route("/v1/models", partial(list_models, server)),
              Route("/v1/models/{model_id:path}", partial(get_model, server)),
              Route("/v1/completions", partial(generate, server, False), methods=["POST"]),
              Route("/v1/chat/completions", partial(generate, server, True), methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.state.server = server
    return app


def error_response(err: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404 / 405 in OpenAI's error shape."""
    if exc.status_code == 404:
        err = ApiError(404, f"no route {request.method} {request.url.path}; routes: GET /v1/models, POST "
                            "/v1/completions, POST /v1/chat/completions, GET /health, GET /metrics", code="not_found")
    else:
        err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    return error_response(err, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug, not a request's fault: still OpenAI's shape (Starlette logs the traceback); the server goes on."""
    return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error"))


# ---------------------------------------------------------------------------------------------- small routes
async def health(server: Server, request: Request) -> Response:
    return JSONResponse({"status": "ok", "model": server.service.model_name, "waiting": server.queue.waiting,
                         "running": server.queue.running, "max_waiting": server.queue.max_waiting})


async def metrics(server: Server, request: Request) -> Response:
    text = server.metrics.render(server.queue.waiting, server.queue.running)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def _model_card(server: Server) -> dict:
    return {"id": server.service.model_name, "object": "model", "created": 0, "owned_by": "specdec"}


async def list_models(server: Server, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(server)]})


async def get_model(server: Server, request: Request) -> Response:
    if request.path_params["model_id"] != server.service.model_name:
        return error_response(_unknown_model(server, request.path_params["model_id"]))
    return JSONResponse(_model_card(server))


def _unknown_model(server: Server, name: str) -> ApiError:
    return ApiError(404, f"model {name!r} does not exist; this server serves {server.service.model_name!r} "
                         "(GET /v1/models)", "model", "model_not_found")


# ---------------------------------------------------------------------------------------------- generation
async def read_json(request: Request, limit: int):
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; this server takes at most {limit} "
                            "(--max-body-bytes)", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes, this server's limit (--max-body-bytes)",
                           code="request_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc


async def generate(server: Server, chat: bool, request: Request) -> Response:
    endpoint = request.url.path
    loop = asyncio.get_running_loop()
    try:
        req = parse_request(await read_json(request, server.max_body_bytes), chat)
        if req.model != server.service.model_name:
            raise _unknown_model(server, req.model)
        prepared = server.service.prepare(req)
        cancelled = threading.Event()
        texts: asyncio.Queue | None = asyncio.Queue() if req.stream else None
        on_text = None if texts is None else (lambda t: loop.call_soon_threadsafe(texts.put_nowait, t))
        try:
            future = server.queue.submit(partial(server.service.run, prepared, on_text, cancelled))
        except QueueFull as exc:
            retry = server.queue.retry_after()
            err = ApiError(429, f"the server is busy ({exc}; the limit is --max-waiting "
                                f"{server.queue.max_waiting}): retry after {retry} s", code="queue_full")
            server.metrics.count_request(endpoint, 429)
            return error_response(err, headers={"Retry-After": str(retry)})
    except ApiError as err:
        server.metrics.count_request(endpoint, err.status)
        return error_response(err)
    shape = ResponseShape(chat, server.service.model_name)
    done = asyncio.wrap_future(future)
    done.add_done_callback(lambda f: f.cancelled() or f.exception())  # read here, so asyncio never warns about it
    if texts is not None:
        done.add_done_callback(lambda _: texts.put_nowait(None))
        return StreamingResponse(_events(server, endpoint, shape, req.include_usage, texts, done, cancelled),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    while not done.done():
        await asyncio.wait({done}, timeout=DISCONNECT_POLL_S)
        if not done.done() and await request.is_disconnected():
            cancelled.set()
    try:
        completion = done.result()
    except BaseException as exc:  # noqa: BLE001 - every failure becomes an answer, the server goes on
        err = _failure(exc)
        server.metrics.count_request(endpoint, err.status)
        if isinstance(exc, GenerationCancelled):
            server.metrics.count_cancelled()
        return error_response(err)
    server.metrics.count_generation(completion.prompt_tokens, completion.stats)
    server.metrics.count_request(endpoint, 200)
    return JSONResponse(shape.whole(completion))


async def _events(server: Server, endpoint: str, shape: ResponseShape, include_usage: bool, texts: asyncio.Queue,
                  done: asyncio.Future, cancelled: threading.Event):
    """The event stream of one request; a disconnect cancels this generator, and so the generation."""
    status = CLIENT_GONE
    try:
        if shape.chat:
            yield sse(shape.chunk(role=True))
        while (text := await texts.get()) is not None:
            yield sse(shape.chunk(text))
        try:
            completion = done.result()
        except BaseException as exc:  # noqa: BLE001 - headers are sent: the error goes in the stream
            err = _failure(exc)
            status = err.status
            yield sse(err.body())
            yield DONE
            return
        server.metrics.count_generation(completion.prompt_tokens, completion.stats)
        yield sse(shape.finishing_chunk(completion))
        if include_usage:
            yield sse(shape.usage_chunk(completion))
        yield DONE
        status = 200
    finally:
        if status == CLIENT_GONE:
            cancelled.set()  # the worker stops at its next step (or skips the request if it has not started)
            server.metrics.count_cancelled()
        server.metrics.count_request(endpoint, status)


def _failure(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, GenerationCancelled):
        return ApiError(CLIENT_GONE, "the client disconnected", code="client_disconnected")
    log.exception("generation failed", exc_info=exc)
    return ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", code="generation_failed")
