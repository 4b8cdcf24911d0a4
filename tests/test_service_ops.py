"""Operational behaviour of the /rerank service on a real uvicorn server: back-pressure (429
with Retry-After under a flood), dropped work of disconnected clients, a Redis that dies,
stalls and comes back (a private redis-server, never the machine's), a model that fails
to load, and the ``instructrec serve`` settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

import httpx
import pytest
import torch

from instructrec.service.app import create_app
from instructrec.service.settings import Settings
from tests.service_fixtures import RedisProcess, ServerThread, free_port, metric, unique_namespace

torch.set_num_threads(1)

WORDS = "legend zelda mario kart halo doom quest star wars edition remastered deluxe racing puzzle farm".split()


def titles(n: int, tag: str) -> list[str]:
    return [f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} {tag} {i}" for i in range(n)]


def _fields(r: httpx.Response) -> list:
    return [(x["index"], x["score"]) for x in r.json()["results"]]


# --- back-pressure and disconnects -------------------------------------------------------------


@pytest.fixture(scope="module")
def small_queue():
    settings = Settings(model="tiny-random", device="cpu", dtype="float32", redis_url="", max_queue=2, lanes=1,
                        batch_tokens=256, max_wait_ms=0, max_queue_wait_ms=60_000)  # no deadline refusals here
    with ServerThread(create_app(settings)) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            yield srv, client


def test_flood_gets_429_with_retry_after(small_queue):
    srv, client = small_queue
    before = metric(client, "instructrec_requests_rejected_total", {"reason": "queue_full"})

    async def flood():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as ac:
            return await asyncio.gather(*(
                ac.post("/rerank", json={"intention": {"text": f"game {k}"}, "candidates": titles(120, f"f{k}")})
                for k in range(20)))

    responses = asyncio.run(flood())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected and codes.count(200) >= 3, codes  # one in flight + two queued at least
    for r in rejected:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limited"
    for r in responses:
        if r.status_code == 200:
            assert len(r.json()["results"]) == 120
    assert metric(client, "instructrec_requests_rejected_total", {"reason": "queue_full"}) - before == len(rejected)
    assert metric(client, "instructrec_request_duration_seconds_count", {"route": "/rerank", "status": "429"}) == len(rejected)


def test_disconnected_client_work_is_dropped(small_queue):
    srv, client = small_queue
    dropped = metric(client, "instructrec_dropped_jobs_total")
    batches = metric(client, "instructrec_batch_size_count")

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as ac:
            # a long job keeps the model busy ...
            busy = asyncio.create_task(ac.post("/rerank", json={"intention": {"text": "busy"},
                                                                "candidates": titles(1000, "busy")}))
            while metric(client, "instructrec_batch_size_count") == batches:  # the busy job is in the model
                await asyncio.sleep(0.01)
            # ... while a second client sends its request, waits until it is queued, and hangs up
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            body = json.dumps({"intention": {"text": "gone"}, "candidates": titles(50, "gone")}).encode()
            writer.write(b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            while metric(client, "instructrec_queue_depth") < 1:
                assert not busy.done(), "the busy job ended before the second one was queued"
                await asyncio.sleep(0.01)
            writer.close()
            await writer.wait_closed()
            return await busy

    r = asyncio.run(scenario())
    assert r.status_code == 200
    deadline = time.monotonic() + 20
    while metric(client, "instructrec_dropped_jobs_total") == dropped and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(client, "instructrec_dropped_jobs_total") == dropped + 1
    time.sleep(0.3)
    assert metric(client, "instructrec_batch_size_count") == batches + 1  # only the busy job reached the model


# --- Redis down, slow, back ----------------------------------------------------------------------


@pytest.mark.skipif(RedisProcess.binary is None, reason="redis-server binary not installed")
def test_redis_stopped_mid_test_then_recovers():
    redis_proc = RedisProcess()
    redis_proc.start()
    settings = Settings(model="tiny-random", device="cpu", dtype="float32", redis_url=redis_proc.url,
                        cache_namespace=unique_namespace(), cache_timeout_ms=200, cache_retry_seconds=0.3,
                        batch_tokens=1024, max_wait_ms=1)
    body = {"history": ["Halo 3", "Doom"], "intention": {"text": "a shooter", "kind": "specific"},
            "candidates": titles(15, "redis")}
    try:
        with ServerThread(create_app(settings)) as srv:
            srv.wait_ready()
            with httpx.Client(base_url=srv.url, timeout=60) as client:
                assert client.get("/ready").json()["cache"] == "up"
                miss = client.post("/rerank", json=body)
                hit = client.post("/rerank", json=body)
                assert miss.json()["cache"]["misses"] == 15 and hit.json()["cache"]["hits"] == 15
                assert _fields(miss) == _fields(hit)
                errors = metric(client, "instructrec_cache_errors_total")
                assert errors == 0 and metric(client, "instructrec_cache_up") == 1

                redis_proc.stop()  # Redis dies
                down = client.post("/rerank", json=body)
                assert down.status_code == 200
                assert down.json()["cache"] == {"enabled": False, "hits": 0, "misses": 0}
                assert not any(x["cached"] for x in down.json()["results"])
                assert _fields(down) == _fields(miss)  # uncached answer == cached answer
                assert metric(client, "instructrec_cache_errors_total") > errors
                assert metric(client, "instructrec_cache_up") == 0
                assert client.get("/ready").json()["cache"] == "down"
                still = client.post("/rerank", json=body)  # within the back-off: Redis is not even tried
                assert still.status_code == 200 and _fields(still) == _fields(miss)
                assert metric(client, "instructrec_cache_bypassed_total") >= 15

                redis_proc.start()  # same port, empty
                time.sleep(0.4)  # past the back-off
                refill = client.post("/rerank", json=body)
                assert refill.json()["cache"] == {"enabled": True, "hits": 0, "misses": 15}
                again = client.post("/rerank", json=body)
                assert again.json()["cache"] == {"enabled": True, "hits": 15, "misses": 0}
                assert _fields(refill) == _fields(again) == _fields(miss)
                assert metric(client, "instructrec_cache_up") == 1

                # slow Redis: a stalled server costs one timeout, then the request is answered uncached
                errors = metric(client, "instructrec_cache_errors_total")
                stall = socket.create_connection(("127.0.0.1", redis_proc.port))
                stall.sendall(b"DEBUG SLEEP 1.5\r\n")
                time.sleep(0.1)
                t0 = time.monotonic()
                slow = client.post("/rerank", json=body)
                assert slow.status_code == 200 and _fields(slow) == _fields(miss)
                assert slow.json()["cache"]["enabled"] is False
                assert time.monotonic() - t0 < 1.3  # did not wait for Redis to wake up
                assert metric(client, "instructrec_cache_errors_total") > errors
                stall.close()
    finally:
        redis_proc.stop()


def test_redis_unreachable_from_the_start():
    settings = Settings(model="tiny-random", device="cpu", dtype="float32", warmup=False,
                        redis_url=f"redis://127.0.0.1:{free_port()}/0", cache_timeout_ms=100, cache_retry_seconds=60)
    with ServerThread(create_app(settings)) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            assert client.get("/ready").json()["cache"] == "down"
            r = client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
            assert r.status_code == 200 and len(r.json()["results"]) == 2
            assert metric(client, "instructrec_cache_errors_total") == 1  # the start-up ping, then back-off


# --- a model that cannot load ------------------------------------------------------------------


def test_model_that_fails_to_load(tmp_path):
    settings = Settings(model=str(tmp_path), device="cpu", redis_url="")  # an empty directory
    with ServerThread(create_app(settings)) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            deadline = time.monotonic() + 30
            while client.get("/ready").json()["status"] == "loading" and time.monotonic() < deadline:
                time.sleep(0.05)
            ready = client.get("/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "failed"
            assert client.get("/health").status_code == 503
            r = client.post("/rerank", json={"intention": {"text": "x"}, "candidates": ["a"]})
            assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
            assert "cannot load model" in r.json()["error"]["message"]


# --- settings and the CLI -----------------------------------------------------------------------


def test_settings_from_env_and_flags(monkeypatch):
    from instructrec.service.cli import add_arguments, run, settings_from_args

    monkeypatch.setenv("INSTRUCTREC_MODEL", "tiny-random-t5")
    monkeypatch.setenv("INSTRUCTREC_PORT", "9001")
    monkeypatch.setenv("INSTRUCTREC_MAX_CANDIDATES", "50")
    monkeypatch.setenv("INSTRUCTREC_API_KEY", "k")
    monkeypatch.setenv("INSTRUCTREC_REDIS_URL", "")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    s = settings_from_args(parser.parse_args([]))
    assert (s.model, s.port, s.max_candidates, s.api_key.get_secret_value(), s.cache_enabled) == (
        "tiny-random-t5", 9001, 50, "k", False)
    s = settings_from_args(parser.parse_args(["--model", "tiny-random", "--port", "9002", "--host", "0.0.0.0"]))
    assert (s.model, s.port, s.host) == ("tiny-random", 9002, "0.0.0.0")
    # a missing checkpoint fails fast, before any model work
    assert run(parser.parse_args(["--model", "./no/such/checkpoint"])) == 2
    monkeypatch.setenv("INSTRUCTREC_MAX_CANDIDATES", "many")
    assert run(parser.parse_args([])) == 2


def test_create_app_does_no_work():
    """create_app only wires things up: no model, no Redis connection until the server starts."""
    t0 = time.monotonic()
    app = create_app(Settings(model="tiny-random", redis_url="redis://127.0.0.1:1/0"))
    assert time.monotonic() - t0 < 0.5
    assert app.state.service.engine is None and app.state.service.cache is None


def test_checkpoint_directory(tmp_path):
    """A checkpoint directory as `instructrec train` writes it: HF files + instructrec.json with
    the preset's token limits, which the service uses; the cache keys on the weights' hash."""
    from instructrec.checkpoint import checkpoint_version, write_meta
    from instructrec.modeling import build_tiny_bert2bert
    from instructrec.templates import TEMPLATE_VERSION

    model, tokenizer = build_tiny_bert2bert(seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    write_meta(tmp_path, {"template_version": TEMPLATE_VERSION,
                          "preset": {"name": "smoke", "max_source_tokens": 96, "max_target_tokens": 16}})
    settings = Settings(model=str(tmp_path), device="cpu", dtype="float32", redis_url="", batch_tokens=512)
    with ServerThread(create_app(settings)) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            ready = client.get("/ready").json()
            assert ready["model"] == {"name": str(tmp_path), "checkpoint_version": checkpoint_version(tmp_path),
                                          "device": "cpu", "precision": "torch.float32"}
            ranker = srv.app.state.service.engine.ranker
            assert (ranker.max_source_tokens, ranker.max_target_tokens) == (96, 16)
            long_title = " ".join(["halo"] * 30)
            out = client.post("/rerank", json={"history": [f"game number {i}" for i in range(40)],
                                               "candidates": ["Doom", long_title]}).json()
            assert out["usage"]["source_tokens"] <= 96 and out["truncated"]["history_dropped"] > 0
            assert out["truncated"]["candidates_cut"] == [1]
            assert metric(client, "instructrec_model_info", {"checkpoint_version": checkpoint_version(tmp_path),
                                                             "tuned_template_version": TEMPLATE_VERSION}) == 1
