"""Lanes: several inference threads, each scoring whole batches with one torch thread.

Batches run at the same time on two lanes and one at a time on one; an exclusive function never
runs beside a batch; the expected wait shares the queued work over the lanes; a request's answer
under load on two lanes is bit for bit its answer alone, and a one-lane server's with one torch
thread; and lanes > 1 with several torch threads is refused at start-up.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from instructrec.service.app import ConfigError, create_app
from instructrec.service.batcher import Batcher, Expired, QueueFull
from instructrec.service.metrics import Metrics
from instructrec.service.settings import Settings
from tests.service_fixtures import WORDS, ServerThread, metric, varied_request

torch.set_num_threads(1)


def _request(k: int, n: int = 30) -> dict:
    return varied_request(k, n)


def _ranking(body: dict) -> list[tuple[int, float]]:
    return [(x["index"], x["score"]) for x in body["results"]]


class _Recorder:
    """A score function that sleeps ``seconds`` a batch (the GIL is free meanwhile, as in torch's
    kernels) and records each batch's (start, end, jobs) and the most batches running at once."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.intervals: list[tuple[float, float, list]] = []

    def __call__(self, requests):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        start = time.monotonic()
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
            self.intervals.append((start, time.monotonic(), list(requests)))
        return [f"scored {r}" for r in requests], 0.0, self.seconds

    def exclusive(self, name: str):
        def fn():
            with self.lock:
                overlapping = self.running
            start = time.monotonic()
            time.sleep(self.seconds)
            self.intervals.append((start, time.monotonic(), [name]))
            return overlapping

        return fn


def _batcher(score, lanes: int, **kw) -> tuple[Batcher, ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(lanes)
    options = dict(budget_tokens=10, max_wait_s=0, max_queue=100, max_jobs=1) | kw
    return Batcher(score, executor=executor, metrics=Metrics(), lanes=lanes, **options), executor


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_lanes_score_that_many_batches_at_once(lanes):
    """Six jobs of 0.15 s each: with N lanes at most N batches run at once, and N do; every job
    is answered, and the jobs start in the order they came."""
    recorder = _Recorder(0.15)

    async def scenario():
        batcher, executor = _batcher(recorder, lanes)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(k, 5) for k in range(6)))
        peak = batcher.peak_busy
        await batcher.close()
        executor.shutdown()
        return results, peak

    results, peak = asyncio.run(scenario())
    # from the first job's start to the last one's end (not the event loop's or the threads'
    # set-up and shut-down, which a busy CI machine can stretch)
    elapsed = max(end for _, end, _ in recorder.intervals) - min(start for start, _, _ in recorder.intervals)
    assert results == [f"scored {k}" for k in range(6)]
    assert recorder.most == lanes and peak == lanes
    assert elapsed < 6 * 0.15 / lanes + 0.4  # they really overlapped
    starts = sorted(recorder.intervals)
    if lanes == 1:
        assert [jobs for _, _, jobs in starts] == [[k] for k in range(6)]
    else:  # two threads may note their start in either order: rounds of `lanes` follow each other
        rounds = [sorted(j for _, _, (j,) in starts[a : a + lanes]) for a in range(0, 6, lanes)]
        assert rounds == [list(range(a, min(6, a + lanes))) for a in range(0, 6, lanes)]


def test_exclusive_waits_for_every_lane_and_blocks_new_batches():
    """Two lanes: an exclusive function queued after four jobs runs once they are all done and
    before the jobs queued after it start; no batch overlaps it."""
    recorder = _Recorder(0.1)

    async def scenario():
        batcher, executor = _batcher(recorder, 2)
        batcher.start()
        before = [batcher.submit(f"before {k}", 5) for k in range(4)]
        await asyncio.sleep(0.02)  # the first two are running
        exclusive = asyncio.ensure_future(batcher.exclusive(recorder.exclusive("swap"), 0.1))
        await asyncio.sleep(0)
        after = [batcher.submit(f"after {k}", 5) for k in range(4)]
        results = await asyncio.gather(*before, exclusive, *after)
        await batcher.close()
        executor.shutdown()
        return results

    results = asyncio.run(scenario())
    assert results[4] == 0  # no batch was running when it started
    (ex_start, ex_end, _), = [i for i in recorder.intervals if i[2] == ["swap"]]
    batches = [i for i in recorder.intervals if i[2] != ["swap"]]
    assert len(batches) == 8
    for start, end, (job,) in batches:
        assert end <= ex_start if job.startswith("before") else start >= ex_end, job
    assert recorder.most == 2  # the lanes were used on both sides of it


def test_expected_wait_and_retry_after_share_the_work_over_the_lanes():
    """The same queue (1 s a token measured on one lane, 4 jobs of 1 token) is 4 s of work for
    one lane and 2 s for two: the expected wait halves, and so does the Retry-After of a full
    queue; an exclusive function's seconds count whole (nothing runs beside it)."""

    async def waits(lanes: int) -> tuple[float, int, float]:
        batcher = Batcher(_Recorder(0.0), budget_tokens=10, max_wait_s=0, max_queue=4, executor=None,
                          metrics=Metrics(), max_jobs=1, lanes=lanes)
        batcher.calibrate(1.0)  # not started: nothing drains while we look
        for k in range(4):
            batcher.submit(k, 1)
        wait = batcher.expected_wait()
        batcher.max_queue = 1  # four places short: every queued job must drain
        with pytest.raises(QueueFull) as full:
            batcher.submit(9, 1)
        exclusive = asyncio.ensure_future(batcher.exclusive(lambda: None, 3.0))
        await asyncio.sleep(0)
        with_exclusive = batcher.expected_wait()
        exclusive.cancel()
        return wait, full.value.retry_after, with_exclusive

    one, two = asyncio.run(waits(1)), asyncio.run(waits(2))
    assert one[0] == pytest.approx(4.0) and two[0] == pytest.approx(2.0)
    assert one[1] == 4 and two[1] == 2
    assert one[2] == pytest.approx(7.0) and two[2] == pytest.approx(5.0)


def test_clients_refused_together_are_told_to_come_back_one_after_another(monkeypatch):
    """A full queue (1 s a token, two jobs of 1 token, two places): the refused clients' returns
    count as work ahead until they are due, so the first is told 1 s, the next 2 s, 3 s, 4 s,
    rather than all 1 s (then all back at once, most refused again); a return that is due no
    longer counts."""
    import types

    from instructrec.service import batcher as batcher_module

    clock = [100.0]
    monkeypatch.setattr(batcher_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    async def refusals() -> list[int]:
        batcher = Batcher(_Recorder(0.0), budget_tokens=10, max_wait_s=0, max_queue=2, executor=None,
                          metrics=Metrics(), max_jobs=1)
        batcher.calibrate(1.0)  # not started: nothing drains while we look
        batcher.submit("a", 1)
        batcher.submit("b", 1)
        told = []
        for k in range(4):
            with pytest.raises(QueueFull) as full:
                batcher.submit(k, 1)
            told.append(full.value.retry_after)
        clock[0] += 2.5  # the first two returns are due: the queue (or their clients' absence) has them now
        with pytest.raises(QueueFull) as full:
            batcher.submit("late", 1)
        return told + [full.value.retry_after]

    assert asyncio.run(refusals()) == [1, 2, 3, 4, 3]


def test_an_idle_lane_takes_a_job_at_once_and_busy_lanes_share_the_queue():
    """0.05 s a token, batches of 10 tokens (0.5 s): beside one running batch a second lane is
    idle (wait 0; one lane: the batch's rest); with both lanes busy the wait is their rest plus
    the queued work shared over the two."""
    recorder = _Recorder(0.5)

    async def waits(lanes: int) -> list[float]:
        batcher, executor = _batcher(recorder, lanes)
        batcher.calibrate(0.05)
        batcher.start()
        running = [batcher.submit("a", 10)]
        await asyncio.sleep(0.05)
        out = [batcher.expected_wait()]
        if lanes == 2:
            running.append(batcher.submit("b", 10))
            await asyncio.sleep(0.05)  # both lanes busy: 0.45 and 0.45 s left, about
            running.append(batcher.submit("c", 10))
            out.append(batcher.expected_wait())
        await asyncio.gather(*running)
        await batcher.close()
        executor.shutdown()
        return out

    (one,), (idle, busy) = asyncio.run(waits(1)), asyncio.run(waits(2))
    assert 0.3 < one < 0.46
    assert idle == 0.0
    assert 0.3 + 0.25 < busy < 0.5 + 0.25  # the first lane's rest, then half of c's 0.5 s


def test_a_lent_lane_counts_as_taken_and_comes_back_for_a_waiting_job():
    """Two lanes and a pool: job A's 12 parts of 50 ms borrow the idle lane; job B, submitted
    meanwhile, starts once that lane has finished its part (not when A ends, and not beside it:
    never more than two threads compute at once); A ends on its own lane with every answer."""
    from instructrec.lanes import LanePool

    pool = LanePool(2)
    lock, state, log = threading.Lock(), {"now": 0, "most": 0}, []

    def busy(seconds: float, what: str):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            log.append((what, time.monotonic()))
        time.sleep(seconds)
        with lock:
            state["now"] -= 1

    def score(requests):
        (name,) = requests
        if name == "A":
            return [pool.map(lambda x: busy(0.05, "A") or x, range(12))], 0.0, 0.0
        busy(0.1, "B")
        return ["B"], 0.0, 0.0

    async def scenario():
        executor = ThreadPoolExecutor(2)
        batcher = Batcher(score, executor=executor, metrics=Metrics(), lanes=2, pool=pool, budget_tokens=10,
                          max_wait_s=0, max_queue=100, max_jobs=1)
        batcher.start()
        a = batcher.submit("A", 1)
        await asyncio.sleep(0.08)
        assert pool.lent == 1  # A borrowed the idle lane
        sent = time.monotonic()
        b = batcher.submit("B", 1)
        results = await asyncio.gather(a, b)
        await batcher.close()
        executor.shutdown()
        return results, sent

    try:
        (a, b), sent = asyncio.run(scenario())
    finally:
        pool.close()
    assert a == list(range(12)) and b == "B"
    assert state["most"] == 2
    started_b = next(t for what, t in log if what == "B")
    last_a = max(t for what, t in log if what == "A")
    assert started_b - sent < 0.09  # the lent lane's part (50 ms) and no more
    assert last_a > started_b  # A was still running: B did not wait for it to end
    assert pool.lent == 0 and pool.parts_lent >= 1


def test_the_drain_rate_counts_what_lent_lanes_computed():
    """A job of 20 tokens whose 8 parts of 50 ms a lent lane shares: about 0.2 s of wall time
    but 0.4 s of lane time. The drain rate is the lane time's (0.02 s a token), so 20 more
    tokens on two lanes are expected to take 0.2 s, as they do when no lane is idle to lend;
    the wall time alone would have said 0.1 s."""
    from instructrec.lanes import LanePool

    pool = LanePool(2)

    def score(requests):
        return [sum(pool.map(lambda x: time.sleep(0.05) or 1, range(8))) for _ in requests], 0.0, 0.0

    async def scenario():
        executor = ThreadPoolExecutor(2)
        batcher = Batcher(score, executor=executor, metrics=Metrics(), lanes=2, pool=pool, budget_tokens=100,
                          max_wait_s=0, max_queue=10, max_jobs=1)
        batcher.start()
        result = await batcher.submit("a", 20)
        drain = batcher.drain_seconds(extra_tokens=20)
        await batcher.close()
        executor.shutdown()
        return result, drain

    try:
        result, drain = asyncio.run(scenario())
    finally:
        pool.close()
    assert result == 8 and pool.parts_lent >= 2
    assert drain >= 0.19, drain  # 8 x 0.05 s over 20 tokens, times 20 tokens, over 2 lanes
    assert pool.lent_seconds() == 0.0  # the lane's account was read by the batcher, not this thread's


def test_an_admitted_job_waits_past_the_admission_deadline_up_to_its_expiry():
    """One lane busy for 0.3 s: a job admitted with a 0.2 s admission deadline (the rate was
    not measured yet, so it fit) but 0.5 s to expire is scored, not dropped; with the expiry
    at the admission deadline (the default) it gets Expired."""
    recorder = _Recorder(0.3)

    async def scenario(expire_after_s):
        batcher, executor = _batcher(recorder, 1, max_queue_wait_s=0.2, expire_after_s=expire_after_s)
        batcher.start()
        first = batcher.submit("a", 5)
        await asyncio.sleep(0.02)
        second = batcher.submit("b", 5)
        results = await asyncio.gather(first, second, return_exceptions=True)
        await batcher.close()
        executor.shutdown()
        return results

    assert asyncio.run(scenario(0.5)) == ["scored a", "scored b"]
    first, late = asyncio.run(scenario(None))
    assert first == "scored a" and isinstance(late, Expired)


def test_two_lanes_keep_deadlines_and_skip_cancelled_jobs():
    """Two lanes busy for 0.3 s, a 0.2 s deadline: a third job cannot start in time and gets
    Expired; a cancelled job is never scored."""
    recorder = _Recorder(0.3)

    async def scenario():
        batcher, executor = _batcher(recorder, 2, max_queue_wait_s=0.2)
        batcher.start()
        first, second = batcher.submit("a", 5), batcher.submit("b", 5)
        await asyncio.sleep(0.02)
        late, gone = batcher.submit("c", 5), batcher.submit("d", 5)
        gone.cancel()
        results = await asyncio.gather(first, second, late, return_exceptions=True)
        await batcher.close()
        executor.shutdown()
        return results

    first, second, late = asyncio.run(scenario())
    assert (first, second) == ("scored a", "scored b")
    assert isinstance(late, Expired) and late.retry_after >= 1
    assert sorted(j for _, _, (j,) in recorder.intervals) == ["a", "b"]


# --- the service ----------------------------------------------------------------------------------


def _answers(settings: Settings, requests: list[dict]) -> tuple[list, list, int, float, int]:
    """Each request's ranking sent alone, one after another, then all of them at once; the most
    lanes busy at once, the busy-lanes gauge once idle, and the torch threads of an inference thread."""
    app = create_app(settings)
    with ServerThread(app) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            alone = [_ranking(client.post("/rerank", json=body).json()) for body in requests]

        async def together():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as ac:
                return await asyncio.gather(*(ac.post("/rerank", json=body) for body in requests))

        responses = asyncio.run(together())
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            idle = metric(client, "instructrec_busy_lanes")
            pool = app.state.service.lane_pool
            lent = pool.parts_lent if pool is not None else None
            assert metric(client, "instructrec_lent_parts") == (lent or 0)
        peak = app.state.service.batcher.peak_busy
        threads = app.state.service.infer_executor.submit(torch.get_num_threads).result()
    return alone, [_ranking(r.json()) for r in responses], peak, idle, threads, lent


@pytest.mark.parametrize("model,dtype", [("tiny-random", "bfloat16"), ("tiny-random-prefixlm", "float32")])
def test_two_lanes_answer_under_load_as_one_lane_answers_alone(model, dtype):
    """24 requests sent at once to a two-lane server get, bit for bit, the answers they get
    alone from it (where the idle lane computed some of their parts), and from a one-lane server
    with one torch thread, and from a two-lane server that lends no lane; the two-lane server
    scored two at a time, the one-lane server one."""
    requests = [_request(k) for k in range(24)]
    base = dict(model=model, device="cpu", dtype=dtype, redis_url="", max_wait_ms=1, max_queue_wait_ms=120_000,
                batch_tokens=64)  # small passes: a request has several for the idle lane to take
    alone, loaded, peak, idle, threads, lent = _answers(Settings(lanes=2, **base), requests)
    assert loaded == alone
    assert peak == 2 and idle == 0
    assert threads == 1  # lanes set torch to one thread (for the process)
    assert lent > 0
    one_alone, one_loaded, one_peak, _, _, _ = _answers(Settings(lanes=1, torch_threads=1, **base), requests)
    assert one_alone == alone and one_loaded == alone
    assert one_peak == 1
    unlent_alone, unlent_loaded, _, _, _, none_lent = _answers(Settings(lanes=2, lend_lanes=False, **base), requests)
    assert unlent_alone == alone and unlent_loaded == alone and none_lent is None


def test_lanes_with_several_torch_threads_are_refused():
    """lanes > 1 needs one torch thread: another explicit torch_threads fails the start, naming both."""
    with pytest.raises(ConfigError, match="lanes=2 and torch_threads=2"):
        create_app(Settings(model="tiny-random", device="cpu", redis_url="", lanes=2, torch_threads=2))
    create_app(Settings(model="tiny-random", device="cpu", redis_url="", lanes=2, torch_threads=1))  # allowed
    create_app(Settings(model="tiny-random", device="cpu", redis_url="", lanes=1, torch_threads=2))


def test_lanes_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("INSTRUCTREC_LANES", "3")
    assert Settings().lanes == 3
    monkeypatch.setenv("INSTRUCTREC_LANES", "-1")
    with pytest.raises(ValueError):
        Settings()


def test_lanes_default_to_the_cores_this_process_may_use(monkeypatch, tmp_path):
    """0 (the default): one lane per CPU core the process may run on (affinity, then a cgroup
    quota: v2 cpu.max or v1 cfs quota/period, rounded up); one lane on a GPU or with torch
    threads asked for."""
    import os

    from instructrec.service.settings import cpu_cores

    monkeypatch.delenv("INSTRUCTREC_LANES", raising=False)
    affinity = len(os.sched_getaffinity(0))
    assert cpu_cores(tmp_path) == affinity  # no cgroup files: the affinity
    assert Settings(device="cpu").lanes == Settings(device="cpu", lanes=0).lanes == cpu_cores()
    assert Settings(device="cpu", torch_threads=2).lanes == 1
    assert Settings(device="cuda").lanes == Settings(device="cuda:1").lanes == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_cores(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert cpu_cores(tmp_path) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_cores(v1) == min(affinity, 2)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_cores(v1) == affinity


# --- what the lanes share ---------------------------------------------------------------------------


def _in_threads(fn, args: list) -> list:
    """``fn(arg)`` for every arg, all at once on their own threads, released together."""
    start = threading.Barrier(len(args))

    def run(arg):
        start.wait()
        return fn(arg)

    with ThreadPoolExecutor(len(args)) as pool:
        return list(pool.map(run, args))


def test_one_ranker_scores_text_from_several_threads_as_from_one():
    """Text requests tokenised by the ranker's own tokenizer (a fused /recommend's rerank runs
    that way on a lane) from 8 threads at once: the scores of each alone, bit for bit."""
    from instructrec.modeling import TINY_PREFIX, load_model
    from instructrec.ranker import Ranker

    ranker = Ranker(load_model(TINY_PREFIX, device="cpu", dtype="float32"))
    requests = [(" ".join(r["history"]) + " " + r["instruction"], r["candidates"]) for r in map(_request, range(8))]
    alone = [ranker.score(source, cands).scores for source, cands in requests]
    for _ in range(3):
        assert _in_threads(lambda r: ranker.score(*r).scores, requests) == alone


def test_the_semantic_encoder_serves_several_threads_as_one():
    """The process's MiniLM encoder, asked by 6 threads at once for needs with texts of their
    own: each gets the similarities it gets alone, and the cache holds them all."""
    from instructrec.aspects import UserNeed
    from instructrec.hybrid.semantic import SemanticEncoder

    needs = [(UserNeed(history=(f"{WORDS[k]} {WORDS[(k + 1) % 15]} saga {k}",), preference=f"more {WORDS[k]} {k}"),
              [f"{WORDS[(k + j) % 15]} title {k}-{j}" for j in range(8)]) for k in range(6)]
    serial = SemanticEncoder()  # the needs share no text: one after another, each is encoded as alone
    alone = [serial.similarities(need, titles).tolist() for need, titles in needs]
    shared = SemanticEncoder()
    together = _in_threads(lambda nt: shared.similarities(*nt).tolist(), needs)
    assert together == alone
    assert len(shared.cache) == 6 * (2 + 8)
