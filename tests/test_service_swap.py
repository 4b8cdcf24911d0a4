"""Admission that queues before it refuses, and a model swap under load with nothing failed.

Admission: jobs are queued while the work ahead of them, at the measured drain rate, lets them
start within the deadline; past it the batcher refuses with a Retry-After that is the time until
enough of that work has drained. The swap: ``POST /admin/reload`` loads a second tiny checkpoint
(another seed: another checkpoint version) while clients send requests; every answer names the
version that scored it and equals that version's answer alone, and the Redis cache never serves
one version's scores to the other.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from instructrec.checkpoint import checkpoint_version
from instructrec.service.app import create_app
from instructrec.service.batcher import RETRY_AFTER_MAX_S, Batcher, QueueFull
from instructrec.service.metrics import Metrics
from instructrec.service.settings import Settings
from tests.service_fixtures import (SHARED_REDIS, ServerThread, delete_namespace, metric, redis_up, tiny_checkpoints,
                                    unique_namespace)

torch.set_num_threads(1)

WORDS = "legend zelda mario kart halo doom quest star wars edition remastered deluxe racing puzzle farm".split()


def _request(k: int, n: int = 10) -> dict:
    history = [f"{WORDS[(k + i) % 15]} {WORDS[(k * 3 + i) % 15]} {i}" for i in range(2 + k % 4)]
    candidates = [" ".join(WORDS[(k + j + m) % 15] for m in range(1 + (j * k) % 5)) + f" {j}" for j in range(n)]
    return {"history": history, "instruction": f"something like {WORDS[k % 15]}", "candidates": candidates}


def _ranking(body: dict) -> list[tuple[int, float]]:
    return [(x["index"], x["score"]) for x in body["results"]]


# --- admission -----------------------------------------------------------------------------------


def _timed_score(seconds_per_token: float):
    """A score function that takes ``seconds_per_token`` for each token of its jobs (job = token count)."""

    def score(requests):
        time.sleep(seconds_per_token * sum(requests))
        return [f"scored {r}" for r in requests], 0.0, 0.0

    return score


def test_admission_queues_what_fits_and_refuses_the_rest_with_the_drain_time():
    """0.01 s a token, jobs of 10 tokens (0.1 s each), a 0.55 s deadline: five jobs queued behind a
    running one all fit and are all scored; the next ones are refused, and each Retry-After is
    the seconds until the queued work has drained enough for a job to fit."""

    async def scenario():
        executor = ThreadPoolExecutor(1)
        batcher = Batcher(_timed_score(0.01), budget_tokens=100, max_wait_s=0, max_queue=1000, executor=executor,
                          metrics=Metrics(), max_jobs=1, max_queue_wait_s=0.55)
        batcher.calibrate(0.01)  # as the warm-up would
        batcher.start()
        running = batcher.submit(10, 10)
        await asyncio.sleep(0.02)  # its batch is running: 0.08 s of it left
        accepted, refused = [], []
        for _ in range(12):
            waited = batcher.expected_wait()
            try:
                accepted.append((waited, batcher.submit(10, 10)))
            except QueueFull as exc:
                refused.append((waited, exc.retry_after))
        results = await asyncio.gather(running, *(f for _, f in accepted))
        await batcher.close()
        executor.shutdown()
        return accepted, refused, results

    accepted, refused, results = asyncio.run(scenario())
    assert all(w <= 0.55 for w, _ in accepted) and len(accepted) == 5  # 0.08 + 4 x 0.1 s fit, the 6th would not
    assert results == ["scored 10"] * 6  # everything admitted is answered
    assert refused and all(w > 0.55 for w, _ in refused)
    for waited, retry_after in refused:
        assert retry_after == max(1, math.ceil(waited - 0.55))  # seconds until the wait fits again


def test_retry_after_counts_the_jobs_to_drain_when_the_queue_is_full():
    """With the queue full (and no deadline) Retry-After is the time the jobs ahead of a free
    place take at the drain rate, clamped to RETRY_AFTER_MAX_S."""

    async def scenario():
        executor = ThreadPoolExecutor(1)
        batcher = Batcher(_timed_score(0.0), budget_tokens=10_000, max_wait_s=0, max_queue=3, executor=executor,
                          metrics=Metrics(), max_jobs=1)
        batcher.calibrate(1.0)  # 1 s a token
        # not started: nothing drains while we look
        for tokens in (2, 3, 4):
            batcher.submit(tokens, tokens)
        with pytest.raises(QueueFull) as full:
            batcher.submit(1, 1)
        first = full.value.retry_after
        batcher.max_queue = 1  # three places short: 2 + 3 + 4 tokens must drain, and the first refused
        # job's return (1 token, due back in 2 s) is ahead of this one
        with pytest.raises(QueueFull) as full:
            batcher.submit(1, 1)
        executor.shutdown()
        return first, full.value.retry_after

    first, second = asyncio.run(scenario())
    assert first == 2  # the first job (2 tokens) frees a place
    assert second == 10


def test_retry_after_is_clamped():
    """Retry-After is whole seconds from 1 to RETRY_AFTER_MAX_S, however much work is queued."""

    async def refused_after(tokens_queued: int) -> int:
        batcher = Batcher(_timed_score(0.0), budget_tokens=10, max_wait_s=0, max_queue=100, executor=None,
                          metrics=Metrics(), max_jobs=1, max_queue_wait_s=1.0)
        batcher.calibrate(10.0)  # 10 s a token; not started: nothing drains
        batcher.submit(0, tokens_queued)  # nothing ahead: admitted
        with pytest.raises(QueueFull) as full:
            batcher.submit(0, 1)
        return full.value.retry_after

    assert asyncio.run(refused_after(1)) == 9  # 10 s queued, 1 s allowed
    assert asyncio.run(refused_after(100)) == RETRY_AFTER_MAX_S


def test_eight_clients_of_100_candidates_are_all_answered_at_the_defaults():
    """The defaults queue 8 concurrent 100-candidate requests, each answered as it is alone; with
    a deadline their queued work does not fit, the refused get 429 with a Retry-After no longer
    than that work takes to drain."""
    requests = [_request(k, n=100) for k in range(8)]
    settings = Settings(model="tiny-random-prefixlm", device="cpu", dtype="auto", redis_url="", torch_threads=1)
    with ServerThread(create_app(settings)) as srv:
        srv.wait_ready()

        async def together():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as ac:
                return await asyncio.gather(*(ac.post("/rerank", json=r) for r in requests))

        with httpx.Client(base_url=srv.url, timeout=120) as client:
            alone = [client.post("/rerank", json=r).json() for r in requests]
            started = time.perf_counter()
            client.post("/rerank", json=requests[0])
            one = time.perf_counter() - started
        answers = asyncio.run(together())
        assert [r.status_code for r in answers] == [200] * 8
        assert [_ranking(r.json()) for r in answers] == [_ranking(a) for a in alone]
        srv.app.state.service.batcher.max_queue_wait = 1.5 * one  # about two requests' wait fits
        answers = asyncio.run(together())
    codes = [r.status_code for r in answers]
    assert 429 in codes and set(codes) <= {200, 429, 503}, codes
    for r in answers:
        if r.status_code == 429:
            assert 1 <= int(r.headers["retry-after"]) <= max(1, math.ceil(8 * one * 2))
            assert r.json()["error"]["type"] == "rate_limited"


# --- the model swap -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny prefix-LM checkpoints, different seeds: two checkpoint versions."""
    root = tmp_path_factory.mktemp("swap")
    out = tiny_checkpoints(root, (11, 12))
    assert checkpoint_version(out[0]) != checkpoint_version(out[1])
    return out


def _settings(model, **extra) -> Settings:
    """The precision the service picks on this CPU: bf16 where it is native, else float32. (With
    bf16 forced, the swap under load took 60 s on an AVX2-only CPU, where bf16 is emulated,
    against 6 s on a Xeon with AMX; bf16's batch invariance is tests/test_service_load.py's.)"""
    return Settings(model=str(model), device="cpu", dtype="auto", torch_threads=1, **{"redis_url": "", **extra})


def _alone(model, requests: list[dict]) -> list[list[tuple[int, float]]]:
    """Each request's answer from a service of ``model`` alone, uncached."""
    with ServerThread(create_app(_settings(model))) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            return [_ranking(client.post("/rerank", json=r).json()) for r in requests]


def test_a_swap_under_load_fails_nothing_and_every_answer_names_its_version(checkpoints):
    """16 clients send requests; after the 30th the service swaps to the second checkpoint, and
    they go on until 32 more were sent after the swap returned. Every request is answered 200 by
    one of the two versions, with that version's answer alone; those sent after the swap returned
    are the new version's; /ready and the metrics follow."""
    first, second = checkpoints
    requests = [_request(k) for k in range(12)]
    refs = {checkpoint_version(first): _alone(first, requests), checkpoint_version(second): _alone(second, requests)}
    with ServerThread(create_app(_settings(first))) as srv:
        srv.wait_ready()

        async def load():
            answers, swap = [], {}
            sent = 0
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as ac:
                async def client():
                    nonlocal sent
                    while sent < 5000 and (sent < 40 or sum(1 for _, after, _ in answers if after) < 32):
                        k, sent = sent, sent + 1
                        if k == 30:
                            swap["task"] = asyncio.ensure_future(ac.post("/admin/reload", json={"model": str(second)}))
                        after = "done" in swap
                        r = await ac.post("/rerank", json=requests[k % 12])
                        answers.append((k % 12, after, r))

                async def watch():
                    while "task" not in swap:
                        await asyncio.sleep(0.001)
                    swap["response"] = await swap["task"]
                    swap["done"] = True

                await asyncio.gather(watch(), *(client() for _ in range(16)))
            return answers, swap["response"]

        answers, swapped = asyncio.run(load())
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            ready = client.get("/ready").json()
            swaps = metric(client, "instructrec_model_swaps_total", {"outcome": "done"})
            info_new = metric(client, "instructrec_model_info", {"checkpoint_version": checkpoint_version(second)})
            info_old = metric(client, "instructrec_model_info", {"checkpoint_version": checkpoint_version(first)})
    assert swapped.status_code == 200, swapped.text
    assert swapped.json()["model"]["checkpoint_version"] == checkpoint_version(second)
    assert swapped.json()["previous"]["checkpoint_version"] == checkpoint_version(first)
    assert [r.status_code for _, _, r in answers] == [200] * len(answers)
    seen = set()
    for k, after, r in answers:
        body = r.json()
        version = body["model"]["checkpoint_version"]
        seen.add(version)
        assert _ranking(body) == refs[version][k]
        if after:
            assert version == checkpoint_version(second)
    assert seen == set(refs)  # both versions answered
    assert ready["model"]["checkpoint_version"] == checkpoint_version(second) and ready["model_swaps"] == 1
    assert (swaps, info_new, info_old) == (1, 1, 0)


@pytest.mark.skipif(not redis_up(), reason="Redis at 127.0.0.1:6379 is not running")
def test_the_cache_never_mixes_versions(checkpoints):
    """The same request before, after a swap and after swapping back: the new version misses
    (the old one's scores are not its), and the old one hits its own again; each answer is its
    version's."""
    first, second = checkpoints
    request = _request(5)
    namespace = unique_namespace()
    try:
        with ServerThread(create_app(_settings(first, redis_url=SHARED_REDIS, cache_namespace=namespace))) as srv:
            srv.wait_ready()
            with httpx.Client(base_url=srv.url, timeout=60) as client:
                a1 = client.post("/rerank", json=request).json()
                assert client.post("/admin/reload", json={"model": str(second)}).status_code == 200
                b1 = client.post("/rerank", json=request).json()
                b2 = client.post("/rerank", json=request).json()
                assert client.post("/admin/reload", json={"model": str(first)}).status_code == 200
                a2 = client.post("/rerank", json=request).json()
    finally:
        delete_namespace(SHARED_REDIS, namespace)
    assert a1["cache"] == b1["cache"] == {"enabled": True, "hits": 0, "misses": 10}
    assert b2["cache"] == a2["cache"] == {"enabled": True, "hits": 10, "misses": 0}
    assert a1["model"]["checkpoint_version"] == a2["model"]["checkpoint_version"] == checkpoint_version(first)
    assert b1["model"]["checkpoint_version"] == b2["model"]["checkpoint_version"] == checkpoint_version(second)
    assert _ranking(a2) == _ranking(a1) and _ranking(b2) == _ranking(b1)
    assert [s for _, s in _ranking(a1)] != [s for _, s in _ranking(b1)]


def test_reload_refuses_what_it_cannot_serve_and_a_second_swap(checkpoints, tmp_path):
    """The API key guards the reload; a missing directory or a broken checkpoint is a 422 naming
    ``model`` (the old model keeps serving); a second reload while one runs is a 409; no body
    reloads the configured model."""
    first, second = checkpoints
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with ServerThread(create_app(_settings(first, api_key="k"))) as srv:
        srv.wait_ready()
        auth = {"authorization": "Bearer k"}
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            assert client.post("/admin/reload", json={"model": str(second)}).status_code == 401
            for path in (tmp_path / "missing", broken):
                r = client.post("/admin/reload", json={"model": str(path)}, headers=auth)
                assert r.status_code == 422 and r.json()["error"]["field"] == "model", r.text
                assert str(path) in r.json()["error"]["message"]
            r = client.post("/admin/reload", json={"model": 3}, headers=auth)
            assert r.status_code == 422 and r.json()["error"]["field"] == "model"
            assert client.get("/ready").json()["model"]["checkpoint_version"] == checkpoint_version(first)
            assert metric(client, "instructrec_model_swaps_total", {"outcome": "failed"}) == 1  # the broken one

        async def two():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120, headers=auth) as ac:
                return await asyncio.gather(ac.post("/admin/reload", json={"model": str(second)}),
                                            ac.post("/admin/reload", json={"model": str(second)}))

        codes = sorted(r.status_code for r in asyncio.run(two()))
        assert codes == [200, 409]
        with httpx.Client(base_url=srv.url, timeout=60, headers=auth) as client:
            back = client.post("/admin/reload")  # the configured model, read again
            assert back.status_code == 200 and back.json()["model"]["checkpoint_version"] == checkpoint_version(first)
            assert client.get("/ready").json()["model_swaps"] == 2
