"""``ServiceState``: what one running service holds (settings, engine, cache, batcher,
metrics, the two worker threads) and its start-up and shut-down. Its own module so the app
factory and the handlers both import it and neither imports the other."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from instructrec.templates import TEMPLATE_VERSION

from .batcher import Batcher
from .cache import ScoreCache
from .engine import Engine, load_engine
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("instructrec.service")


class ServiceState:
    """One per app (``app.state.service``): the handlers read it, the lifespan starts and stops it."""

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
        # Batch-invariant scoring gives every request passes of its own: a batch of several would
        # share nothing and only keep its first requests waiting for its last (seen: a server-side
        # p99 of 1.8 s with 1 s deadlines, batches of 32 requests scored one after another).
        jobs = 1 if s.batch_invariant else s.max_batch_requests
        self.batcher = Batcher(self._score_many, budget_tokens=s.batch_tokens, max_wait_s=s.max_wait_ms / 1000,
                               max_queue=s.max_queue, executor=self.infer_executor, metrics=self.metrics,
                               max_jobs=jobs, max_queue_wait_s=s.max_queue_wait_ms / 1000)
        self.batcher.start()
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="instructrec-load")

    def _score_many(self, requests: list):
        """A batch of jobs: rerank jobs (``Encoded``) and generation jobs (``RecommendJob``)."""
        return self.engine.run_jobs(requests)

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
        self.engine = engine
        if engine.catalogue is not None:
            cat = engine.catalogue
            log.info("catalogue %s: %d items, %d distinct titles (version %s) for /recommend", self.settings.catalogue,
                     len(cat), cat.header["leaves"], cat.version)
        if engine.hybrid is not None:
            h = engine.hybrid
            log.info("fusion: gate %s, behaviour %s, semantic %s (hybrid version %s); requests default to fused answers",
                     h.gate.version, f"{len(h.behaviour)} items" if h.behaviour else "none",
                     h.semantic.version if h.semantic else "off", h.version)
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
