"""``instructrec bench soak``: many clients for a long run, with a fault in the middle, and every
answer checked.

What an operator needs before trusting a deployment, in one run on loopback:

1. The bench starts a private redis-server (never the machine's) and the service in a child
   process using it as its cache (or, with ``--url``, talks to a running loopback service; the
   Redis fault then cannot run: the bench only stops a Redis it started).
2. ``--distinct`` real Games requests (a user's last ``--history`` titles, ``--candidates``
   catalogue titles none of which is in the history) are each sent once, alone and in turn:
   their answers are the references. The bench then empties its Redis, so the load starts cold.
3. ``--clients`` concurrent clients send ``--requests`` requests drawn from those (seeded),
   back to back; a client refused with Retry-After waits that long (at most 10 s) before its
   next request, as a polite client does. The fault plan: Redis stopped when 30% of the requests have been sent and
   started again (empty) at 60%; at 80% a burst of ``--burst`` extra requests at once, beyond
   the clients, over the queue limit. With ``--resend`` a refused request is sent again after its
   Retry-After until answered (the burst's are not), and every request must be answered in the
   end. The ``swap`` fault (with ``--swap-model``) swaps the
   service to that second model version (``POST /admin/reload``) at 50%, while the clients send
   (from 75% on they send only once it is done); its references are taken before the load (swap
   there, answer each request alone, swap back).
4. Checks: every 200 answer names one of the two versions (``model.checkpoint_version``) and
   has that version's reference candidates in the reference's order with scores within 1e-4;
   every refusal is a 429 or 503 carrying Retry-After; every request gets an answer (a timeout
   or a broken connection is *lost*); a swap fault's swap answered 200.

Reported: p50/p95/p99 of the answered requests (as the clients saw them, and the service's own
time from its ``Server-Timing`` header: with 200 clients on the same two cores, the load
generator's own event loop adds its share), requests/s, outcomes by status, the cache hit
ratio in twenty windows of the run, and ``instructrec_cache_errors_total`` at the start, at the
fault's edges and at the end, so the errors while Redis was up are known.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from instructrec.service.loopback import RedisServer
from instructrec.training.data.load import load_dataset

from . import report
from .service_bench import (BenchError, ChildServer, Workload, _parse_sets, _Server, _server_ms, _settings, _value,
                            loopback_error, scrape)

SCORE_TOLERANCE = 1e-4
STOP_AT, START_AT, BURST_AT, SWAP_AT = 0.3, 0.6, 0.8, 0.5
SWAPPED_BY = 0.75  # the last quarter of the load is sent after the swap is done, so both versions answer
FAULTS = ("redis", "burst", "swap")
DEFAULT_FAULTS = ("redis", "burst")  # swap needs a second model (--swap-model)
WINDOWS = 20
MAX_RETRY_AFTER_S = 10.0  # a refused client waits its Retry-After, at most this long
MAX_RESENDS = 30  # with --resend: a refused request is sent again at most this often


@dataclass
class Outcome:
    """One request of the load phase, as the client saw it."""

    seq: int  # send order (the burst's requests come after the others)
    ref: int  # which distinct request
    status: str  # HTTP status, or "lost: <why>"
    latency_ms: float  # as the client saw it
    server_ms: float | None = None  # the service's own time to its response headers (Server-Timing)
    retry_after: bool = False
    hits: int = 0
    misses: int = 0
    cache_enabled: bool = False
    wrong: str | None = None  # why the 200 answer differs from the reference
    burst: bool = False
    version: str | None = None  # the checkpoint version the 200 answer names
    retried: bool = False  # refused, then sent again (--resend): the later attempt is the request's outcome


@dataclass
class FaultLog:
    """When each fault happened, and the cache error counter around it."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def mark(self, what: str, sent: int, errors: float | None) -> None:
        self.events.append({"event": what, "sent": sent, "at_s": time.monotonic(), "cache_errors": errors})


def _answer(body: dict) -> list[tuple[int, float]]:
    return [(x["index"], x["score"]) for x in body["results"]]


def compare(reference: list[tuple[int, float]], got: list[tuple[int, float]]) -> str | None:
    """None when ``got`` ranks the same candidates in the same order with scores within
    ``SCORE_TOLERANCE``; else what differs."""
    if [i for i, _ in got] != [i for i, _ in reference]:
        return f"order {[i for i, _ in got][:10]} != reference {[i for i, _ in reference][:10]}"
    worst = max((abs(a - b) for (_, a), (_, b) in zip(got, reference)), default=0.0)
    if worst > SCORE_TOLERANCE:
        return f"a score differs by {worst:.2e}"
    return None


class _Fixture:
    """The Redis and the service the bench started (or the service at ``--url``)."""

    def __init__(self, model: str | None, url: str | None, settings: Sequence[str], threads: int | None,
                 log_dir: Path, with_redis: bool):
        self.redis: RedisServer | None = None
        self.server: ChildServer | None = None
        if url:
            problem = loopback_error(url)
            if problem:
                raise BenchError(problem)
            self.url = url.rstrip("/")
            return
        overrides: dict[str, Any] = {"model": model, **_parse_sets(settings)}
        if threads:
            overrides["torch_threads"] = threads
        if with_redis:
            if RedisServer.binary is None:
                raise BenchError("redis-server is not installed: the soak bench starts its own Redis "
                                 "(apt-get install redis-server), or run it with --faults burst and --set redis_url=")
            self.redis = RedisServer()
            overrides.update(redis_url=self.redis.url, cache_namespace=f"soak-{uuid.uuid4().hex[:8]}")
        _settings(overrides)  # a bad --set stops here, named
        self.settings = overrides
        try:
            if self.redis is not None:
                self.redis.start()
            self.server = ChildServer(overrides, log_dir / "soak-service.log")
        except Exception as exc:
            self.close()
            raise BenchError(str(exc)) from exc
        self.url = self.server.url

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.redis is not None:
            self.redis.stop()


def _cache_errors(url: str) -> float | None:
    samples = scrape(url, {})
    return None if samples is None else _value(samples, "instructrec_cache_errors_total")


def _version(body: dict) -> str | None:
    model = body.get("model")
    return model.get("checkpoint_version") if isinstance(model, dict) else None


async def _references(url: str, bodies: Sequence[bytes], timeout: float) -> tuple[str, list[list[tuple[int, float]]]]:
    """(the version that answered, each request's answer sent alone)."""
    import httpx

    refs, versions = [], set()
    async with httpx.AsyncClient(base_url=url, timeout=timeout, trust_env=False) as client:
        for k, body in enumerate(bodies):
            r = await client.post("/rerank", content=body, headers={"content-type": "application/json"})
            if r.status_code != 200:
                raise BenchError(f"reference request {k} answered {r.status_code}: {r.text[:300]}")
            refs.append(_answer(r.json()))
            versions.add(_version(r.json()))
    if len(versions) != 1:
        raise BenchError(f"the references were answered by {len(versions)} model versions: "
                         f"{sorted(map(str, versions))}")
    return versions.pop(), refs


def reload(url: str, model: str | None, timeout: float) -> dict[str, Any]:
    """``POST /admin/reload`` (a swap to ``model``): its status, answer and time as the bench saw them."""
    import httpx

    t0 = time.perf_counter()
    try:
        r = httpx.post(f"{url}/admin/reload", json={"model": model} if model else {}, timeout=timeout, trust_env=False)
    except httpx.HTTPError as exc:
        return {"status": f"lost: {type(exc).__name__}", "seconds": time.perf_counter() - t0}
    out: dict[str, Any] = {"status": r.status_code, "seconds": time.perf_counter() - t0}
    if r.status_code == 200:
        body = r.json()
        out.update(to=body["model"]["checkpoint_version"], **{"from": body["previous"]["checkpoint_version"]})
    else:
        out["error"] = r.text[:300]
    return out


async def _all_references(url: str, bodies: Sequence[bytes], timeout: float, swap_model: str | None) -> dict:
    """Each request's answer alone, by version: the served model's, and with ``swap_model`` that
    one's too (swapped to and back before the load)."""
    version, refs = await _references(url, bodies, timeout)
    out = {version: refs}
    if swap_model:
        loop = asyncio.get_running_loop()
        for target in (swap_model, None):  # None: back to the service's configured model
            swap = await loop.run_in_executor(None, reload, url, target, timeout)
            if swap["status"] != 200:
                raise BenchError(f"swapping to {target} for the references answered {swap['status']}: "
                                 f"{swap.get('error')}")
            if target == swap_model:
                other, other_refs = await _references(url, bodies, timeout)
                out[other] = other_refs
    return out


async def _load(url: str, bodies: Sequence[bytes], refs, plan: Sequence[int], clients: int, burst: int,
                timeout: float, max_seconds: float, fault, log: FaultLog, obey_retry_after: bool = True,
                resend: bool = False) -> tuple[list[Outcome], float]:
    """The load phase: ``clients`` workers take the next request of ``plan`` until it is done (a
    worker refused with Retry-After waits that long first, as the Cohere SDKs do); a fault runs
    when the sent count crosses its point (Redis stop/start in a thread: they block a moment)."""
    import httpx

    limits = httpx.Limits(max_connections=clients + burst, max_keepalive_connections=clients + burst)
    headers = {"content-type": "application/json"}
    outcomes: list[Outcome] = []
    sent = 0
    start = time.perf_counter()
    deadline = start + max_seconds
    pending_faults = sorted(fault.points(len(plan)))
    fault_tasks: list[asyncio.Future] = []
    swapping: list[asyncio.Future] = []  # the swap fault's reload, once started
    loop = asyncio.get_running_loop()

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, trust_env=False) as client:

        async def one(seq: int, ref: int, is_burst: bool) -> tuple[float, Outcome]:
            """Send one request and check its answer; returns the Retry-After it asked for (0 if none)
            and its outcome."""
            t0 = time.perf_counter()
            try:
                r = await client.post("/rerank", content=bodies[ref], headers=headers)
            except httpx.HTTPError as exc:
                outcomes.append(Outcome(seq, ref, f"lost: {type(exc).__name__}", (time.perf_counter() - t0) * 1000,
                                        burst=is_burst))
                return 0.0, outcomes[-1]
            o = Outcome(seq, ref, str(r.status_code), (time.perf_counter() - t0) * 1000, _server_ms(r.headers),
                        retry_after="retry-after" in r.headers, burst=is_burst)
            if r.status_code == 200:
                body = r.json()
                cache = body.get("cache") or {}
                o.hits, o.misses, o.cache_enabled = int(cache.get("hits", 0)), int(cache.get("misses", 0)), bool(
                    cache.get("enabled"))
                o.version = _version(body)
                o.wrong = compare(refs[o.version][ref], _answer(body)) if o.version in refs else \
                    f"answered by version {o.version}, not one of {sorted(refs)}"
            outcomes.append(o)
            try:
                return float(r.headers.get("retry-after", 0)), o
            except ValueError:
                return 0.0, o

        fault_order = asyncio.Lock()

        async def worker() -> None:
            nonlocal sent
            while sent < len(plan) and time.perf_counter() < deadline:
                seq = sent
                sent += 1
                while pending_faults and seq >= pending_faults[0][0]:
                    _, name = pending_faults.pop(0)
                    # in plan order: a fault popped by another worker meanwhile (the burst) waits
                    # until this one is done (Redis back up), however long a busy machine takes
                    async with fault_order:
                        if name == "burst":
                            fault_tasks.append(asyncio.ensure_future(asyncio.gather(
                                *(one(len(plan) + k, plan[(seq + k) % len(plan)], True) for k in range(burst)))))
                            log.mark("burst", seq, None)
                        elif name == "swap":  # in a thread, while the clients go on sending
                            swapping.append(loop.run_in_executor(None, fault.run, name, seq))
                            fault_tasks.append(swapping[0])
                        else:  # Redis stop/start run in a thread: they block for a moment
                            await loop.run_in_executor(None, fault.run, name, seq)
                if swapping and seq >= int(len(plan) * SWAPPED_BY):
                    await asyncio.shield(swapping[0])
                for attempt in range(MAX_RESENDS + 1):
                    wait, outcome = await one(seq, plan[seq], False)
                    if wait and obey_retry_after:  # a polite client: it waits as told before its next request
                        await asyncio.sleep(min(wait, MAX_RETRY_AFTER_S))
                    if not (wait and resend) or attempt == MAX_RESENDS:
                        break
                    outcome.retried = True  # sent again: the next attempt is this request's outcome

        await asyncio.gather(*(worker() for _ in range(clients)))
        if fault_tasks:
            await asyncio.gather(*fault_tasks)
    return outcomes, time.perf_counter() - start


class _Faults:
    """The fault plan: which points, and what each does to the bench's own Redis."""

    def __init__(self, names: Sequence[str], fixture: _Fixture, log: FaultLog, swap_model: str | None = None,
                 timeout: float = 60.0):
        self.names = set(names)
        self.fixture = fixture
        self.log = log
        self.swap_model = swap_model
        self.timeout = timeout
        self.swap: dict[str, Any] | None = None  # the swap's outcome
        self._lock = threading.Lock()

    def points(self, total: int) -> list[tuple[int, str]]:
        out = []
        if "redis" in self.names:
            out += [(int(total * STOP_AT), "stop_redis"), (int(total * START_AT), "start_redis")]
        if "burst" in self.names:
            out.append((int(total * BURST_AT), "burst"))
        if "swap" in self.names:
            out.append((int(total * SWAP_AT), "swap"))
        return sorted(out)

    def run(self, name: str, sent: int) -> None:
        if name == "swap":  # not under the lock: Redis faults may come while the model loads
            self.log.mark("swap_started", sent, None)
            self.swap = reload(self.fixture.url, self.swap_model, self.timeout)
            self.log.mark("swapped" if self.swap["status"] == 200 else "swap_failed", sent, None)
            return
        with self._lock:
            redis = self.fixture.redis
            if name == "stop_redis":
                self.log.mark("before_stop", sent, _cache_errors(self.fixture.url))
                redis.stop()
                self.log.mark("redis_stopped", sent, None)
            elif name == "start_redis":
                self.log.mark("before_start", sent, _cache_errors(self.fixture.url))
                redis.start()
                self.log.mark("redis_started", sent, _cache_errors(self.fixture.url))


def _windows(outcomes: list[Outcome], total: int) -> list[dict[str, Any]]:
    """Outcomes, and the cache hit ratio of the answered requests, in ``WINDOWS`` slices of the
    send order."""
    size = max(1, -(-total // WINDOWS))
    rows = []
    for a in range(0, total, size):
        window = [o for o in outcomes if not o.burst and a <= o.seq < a + size]
        part = [o for o in window if o.status == "200"]
        hits, misses = sum(o.hits for o in part), sum(o.misses for o in part)
        rows.append({"from": a, "to": min(total, a + size), "answered": len(part),
                     "outcomes": dict(Counter(o.status for o in window)),
                     "hit_ratio": hits / (hits + misses) if hits + misses else None,
                     "uncached": sum(1 for o in part if not o.cache_enabled)})
    return rows


def summarize(outcomes: list[Outcome], wall: float, log: FaultLog, before: float | None, after: float | None,
              total: int, swap: dict[str, Any] | None = None, resend: bool = False) -> dict[str, Any]:
    retries = sum(1 for o in outcomes if o.retried)
    outcomes = [o for o in outcomes if not o.retried]  # each request's last attempt
    ok = [o for o in outcomes if o.status == "200"]
    lat = [o.latency_ms for o in ok]
    server = [o.server_ms for o in ok if o.server_ms is not None]
    refused = [o for o in outcomes if o.status in ("429", "503")]
    other = [o for o in outcomes if o.status not in ("200", "429", "503") and not o.status.startswith("lost")]
    lost = [o for o in outcomes if o.status.startswith("lost")]
    expected = total + sum(1 for o in outcomes if o.burst)
    events = {e["event"]: e for e in log.events}
    up_errors = None
    if before is not None and after is not None:
        if "before_stop" in events and "redis_started" in events:
            up_errors = ((events["before_stop"]["cache_errors"] or 0) - before) + (
                after - (events["redis_started"]["cache_errors"] or 0))
        else:
            up_errors = after - before
    return {
        "sent": len(outcomes), "planned": expected, "answered": len(ok), "requests_per_s": len(ok) / wall if wall else None,
        "wall_s": wall, "outcomes": dict(Counter(o.status for o in outcomes)),
        "burst_outcomes": dict(Counter(o.status for o in outcomes if o.burst)),
        "lost": len(lost), "not_sent": expected - len(outcomes),  # not sent: --max-seconds ran out first
        "wrong": sum(1 for o in ok if o.wrong), "wrong_examples": [o.wrong for o in ok if o.wrong][:5],
        "refused_without_retry_after": sum(1 for o in refused if not o.retry_after),
        "unexpected_status": len(other),
        "p50_ms": report.percentile(lat, 50), "p95_ms": report.percentile(lat, 95),
        "p99_ms": report.percentile(lat, 99), "max_ms": max(lat) if lat else None,
        "server_p50_ms": report.percentile(server, 50), "server_p95_ms": report.percentile(server, 95),
        "server_p99_ms": report.percentile(server, 99),
        "cache_errors_before": before, "cache_errors_after": after, "cache_errors_while_redis_up": up_errors,
        "fault_events": log.events, "hit_ratio_windows": _windows(outcomes, total),
        "versions": dict(Counter(o.version for o in ok)), "swap": swap, "resend": resend, "retries": retries,
        "unanswered_after_resend": sum(1 for o in outcomes if not o.burst and o.status != "200") if resend else None,
    }


def passed(s: dict[str, Any]) -> bool:
    """The soak's verdict: every planned request sent and answered, nothing wrong, every refusal
    with Retry-After, no other status, no cache error while Redis was up (when known), a swap
    fault's swap done, and with ``resend`` every request answered in the end."""
    return (s["lost"] == 0 and s.get("not_sent", 0) == 0 and s["wrong"] == 0 and s["refused_without_retry_after"] == 0
            and s["unexpected_status"] == 0 and not s.get("cache_errors_while_redis_up")
            and (s.get("swap") is None or s["swap"].get("status") == 200) and not s.get("unanswered_after_resend"))


def run_soak(*, model: str | None = None, url: str | None = None, clients: int = 200, requests: int = 4000,
             distinct: int = 40, candidates: int = 10, history: int = 20, faults: Sequence[str] = DEFAULT_FAULTS,
             swap_model: str | None = None, resend: bool = False,
             burst: int = 128, timeout: float = 60.0, max_seconds: float = 1200.0, settings: Sequence[str] = (),
             threads: int | None = None, seed: int = 0, dataset: str = "games", log_dir: Path = report.DEFAULT_OUT
             ) -> dict[str, Any]:
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise BenchError(f"unknown fault(s) {', '.join(sorted(unknown))}; choose from {', '.join(FAULTS)}")
    if url and "redis" in faults:
        raise BenchError("the redis fault stops the service's Redis, which the bench does not own with --url; "
                         "use --faults burst (or none) with --url")
    if ("swap" in faults) != bool(swap_model):
        raise BenchError("the swap fault needs --swap-model (the model version to swap to), and --swap-model the "
                         "swap fault")
    if min(clients, requests, distinct, candidates) < 1 or burst < 0:
        raise BenchError("--clients, --requests, --distinct, --candidates >= 1 and --burst >= 0")

    workload = Workload(load_dataset(dataset), history=history, seed=seed)
    bodies = workload.make(distinct, candidates)
    rng = random.Random(seed)
    plan = [rng.randrange(distinct) for _ in range(requests)]
    fixture = _Fixture(model, url, settings, threads, Path(log_dir), with_redis="redis" in faults or not url)
    try:
        ready = (fixture.server or _Server(fixture.url)).wait_ready()
        t0 = time.monotonic()
        refs = asyncio.run(_all_references(fixture.url, bodies, timeout, swap_model))
        reference_s = time.monotonic() - t0
        if fixture.redis is not None:
            fixture.redis.command("FLUSHALL")  # the load starts cold
        log = FaultLog()
        before = _cache_errors(fixture.url)
        fault = _Faults(faults, fixture, log, swap_model, timeout)
        outcomes, wall = asyncio.run(_load(fixture.url, bodies, refs, plan, clients, burst if "burst" in faults else 0,
                                           timeout, max_seconds, fault, log, resend=resend))
        after = _cache_errors(fixture.url)
    finally:
        fixture.close()
    start = log.events[0]["at_s"] if log.events else 0.0
    for e in log.events:
        e["at_s"] = round(e["at_s"] - start, 3)
    summary = summarize(outcomes, wall, log, before, after, len(plan), fault.swap if swap_model else None, resend)
    return {
        "model": ready.get("model", {}).get("name") if isinstance(ready.get("model"), dict) else model,
        "machine": report.machine_info(), "workload": workload.description(),
        "config": {"clients": clients, "requests": requests, "distinct": distinct, "candidates": candidates,
                   "history": history, "faults": list(faults), "burst": burst if "burst" in faults else 0,
                   "swap_model": swap_model, "resend": resend,
                   "timeout_s": timeout, "seed": seed, "dataset": dataset, "url": url,
                   "settings": getattr(fixture, "settings", None)},
        "reference_seconds": reference_s, **summary, "passed": passed(summary),
    }
