"""`create_app(settings, engine=None)`: the FastAPI app in front of one engine.

Given an engine (tests, the Ray Serve deployment), the app uses it and leaves its life to the
caller. Without one, the lifespan builds it in a thread (loading the model, then the preloaded
adapters) while `/health` already answers and every other route says 503; the engine is shut down
(in-flight requests drained, bounded by `drain_timeout_s`) when the app stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import AsyncIterator, Callable

from fastapi import FastAPI

from s2ft_serve.engine.engine import Engine
from s2ft_serve.errors import EngineNotReadyError
from s2ft_serve.server.errors import SafeJSONResponse, body_too_large, domain_error_response, install_error_handlers
from s2ft_serve.server.metrics import Metrics
from s2ft_serve.server.routes import adapters, chat, completions, health, models, tokenize
from s2ft_serve.server.settings import ServerSettings

log = logging.getLogger("s2ft_serve.server")

ROUTERS = (completions.router, chat.router, models.router, tokenize.router, adapters.router, health.router)
DESCRIPTION = """OpenAI-compatible server for one base model and many S²FT adapters.

Choose an adapter with the `adapter` field, or name it as `model` (vLLM's convention).
Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""


def build_engine(settings: ServerSettings, metrics: Metrics) -> Engine:
    """Load the model and the preloaded adapters (blocking; run in a thread)."""
    engine = Engine(settings.engine_config()).start()
    try:
        for name, path in settings.adapter_specs().items():  # the admin route's path checks apply
            adapters.load(engine, settings, metrics, name, path, replace=False)
    except BaseException:
        engine.shutdown(timeout=0)
        raise
    return engine


def attach_engine(app: FastAPI, engine: Engine) -> None:
    engine.add_step_listener(app.state.metrics.on_step)
    app.state.metrics.set_engine(engine)
    app.state.engine = engine


async def _load_in_background(app: FastAPI, settings: ServerSettings) -> None:
    started = time.perf_counter()
    try:
        engine = await asyncio.to_thread(build_engine, settings, app.state.metrics)
    except Exception as exc:  # reported by /ready and the log; the CLI exits
        app.state.startup_error = f"{type(exc).__name__}: {exc}"
        log.error("startup failed: %s", app.state.startup_error)
        on_fatal: Callable[[], None] | None = getattr(app.state, "on_fatal", None)
        if on_fatal is not None:
            on_fatal()
        return
    attach_engine(app, engine)
    adapters = ", ".join(settings.adapter_specs()) or "none"
    log.info("ready in %.1f s: model %s on %s (%s), KV cache %.2f GiB, mixed-adapter steps: %s, CUDA graphs: %s, "
             "adapters: %s, serving %s", time.perf_counter() - started, engine.model_name, engine.device, engine.dtype,
             engine.kv_cache_bytes / 2**30, engine.mixed_kernel, engine.cuda_graphs, adapters, settings.url)


def begin_drain(app: FastAPI) -> None:
    """SIGTERM's deadline (the CLI calls this once, from its signal handler): requests still running
    `drain_timeout_s` later end with a 503 error, as an error event and `data: [DONE]` on a stream,
    before the HTTP server stops waiting for them (it waits a little longer) and would cut the
    connections mid-response."""
    loop: asyncio.AbstractEventLoop | None = getattr(app.state, "loop", None)
    if loop is not None:
        loop.call_soon_threadsafe(loop.call_later, app.state.settings.drain_timeout_s, end_in_flight, app)


def end_in_flight(app: FastAPI) -> None:
    generations = list(app.state.generations)
    if generations:
        log.warning("drain timeout: ending %d in-flight request(s) with an error", len(generations))
    for gen in generations:
        gen.stop(EngineNotReadyError("the server is shutting down; retry the request", code="shutting_down"))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ServerSettings = app.state.settings
    owned = app.state.engine is None
    app.state.loop = asyncio.get_running_loop()
    loader = asyncio.create_task(_load_in_background(app, settings)) if owned else None
    try:
        yield
    finally:
        if loader is not None and not loader.done():
            loader.cancel()
        engine: Engine | None = app.state.engine
        if owned and engine is not None:
            log.info("draining in-flight requests (at most %.0f s)", settings.drain_timeout_s)
            await asyncio.to_thread(engine.shutdown, settings.drain_timeout_s)
            app.state.engine = None


class BodyLimit:
    """Refuse request bodies beyond `max_bytes` (413, OpenAI's error shape) as they are read, whatever
    Content-Length claims: nothing else bounds them (QA: a 20 MB /tokenize body took 3.9 GB). The body,
    once whole and within the limit, is handed on; later messages (a disconnect) pass through."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        body, first = bytearray(), None
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: the app sees it as it would have
                first = message
                break
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": bytes(body), "more_body": False}
                break
        pending = [first]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        await domain_error_response(body_too_large(self.max_bytes))(scope, receive, send)


def create_app(settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    app = FastAPI(title="s2ft-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  default_response_class=SafeJSONResponse)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.engine = None
    app.state.startup_error = None
    app.state.created = int(time.time())
    app.state.generations = weakref.WeakSet()  # the requests in flight (begin_drain ends them at its deadline)
    app.state.loop = None
    if engine is not None:
        attach_engine(app, engine)
    install_error_handlers(app)
    if settings.max_request_bytes:
        app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    for router in ROUTERS:
        app.include_router(router)
    return app
