"""Micro-batching between the HTTP layer and the ranker (router -> batcher -> ranker -> model).

Requests submit *jobs* (one instruction and the candidates still to score, as the token
ids preparation made: the ranker's ``Encoded``; the batcher does not look inside). One worker
task waits for a free *lane*, collects jobs until the batch's token budget is reached or
``max_wait`` has passed since the first job of the batch, then hands the batch to an inference
thread and goes back to wait for the next free lane, so the event loop never runs the model and
up to ``lanes`` batches are scored at once (one per inference thread; the service gives each
lane a single torch thread, so a job's numbers are the same whichever lane takes it). Jobs are
taken in arrival order and batches start in that order; a job that would overflow the budget
starts the next batch (a job bigger than the whole budget forms a batch of its own, which the
ranker splits into forward passes within the budget).

Admission: a job is queued, never refused, while the work ahead of it (the running batches'
rest and the queued jobs' tokens, at the measured seconds per token of one lane, shared out
over the lanes as they come free: the drain rate) lets it start within ``max_queue_wait``.
Past that, or with ``max_queue`` jobs already waiting, :meth:`Batcher.submit` raises
:class:`QueueFull` (the route answers 429) whose ``retry_after`` is the seconds until enough
work has drained for the job to be admitted, at the same rate, clamped to
1..``RETRY_AFTER_MAX_S``. The clients already refused count as work ahead until the time they
were told to come back: without them every client refused in the same second would be told the
same Retry-After, come back together and mostly be refused again (a soak of 200 clients
resending: 22,988 resends, 388 requests still refused after 30 tries); with them the k-th
refused client is told about k jobs' drain time later than the first. A job still waiting at
``expire_after`` (by default ``max_queue_wait``; the service gives admitted jobs twice that,
``queue_expiry_factor``, since the drain rate can fall after they were admitted) gets
:class:`Expired` (503 with ``Retry-After``) instead of being scored for a client that has likely
given up. The drain rate is measured in lane seconds: a batch's wall time plus what idle lanes
computed for it (:meth:`instructrec.lanes.LanePool.lent_seconds`), so the rate a quiet service
measured with help still holds when a burst leaves no lane idle. A job whose future was cancelled
(client disconnected) is skipped, before its batch starts and again just before its scoring in
the inference thread.

:meth:`Batcher.exclusive` runs a function on an inference thread while no batch runs (the part
of a model swap's warm-up that touches what the engines share): it waits for every lane to be
idle and no batch starts until it is done; the expected wait counts it whole.

The jobs of a batch are scored by one ``score_many`` call; only when the ranker is not batch
invariant do they share forward passes (``Ranker.score_many``), so by default the service
gives each job a batch of its own (``max_jobs=1``). If that call fails, each job is scored
alone so one bad job cannot fail the others.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable

from .metrics import Metrics

if TYPE_CHECKING:
    from instructrec.lanes import LanePool

log = logging.getLogger("instructrec.service.batcher")

RETRY_AFTER_MAX_S = 60  # a Retry-After longer than this is not worth a client's wait: it tries again then


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"scoring queue is full; retry after {retry_after}s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


class Expired(Exception):
    """The job waited ``expire_after`` without its batch starting."""

    def __init__(self, waited: float, retry_after: int):
        super().__init__(f"waited {waited:.2f}s for the model without starting; retry after {retry_after}s")
        self.retry_after = retry_after


@dataclass
class Job:
    request: Any  # what the score function takes for one job (the service: an ``Encoded``)
    tokens: int  # instruction tokens + candidate target tokens: the job's share of a budget
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    deadline: float = math.inf  # monotonic time by which its batch must start


@dataclass(frozen=True)
class _Exclusive:
    """A queued function that runs alone on an inference thread (see :meth:`Batcher.exclusive`)."""

    fn: Callable[[], Any]
    seconds: float  # what it is expected to take


# score_many([request, ...]) -> ([result, ...], encode_seconds, decode_seconds), run in the
# inference thread; the seconds are the batch's, attributed to each of its jobs
ScoreFn = Callable[[list[Any]], tuple[list[Any], float, float]]


class Batcher:
    def __init__(self, score: ScoreFn, *, budget_tokens: int, max_wait_s: float, max_queue: int, executor: Executor,
                 metrics: Metrics, max_jobs: int = 32, max_queue_wait_s: float = math.inf, lanes: int = 1,
                 pool: LanePool | None = None, expire_after_s: float | None = None):
        """``lanes``: batches scored at once; ``executor`` needs at least as many threads. ``pool``:
        the lanes a batch may borrow while they are idle (:mod:`instructrec.lanes`); the batcher
        tells it which lanes score a batch and when a job waits for one. ``expire_after_s``: how
        long an admitted job may wait before it gets :class:`Expired` (default
        ``max_queue_wait_s``, what admission promised)."""
        self._score = score
        self.lanes = max(1, int(lanes))
        self.pool = pool
        self._wanting = False  # a batch is collected and waits for a lane (a lent one should come back)
        self._lane_back = asyncio.Event()  # a lent lane came back
        if pool is not None:
            pool.demand = lambda: self._wanting or bool(self._pending)
        self.budget = budget_tokens
        self.max_jobs = max_jobs
        self.max_wait = max_wait_s
        self.max_queue = max_queue
        self.max_queue_wait = max_queue_wait_s
        self.expire_after = max_queue_wait_s if expire_after_s is None else max(expire_after_s, max_queue_wait_s)
        self._executor = executor
        self.metrics = metrics
        self._pending: deque[Job] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self._queued_tokens = 0  # tokens of the jobs in _pending
        self._running: dict[asyncio.Task, float] = {}  # batch being scored -> monotonic time it should end
        self._exclusive_until = 0.0  # monotonic time the exclusive function taken up should end (0: none)
        self._exclusive_running = False
        self.peak_busy = 0  # most lanes ever busy at once (what the tests read)
        self._token_seconds = 0.0  # running estimate of scoring seconds per token (0: not measured yet)
        self._exclusive_seconds = 0.0  # expected seconds of the exclusive functions in _pending
        # the refused jobs' returns: (monotonic time its client was told to come back, tokens), a heap
        self._promised: list[tuple[float, int]] = []
        self._promised_tokens = 0

    # -- router side --------------------------------------------------------------------
    def start(self) -> None:
        if self.pool is not None:
            loop = asyncio.get_running_loop()
            self.pool.on_return = lambda: loop.call_soon_threadsafe(self._lane_back.set)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="instructrec-batcher")

    def submit(self, request: Any, tokens: int) -> asyncio.Future:
        if self._closed:
            raise ShuttingDown("the service is shutting down")
        if len(self._pending) >= self.max_queue:
            self._purge_cancelled()
        if len(self._pending) >= self.max_queue or self.expected_wait() > self.max_queue_wait:
            raise QueueFull(self._refuse(tokens))
        now = time.monotonic()
        job = Job(request, max(1, int(tokens)), asyncio.get_running_loop().create_future(), now,
                  now + self.expire_after)
        self._pending.append(job)
        self._queued_tokens += job.tokens
        self.metrics.queue_depth.set(len(self._pending))
        self._wake.set()
        return job.future

    def calibrate(self, seconds_per_token: float) -> None:
        """Start the drain rate from a measurement (the warm-up's), so the first requests are
        admitted by it rather than all at once; batches refine it."""
        if seconds_per_token > 0 and not self._token_seconds:
            self._token_seconds = seconds_per_token

    def drain_seconds(self, jobs: int | None = None, extra_tokens: int = 0) -> float:
        """Seconds until the running batches and the first ``jobs`` queued jobs (all: None; then
        ``extra_tokens`` more) have drained enough for a job behind them to start, at the
        measured seconds per token of one lane (0 until measured). An exclusive function runs
        alone: its seconds count whole."""
        if jobs is None:
            ahead, exclusive = self._queued_tokens + extra_tokens, self._exclusive_seconds
        else:
            first = list(islice(self._pending, max(0, jobs)))
            ahead = sum(j.tokens for j in first)
            exclusive = sum(j.request.seconds for j in first if isinstance(j.request, _Exclusive))
        exclusive += max(0.0, self._exclusive_until - time.monotonic())
        return self._lane_free_after(ahead * self._token_seconds) + exclusive

    def _lane_free_after(self, work: float) -> float:
        """Seconds until a lane is free once ``work`` (one lane's seconds) has been shared out over
        the lanes as they come free (each running batch's lane from its expected end, an idle
        lane at once): with every lane busy that is about the work ahead divided by the lanes;
        with one lane, its rest plus the work (jobs are not split: an estimate)."""
        now = time.monotonic()
        free = sorted([max(0.0, end - now) for end in self._running.values()]
                      + [0.0] * max(0, self.lanes - len(self._running)))[: self.lanes]
        level = free[0]
        for k in range(1, len(free) + 1):  # k lanes are free at `level`: the work fills them evenly
            room = (free[k] - level) * k if k < len(free) else math.inf
            if work <= room:
                return level + work / k
            work -= room
            level = free[k]
        return level

    def expected_wait(self) -> float:
        """Seconds before a job submitted now would start: everything ahead of it drained."""
        return self.drain_seconds()

    def retry_after(self) -> int:
        """Whole seconds until a job submitted then would be admitted: enough work drained (the
        queue's, and the refused jobs' due back before) that its wait fits ``max_queue_wait`` and
        a queue place is free; 1 to ``RETRY_AFTER_MAX_S``."""
        promised, tokens = self._promises()
        fits = self.drain_seconds(extra_tokens=tokens) - self.max_queue_wait
        excess = len(self._pending) + promised - self.max_queue + 1  # jobs ahead that must leave first
        if excess <= 0:
            place = 0.0
        elif excess <= len(self._pending):
            place = self.drain_seconds(excess)
        else:  # the whole queue and some of the returns, at their mean size
            place = self.drain_seconds(extra_tokens=round(tokens * (excess - len(self._pending)) / promised))
        return min(RETRY_AFTER_MAX_S, max(1, math.ceil(max(fits, place))))

    def _promises(self) -> tuple[int, int]:
        """(jobs, tokens) of the refused clients told to come back later than now; a return now
        due is in the queue by now, or its client has gone."""
        now = time.monotonic()
        while self._promised and self._promised[0][0] <= now:
            self._promised_tokens -= heapq.heappop(self._promised)[1]
        return len(self._promised), self._promised_tokens

    def _refuse(self, tokens: int) -> int:
        """The Retry-After of a refused job of ``tokens``, whose return is then counted as work ahead."""
        seconds = self.retry_after()
        heapq.heappush(self._promised, (time.monotonic() + seconds, max(1, int(tokens))))
        self._promised_tokens += max(1, int(tokens))
        return seconds

    async def exclusive(self, fn: Callable[[], Any], expected_s: float) -> Any:
        """Run ``fn`` on an inference thread after the jobs queued now have been scored and before
        any queued later starts, with no batch running beside it (it is never refused or expired);
        the expected wait counts it as ``expected_s`` seconds."""
        if self._closed:
            raise ShuttingDown("the service is shutting down")
        job = Job(_Exclusive(fn, max(0.0, expected_s)), 0, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._exclusive_seconds += job.request.seconds
        self._wake.set()
        return await job.future

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> int:
        """Lanes scoring a batch now (an exclusive function counts as one)."""
        return len(self._running) + self._exclusive_running

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        while self._pending:
            job = self._popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the service is shutting down"))
        self.metrics.queue_depth.set(0)

    # -- worker -------------------------------------------------------------------------
    def _purge_cancelled(self) -> None:
        live = [j for j in self._pending if not j.future.cancelled()]
        dropped = len(self._pending) - len(live)
        if dropped:
            self.metrics.dropped_jobs.inc(dropped)
            self._pending = deque(live)
            self._queued_tokens = sum(j.tokens for j in live)
            self._exclusive_seconds = sum(j.request.seconds for j in live if isinstance(j.request, _Exclusive))
            self.metrics.queue_depth.set(len(self._pending))

    def _popleft(self) -> Job:
        job = self._pending.popleft()
        self._queued_tokens -= job.tokens
        if isinstance(job.request, _Exclusive):
            self._exclusive_seconds -= job.request.seconds
        return job

    def _gone(self, job: Job, now: float) -> bool:
        """Whether ``job`` is not to be scored: its client left, or its deadline passed (then it
        gets :class:`Expired`)."""
        if job.future.cancelled():
            self.metrics.dropped_jobs.inc()
            return True
        if now > job.deadline:
            job.future.set_exception(Expired(now - job.enqueued, self._refuse(job.tokens)))
            return True
        return False

    def _pop_live(self) -> Job | None:
        while self._pending:
            job = self._popleft()
            if not self._gone(job, time.monotonic()):
                return job
        return None

    async def _collect(self) -> list[Job]:
        """Wait for a first job, then add jobs until the budget or the max wait is reached."""
        loop = asyncio.get_running_loop()
        while True:
            first = self._pop_live()
            if first is not None:
                break
            self._wake.clear()
            self.metrics.queue_depth.set(0)
            await self._wake.wait()
        batch, tokens = [first], first.tokens
        deadline = loop.time() + self.max_wait
        while tokens < self.budget and len(batch) < self.max_jobs and not isinstance(first.request, _Exclusive):
            if self._pending:
                nxt = self._pending[0]
                if isinstance(nxt.request, _Exclusive):
                    break  # it runs alone, after this batch
                if nxt.future.cancelled() or time.monotonic() > nxt.deadline:
                    self._gone(self._popleft(), time.monotonic())
                    continue
                if tokens + nxt.tokens > self.budget:
                    break  # it starts the next batch
                batch.append(self._popleft())
                tokens += nxt.tokens
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)  # Event.wait is safe to time out
            except asyncio.TimeoutError:
                break
        self.metrics.queue_depth.set(len(self._pending))
        return batch

    def _score_batch(self, jobs: list[Job]) -> tuple[list[tuple[str, Any, float, float]], float]:
        """In the inference thread: score the live jobs together; ('skip'|'ok'|'error', value, enc,
        dec) per job, and the seconds lent lanes computed for them."""
        if self.pool is not None:
            self.pool.lent_seconds()  # from zero
        out = self._score_jobs(jobs)
        return out, (self.pool.lent_seconds() if self.pool is not None else 0.0)

    def _score_jobs(self, jobs: list[Job]) -> list[tuple[str, Any, float, float]]:
        live = [i for i, job in enumerate(jobs) if not job.future.cancelled()]  # the client may have left meanwhile
        out: list[tuple[str, Any, float, float]] = [("skip", None, 0.0, 0.0)] * len(jobs)
        if not live:
            return out
        try:
            results, enc, dec = self._score([jobs[i].request for i in live])
            for i, result in zip(live, results):
                out[i] = ("ok", result, enc, dec)
        except Exception:  # noqa: BLE001 - isolate the failing job: score each alone
            for i in live:
                try:
                    (result,), enc, dec = self._score([jobs[i].request])
                    out[i] = ("ok", result, enc, dec)
                except Exception as exc:  # noqa: BLE001 - reported to the job's request
                    out[i] = ("error", exc, 0.0, 0.0)
        return out

    def _set_busy(self) -> None:
        busy = self.busy
        self.peak_busy = max(self.peak_busy, busy)
        self.metrics.busy_lanes.set(busy)

    async def _run_exclusive(self, job: Job) -> None:
        """Run an exclusive function once every lane is idle (the worker starts nothing meanwhile)."""
        self._exclusive_until = time.monotonic() + job.request.seconds  # counted in the wait from now
        try:
            if self._running:
                await asyncio.wait(list(self._running))
            self._exclusive_until = time.monotonic() + job.request.seconds
            self._exclusive_running = True
            self._set_busy()
            result = await asyncio.get_running_loop().run_in_executor(self._executor, job.request.fn)
        except asyncio.CancelledError:
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the service is shutting down"))
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            if not job.future.done():
                job.future.set_exception(exc)
        else:
            if not job.future.done():
                job.future.set_result(result)
        finally:
            self._exclusive_until, self._exclusive_running = 0.0, False
            self._set_busy()

    def _dispatch(self, batch: list[Job]) -> None:
        """Start scoring ``batch`` on a free lane; its expected end counts in the drain estimate."""
        start = time.monotonic()
        tokens = sum(j.tokens for j in batch)
        for job in batch:
            self.metrics.queue_seconds.observe(start - job.enqueued)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(tokens)
        if self.pool is not None:
            self.pool.take()
        task = asyncio.get_running_loop().create_task(self._score_on_lane(batch, start, tokens))
        self._running[task] = start + tokens * self._token_seconds
        task.add_done_callback(self._lane_done)
        self._set_busy()

    def _lane_done(self, task: asyncio.Task) -> None:
        if self._running.pop(task, None) is not None and self.pool is not None:
            self.pool.give()
        self._set_busy()

    def _lanes_taken(self) -> int:
        """Lanes scoring a batch or lent to one."""
        return len(self._running) + (self.pool.lent if self.pool is not None else 0)

    async def _free_lane(self) -> None:
        """Until a lane is neither scoring a batch nor lent (a lent lane returns after its part
        once a job waits: ``_wanting`` or a queued job)."""
        while self._lanes_taken() >= self.lanes:
            self._lane_back.clear()
            if self._lanes_taken() < self.lanes:
                break
            back = asyncio.ensure_future(self._lane_back.wait())
            try:
                await asyncio.wait([*self._running, back], return_when=asyncio.FIRST_COMPLETED)
            finally:
                back.cancel()

    async def _score_on_lane(self, batch: list[Job], start: float, tokens: int) -> None:
        lent = 0.0
        try:
            results, lent = await asyncio.get_running_loop().run_in_executor(self._executor, self._score_batch, batch)
        except asyncio.CancelledError:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(ShuttingDown("the service is shutting down"))
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. the executor is gone
            log.exception("scoring batch failed")
            results = [("error", exc, 0.0, 0.0)] * len(batch)
        # one lane's seconds per token: the lent lanes' seconds count, since under load (when the
        # rate decides admission) no lane is idle to lend and the batch takes them all on its own
        measured = (time.monotonic() - start + lent) / max(1, tokens)
        self._token_seconds = measured if not self._token_seconds else 0.8 * self._token_seconds + 0.2 * measured
        for job, (status, value, enc, dec) in zip(batch, results):
            if status == "skip" or job.future.cancelled():
                self.metrics.dropped_jobs.inc()
                continue
            self.metrics.encode_seconds.observe(enc)
            self.metrics.decode_seconds.observe(dec)
            if job.future.done():
                continue
            if status == "ok":
                job.future.set_result(value)
            else:
                job.future.set_exception(value)

    async def _run(self) -> None:
        """The worker: wait for a free lane, collect a batch, start it there; an exclusive
        function waits for every lane to be idle and runs before anything else starts."""
        try:
            while True:
                await self._free_lane()
                batch = await self._collect()
                if isinstance(batch[0].request, _Exclusive):
                    await self._run_exclusive(batch[0])
                    continue
                self._wanting = True  # a lane lent while the batch was collected comes back now
                try:
                    await self._free_lane()
                finally:
                    self._wanting = False
                self._dispatch(batch)
        finally:  # closing: the running batches' jobs hear ShuttingDown
            running = list(self._running)
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running)
