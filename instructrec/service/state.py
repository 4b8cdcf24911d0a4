"""``ServiceState``: what one running service holds (settings, engine, cache, batcher,
metrics, the worker threads), its start-up and shut-down, and the model swap. Its own module so
the app factory and the handlers both import it and neither imports the other.

A swap (:meth:`ServiceState.reload`) loads and warms up the new engine on a thread of its own
while the old one keeps serving (the part of the warm-up that touches the process's shared
MiniLM encoder runs on an inference thread while no batch runs, counted in the batcher's
expected wait), then switches ``engine`` on the event loop, atomically: a
request takes the engine current when it starts and keeps it, so jobs queued before the switch
are scored by the engine that prepared them, and every answer names the engine that scored it."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from instructrec.lanes import LanePool
from instructrec.templates import TEMPLATE_VERSION

from .batcher import Batcher
from .cache import ScoreCache
from .checks import ConfigError, check_hybrid, resolve_model
from .engine import Engine, load_engine
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("instructrec.service")


class SwapRunning(Exception):
    """A model swap is already under way."""


class SwapRefused(ValueError):
    """The model to swap to cannot be served (the message names it); the old one keeps serving."""


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
        self.swaps = 0  # models swapped in by reload
        # One thread per lane runs the model (warm-up, batches); one prepares requests; one loads a swap's model.
        self.infer_executor = ThreadPoolExecutor(settings.lanes, thread_name_prefix="instructrec-infer")
        # the idle lanes a batch borrows for its independent passes (the same bits, sooner)
        self.lane_pool = LanePool(settings.lanes) if settings.lanes > 1 and settings.lend_lanes else None
        if self.lane_pool is not None:
            self.metrics.lent_parts.set_function(lambda: self.lane_pool.parts_lent)
        self.prep_executor = ThreadPoolExecutor(1, thread_name_prefix="instructrec-prep")
        self.swap_executor = ThreadPoolExecutor(1, thread_name_prefix="instructrec-swap")
        self._swap_lock = asyncio.Lock()
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
                               max_jobs=jobs, max_queue_wait_s=s.max_queue_wait_ms / 1000, lanes=s.lanes,
                               pool=self.lane_pool, expire_after_s=s.max_queue_wait_ms * s.queue_expiry_factor / 1000)
        self.batcher.start()
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="instructrec-load")

    @staticmethod
    def _score_many(requests: list):
        """A batch of ``(engine, job)``: each job scored by the engine that prepared it (rerank jobs
        are ``Encoded``, generation jobs ``RecommendJob``); after a swap a batch may hold both engines'."""
        groups: dict[int, tuple[Engine, list[int]]] = {}
        for k, (engine, _) in enumerate(requests):
            groups.setdefault(id(engine), (engine, []))[1].append(k)
        results: list = [None] * len(requests)
        enc = dec = 0.0
        for engine, ks in groups.values():
            out, e, d = engine.run_jobs([requests[k][1] for k in ks])
            for k, value in zip(ks, out):
                results[k] = value
            enc, dec = enc + e, dec + d
        return results, enc, dec

    def _warm_up(self, engine: Engine, shared: bool = True) -> None:
        """The warm-up batches, logged (``shared``: with the shared encoder's part, which runs on an
        inference thread while no batch runs; a swap runs the rest on its own thread)."""
        src, n = engine.warm_up(shared)
        log.info("warm-up batch: %d instruction tokens, %d candidates x %d tokens (%d-token budget)",
                 src, n, engine.ranker.max_target_tokens, engine.ranker.batch_tokens)
        if "mixed" in engine.warmup_report:
            mixed = engine.warmup_report["mixed"]
            log.info("warm-up mixed batch: %d requests, %d candidates x %d tokens, %.1f MB of per-row "
                     "key/value copies (mixed_kv_mb=%s)", mixed["requests"], sum(mixed["candidates"]),
                     mixed["row_tokens"], mixed["mixed_copy_bytes"] / 2**20, engine.settings.mixed_kv_mb)

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        log.info("loading model %s", self.model_name)
        try:
            engine = await loop.run_in_executor(self.infer_executor, load_engine, self.settings, self.model_name)
            if self.settings.warmup:
                await loop.run_in_executor(self.infer_executor, self._warm_up, engine)
                self.batcher.calibrate(engine.warmup_report["single"]["seconds_per_token"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported by /health and /ready
            self.load_error = self._cannot_load(self.model_name, exc)
            log.error("%s", self.load_error, exc_info=exc)
            return
        self._install(engine)
        self.metrics.ready.set(1)
        self.ready = True
        r = engine.ranker
        log.info("ready in %.1fs: model %s (version %s, %s on %s), %d/%d source/target tokens, template table %s, "
                 "%d lane(s)%s", time.monotonic() - t0, engine.name, engine.version, engine.loaded.precision,
                 engine.loaded.device, r.max_source_tokens, r.max_target_tokens, TEMPLATE_VERSION, self.settings.lanes,
                 ", idle ones lending a hand" if self.lane_pool is not None else "")

    @staticmethod
    def _cannot_load(name: str, exc: Exception) -> str:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return first if first.startswith(f"cannot load model {name}:") else f"cannot load model {name}: {first}"

    def _install(self, engine: Engine) -> None:
        """Make ``engine`` the one new requests use (on the event loop: atomic for every request)."""
        previous, self.engine = self.engine, engine
        engine.ranker.pool = self.lane_pool  # after its warm-up: a swap's runs beside the lanes, borrowing none
        if previous is not None:
            self.metrics.model_info.remove(*self._info_labels(previous))
        if engine.catalogue is not None:
            cat = engine.catalogue
            log.info("catalogue %s: %d items, %d distinct titles (version %s) for /recommend", self.settings.catalogue,
                     len(cat), cat.header["leaves"], cat.version)
        if engine.hybrid is not None:
            h = engine.hybrid
            log.info("fusion: gate %s, behaviour %s, semantic %s (hybrid version %s); requests default to fused answers",
                     h.gate.version, f"{len(h.behaviour)} items" if h.behaviour else "none",
                     h.semantic.version if h.semantic else "off", h.version)
        self.metrics.model_info.labels(*self._info_labels(engine)).set(1)

    @staticmethod
    def _info_labels(engine: Engine) -> tuple[str, ...]:
        return engine.name, engine.version, TEMPLATE_VERSION, engine.tuned_template_version or "none"

    async def reload(self, model: str | None = None) -> tuple[Engine, Engine, float]:
        """Swap to ``model`` (None: the configured model, read again) while serving; returns (the
        engine swapped out, the one swapped in, seconds). Raises :class:`SwapRunning` while another
        swap runs and :class:`SwapRefused` when the model cannot be served (the old one stays)."""
        if self._swap_lock.locked():
            raise SwapRunning("a model swap is already running; retry when it is done")
        async with self._swap_lock:
            started = time.monotonic()
            try:
                name = resolve_model(self.settings.model_copy(update={"model": model}) if model else self.settings)
                check_hybrid(self.settings, name)
            except ConfigError as exc:
                raise SwapRefused(str(exc)) from None
            log.info("swapping in model %s", name)
            loop = asyncio.get_running_loop()
            try:  # the new model loads and warms up on the swap thread while the old one serves
                engine = await loop.run_in_executor(self.swap_executor, load_engine, self.settings, name)
                if self.settings.warmup:
                    await loop.run_in_executor(self.swap_executor, self._warm_up, engine, False)
                    shared = self.engine.warmup_report
                    expected = sum(shared.get(part, {}).get("seconds", 0.0) for part in ("semantic", "retrieval"))
                    await self.batcher.exclusive(engine.warm_up_shared, expected)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the old model keeps serving; the caller hears why
                self.metrics.model_swaps.labels("failed").inc()
                log.error("swap to %s failed", name, exc_info=exc)
                raise SwapRefused(self._cannot_load(name, exc)) from None
            previous = self.engine
            self._install(engine)
            self.model_name = name
            self.swaps += 1
            self.metrics.model_swaps.labels("done").inc()
            log.info("swapped %s (version %s) for %s (version %s) in %.1fs", name, engine.version, previous.name,
                     previous.version, time.monotonic() - started)
            return previous, engine, time.monotonic() - started

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.batcher is not None:
            await self.batcher.close()
        if self.cache is not None:
            await self.cache.close()
        for executor in (self.infer_executor, self.prep_executor, self.swap_executor):
            executor.shutdown(wait=False, cancel_futures=True)
        if self.lane_pool is not None:
            self.lane_pool.close()
