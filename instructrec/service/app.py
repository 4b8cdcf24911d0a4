"""``create_app(settings) -> FastAPI``: the /rerank service. Nothing happens at import time.

Start-up (lifespan): the score cache connects (or says in the log that it answers
uncached), the batcher starts, and the model loads in the background in the inference
thread, followed by a warm-up batch at the largest budget; only then does ``/ready``
answer 200. ``/health`` answers from the first moment (liveness).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .checks import ConfigError, check_catalogue, check_device, check_hybrid, check_lanes, resolve_model
from .http_errors import install as install_errors
from .routes import router
from .settings import Settings
from .state import ServiceState

log = logging.getLogger("instructrec.service")

ROUTES = ("/rerank", "/v1/rerank", "/v2/rerank", "/recommend", "/health", "/ready", "/metrics", "/admin/reload")
COMPAT_ROUTES = ("/v1/rerank", "/v2/rerank")  # errors in Cohere's shape there


class _MetricsMiddleware:
    """Request duration by route and status (pure ASGI: keeps ``receive`` untouched)."""

    def __init__(self, app, state: ServiceState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                # the app's own time to the response headers, for clients and load generators
                ms = (time.perf_counter() - start) * 1000
                message = {**message, "headers": [*message.get("headers", []), (b"server-timing", f"app;dur={ms:.3f}".encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            route = path if path in ROUTES else "other"
            self.state.metrics.request_seconds.labels(route, str(status[0])).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    check_device(settings)
    check_lanes(settings)
    check_catalogue(settings)
    model_name = resolve_model(settings)
    check_hybrid(settings, model_name)
    state = ServiceState(settings, model_name)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="instructrec", version="0.1.0", lifespan=lifespan,
                  description="Rerank candidates by the likelihood of each title given the user's instruction.")
    app.state.service = state
    install_errors(app, lambda reason: state.metrics.rejected.labels(reason).inc(), compat_paths=COMPAT_ROUTES)
    app.include_router(router)
    app.add_middleware(_MetricsMiddleware, state=state)
    return app
