"""``create_app(settings) -> FastAPI``: the /rerank service. Nothing happens at import time.

Start-up (lifespan): the score cache connects (or says in the log that it answers
uncached), the batcher starts, and the model loads in the background in the inference
thread, followed by a warm-up batch at the largest budget; only then does ``/ready``
answer 200. ``/health`` answers from the first moment (liveness).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from instructrec.ranker import Encoded

from .batcher import Batcher
from .cache import ScoreCache
from .engine import Engine, load_engine
from .errors import install as install_errors
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("instructrec.service")

ROUTES = ("/rerank", "/v1/rerank", "/v2/rerank", "/health", "/ready", "/metrics")
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


class ServiceState:
    def __init__(self, settings: Settings, model_name: str):
        self.settings = settings
        self.model_name = model_name
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.cache: ScoreCache | None = None
        self.ready = False
        self.load_error: str | None = None
        self.started = time.monotonic()
        # One thread runs the model (load, warm-up, every batch); one prepares requests.
        self.infer_executor = ThreadPoolExecutor(1, thread_name_prefix="instructrec-infer")
        self.prep_executor = ThreadPoolExecutor(1, thread_name_prefix="instructrec-prep")
        self._load_task: asyncio.Task | None = None

    async def start(self) -> None:
        s = self.settings
        self.cache = ScoreCache(s.redis_url.strip(), namespace=s.cache_namespace, ttl_seconds=s.cache_ttl_seconds,
                                timeout_s=s.cache_timeout_ms / 1000, retry_s=s.cache_retry_seconds, metrics=self.metrics,
                                io_threads=s.cache_connections)
        await self.cache.connect()
        self.batcher = Batcher(self._score_many, budget_tokens=s.batch_tokens, max_wait_s=s.max_wait_ms / 1000,
                               max_queue=s.max_queue, executor=self.infer_executor, metrics=self.metrics,
                               max_jobs=s.max_batch_requests, max_queue_wait_s=s.max_queue_wait_ms / 1000)
        self.batcher.start()
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="instructrec-load")

    def _score_many(self, requests: list[Encoded]):
        return self.engine.score_many(requests)

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        log.info("loading model %s", self.model_name)
        try:
            engine = await loop.run_in_executor(self.infer_executor, load_engine, self.settings, self.model_name)
            if self.settings.warmup:
                src, n = await loop.run_in_executor(self.infer_executor, engine.warm_up)
                log.info("warm-up batch: %d instruction tokens, %d candidates x %d tokens (%d-token budget)",
                         src, n, engine.ranker.max_target_tokens, engine.ranker.batch_tokens)
                if "mixed" in engine.warmup_report:
                    mixed = engine.warmup_report["mixed"]
                    log.info("warm-up mixed batch: %d requests, %d candidates x %d tokens, %.1f MB of per-row "
                             "key/value copies (mixed_kv_mb=%s)", mixed["requests"], sum(mixed["candidates"]),
                             mixed["row_tokens"], mixed["mixed_copy_bytes"] / 2**20, engine.settings.mixed_kv_mb)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported by /health and /ready
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.load_error = f"cannot load model {self.model_name}: {first}"
            log.error("%s", self.load_error, exc_info=exc)
            return
        from instructrec.templates import TEMPLATE_VERSION

        self.engine = engine
        self.metrics.model_info.labels(engine.name, engine.version, TEMPLATE_VERSION,
                                       engine.tuned_template_version or "none").set(1)
        self.metrics.ready.set(1)
        self.ready = True
        r = engine.ranker
        log.info("ready in %.1fs: model %s (version %s, %s on %s), %d/%d source/target tokens, template table %s",
                 time.monotonic() - t0, engine.name, engine.version, engine.loaded.precision, engine.loaded.device,
                 r.max_source_tokens, r.max_target_tokens, TEMPLATE_VERSION)

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.batcher is not None:
            await self.batcher.close()
        if self.cache is not None:
            await self.cache.close()
        self.infer_executor.shutdown(wait=False, cancel_futures=True)
        self.prep_executor.shutdown(wait=False, cancel_futures=True)


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
    state = ServiceState(settings, resolve_model(settings))

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
    from .routes import router

    app.include_router(router)
    app.add_middleware(_MetricsMiddleware, state=state)
    return app
