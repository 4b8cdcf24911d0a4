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
from pathlib import Path

from fastapi import FastAPI

from .http_errors import install as install_errors
from .routes import router
from .settings import Settings
from .state import ServiceState

log = logging.getLogger("instructrec.service")

ROUTES = ("/rerank", "/v1/rerank", "/v2/rerank", "/recommend", "/health", "/ready", "/metrics")
COMPAT_ROUTES = ("/v1/rerank", "/v2/rerank")  # errors in Cohere's shape there


class ConfigError(ValueError):
    """The settings cannot work (e.g. no model to serve)."""


def resolve_model(settings: Settings) -> str:
    """The model to serve: the same resolution as ``instructrec rank --model``."""
    from instructrec.modeling import ModelNotFound, resolve_model_name

    try:
        return resolve_model_name(settings.model)
    except ModelNotFound as exc:
        raise ConfigError(str(exc)) from None


def check_device(settings: Settings) -> None:
    """Refuse a device this machine lacks (or int8 off the CPU) at start-up, not after the model loads."""
    from instructrec.modeling import resolve_device

    try:
        device = resolve_device(settings.device)
    except RuntimeError as exc:  # torch's "Invalid device string" and CUDA missing both land here
        raise ConfigError(f"setting device: {exc}") from None
    if settings.dtype == "int8" and device.type != "cpu":
        raise ConfigError(f"setting dtype: int8 (dynamic quantisation) runs on the CPU only, not on {device}; "
                          "use bfloat16 or float32 on a GPU")


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


def check_catalogue(settings: Settings) -> None:
    """A named catalogue file must exist (whether it fits the model is checked at load)."""
    if settings.catalogue and not Path(settings.catalogue).is_file():
        raise ConfigError(f"catalogue {settings.catalogue} does not exist; make it with `instructrec catalogue build "
                          "--data DIR|--items FILE.jsonl --model <the served model> --out CAT`")


def check_hybrid(settings: Settings, model_name: str) -> None:
    """Named gate and behaviour files must exist, and a behaviour index needs a gate (whether
    they are readable and fit the catalogue is checked at load: /health says why not)."""
    from .engine import gate_path, sequential_path

    gate = gate_path(settings, model_name)
    if settings.gate and gate is not None and not gate.is_file():
        raise ConfigError(f"gate file {gate} does not exist; fit one for the served model with `instructrec gate fit`, "
                          "or set INSTRUCTREC_GATE=none to serve LM-only answers")
    sequential = sequential_path(settings, model_name)
    if settings.sequential and sequential is not None and not (sequential / "sequential.json").is_file():
        raise ConfigError(f"sequential model {sequential} does not exist; train one with `instructrec sequential train`, "
                          "or set INSTRUCTREC_SEQUENTIAL=none")
    if sequential is not None and gate is None and settings.sequential:
        raise ConfigError(f"sequential model {sequential} given without a gate to fuse it with: set "
                          "INSTRUCTREC_GATE (or put gate.json in the model directory)")
    if settings.behaviour:
        if not Path(settings.behaviour).is_file():
            raise ConfigError(f"behaviour index {settings.behaviour} does not exist; build one with `instructrec "
                              "behaviour build`")
        if gate is None:
            raise ConfigError(f"behaviour index {settings.behaviour} given without a gate to fuse it with: set "
                              "INSTRUCTREC_GATE (or put gate.json in the model directory)")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    check_device(settings)
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
