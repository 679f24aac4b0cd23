"""The HTTP server: OpenAI's /v1/completions (with server-sent events), /v1/models, /health, /metrics.

    app = build_app(scheduler, model_name="micro", encode=data.encode)
    serve(app, host="127.0.0.1", port=8000, drain_timeout=30)   # returns after SIGTERM / Ctrl-C, once drained

FastAPI and uvicorn are the optional extra `serve` (`pip install 'memoryformer[serve]'`), imported here only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import signal
import time

from memoryformer.serve import protocol
from memoryformer.serve.protocol import ApiError
from memoryformer.serve.scheduler import QueueFull, Scheduler, ShuttingDown

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
except ImportError as e:  # the optional extra
    raise ImportError(f"serve: needs FastAPI and uvicorn: pip install 'memoryformer[serve]' ({e})") from None

RETRY_AFTER_S = 1  # a full queue: when to try again (a few steps of the running rows free slots)
DISCONNECT_POLL_S = 0.1
GRACE_S = 2  # after the drain deadline: for the cancelled requests' answers to go out


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class BearerAuth:
    """Every request without `Authorization: Bearer <key>` gets 401 (plain ASGI: streams pass untouched)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.key):
                err = ApiError(401, "authorization: expected the header 'Authorization: Bearer <api key>' with the "
                               "server's --api-key", "authorization", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
                await _error(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _watch_disconnect(request: Request, handle) -> None:
    """Cancel `handle` once the client has gone (a non-streaming request: nothing else would notice)."""
    while not handle.done:
        if await request.is_disconnected():
            handle.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def build_app(scheduler: Scheduler, *, model_name: str, encode, api_key: str | None = None,
              drain_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app over a started `scheduler`; at its shutdown the requests in flight get until `drain_timeout`
    seconds after the scheduler stopped admitting (SIGTERM, see `serve`), then the rest are cancelled."""
    engine = scheduler.engine
    S, V = engine.max_seq_len, engine.vocab_size

    async def lifespan(app):
        yield
        await asyncio.to_thread(scheduler.shutdown, drain_timeout)

    app = FastAPI(title="memoryformer", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return _error(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind=kind))

    @app.get("/health")
    async def health():
        if not scheduler.admitting:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not scheduler.alive:
            return JSONResponse({"status": "error", "detail": "the decoding loop is not running"}, status_code=503)
        return {"status": "ok", "active": scheduler.active, "waiting": scheduler.queue_depth}

    @app.get("/metrics")
    async def metrics():
        text = scheduler.metrics.render(scheduler.queue_depth, scheduler.active, engine.max_batch)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return protocol.model_list(model_name, S)

    @app.post("/v1/chat/completions")
    async def chat():
        raise ApiError(400, "messages: this checkpoint has no chat template, so chat messages cannot be turned into "
                       "a prompt; send text to /v1/completions", "messages")

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = json.loads(await request.body())
        except ClientDisconnect:  # gone before its body arrived: nobody to answer
            return Response(status_code=400)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "body: expected a JSON object (the request body is not valid JSON)") from None
        model = body.get("model") if isinstance(body, dict) else None
        if model not in (None, model_name):
            raise ApiError(404, f"model: {model!r} is not served here; this server serves {model_name!r}", "model",
                           code="model_not_found")
        req = protocol.parse_completion(body, encode=encode, vocab_size=V, max_seq_len=S)
        handle = _submit(scheduler, req)
        rid, created = protocol.completion_id(), int(time.time())
        if req.stream:
            return StreamingResponse(_stream(request, handle, rid, model_name, created, req.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(request, handle, rid, model_name, created)

    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    return app


def _submit(scheduler: Scheduler, req):
    try:
        return scheduler.submit(req.prompt_ids, req.params, loop=asyncio.get_running_loop())
    except QueueFull as e:
        raise ApiError(503, f"queue: full, {e}; retry later", kind="server_overloaded", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except ShuttingDown as e:
        raise ApiError(503, f"server: {e}", kind="server_overloaded", code="shutting_down") from None
    except ValueError as e:
        raise ApiError(400, str(e), str(e).split(":")[0]) from None


async def _complete(request: Request, handle, rid: str, model: str, created: int):
    watch = asyncio.create_task(_watch_disconnect(request, handle))
    text, error = [], None
    try:
        async for ev in handle.aiter():
            text.append(ev.text)
            error = ev.error
    finally:
        watch.cancel()
        handle.cancel()  # a no-op once it is done; else (the task was cancelled) its slot is freed
    if handle.finish_reason == "error":
        raise ApiError(500, f"server: {error}", kind="server_error")
    if handle.finish_reason == "cancelled":
        raise ApiError(503, f"server: {error or 'request cancelled'}", kind="server_error", code="cancelled")
    return protocol.chunk(rid, model, created, "".join(text), handle.finish_reason, handle.usage)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _stream(request: Request, handle, rid: str, model: str, created: int, include_usage: bool):
    """Server-sent events of a completion: a chunk per new text, the finish reason, the usage if asked, [DONE]."""
    watch = asyncio.create_task(_watch_disconnect(request, handle))  # also while a stop string holds text back
    try:
        async for ev in handle.aiter():
            if ev.error:
                yield _sse(ApiError(500, f"server: {ev.error}", kind="server_error").body())
                break
            if ev.text or ev.finish_reason:
                yield _sse(protocol.chunk(rid, model, created, ev.text, ev.finish_reason, None, include_usage))
        if include_usage and not handle.cancelled:
            yield _sse(protocol.usage_chunk(rid, model, created, handle.usage))
        yield "data: [DONE]\n\n"
    finally:  # the client left (the response was cancelled) or the stream ended: free the slot
        watch.cancel()
        handle.cancel()


class _Server(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM / SIGINT also starts the scheduler's drain: it cancels what is left at
    the deadline itself, so those clients get an answer (503, or an error event) rather than a cut connection."""

    def __init__(self, config, scheduler: Scheduler, drain_timeout: float):
        super().__init__(config)
        self.scheduler, self.drain_timeout = scheduler, drain_timeout

    def handle_exit(self, sig, frame) -> None:
        self.scheduler.drain(self.drain_timeout)
        super().handle_exit(sig, frame)


def serve(app: FastAPI, scheduler: Scheduler, *, host: str = "127.0.0.1", port: int = 8000,
          drain_timeout: float = 30.0, log_level: str = "info") -> None:
    """Run until SIGTERM / Ctrl-C: then stop admitting, give the requests in flight `drain_timeout` seconds, cancel
    the rest, and return (the process exits 0)."""
    # uvicorn's own wait for open connections outlasts the drain by the time the cancelled ones take to answer
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=math.ceil(drain_timeout) + GRACE_S)
    server = _Server(config, scheduler, drain_timeout)
    # uvicorn re-raises the signal it caught once it has shut down, under the handler that was there before it:
    # a handler that does nothing makes that a clean exit
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
