"""`instructrec eval-client` against a real /rerank service on loopback (tiny-random model, no
Redis): its per-case ranks and metrics equal `instructrec evaluate`'s on the same candidate
file and template; 429/503 storms are retried honouring Retry-After; an interrupted run
resumes without requesting a case twice; errors are one line and exit code 2.

Some titles of the slice are given doubled/odd whitespace and decomposed Unicode, which the
service normalises: the offline path must build the same instructions (instructrec.text).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest
import torch

from instructrec.instruction import build
from instructrec.text import normalise
from instructrec.service.app import create_app
from instructrec.service.settings import Settings
from tests.service_fixtures import ServerThread
from instructrec.training.data.load import load_dataset
from instructrec.training.evaluate import candidates as cand
from instructrec.training.evaluate.client import ClientConfig, ClientError, evaluate_service, rerank_case, request_body
from instructrec.training.evaluate.run import EvalConfig, annotate, evaluate, scenario_needs
from instructrec.training.evaluate.scenarios import SCENARIOS
from instructrec.training.data.types import MAX_HISTORY

torch.set_num_threads(1)

KEY = "eval-client-key"
METHOD = "tiny-random (untuned)"
RESAMPLES = 200


def _odd(title: str) -> str:
    """The same title as the service will see it, written with odd whitespace and NFD."""
    return " " + unicodedata.normalize("NFD", title).replace(" ", "  \t", 1) + "\u2003"


@pytest.fixture(scope="module")
def data():
    d = load_dataset("games-sample").sample_users(40, seed=3)
    items = {i: dataclasses.replace(it, title=_odd(it.title)) if n % 3 == 0 else it
             for n, (i, it) in enumerate(sorted(d.items.items()))}
    return dataclasses.replace(d, items=items)


@pytest.fixture(scope="module")
def offline(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("offline")
    cfg = EvalConfig(data=data, out=out, users=12, settings=("uniform-10",), scenarios=("sequential", "product_search"),
                     base="tiny-random", baselines=(), device="cpu", dtype="float32", resamples=RESAMPLES,
                     progress=False)
    results = evaluate(cfg)
    rows = {r["scenario"]: r for r in results["rows"] if r["method"] == METHOD and r["setting"] == "uniform-10"}
    units = {}
    for p in (out / "units").iterdir():
        u = json.loads(p.read_text())["unit"]
        if u["split"] == "test" and u["method"] == METHOD:
            units[u["scenario"]] = u
    return {"out": out, "rows": rows, "units": units, "file": out / "candidates" / "test-uniform-10.jsonl"}


@pytest.fixture(scope="module")
def service():
    settings = Settings(model="tiny-random", device="cpu", dtype="float32", redis_url="", api_key=KEY, max_wait_ms=2)
    app = create_app(settings)
    with ServerThread(app) as srv:
        srv.wait_ready()
        yield app, srv.url


class Proxy:
    """A real HTTP hop in front of the service: ``plan(body, attempt)`` may answer a /rerank
    request itself (status, headers, JSON body); otherwise it is forwarded. Records per case
    (its candidate ids) when each attempt arrived and how often it was forwarded."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.plan = lambda body, attempt: None
        self.reset()

    def reset(self) -> None:
        self.attempts: dict[str, list[float]] = defaultdict(list)
        self.forwarded: Counter = Counter()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        answer, key = None, None
        if scope["path"] == "/rerank":
            body = json.loads(raw)
            key = " ".join(c["id"] for c in body["candidates"])
            self.attempts[key].append(time.monotonic())
            answer = self.plan(body, len(self.attempts[key]) - 1)
        if answer is not None:
            status, headers, payload = answer
            content = json.dumps(payload).encode()
        else:
            headers_in = {k.decode(): v.decode() for k, v in scope["headers"] if k in (b"authorization", b"content-type")}
            async with httpx.AsyncClient(base_url=self.upstream, timeout=60) as client:
                r = await client.request(scope["method"], scope["path"], content=raw, headers=headers_in)
            status, content = r.status_code, r.content
            headers = {k: v for k, v in r.headers.items() if k.lower() in ("content-type", "retry-after")}
            if key is not None and status == 200:
                self.forwarded[key] += 1
        headers = {"content-type": "application/json", **headers}
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.lower().encode(), str(v).encode()) for k, v in headers.items()]})
        await send({"type": "http.response.body", "body": content})


@pytest.fixture(scope="module")
def proxy(service):
    p = Proxy(service[1])
    with ServerThread(p) as srv:
        p.url = srv.url
        yield p


def _client(url: str, out: Path, data, offline, scenario="sequential", **kw) -> ClientConfig:
    template = kw.pop("template", offline["rows"][scenario]["template"])
    return ClientConfig(url=url, out=out, data=data, candidates=offline["file"], scenario=scenario, template=template,
                        api_key=KEY, resamples=RESAMPLES, progress=False, **kw)


def _assert_equal_to_offline(results: dict, out: Path, offline, scenario: str) -> None:
    unit, row = offline["units"][scenario], offline["rows"][scenario]
    assert results["user_ids"] == unit["user_ids"]
    assert results["ranks"] == unit["ranks"]
    assert results["metrics"] == row["metrics"]
    assert results["ci95"] == {k: tuple(v) for k, v in row["ci95"].items()}
    assert results["counts"]["skipped"] == row["skipped"] and results["counts"]["errors"] == 0
    lines = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()[1:]]
    scores = {x["user_id"]: x["scores"] for x in lines if "scores" in x}
    for user, expected in zip(unit["user_ids"], unit["scores"]):
        assert scores[user] == pytest.approx(expected, abs=1e-4)


# --- equality with the offline evaluation ---------------------------------------------------


@pytest.mark.parametrize("scenario", ["sequential", "product_search"])
def test_client_ranks_and_metrics_equal_the_offline_evaluation(tmp_path, data, offline, service, scenario):
    results = evaluate_service(_client(service[1], tmp_path / "c", data, offline, scenario))
    _assert_equal_to_offline(results, tmp_path / "c", offline, scenario)
    template = offline["rows"][scenario]["template"]
    assert results["template"]["used"] == {template: results["counts"]["answered"]}
    assert results["counts"]["answered"] == offline["rows"][scenario]["cases"] > 0
    assert results["counts"]["resumed"] == 0 and results["latency"]["p50"] > 0
    assert results["template_table"]["same"] and results["model"]["checkpoint_version"].startswith("tiny-random")
    saved = json.loads((tmp_path / "c" / "results.json").read_text())
    assert saved["metrics"] == results["metrics"]


def test_users_mode_writes_the_offline_candidate_file(tmp_path, data, offline):
    from instructrec.training.evaluate.client import uniform_test_file

    mine = uniform_test_file(data, 12, 0, tmp_path)
    assert mine.path == tmp_path / "candidates" / "test-uniform-10.jsonl"
    assert mine.digest == cand.read(offline["file"], data).digest  # the same cases, header and digest


def test_offline_instructions_equal_the_service_ones_for_unnormalised_texts(tmp_path, data, offline, service):
    """The service normalises request texts (NFC, whitespace); the offline path now does too."""
    from instructrec.service.schemas import RerankRequest
    from instructrec.service.serving import need_of
    from instructrec.training.evaluate.methods import InstructionModel

    file = cand.read(offline["file"], data)
    scenario = SCENARIOS["sequential"]
    annotations = annotate(data, [c.as_case() for c in file.cases], [scenario], EvalConfig(data=data, out=tmp_path))
    pairs = scenario_needs(data, file, scenario, annotations)
    model = InstructionModel(data, "tiny-random", device="cpu", dtype="float32")
    engine = service[0].state.service.engine
    template = offline["rows"]["sequential"]["template"]
    odd = 0
    for case, need in pairs:
        req = RerankRequest.model_validate(json.loads(json.dumps(request_body(data, case, need, template))))
        titles = [c.title for c in req.candidates]
        served = engine.prepare(need_of(req), template, titles).instruction.source
        assert model.sources([need], template) == [served]
        assert [normalise(data.title(c)) for c in case.candidates] == titles
        raw = build(need, model.loaded.tokenizer, model.ranker.max_source_tokens, template_id=template).source
        odd += raw != served
    assert odd > 0  # the slice does exercise titles the service rewrites


# --- retries ---------------------------------------------------------------------------------


def test_429_and_503_are_retried_honouring_retry_after(tmp_path, data, offline, proxy):
    # Per case: 503 without Retry-After (back-off), 429 "Retry-After: 2", 429 "Retry-After: 0", then the service.
    answers = [(503, {}, {"error": {"type": "unavailable", "message": "busy", "field": None}}),
               (429, {"Retry-After": "2"}, {"error": {"type": "rate_limited", "message": "queue full", "field": None}}),
               (429, {"Retry-After": "0"}, {"error": {"type": "rate_limited", "message": "queue full", "field": None}})]
    proxy.reset()
    proxy.plan = lambda body, attempt: answers[attempt] if attempt < len(answers) else None
    try:
        results = evaluate_service(_client(proxy.url, tmp_path / "c", data, offline, backoff=0.6, concurrency=16))
    finally:
        proxy.plan = lambda body, attempt: None
    _assert_equal_to_offline(results, tmp_path / "c", offline, "sequential")
    assert len(proxy.attempts) == results["counts"]["answered"]
    for times in proxy.attempts.values():
        assert len(times) == 4
        gaps = [b - a for a, b in zip(times, times[1:])]
        # Wall-clock lower bounds are exact (a wait is never shorter); which wait was chosen is
        # checked without a clock in the next test (a busy machine stretches gaps, never shortens them).
        assert gaps[0] >= 0.25  # back-off step 1: 0.3-0.6 s with jitter
        assert gaps[1] >= 1.9  # Retry-After: 2 (back-off step 2 would be 0.6-1.2 s)
    lines = [json.loads(x) for x in (tmp_path / "c" / "responses.jsonl").read_text().splitlines()[1:]]
    assert {x["attempts"] for x in lines} == {4}


def test_retry_waits_follow_retry_after_else_backoff(proxy):
    """The waits the client chooses between attempts, recorded instead of slept: back-off when
    the answer has no Retry-After, exactly Retry-After otherwise; it gives up after the retries."""
    answers = [(503, {}, {"error": {"type": "unavailable", "message": "busy", "field": None}}),
               (429, {"Retry-After": "2"}, {"error": {"type": "rate_limited", "message": "queue full", "field": None}}),
               (429, {"Retry-After": "0"}, {"error": {"type": "rate_limited", "message": "queue full", "field": None}}),
               (503, {"Retry-After": "7"}, {"error": {"type": "unavailable", "message": "still busy", "field": None}})]
    case = cand.CandidateCase("u1", ("h1",), "i1", ("i1", "i2"))
    body = {"candidates": [{"id": "i1", "title": "one"}, {"id": "i2", "title": "two"}]}
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    async def run() -> dict:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
            return await rerank_case(client, proxy.url, body, case, retries=3, backoff=0.6, sleep=record)

    proxy.reset()
    proxy.plan = lambda body, attempt: answers[attempt]
    try:
        out = asyncio.run(run())
    finally:
        proxy.plan = lambda body, attempt: None
    assert 0.3 <= waits[0] <= 0.6 and waits[1:] == [2.0, 0.0]  # no wait after the last attempt
    assert out["attempts"] == 4 and out["error"]["status"] == 503
    assert out["error"]["message"].startswith("gave up after 4 attempts: still busy")
    assert len(proxy.attempts["i1 i2"]) == 4


def test_gives_up_records_the_error_and_a_rerun_retries_only_that_case(tmp_path, data, offline, proxy):
    file = cand.read(offline["file"], data)
    victim = " ".join(file.cases[0].candidates)
    storm = (429, {"Retry-After": "0"}, {"error": {"type": "rate_limited", "message": "queue full", "field": None}})
    bad = (422, {}, {"error": {"type": "validation_error", "message": "candidates[2].title: too long",
                                "field": "candidates[2].title"}})
    second = " ".join(file.cases[1].candidates)
    proxy.reset()
    proxy.plan = lambda body, attempt: (storm if " ".join(c["id"] for c in body["candidates"]) == victim else
                                        bad if " ".join(c["id"] for c in body["candidates"]) == second else None)
    out = tmp_path / "c"
    try:
        first = evaluate_service(_client(proxy.url, out, data, offline, retries=2))
    finally:
        proxy.plan = lambda body, attempt: None
    n = offline["rows"]["sequential"]["cases"]
    assert first["counts"]["errors"] == 2 and first["counts"]["answered"] == n - 2
    errors = {e["user_id"]: e for e in first["errors"]}
    assert "gave up after 3 attempts" in errors[file.cases[0].user_id]["message"]
    assert errors[file.cases[1].user_id]["field"] == "candidates[2].title"  # a 4xx is not retried
    assert len(proxy.attempts[victim]) == 3 and len(proxy.attempts[second]) == 1

    proxy.reset()
    again = evaluate_service(_client(proxy.url, out, data, offline))
    assert set(proxy.attempts) == {victim, second}  # the answered cases were not requested again
    assert again["counts"]["resumed"] == n - 2 and again["counts"]["errors"] == 0
    _assert_equal_to_offline(again, out, offline, "sequential")


# --- resume ----------------------------------------------------------------------------------


def test_an_interrupted_run_resumes_without_requesting_a_case_twice(tmp_path, data, offline, proxy):
    out = tmp_path / "c"
    proxy.reset()
    part = evaluate_service(_client(proxy.url, out, data, offline, limit=5))
    n = offline["rows"]["sequential"]["cases"]
    assert part["counts"]["answered"] == 5 and part["counts"]["not_requested"] == n - 5
    # A run killed while writing leaves half a line: it is cut off on resume.
    with (out / "responses.jsonl").open("a") as f:
        f.write('{"user_id": "x", "target": "y", "scores": [0.1, ')
    full = evaluate_service(_client(proxy.url, out, data, offline))
    assert full["counts"]["resumed"] == 5 and full["counts"]["answered"] == n
    assert sum(proxy.forwarded.values()) == n and set(proxy.forwarded.values()) == {1}
    assert all(len(t) == 1 for t in proxy.attempts.values())
    _assert_equal_to_offline(full, out, offline, "sequential")

    # Answers of another run are not mixed in.
    with pytest.raises(ClientError, match="another run .*template"):
        evaluate_service(_client(proxy.url, out, data, offline, template="pref-06" if full["template"]["requested"] != "pref-06" else "pref-07"))


# --- the command -----------------------------------------------------------------------------


def test_cli_runs_and_reports_errors_in_one_line(tmp_path, offline, service, capsys):
    from instructrec.cli import main

    url = service[1]
    base = ["eval-client", "--data", "games-sample", "--candidates", str(offline["file"]), "--no-progress",
            "--template", offline["rows"]["sequential"]["template"]]
    assert main([*base, "--url", url, "--api-key", KEY, "--out", str(tmp_path / "ok")]) == 0
    printed = capsys.readouterr().out
    assert "hr@1" in printed and "ndcg@5" in printed and "latency p50" in printed

    cases = [
        (["--url", url, "--api-key", "wrong"], "401 unauthorized"),
        (["--url", url, "--api-key", KEY, "--template", "nope-1"], "field template"),
        (["--url", "http://127.0.0.1:9", "--api-key", KEY], "cannot connect"),
        (["--url", "localhost:8000"], "bad --url"),
        (["--url", url + "/nothing", "--api-key", KEY], "404"),
    ]
    for n, (args, message) in enumerate(cases):
        assert main([*base, *args, "--out", str(tmp_path / f"e{n}")]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("instructrec eval-client:") and message in err and "Traceback" not in err, err
    # An `instructrec evaluate` report folder is never overwritten.
    assert main([*base, "--url", url, "--api-key", KEY, "--out", str(offline["out"])]) == 2
    assert "not an eval-client result" in capsys.readouterr().err


# --- a service that fuses the LM with the behaviour and semantic signals ----------------------------


def test_fused_answers_are_the_cores_fusion_of_the_lm_only_answers(tmp_path):
    """eval-client --fusion lm-only and auto against one gated service: every auto answer is
    fused, and ranks each case exactly as the core's Hybrid fuses the lm-only run's scores."""
    import numpy as np

    from instructrec.aspects import UserNeed
    from instructrec.hybrid import Hybrid
    from instructrec.hybrid.gate import FEATURES, SIGNALS, Gate
    from instructrec.service.engine import shared_semantic_encoder
    from instructrec.training.hybrid.behaviour_cli import build_for
    from instructrec.training.metrics import rank_of

    data = load_dataset("games-sample").sample_users(40, seed=3)
    index = build_for(data)
    index.save(tmp_path / "behaviour.npz")
    w = np.zeros((len(SIGNALS), len(FEATURES)))
    w[SIGNALS.index("behaviour"), FEATURES.index("bias")] = 1.5
    w[SIGNALS.index("semantic"), FEATURES.index("bias")] = 0.7
    gate = Gate(w, temperature=1.0, info={"test": True})
    gate.save(tmp_path / "gate.json")
    settings = Settings(model="tiny-random", device="cpu", dtype="float32", redis_url="", max_wait_ms=2,
                        gate=str(tmp_path / "gate.json"), behaviour=str(tmp_path / "behaviour.npz"), sequential="none")
    with ServerThread(create_app(settings)) as srv:
        srv.wait_ready()
        common = dict(url=srv.url, data=data, seed=0, scenario="sequential", resamples=RESAMPLES, progress=False)
        lm = evaluate_service(ClientConfig(out=tmp_path / "lm", users=12, fusion="lm-only", **common))
        file = tmp_path / "lm" / "candidates" / "test-uniform-10.jsonl"
        fused = evaluate_service(ClientConfig(out=tmp_path / "fused", candidates=file, fusion="auto", **common))
        hybrid_version = httpx.get(f"{srv.url}/ready").json()["hybrid_version"]
    assert lm["fusion"]["answered"] == {"lm-only": lm["counts"]["answered"]} and lm["counts"]["answered"] > 0
    assert fused["fusion"] == {"requested": "auto", "answered": {"fused": fused["counts"]["answered"]},
                               "hybrid_version": hybrid_version}
    assert fused["user_ids"] == lm["user_ids"]
    reference = Hybrid(gate, index, shared_semantic_encoder())
    cases = {c.user_id: c for c in cand.read(file, data).cases}
    scores = {json.loads(x).get("user_id"): json.loads(x).get("scores")
              for x in (tmp_path / "lm" / "responses.jsonl").read_text().splitlines()[1:]}
    expected_ranks = []
    for user in lm["user_ids"]:
        case = cases[user]
        history = case.history[-MAX_HISTORY:]
        expected = reference.fuse(scores[user], UserNeed(history=tuple(data.title(i) for i in history)),
                                  [data.title(c) for c in case.candidates], list(case.candidates), list(history))
        expected_ranks.append(rank_of(expected.scores.tolist(), case.positive))
    assert fused["ranks"] == expected_ranks
    assert fused["ranks"] != lm["ranks"]  # the gate moved some targets: the fusion was really applied
