"""The HTTP face of the engine (FastAPI): OpenAI's /v1/completions and /v1/models, /health and /metrics.

Requests are checked at the edge (protocol.py) and handed to the engine's loop, which runs in a thread of its
own; its events come back to the request's coroutine through an asyncio queue. A client that disconnects has its
request cancelled, which frees its row at the next step.
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

from starcast.contract.errors import UserError
from starcast.runtime.engine import Engine, QueueFull
from starcast.runtime.requests import FINISH_CANCELLED, FINISH_ERROR, Event, Request
from starcast.serve.metrics import Metrics
from starcast.serve.protocol import BadRequest, Completion, Responses, error_body, parse_completion

RETRY_AFTER_S = 1
MAX_BODY = 8 << 20  # bytes: a prompt of a few MiB of text, far beyond any context


class State:
    """The engine once it has loaded, or why it could not."""

    def __init__(self):
        self.engine: Engine | None = None
        self.error: str | None = None


def create_app(load_engine: Callable[[], Engine], model_name: str, grace: float = 10.0) -> FastAPI:
    state = State()
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
        if state.engine is not None:  # SIGTERM: uvicorn stopped accepting; let running rows finish, then cancel
            await asyncio.to_thread(state.engine.stop, grace)

    app = FastAPI(title="starcast", lifespan=lifespan)
    app.state.starcast = state

    def fail(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
        metrics.requests.labels(str(status)).inc()
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return JSONResponse(error_body(message, kind, param), status_code=status, headers=headers)

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
        raw = await http.body()
        if len(raw) > MAX_BODY:
            return fail(413, f"the request body is larger than {MAX_BODY >> 20} MiB", "invalid_request_error")
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
        except UserError as exc:
            return fail(400, str(exc), "invalid_request_error", "prompt")
        responses = Responses(model_name)
        if completion.stream:
            metrics.requests.labels("200").inc()
            return StreamingResponse(stream(request, events, responses, completion), media_type="text/event-stream")
        return await whole(http, request, events, responses)

    async def whole(http: HttpRequest, request: Request, events: asyncio.Queue, responses: Responses) -> Response:
        pieces: list[str] = []
        try:
            while True:
                try:
                    event: Event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return Response(status_code=499)
                    continue
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
