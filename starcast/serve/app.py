"""The HTTP face of the engine (FastAPI): OpenAI's /v1/completions and /v1/models, /health and /metrics.

Requests are checked at the edge (protocol.py) and handed to the engine's loop, which runs in a thread of its
own; its events come back to the request's coroutine through an asyncio queue. A client that disconnects (a
stream or a whole completion, watched for as soon as the body is read) has its request cancelled, which frees
its row at the next step. A body is refused (413) from its Content-Length, or once a chunked body passes the
limit; nothing past the limit is kept (a little is read and dropped, so that the client sees the 413). SIGTERM
stops the engine at once (`State.begin_stop`): running rows get --grace seconds, then what is left, queued or
running, is answered 503 (a stream: an error event, then [DONE]) before uvicorn's own graceful shutdown ends.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from starcast import __version__
from starcast.contract.errors import UserError
from starcast.runtime.engine import Engine, QueueFull
from starcast.runtime.requests import FINISH_CANCELLED, FINISH_ERROR, Event, Request
from starcast.serve.metrics import Metrics
from starcast.serve.protocol import BadRequest, Completion, Responses, error_body, parse_completion

RETRY_AFTER_S = 1
MAX_BODY = 8 << 20  # bytes: a prompt of a few MiB of text, far beyond any context
LINGER, LINGER_S = 4 << 20, 0.5  # what is read and dropped past the limit before the 413


class State:
    """The engine once it has loaded, or why it could not."""

    def __init__(self, grace: float):
        self.engine: Engine | None = None
        self.error: str | None = None
        self.grace, self.stopper = grace, None

    def begin_stop(self) -> threading.Thread:
        """Stop the engine in the background (once): called on SIGTERM, before uvicorn waits for connections."""
        if self.stopper is None:
            engine = self.engine
            self.stopper = threading.Thread(target=engine.stop if engine else lambda _: None, args=(self.grace,),
                                            name="starcast-stop", daemon=True)  # fmt: skip
            self.stopper.start()
        return self.stopper


async def read_body(http: HttpRequest) -> tuple[bytes | None, bool]:
    """(the body, or None once it is known to pass MAX_BODY: from Content-Length, or while a chunked body
    arrives; whether the client sent all of it). Nothing beyond the limit is kept: past it, at most LINGER
    bytes for LINGER_S seconds are read and dropped, so that a client still sending gets the 413 rather than a
    reset (what nginx's lingering close does)."""
    try:
        declared = int(http.headers.get("content-length", 0))
    except ValueError:
        declared = 0  # uvicorn refuses a malformed Content-Length itself
    if declared > MAX_BODY + LINGER:
        return None, False  # known from the header: nothing is read
    loop = asyncio.get_running_loop()
    data, kept, received, deadline = bytearray(), declared <= MAX_BODY, 0, None
    while True:
        if deadline is None:
            message = await http.receive()
        else:  # lingering: bounded in bytes and in time, whether or not the client sends
            try:
                message = await asyncio.wait_for(http.receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None, False
        if message["type"] != "http.request":
            return None, False  # the client left
        chunk = message.get("body", b"")
        received += len(chunk)
        if kept:
            data += chunk
            kept = len(data) <= MAX_BODY
            if not kept:
                data = bytearray()  # past the limit: nothing more is kept
        if not kept:
            deadline = deadline or loop.time() + LINGER_S
            if received > MAX_BODY + LINGER:
                return None, False
        if not message.get("more_body", False):
            return (bytes(data) if kept else None), True


async def watch_disconnect(http: HttpRequest, request: Request, gone: asyncio.Event) -> None:
    """Once the body is read, the next ASGI message is the client's disconnect: cancel its request then."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            gone.set()
            request.cancel()
            return


def create_app(load_engine: Callable[[], Engine], model_name: str, grace: float = 10.0) -> FastAPI:
    state = State(grace)
    metrics = Metrics(lambda: state.engine)

    def load() -> None:
        try:
            state.engine = load_engine().start()
        except Exception as exc:  # reported by /health and the CLI; the server keeps answering
            state.error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, name="starcast-load", daemon=True).start()
        yield
        await asyncio.to_thread(state.begin_stop().join)  # normally begun on SIGTERM already

    app = FastAPI(title="starcast", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    app.state.starcast = state

    def fail(status: int, message: str, kind: str, param: str | None = None, close: bool = False) -> JSONResponse:
        metrics.requests.labels(str(status)).inc()
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}
        if close:  # the rest of the body is never read: the connection cannot carry another request
            headers["Connection"] = "close"
        return JSONResponse(error_body(message, kind, param), status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(http: HttpRequest, exc: HTTPException) -> JSONResponse:
        """404, 405 and the like in OpenAI's error shape, not FastAPI's {"detail": ...}."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{http.method} {http.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=exc.headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is not None and state.engine.alive:
            return JSONResponse({"status": "ok"})
        if state.engine is not None:
            return JSONResponse({"status": "error", "error": "the engine stopped"}, status_code=503)
        return JSONResponse({"status": "error" if state.error else "loading", "error": state.error}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "starcast"}]}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Response:
        engine = state.engine
        if engine is None:
            return fail(503, "the model is still loading" if not state.error else state.error, "unavailable")
        raw, whole_body = await read_body(http)
        if raw is None:
            too_big = f"the request body is larger than {MAX_BODY >> 20} MiB"
            return fail(413, too_big, "invalid_request_error", close=not whole_body)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
            return fail(400, f"the request body is not valid JSON ({str(exc)[:200]})", "invalid_request_error")
        try:  # tokenizing a long prompt must not hold up the other requests' coroutines
            completion = await asyncio.to_thread(parse_completion, body, engine.tokenizer)
        except BadRequest as exc:
            return fail(exc.status, exc.message, "invalid_request_error", exc.param)
        except UserError as exc:
            return fail(400, str(exc), "invalid_request_error")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(event: Event) -> None:  # in the engine's thread
            if event.finish_reason is not None:  # recorded here: a client that left reads no more events
                metrics.record(request, event.finish_reason, event.prompt_tokens, event.completion_tokens)
            loop.call_soon_threadsafe(events.put_nowait, event)

        request = Request(completion.prompt, completion.max_tokens, completion.sampling, completion.stop, on_event)
        try:
            engine.submit(request)
        except QueueFull as exc:
            return fail(503, f"the server is busy: {exc}", "server_busy")
        except UserError as exc:  # the prompt and max_tokens against the maximum length, or the vocabulary
            fits = len(completion.prompt) < engine.max_length and "max_tokens" in str(exc)  # the prompt alone fits
            return fail(400, str(exc), "invalid_request_error", "max_tokens" if fits else "prompt")
        responses = Responses(model_name)
        if completion.stream:
            metrics.requests.labels("200").inc()
            return StreamingResponse(stream(request, events, responses, completion), media_type="text/event-stream")
        return await whole(http, request, events, responses)

    async def whole(http: HttpRequest, request: Request, events: asyncio.Queue, responses: Responses) -> Response:
        pieces: list[str] = []
        gone = asyncio.Event()
        watcher = asyncio.create_task(watch_disconnect(http, request, gone))
        try:
            while True:
                event: Event = await events.get()
                if gone.is_set():
                    return Response(status_code=499)  # nobody reads it; the row was freed
                if event.finish_reason is None:
                    pieces.append(event.text)
                    continue
                if event.finish_reason == FINISH_ERROR:
                    return fail(500, f"generation failed: {event.error}", "server_error")
                if event.finish_reason == FINISH_CANCELLED:  # the server is shutting down
                    return fail(503, "the server shut down before the completion finished", "unavailable")
                metrics.requests.labels("200").inc()
                usage = (event.prompt_tokens, event.completion_tokens)
                return JSONResponse(responses.whole("".join(pieces), event.finish_reason, *usage))
        finally:
            watcher.cancel()
            request.cancel()  # a no-op once finished; frees the row when this coroutine was cancelled

    async def stream(request: Request, events: asyncio.Queue, responses: Responses, completion: Completion):
        try:
            while True:
                event: Event = await events.get()
                if event.finish_reason is None:
                    if event.text:
                        yield f"data: {json.dumps(responses.chunk(event.text))}\n\n"
                    continue
                if event.finish_reason == FINISH_ERROR:
                    yield f"data: {json.dumps(error_body(f'generation failed: {event.error}', 'server_error'))}\n\n"
                elif event.finish_reason == FINISH_CANCELLED:
                    body = error_body("the server shut down before the completion finished", "unavailable")
                    yield f"data: {json.dumps(body)}\n\n"
                else:
                    yield f"data: {json.dumps(responses.chunk('', event.finish_reason))}\n\n"
                    if completion.include_usage:
                        usage = responses.usage_chunk(event.prompt_tokens, event.completion_tokens)
                        yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:
            request.cancel()  # a no-op once finished; frees the row when the client went away mid-stream

    return app
