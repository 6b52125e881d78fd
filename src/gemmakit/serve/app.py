"""`gemmakit serve`: an OpenAI- and Anthropic-compatible HTTP server (FastAPI + uvicorn) over the batched engine.

Routes: chat completions, completions and the server's own (routes.py), OpenAI's Responses API (responses.py),
Anthropic's Messages API (messages.py), all three chat dialects over one chat core (`routes.start_chat`), and
embeddings from a second model (embeddings.py).

Shape of a request. The handler validates the body (protocol.py), renders the chat with the model's format
(api.LLM: the checkpoint's template, or the plain dialogue for a base model like the embedded default), turns
its images and audio into soft tokens with the model's towers (in a worker thread; policy in server.py),
checks that prompt + max_tokens fit the context, and submits one ticket per choice (`n`) to the engine loop
(loop.py). Generated text comes back per decode step; each choice turns it into content, reasoning and tool
calls (choices.py), sent as SSE chunks the way OpenAI sends them, or collected into one response.

Everything a client can get wrong is a 400 in OpenAI's error shape, never a 500 or a stall: malformed JSON,
wrong types, out-of-range values, unknown model (404), a prompt that does not fit (numbers given), a full
queue (429 with Retry-After). A client that disconnects cancels its tickets: its rows are free at the next
step. `/health` is 503 until the model is loaded; `/metrics` is Prometheus text.

Security defaults: the CLI binds 127.0.0.1, CORS is off unless origins are given, and with an API key every
/v1 route and /metrics need `Authorization: Bearer <key>` (or `x-api-key: <key>`). The check is a dependency
of each route, not a path prefix, so it holds wherever the app is mounted (uvicorn `--root-path`, a proxy, Ray
Serve's route prefix), and keys are compared in constant time. Without the key, /health says only "ok",
"loading" or "failed" (the reason names files), and the chat page and the API schema (/docs, /openapi.json)
stay public: they describe the API and hold no data.

Limits before any work: a request body over `ServeOptions.body_limit()` is a 413 while it is still arriving (FastAPI's
`max_body_size`), and metrics label requests by route template (paths that match no route share one label), so
no client can grow them.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from gemmakit.api import LLM
from gemmakit.serve import protocol as P
from gemmakit.serve.embeddings import install_embedding_routes, load_service
from gemmakit.serve.messages import install_messages
from gemmakit.serve.metrics import Metrics
from gemmakit.serve.responses import install_responses
from gemmakit.serve.routes import install_routes
from gemmakit.serve.server import HTTPFail, ServeOptions, Server, fail, log


def create_app(load: Callable[[], LLM] | LLM | None, options: ServeOptions | None = None) -> FastAPI:
    """The app; `load` is an LLM, or a function that loads one (in a thread, /health says 503 meanwhile), or
    None for a server of `options.embedding_model` alone."""
    options = options or ServeOptions()
    metrics = Metrics()

    def start(app: FastAPI) -> None:
        t0 = time.perf_counter()
        log.info("loading the model; /health answers 503 until it is ready")
        try:
            app.state.embeddings = load_service(options)  # first: /health turns 200 once both are ready
            if load is not None:
                app.state.server = Server(load() if callable(load) else load, options, metrics)
        except Exception as e:  # reported by /health, every request and the console, not swallowed
            app.state.load_error = f"{type(e).__name__}: {e}"
            log.error("the model failed to load: %s. /health and every request report this; fix it and restart",
                      app.state.load_error)
            return
        app.state.loaded = True
        if (server := app.state.server) is not None:
            log.info("ready: %s, context %d tokens, up to %d sequences at once (%.0f s)", server.name,
                     server.context, options.max_batch, time.perf_counter() - t0)
        else:
            log.info("ready: embedding model %s only (%.0f s)", app.state.embeddings.name, time.perf_counter() - t0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=start, args=(app,), name="gemmakit-load", daemon=True).start()
        yield
        if app.state.server is not None:
            app.state.server.loop.stop()

    app = FastAPI(title="gemmakit", version="0.1.0", summary="OpenAI-compatible Gemma server", lifespan=lifespan,
                  max_body_size=options.body_limit())
    app.state.server, app.state.load_error, app.state.metrics = None, None, metrics
    app.state.embeddings, app.state.loaded = None, False
    app.state.options = options

    _install_middleware(app, options, metrics)
    keyed = install_routes(app)  # chat completions, completions, models, health, metrics, the page
    install_messages(app, keyed)  # Anthropic's Messages API
    install_responses(app, keyed)  # OpenAI's Responses API
    install_embedding_routes(app)
    return app


def _install_middleware(app: FastAPI, options: ServeOptions, metrics: Metrics) -> None:
    replica = f"{socket.gethostname()}:{os.getpid()}"
    if options.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])

    app.add_middleware(_CountAndTag, metrics=metrics, replica=replica)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return fail(400, "the request body is not valid JSON", code="invalid_json")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return fail(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param, "invalid_value")

    @app.exception_handler(HTTPFail)
    async def _failed(request: Request, exc: HTTPFail) -> JSONResponse:
        return exc.response

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own refusals (no such route, a body over max_body_size) in OpenAI's error shape too.
        message = (f"the request body is larger than this server takes ({options.body_limit()} bytes)"
                   if exc.status_code == 413 else f"{request.method} {request.url.path}: {exc.detail}")
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return fail(exc.status_code, message, code=code, headers=exc.headers)

    @app.exception_handler(P.ParamError)
    async def _param(request: Request, exc: P.ParamError) -> JSONResponse:
        return fail(400, str(exc), exc.param, exc.code)


class _CountAndTag:
    """Pure ASGI middleware: counts each request by route template (the router sets `scope["route"]`; paths
    that match none share "unmatched") and status, and names the process that answered (several run behind
    Ray Serve). Not `@app.middleware("http")`: that wrapper hides a client's disconnect from the handlers."""

    def __init__(self, app: Any, metrics: Metrics, replica: str):
        self.app, self.metrics, self.replica = app, metrics, replica

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def tagged(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"x-gemmakit-replica", self.replica.encode())]}
            await send(message)
        try:
            await self.app(scope, receive, tagged)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
