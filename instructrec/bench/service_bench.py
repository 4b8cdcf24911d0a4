"""``instructrec bench service``: load-test /rerank with real Games requests.

The bench starts the service itself on 127.0.0.1 (a child process running the service's
own ``create_app`` under uvicorn, or uvicorn in a thread with ``--server thread``), once per
batching mode, each with a fresh cache namespace -- or it talks to an already-running
service given by ``--url`` (loopback addresses only; anything else is refused).

Requests: a real Games user's history (a window of ``--history`` consecutive titles, 20 by
default) and ``N`` real catalogue titles as candidates, none from the history. Every
(instruction, candidate) pair is used once in the whole run, so with a fresh namespace the
*cold* phase has no cache hits; the *warm* phase replays the cold phase's successful
requests unchanged, so every candidate is a hit, cycling through them up to the cell's
request count when the cold phase ran out of time first (a 100-candidate cold cell may get
through only a dozen requests in ``--duration``, too few for a steady p50 of cached requests).
Both batching modes get the same requests.

Load: for every (candidates, concurrency) cell, ``concurrency`` clients (one
``httpx.AsyncClient``, one connection each) send requests back to back until the cell's
``--requests`` are sent or ``--duration`` seconds have passed. Per cell: client latency
p50/p95/p99, requests/s, errors by status, server-side time (a timing header the bench's
server adds; the service's request histogram for an external --url), cache hits from the
responses, and the mean batch size from the service's ``instructrec_batch_size`` metric.

Batching **off** = ``max_batch_requests=1`` and ``max_wait_ms=0`` (service settings), so every
batch holds exactly one request; the ranker's own per-forward budget (``Settings.batch_tokens``) is unchanged, so
each request is scored exactly as with batching on. (``batch_tokens`` alone cannot turn
batching off without also shrinking the ranker's forward passes: the service uses one
setting for both.)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import logging
import math
import os
import random
import re
import subprocess
import sys
import time
import unicodedata
import urllib.parse
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from instructrec.service.loopback import ThreadedServer, free_port

from . import report, service_floor

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
READY_TIMEOUT_S = 600.0
PHASES = ("cold", "warm")
MODES = ("on", "off")


class BenchError(Exception):
    """The bench cannot run as asked (bad URL, server did not start, ...)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- loopback only ---------------------------------------------------------------------------


def loopback_error(url: str) -> str | None:
    """Why ``url`` is not acceptable (None if it is an http(s) URL on a loopback host)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        return f"invalid URL {url!r}: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"URL {url!r} must start with http:// or https://"
    if not host:
        return f"URL {url!r} has no host"
    if host.lower() == "localhost":
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return (f"refusing to benchmark {host}: only loopback hosts are allowed (localhost, 127.0.0.0/8, ::1); "
                f"host names other than localhost are not resolved")
    if not address.is_loopback:
        return f"refusing to benchmark {host}: not a loopback address (only localhost, 127.0.0.0/8, ::1)"
    return None


# --- requests ------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())  # what the service keys the cache on


class Workload:
    """Real Games requests; every (instruction, candidate) pair is handed out once per run."""

    def __init__(self, data, history: int = 20, seed: int = 0):
        self.data = data
        self.history = history
        self.rng = random.Random(seed)
        windows = [(u, e) for u in sorted(data.sequences) for e in range(history, len(data.sequences[u]) + 1)]
        self.full_history = bool(windows)
        if not windows:  # no user has `history` items: each user's whole sequence
            windows = [(u, len(s)) for u, s in sorted(data.sequences.items()) if s]
        self.rng.shuffle(windows)
        self.windows = windows
        self.users = len({u for u, _ in windows})
        self.titles = sorted({_norm(it.title) for it in data.items.values() if it.title and _norm(it.title)})
        self._used: dict[tuple[str, int], set[str]] = defaultdict(set)
        self._next = 0

    def titles_of(self, window: tuple[str, int]) -> list[str]:
        user, end = window
        seq = self.data.sequences[user][max(0, end - self.history):end]
        return [t for t in (_norm(self.data.items[x.item_id].title) for x in seq) if t]

    def make(self, count: int, candidates: int) -> list[bytes]:
        """``count`` request bodies with ``candidates`` candidates each."""
        out = []
        for _ in range(count):
            window = self.windows[self._next % len(self.windows)]
            self._next += 1
            hist = self.titles_of(window)
            banned = set(hist) | self._used[window]
            if len(self.titles) - len(banned) < candidates:
                raise BenchError(f"the catalogue has too few unused titles for {candidates} more candidates")
            chosen: list[str] = []
            seen: set[str] = set()
            while len(chosen) < candidates:
                t = self.titles[self.rng.randrange(len(self.titles))]
                if t not in banned and t not in seen:
                    seen.add(t)
                    chosen.append(t)
            self._used[window] |= seen
            out.append(json.dumps({"history": hist, "candidates": chosen}).encode())
        return out

    def description(self) -> str:
        length = f"{self.history} consecutive titles" if self.full_history else "whole (shorter) histories"
        return (f"real Games histories ({length} of one user, {len(self.windows)} windows from {self.users} users) "
                f"and real catalogue titles as candidates ({len(self.titles)} titles, none from the request's "
                f"history); every (instruction, candidate) pair is used once per run; no instruction text, so "
                f"the service selects its history-only template")


# --- the bench's server ------------------------------------------------------------------------


def bench_app(overrides: dict[str, Any]):
    """The service's own app (``create_app``) with the mode's settings; it reports its time to
    the response headers in ``Server-Timing``."""
    from instructrec.service.app import create_app
    from instructrec.service.settings import Settings

    return create_app(Settings(**overrides))


def _child_main(argv: Sequence[str]) -> int:
    """``python -m instructrec.bench.service_bench serve-child``: the bench's server process."""
    parser = argparse.ArgumentParser(prog="instructrec.bench.service_bench serve-child")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--settings", required=True, help="JSON object of Settings overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    app = bench_app(json.loads(args.settings))
    keep_alive = app.state.service.settings.keep_alive_seconds  # as `instructrec serve` runs it
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="on",
                timeout_keep_alive=keep_alive)
    return 0


class _Server:
    """A service to wait for: its base URL."""

    def __init__(self, url: str):
        self.url = url

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict:
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5, trust_env=False) as client:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    r = client.get("/ready")
                except httpx.HTTPError:
                    time.sleep(0.1)
                    continue
                if r.status_code == 200:
                    return r.json()
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                if body.get("status") == "failed":
                    raise BenchError(f"the service failed to load: {body.get('error')}")
                time.sleep(0.1)
        raise BenchError(f"the service at {self.url} was not ready after {timeout:.0f} s")

    def check_alive(self) -> None:
        pass


class ChildServer(_Server):
    """The service in a child process (``python -m instructrec.bench.service_bench serve-child``)."""

    def __init__(self, overrides: dict[str, Any], log_path: Path):
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.log_path = log_path
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # this checkout's instructrec
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "instructrec.bench.service_bench", "serve-child", "--port", str(self.port),
               "--settings", json.dumps(overrides)]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=root)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-15:]
            raise BenchError(f"the service process exited with code {self.proc.returncode}:\n" + "\n".join(tail))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


class ThreadServer(_Server):
    """The service under uvicorn in a thread of this process (shares the GIL with the clients)."""

    def __init__(self, overrides: dict[str, Any], log_path: Path):
        self.threaded = ThreadedServer(bench_app(overrides), name="bench-uvicorn")
        super().__init__(self.threaded.url)
        try:
            self.threaded.start()
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None

    def check_alive(self) -> None:
        if not self.threaded.alive:
            raise BenchError("the in-thread service stopped")

    def stop(self) -> None:
        self.threaded.stop()


# --- metrics ---------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                out.append((m.group(1), dict(_LABEL.findall(m.group(3) or "")), float(m.group(4))))
            except ValueError:
                continue
    return out


def _value(samples, name: str, **labels) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def _buckets(samples, name: str, **labels) -> dict[float, float]:
    out: dict[float, float] = {}
    for n, lab, v in samples:
        if n == f"{name}_bucket" and all(lab.get(k) == w for k, w in labels.items()):
            le = math.inf if lab.get("le") in ("+Inf", "inf") else float(lab["le"])
            out[le] = out.get(le, 0.0) + v
    return out


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus-style quantile (linear within a bucket) of cumulative bucket counts."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in items:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return le if c == prev_c else prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def scrape(url: str, headers: dict[str, str]) -> list | None:
    import httpx

    try:
        r = httpx.get(f"{url}/metrics", headers=headers, timeout=10, trust_env=False)
    except httpx.HTTPError:
        return None
    return parse_metrics(r.text) if r.status_code == 200 else None


def metric_delta(before, after) -> dict[str, Any]:
    """Batches and server-side /rerank 200 histogram over a cell, from two scrapes."""
    if before is None or after is None:
        return {}
    batches = _value(after, "instructrec_batch_size_count") - _value(before, "instructrec_batch_size_count")
    jobs = _value(after, "instructrec_batch_size_sum") - _value(before, "instructrec_batch_size_sum")
    b0 = _buckets(before, "instructrec_request_duration_seconds", route="/rerank", status="200")
    b1 = _buckets(after, "instructrec_request_duration_seconds", route="/rerank", status="200")
    delta = {le: b1.get(le, 0.0) - b0.get(le, 0.0) for le in b1}
    breakdown = {}
    for part, name in (("prepare", "instructrec_prepare_seconds"), ("queue", "instructrec_queue_seconds"),
                       ("encode", "instructrec_encode_seconds"), ("decode", "instructrec_decode_seconds")):
        n = _value(after, f"{name}_count") - _value(before, f"{name}_count")
        total = _value(after, f"{name}_sum") - _value(before, f"{name}_sum")
        breakdown[part] = total / n * 1000 if n else None
    cpu = (_value(after, "process_cpu_seconds_total") - _value(before, "process_cpu_seconds_total")
           if any(name == "process_cpu_seconds_total" for name, _, _ in after) else None)
    return {"batches": int(batches), "mean_batch_size": jobs / batches if batches else None, "request_buckets": delta,
            "server_mean_ms": breakdown, "server_cpu_s": cpu}


# --- load generation -----------------------------------------------------------------------------


@dataclass
class Sample:
    index: int
    latency_ms: float
    status: str  # HTTP status code, or the exception's name
    server_ms: float | None = None
    hits: int = 0
    misses: int = 0
    cache_enabled: bool = False


def _server_ms(headers) -> float | None:
    timing = headers.get("server-timing")
    if timing:
        m = re.search(r"dur=([0-9.]+)", timing)
        if m:
            return float(m.group(1))
    return None


async def _run_cell(url: str, bodies: Sequence[bytes], concurrency: int, duration: float, timeout: float,
                    headers: dict[str, str]) -> tuple[list[Sample], float]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    req_headers = {**headers, "content-type": "application/json"}
    samples: list[Sample] = []
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, trust_env=False) as client:
        # open the connections first, so the cell measures requests, not TCP set-up
        await asyncio.gather(*(client.get("/health") for _ in range(concurrency)), return_exceptions=True)
        queue = iter(range(len(bodies)))
        start = time.perf_counter()
        deadline = start + duration
        last_done = start

        async def worker() -> None:
            nonlocal last_done
            while time.perf_counter() < deadline:
                i = next(queue, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    r = await client.post("/rerank", content=bodies[i], headers=req_headers)
                    t1 = time.perf_counter()
                    s = Sample(i, (t1 - t0) * 1000, str(r.status_code), _server_ms(r.headers))
                    if r.status_code == 200:
                        cache = r.json().get("cache") or {}
                        s.hits, s.misses = int(cache.get("hits", 0)), int(cache.get("misses", 0))
                        s.cache_enabled = bool(cache.get("enabled"))
                except httpx.TimeoutException:
                    t1 = time.perf_counter()
                    s = Sample(i, (t1 - t0) * 1000, "timeout")
                except httpx.HTTPError as exc:
                    t1 = time.perf_counter()
                    s = Sample(i, (t1 - t0) * 1000, type(exc).__name__)
                samples.append(s)
                last_done = max(last_done, t1)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, last_done - start


def summarize(samples: list[Sample], wall: float, delta: dict[str, Any]) -> dict[str, Any]:
    ok = [s for s in samples if s.status == "200"]
    lat = [s.latency_ms for s in ok]
    server = [s.server_ms for s in ok if s.server_ms is not None]
    out: dict[str, Any] = {
        "status": "ok", "sent": len(samples), "ok": len(ok),
        "errors": dict(Counter(s.status for s in samples if s.status != "200")),
        "wall_s": wall, "requests_per_s": len(ok) / wall if wall > 0 else None,
        "p50_ms": report.percentile(lat, 50), "p95_ms": report.percentile(lat, 95),
        "p99_ms": report.percentile(lat, 99), "mean_ms": sum(lat) / len(lat) if lat else None,
        "max_ms": max(lat) if lat else None,
    }
    if server:
        out.update(server_p50_ms=report.percentile(server, 50), server_p95_ms=report.percentile(server, 95),
                   server_ms_source="header")
    elif delta.get("request_buckets"):
        p50 = histogram_quantile(0.5, delta["request_buckets"])
        p95 = histogram_quantile(0.95, delta["request_buckets"])
        out.update(server_p50_ms=p50 * 1000 if p50 is not None else None,
                   server_p95_ms=p95 * 1000 if p95 is not None else None, server_ms_source="histogram")
    hits, misses = sum(s.hits for s in ok), sum(s.misses for s in ok)
    enabled = any(s.cache_enabled for s in ok)
    out.update(cache_hits=hits, cache_misses=misses,
               cache_hit_fraction=hits / (hits + misses) if enabled and hits + misses else None,
               fully_cached=sum(1 for s in ok if s.cache_enabled and s.misses == 0 and s.hits > 0),
               mean_batch_size=delta.get("mean_batch_size"), batches=delta.get("batches"),
               server_mean_ms=delta.get("server_mean_ms"))
    cpu = delta.get("server_cpu_s")
    # CPU seconds the serving process spent per answer (all its threads): N CPUs cannot answer
    # more than N / this per second, whatever the concurrency
    out["server_cpu_ms_per_request"] = cpu / len(ok) * 1000 if cpu is not None and ok else None
    return out


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Mode:
    name: str
    overrides: dict[str, Any]
    description: str
    namespace: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def _parse_sets(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--set expects KEY=VALUE, not {item!r}")
        out[key.strip().lower().replace("-", "_")] = value
    return out


def _settings(overrides: dict[str, Any]):
    from pydantic import ValidationError

    from instructrec.service.settings import Settings

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise BenchError(f"setting {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


def _redis_ok(url: str) -> bool:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means no cache for the bench
        return False


def _delete_namespace(url: str, namespace: str) -> int:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i:i + 1000])
            return len(keys)
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - best effort; keys expire with their TTL anyway
        return 0


def _public(settings) -> dict[str, Any]:
    data = settings.model_dump(exclude={"api_key"})
    data["api_key_set"] = settings.api_key is not None
    return data


@dataclass
class ServiceBenchConfig:
    """What ``instructrec bench service`` measures (its options, see :mod:`instructrec.bench.cli`)."""

    model: str = "minilm-bert2bert"
    url: str | None = None
    api_key: str | None = None
    concurrency: Sequence[int] = (1, 8, 32, 128)
    candidates: Sequence[int] = (10, 100)
    requests: int = 256
    duration: float = 30.0
    timeout: float = 120.0
    history: int = 20
    batching: Sequence[str] = MODES
    phases: Sequence[str] = PHASES
    redis_url: str = DEFAULT_REDIS
    server: str = "subprocess"
    settings: Sequence[str] = ()
    threads: int | None = None
    seed: int = 0
    dataset: str = "games-sample"
    log_dir: str | Path = report.DEFAULT_OUT
    peak_size: int = service_floor.PEAK_SIZE

    def checked(self) -> "ServiceBenchConfig":
        """The config with the URL, concurrency and candidate counts normalised; BenchError if unusable."""
        url = self.url
        if url is not None:
            why = loopback_error(url)
            if why:
                raise BenchError(why)
            url = url.rstrip("/")
        bad = [p for p in self.phases if p not in PHASES] + [m for m in self.batching if m not in MODES]
        if bad:
            raise BenchError(f"unknown phase/mode {', '.join(bad)} (phases: cold,warm; batching: on,off)")
        if not self.phases or (url is None and not self.batching):
            raise BenchError("nothing to run: give at least one phase and one batching mode")
        if self.requests < 1 or self.duration <= 0 or self.timeout <= 0 or self.history < 1 or self.peak_size < 8:
            raise BenchError("--requests, --duration, --timeout and --history must be positive, --peak-size >= 8")
        return dataclasses.replace(self, url=url, concurrency=sorted(set(self.concurrency)),
                                   candidates=sorted(set(self.candidates)))


@dataclass
class _Load:
    """The requests every mode replays and how: cell (candidates, concurrency) -> bodies."""

    bodies: dict[tuple[int, int], list[bytes]]
    warmup_bodies: dict[int, list[bytes]]
    sizes: Sequence[int]
    concurrency: Sequence[int]
    phases: Sequence[str]
    duration: float
    timeout: float
    headers: dict[str, str]


@dataclass
class _Setup:
    """How the measured service was set up: its modes, server and cache, for the report."""

    modes: dict[str, Mode]
    server: dict[str, Any]
    cache: dict[str, Any]
    floor: dict[str, Any] = field(default_factory=dict)  # the service_floor section


def run_bench(progress: Callable[[str], None] = log, **options) -> dict[str, Any]:
    """Run the service bench (``options``: the fields of :class:`ServiceBenchConfig`); returns the
    ``service`` section of results.json."""
    cfg = ServiceBenchConfig(**options).checked()
    machine = report.machine_info()
    import torch

    default_threads = torch.get_num_threads()  # torch's default here, before any in-thread service sets it

    from .ranker_bench import load_games

    key = cfg.api_key if cfg.api_key is not None else (os.environ.get("INSTRUCTREC_API_KEY") or None)
    workload = Workload(load_games(cfg.dataset), history=cfg.history, seed=cfg.seed)
    # The same request bodies for every mode.
    load = _Load(bodies={(n, c): workload.make(cfg.requests, n) for n in cfg.candidates for c in cfg.concurrency},
                 warmup_bodies={n: workload.make(2, n) for n in cfg.candidates}, sizes=cfg.candidates,
                 concurrency=cfg.concurrency, phases=cfg.phases, duration=cfg.duration, timeout=cfg.timeout,
                 headers={})
    cells: list[dict[str, Any]] = []
    if cfg.url is not None:
        if key:
            load.headers["Authorization"] = f"Bearer {key}"
        setup = _bench_external(cfg.url, load, cells, progress)
        setup.floor = service_floor.skipped("--url: the bench does not know the remote service's model")
    else:
        setup = _bench_started(cfg, load, cells, progress)
        setup.floor = _floor(cfg, load, setup, default_threads, progress)
    service_floor.apply(cells, setup.floor)
    if cfg.url is None and cfg.server == "thread":
        for cell in cells:  # the process is the bench's too: its CPU time counts the clients
            cell["server_cpu_ms_per_request"] = None
    return {
        "kind": "service",
        "machine": machine,
        "config": {"concurrency": cfg.concurrency, "candidates": cfg.candidates, "requests": cfg.requests,
                   "duration_s": cfg.duration, "timeout_s": cfg.timeout, "history": cfg.history,
                   "phases": list(cfg.phases), "seed": cfg.seed, "dataset": cfg.dataset, "url": cfg.url},
        "server": setup.server,
        "modes": {n: {"description": m.description, "settings": m.settings or None} for n, m in setup.modes.items()},
        "cache": setup.cache,
        "workload": {"description": workload.description()},
        "cells": cells,
        "cached_request": _cached_summary(cells),
        **setup.floor,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _floor(cfg: ServiceBenchConfig, load: _Load, setup: _Setup, default_threads: int, progress) -> dict[str, Any]:
    """The floor of the cells just measured (after them, the services stopped): the first mode's
    settings (the modes differ in batching only) and every request built per candidate count."""
    mode = next(iter(setup.modes.values()))
    bodies = {n: [b for c in load.concurrency for b in load.bodies[(n, c)]] for n in load.sizes}
    return service_floor.measure(mode.overrides, mode.settings, setup.server.get("precision"), bodies,
                                 default_threads, cfg.peak_size, progress)


def _bench_external(url: str, load: _Load, cells: list, progress) -> _Setup:
    """Measure a service already running at ``url``, as it is configured."""
    mode = Mode("external", {}, f"as configured by the service at {url} (the bench changes nothing)")
    info = _Server(url).wait_ready(timeout=30)
    server_info = {"description": f"already running at {url} (--url)", "url": url,
                   "model": (info.get("model") or {}).get("name"),
                   "checkpoint_version": (info.get("model") or {}).get("checkpoint_version"),
                   "cache": info.get("cache")}
    cache_enabled = info.get("cache") == "up"
    cache_info = {"description": f"the service's own (reported {info.get('cache')!r}); cold = requests unique "
                                 f"within this run, so hits in the cold phase can only come from earlier runs "
                                 f"(see the cache hits column)", "enabled": cache_enabled}
    _run_mode(mode, url, load, cache_enabled, cells, progress)
    return _Setup({mode.name: mode}, server_info, cache_info)


def _bench_started(cfg: ServiceBenchConfig, load: _Load, cells: list, progress) -> _Setup:
    """Start one service per batching mode on loopback (all warmed up first), measure each in turn."""
    base = {"model": cfg.model, "log_level": "warning"}
    if cfg.threads:
        base["torch_threads"] = cfg.threads
    base.update(_parse_sets(cfg.settings))
    redis_url = cfg.redis_url
    cache_enabled = bool(redis_url.strip()) and _redis_ok(redis_url)
    if redis_url.strip() and not cache_enabled:
        progress(f"no Redis at {redis_url}: the service runs without cache, warm phases are skipped")
    base["redis_url"] = redis_url if cache_enabled else ""
    modes = _modes(base, cfg.batching, cache_enabled, uuid.uuid4().hex[:10])
    cache_info = {"enabled": cache_enabled,
                  "description": (f"Redis {redis_url}, a fresh namespace per batching mode (deleted afterwards); "
                                  f"cold = requests never sent before in that namespace, warm = the same "
                                  f"requests again" if cache_enabled else
                                  "disabled (no Redis): every request is scored; warm phases skipped")}
    server_cls = ChildServer if cfg.server == "subprocess" else ThreadServer
    how = ("a child process (python -m instructrec.bench.service_bench serve-child) running instructrec.service.app.create_app under "
           "uvicorn" if cfg.server == "subprocess" else "uvicorn in a thread of the bench process")
    server_info = {"description": f"started by the bench on 127.0.0.1: {how}, one per batching mode, all "
                                  f"started (and warmed up) before any measurement, each idle while another "
                                  f"mode is measured; model {cfg.model}", "kind": cfg.server, "model": cfg.model}
    servers: dict[str, _Server] = {}
    try:
        progress(f"starting the service ({', '.join(f'batching {n}' for n in modes)}) ...")
        for name, mode in modes.items():
            servers[name] = server_cls(mode.overrides, Path(cfg.log_dir) / f"service-server-{name}.log")
        for name, srv in servers.items():
            info = srv.wait_ready()
            server_info["checkpoint_version"] = (info.get("model") or {}).get("checkpoint_version")
            server_info["precision"] = (info.get("model") or {}).get("precision")
        for name, mode in modes.items():
            _run_mode(mode, servers[name].url, load, cache_enabled, cells, progress)
    finally:
        for name, srv in servers.items():
            srv.stop()
            if cache_enabled and modes[name].namespace:
                _delete_namespace(redis_url, modes[name].namespace)
    return _Setup(modes, server_info, cache_info)


def _modes(base: dict[str, Any], batching: Sequence[str], cache_enabled: bool, run_id: str) -> dict[str, Mode]:
    """The service settings of each batching mode (on: as configured; off: one request per batch)."""
    on = _settings(base)
    modes: dict[str, Mode] = {}
    for name in batching:
        overrides = dict(base)
        if cache_enabled:
            overrides["cache_namespace"] = f"instructrec-bench:{run_id}:{name}"
        if name == "on" and on.batch_invariant:
            desc = ("the service as configured: batch_invariant, so each request is scored in forward passes "
                    "of its own and a batch holds one request (none waits for others to join); up to "
                    f"{on.lanes} at once, one per lane")
        elif name == "on":
            desc = (f"the service as configured: a batch collects requests until {on.batch_tokens} tokens "
                    f"(instruction + candidates) or {on.max_wait_ms:g} ms after its first request")
        else:
            overrides["max_wait_ms"] = 0
            overrides["max_batch_requests"] = 1
            desc = (f"max_batch_requests=1 and max_wait_ms=0, so every batch holds exactly one request; "
                    f"the ranker's forward-pass budget stays batch_tokens={on.batch_tokens}, "
                    f"so each request is scored exactly as with batching on")
        mode = Mode(name, overrides, desc, overrides.get("cache_namespace"))
        mode.settings = _public(_settings(overrides))
        modes[name] = mode
    return modes


def _run_mode(mode: Mode, url: str, load: _Load, cache_enabled: bool, cells: list, progress) -> None:
    """Every cell of one mode: a cold phase (new requests) and a warm one (the same again, cached)."""
    for n in load.sizes:  # a few untimed requests first (HTTP path, tokenizer, allocator)
        asyncio.run(_run_cell(url, load.warmup_bodies[n], 1, load.duration, load.timeout, load.headers))
    for n in load.sizes:
        for c in load.concurrency:
            base = {"batching": mode.name, "candidates": n, "concurrency": c}
            samples = None
            if "cold" in load.phases or ("warm" in load.phases and cache_enabled):
                samples = _cold_cell(url, load, base, cells, progress)
            if "warm" in load.phases:
                _warm_cell(url, load, base, samples, cache_enabled, cells, progress)


def _cold_cell(url: str, load: _Load, base: dict, cells: list, progress) -> list[Sample]:
    """New requests (also the warm phase's source); a cell is recorded when the cold phase was asked for."""
    before = scrape(url, load.headers)
    cold = load.bodies[(base["candidates"], base["concurrency"])]
    samples, wall = asyncio.run(_run_cell(url, cold, base["concurrency"], load.duration, load.timeout, load.headers))
    delta = metric_delta(before, scrape(url, load.headers))
    if "cold" in load.phases:
        cell = {**base, "phase": "cold", **summarize(samples, wall, delta)}
        cells.append(cell)
        _progress_cell(cell, progress)
    return samples


def _warm_cell(url: str, load: _Load, base: dict, samples, cache_enabled: bool, cells: list, progress) -> None:
    """The cold phase's successful requests again: every candidate a cache hit."""
    if not cache_enabled:
        cells.append({**base, "phase": "warm", "status": "skipped", "reason": "the cache is disabled"})
        return
    replay = warm_replay(load.bodies[(base["candidates"], base["concurrency"])], samples)
    if not replay:
        cells.append({**base, "phase": "warm", "status": "skipped", "reason": "no cold request succeeded"})
        return
    before = scrape(url, load.headers)
    samples_w, wall = asyncio.run(_run_cell(url, replay, base["concurrency"], load.duration, load.timeout, load.headers))
    cell = {**base, "phase": "warm", **summarize(samples_w, wall, metric_delta(before, scrape(url, load.headers)))}
    cell["_fully_cached_server_ms"] = [s.server_ms for s in samples_w if s.status == "200" and s.cache_enabled
                                       and s.misses == 0 and s.hits > 0 and s.server_ms is not None]
    cell["_fully_cached_client_ms"] = [s.latency_ms for s in samples_w if s.status == "200" and s.cache_enabled
                                       and s.misses == 0 and s.hits > 0]
    cells.append(cell)
    _progress_cell(cell, progress)


def warm_replay(cold: Sequence[bytes], samples: Sequence[Sample]) -> list[bytes]:
    """The warm phase's requests: the cold phase's successful ones, in their order, repeated to
    as many as the cold phase had to send (none if none succeeded)."""
    ok = [cold[s.index] for s in sorted(samples, key=lambda s: s.index) if s.status == "200"]
    return [ok[i % len(ok)] for i in range(len(cold))] if ok else []


def _progress_cell(c: dict, progress) -> None:
    progress(f"  batching {c['batching']:<8} {c['phase']:<4} {c['candidates']:>4} candidates x {c['concurrency']:>3} "
             f"clients: {c['ok']}/{c['sent']} ok, {c.get('requests_per_s') or 0:7.1f} req/s, p50 "
             f"{c.get('p50_ms') or 0:8.1f} ms, p99 {c.get('p99_ms') or 0:8.1f} ms, server p50 "
             f"{c.get('server_p50_ms') or 0:7.2f} ms, errors {c['errors'] or 0}")


def _cached_summary(cells: list[dict]) -> list[dict]:
    """Server-side time of fully cached requests: the warm cell at the lowest concurrency, per
    batching mode and candidate count (private sample lists are removed from the cells)."""
    out = []
    warm = [c for c in cells if c.get("phase") == "warm" and c.get("status") == "ok"]
    for key in sorted({(c["batching"], c["candidates"]) for c in warm}):
        cell = min((c for c in warm if (c["batching"], c["candidates"]) == key), key=lambda c: c["concurrency"])
        server, client = cell.get("_fully_cached_server_ms") or [], cell.get("_fully_cached_client_ms") or []
        if server:
            p50, p95, source = report.percentile(server, 50), report.percentile(server, 95), "timing header"
        elif cell.get("server_ms_source") == "histogram" and client:
            p50, p95, source = cell.get("server_p50_ms"), cell.get("server_p95_ms"), "request histogram (bucketed)"
        else:
            p50 = p95 = source = None
        out.append({"batching": key[0], "candidates": key[1], "concurrency": cell["concurrency"],
                    "requests": len(client), "server_p50_ms": p50, "server_p95_ms": p95,
                    "client_p50_ms": report.percentile(client, 50), "source": source})
    for c in cells:
        c.pop("_fully_cached_server_ms", None)
        c.pop("_fully_cached_client_ms", None)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve-child":
        sys.exit(_child_main(sys.argv[2:]))
    print("usage: python -m instructrec.bench.service_bench serve-child --port P --settings JSON  "
          "(started by `instructrec bench service`)", file=sys.stderr)
    sys.exit(2)
