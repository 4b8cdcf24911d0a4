"""The /rerank service end to end: a real uvicorn server on loopback driven by httpx, the
machine's Redis (unique namespace), the built-in tiny-random model.

Covers both endpoints, ranking == the ranker called directly, cache hit == miss (full and
partial hits, template and history in the key), truncation reporting, auth, metrics, and
more than twenty bad inputs answered with the JSON error shape.
"""

from __future__ import annotations

import json
import math
import random

import httpx
import pytest
import redis
import torch

from instructrec.aspects import Intention, UserNeed
from instructrec.instruction import build
from instructrec.ranker import Ranker, rank_order
from instructrec.templates import TEMPLATE_VERSION, get_template
from instructrec.service.app import create_app
from instructrec.service.serving_rerank import ServingRerank
from instructrec.service.settings import Settings
from tests.service_fixtures import SHARED_REDIS, ServerThread, delete_namespace, metric, redis_up, unique_namespace

torch.set_num_threads(1)

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
WORDS = "legend zelda mario kart halo doom quest star wars edition remastered deluxe racing puzzle farm".split()
HISTORY = ["Halo 3", "Doom Eternal", "Quake Champions"]


def titles(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(1 + i % 5)) + f" {seed}-{i}" for i in range(n)]


@pytest.fixture(scope="module")
def service():
    if not redis_up():
        pytest.skip("no Redis at 127.0.0.1:6379")
    namespace = unique_namespace()
    settings = Settings(model="tiny-random", device="cpu", dtype="float32", batch_tokens=1024, max_wait_ms=2,
                        redis_url=SHARED_REDIS, cache_namespace=namespace, cache_ttl_seconds=600, api_key=KEY,
                        max_text_chars=500, max_history=50, max_body_bytes=1_000_000)
    app = create_app(settings)
    try:
        with ServerThread(app) as srv:
            srv.wait_ready()
            with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as client:
                yield app, client
    finally:
        delete_namespace(SHARED_REDIS, namespace)


def direct(app, need: UserNeed, candidates: list[str], template_id: str | None = None,
           max_target_tokens: int | None = None):
    """The ranker called directly, configured like the service, on the same loaded model."""
    engine = app.state.service.engine
    r = engine.ranker
    ranker = Ranker(engine.loaded, max_source_tokens=r.max_source_tokens,
                    max_target_tokens=max_target_tokens or r.max_target_tokens,
                    batch_tokens=r.batch_tokens, reduction=r.reduction)
    inst = build(need, engine.loaded.tokenizer, max_tokens=ranker.max_source_tokens, template_id=template_id)
    return inst, ranker.score(inst.source, candidates)


# --- endpoints -----------------------------------------------------------------------------


def test_health_ready_metrics_open(service):
    app, client = service
    with httpx.Client(base_url=str(client.base_url)) as anon:  # no API key
        assert anon.get("/health").json() == {"status": "ok"}
        ready = anon.get("/ready").json()
        assert ready["status"] == "ready" and ready["template_version"] == TEMPLATE_VERSION
        assert ready["cache"] == "up"
        m = anon.get("/metrics")
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
        assert metric(anon, "instructrec_model_info", {"model": "tiny-random", "template_version": TEMPLATE_VERSION}) == 1
        assert metric(anon, "instructrec_ready") == 1
        # every response says how long the app took to its headers (what load generators read)
        timing = anon.get("/health").headers["server-timing"]
        assert timing.startswith("app;dur=") and float(timing.split("=", 1)[1]) >= 0


def test_native_rerank_equals_ranker(service):
    app, client = service
    cands = titles(12, seed=1)
    body = {"history": HISTORY, "preference": "fast and loud", "intention": {"text": "an arena shooter", "kind": "specific"},
            "candidates": [cands[0], {"id": 7, "title": cands[1], "price": 9.99}, *cands[2:]]}
    r = client.post("/rerank", json=body)
    assert r.headers["content-type"] == "application/json"
    assert r.status_code == 200, r.text
    out = r.json()
    need = UserNeed(history=tuple(HISTORY), preference="fast and loud", intention="an arena shooter",
                    intention_kind=Intention.SPECIFIC)
    inst, scored = direct(app, need, cands)
    assert [x["index"] for x in out["results"]] == rank_order(scored.scores)
    assert [x["score"] for x in out["results"]] == [scored.scores[i] for i in rank_order(scored.scores)]
    assert [x["title"] for x in out["results"]] == [cands[i] for i in rank_order(scored.scores)]
    by_index = {x["index"]: x for x in out["results"]}
    assert by_index[1]["id"] == 7 and by_index[0]["id"] is None and "price" not in by_index[1]
    assert not any(x["cached"] for x in out["results"])
    t = out["template"]
    assert t["id"] == inst.template.id == get_template(t["id"]).id
    assert t["label"] == inst.template.label and t["instantiation"] == inst.rendered.instantiation.label()
    assert t["instantiation"] == "<P1,P2,I2,T3>" and t["table_version"] == TEMPLATE_VERSION
    assert out["model"] == {"name": "tiny-random", "checkpoint_version": f"tiny-random+{TEMPLATE_VERSION}"}
    u = out["usage"]
    assert u["source_tokens"] == scored.source_tokens and u["candidate_tokens"] == scored.target_tokens
    assert u["scored_tokens"] == u["total_tokens"] == u["source_tokens"] + u["candidate_tokens"]
    assert out["cache"] == {"enabled": True, "hits": 0, "misses": 12}
    assert out["truncated"] == {"history_dropped": 0, "source_tokens_cut": 0, "candidates_cut": []}

    # an id beyond 64 bits (which orjson refuses) is echoed back all the same
    body["candidates"][2] = {"id": 2**70, "title": cands[2]}
    r = client.post("/rerank", json=body)
    assert r.status_code == 200 and {x["index"]: x["id"] for x in r.json()["results"]}[2] == 2**70

    # top_n, return_scores=false, the instruction alone as a vague intention
    r = client.post("/rerank", json={"instruction": "something calm", "candidates": cands, "top_n": 3,
                                     "return_scores": False})
    out = r.json()
    assert r.status_code == 200 and len(out["results"]) == 3
    assert all(x["score"] is None for x in out["results"])
    _, scored = direct(app, UserNeed(intention="something calm", intention_kind=Intention.VAGUE), cands)
    assert [x["index"] for x in out["results"]] == rank_order(scored.scores)[:3]
    assert out["template"]["instantiation"].endswith("I1,T3>")


def test_template_override_and_truncation(service):
    app, client = service
    cands = titles(5, seed=2) + [" ".join(["halo"] * 60)]  # the last one is cut to max_target_tokens
    history = [f"{' '.join(random.Random(i).choice(WORDS) for _ in range(30))} {i}" for i in range(40)]
    body = {"history": history, "intention": {"text": "a racing game", "kind": "vague"}, "candidates": cands,
            "template": "comb-10"}
    out = client.post("/rerank", json=body).json()
    assert out["template"]["id"] == "comb-10"
    need = UserNeed(history=tuple(history), intention="a racing game", intention_kind=Intention.VAGUE)
    inst, scored = direct(app, need, cands, template_id="comb-10")
    assert inst.history_dropped > 0
    assert out["truncated"]["history_dropped"] == inst.history_dropped
    assert out["truncated"]["candidates_cut"] == [5] and scored.targets_truncated == 1
    assert [x["score"] for x in out["results"]] == [scored.scores[i] for i in rank_order(scored.scores)]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_compat_endpoint(service, path):
    app, client = service
    docs = titles(6, seed=3)
    r = client.post(path, json={"model": "rerank-english-v3.0", "query": "a farming game",
                                "documents": [docs[0], *({"text": d} for d in docs[1:])], "top_n": 4,
                                "return_documents": True, "rank_fields": ["text"]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) >= {"id", "results", "model", "usage", "meta"} and out["model"] == "tiny-random"
    assert out["meta"]["api_version"]["version"] == path[2] and out["meta"]["billed_units"] == {"search_units": 1}
    _, scored = direct(app, UserNeed(intention="a farming game", intention_kind=Intention.SPECIFIC), docs)
    order = rank_order(scored.scores)[:4]
    assert [x["index"] for x in out["results"]] == order
    # the raw score is kept; relevance_score = exp(mean log-likelihood), in [0, 1], same order
    assert [x["log_likelihood"] for x in out["results"]] == [scored.scores[i] for i in order]
    assert [x["relevance_score"] for x in out["results"]] == [math.exp(scored.scores[i]) for i in order]
    rel = [x["relevance_score"] for x in out["results"]]
    assert all(0 < v <= 1 for v in rel) and rel == sorted(rel, reverse=True)
    assert [x["document"] for x in out["results"]] == [{"text": docs[i]} for i in order]
    assert out["usage"]["total_tokens"] == scored.source_tokens + scored.target_tokens
    # without documents; all results
    out = client.post(path, json={"query": "a farming game", "documents": docs}).json()
    assert len(out["results"]) == 6 and "document" not in out["results"][0]


def test_compat_documents_keep_their_fields_and_rank_fields(service):
    app, client = service
    docs = [{"text": "Harvest Moon", "id": "hm", "year": 1996, "tags": ["farm"]}, "Halo 3",
            {"text": "Stardew Valley", "meta": {"price": 14.99}}]
    out = client.post("/v1/rerank", json={"query": "a farming game", "documents": docs,
                                          "return_documents": True}).json()
    by_index = {x["index"]: x["document"] for x in out["results"]}
    assert by_index == {0: docs[0], 1: {"text": "Halo 3"}, 2: docs[2]}  # every field, as sent

    # rank_fields: the named fields make the text; one field -> its value
    games = [{"title": "Harvest Moon", "genre": "farming sim"}, {"title": "Halo 3", "genre": "shooter"},
             {"title": "Stardew Valley", "genre": "farming sim"}]
    need = UserNeed(intention="a farming game", intention_kind=Intention.SPECIFIC)
    out = client.post("/v1/rerank", json={"query": "a farming game", "documents": games, "rank_fields": ["title"],
                                          "return_documents": True}).json()
    _, scored = direct(app, need, [g["title"] for g in games])
    assert [x["index"] for x in out["results"]] == rank_order(scored.scores)
    assert [x["log_likelihood"] for x in out["results"]] == [scored.scores[i] for i in rank_order(scored.scores)]
    assert [x["document"] for x in out["results"]] == [games[i] for i in rank_order(scored.scores)]
    # several fields -> "name: value" joined by "; "
    out = client.post("/v2/rerank", json={"query": "a farming game", "documents": games,
                                          "rank_fields": ["title", "genre"]}).json()
    texts = [f"title: {g['title']}; genre: {g['genre']}" for g in games]
    _, scored = direct(app, need, texts)
    assert [x["log_likelihood"] for x in out["results"]] == [scored.scores[i] for i in rank_order(scored.scores)]


def test_compat_max_tokens_per_doc(service):
    app, client = service
    docs = [" ".join(["racing"] * 20) + " deluxe", " ".join(["puzzle"] * 20), "Halo"]
    need = UserNeed(intention="a racing game", intention_kind=Intention.SPECIFIC)
    out = client.post("/v2/rerank", json={"query": "a racing game", "documents": docs, "max_tokens_per_doc": 4}).json()
    _, scored = direct(app, need, docs, max_target_tokens=5)  # 4 tokens of text + end-of-sequence
    assert scored.targets_truncated == 2
    assert [x["log_likelihood"] for x in out["results"]] == [scored.scores[i] for i in rank_order(scored.scores)]
    # a limit above the model's own changes nothing
    out = client.post("/v2/rerank", json={"query": "a racing game", "documents": docs,
                                          "max_tokens_per_doc": 4096}).json()
    _, scored = direct(app, need, docs)
    assert [x["log_likelihood"] for x in out["results"]] == [scored.scores[i] for i in rank_order(scored.scores)]


# --- cache -----------------------------------------------------------------------------------


def test_cache_hit_equals_miss(service):
    app, client = service
    cands = titles(20, seed=4)
    body = {"history": HISTORY, "intention": {"text": "co-op shooter", "kind": "specific"}, "candidates": cands}
    hits0 = metric(client, "instructrec_cache_hits_total")
    first = client.post("/rerank", json=body).json()
    second = client.post("/rerank", json=body).json()
    assert first["cache"] == {"enabled": True, "hits": 0, "misses": 20}
    assert second["cache"] == {"enabled": True, "hits": 20, "misses": 0}
    assert all(x["cached"] for x in second["results"]) and not any(x["cached"] for x in first["results"])
    assert second["usage"]["scored_tokens"] == 0 and first["usage"]["scored_tokens"] > 0
    strip = lambda res: [(x["index"], x["id"], x["title"], x["score"]) for x in res["results"]]  # noqa: E731
    assert strip(first) == strip(second)  # bit-identical scores and the same order
    assert metric(client, "instructrec_cache_hits_total") - hits0 == 20

    # partial hit: 10 known + 10 new candidates -> only the new ones are scored
    new = titles(10, seed=5)
    mixed = cands[::2] + new
    third = client.post("/rerank", json={**body, "candidates": mixed}).json()
    assert third["cache"] == {"enabled": True, "hits": 10, "misses": 10}
    flags = {x["index"]: x["cached"] for x in third["results"]}
    assert [flags[i] for i in range(20)] == [True] * 10 + [False] * 10
    _, scored = direct(app, UserNeed(history=tuple(HISTORY), intention="co-op shooter",
                                     intention_kind=Intention.SPECIFIC), mixed)
    assert [x["score"] for x in third["results"]] == [scored.scores[i] for i in rank_order(scored.scores)]

    # the template and the history are part of the key: a different one misses
    other_template = client.post("/rerank", json={**body, "template": "comb-11"}).json()
    assert other_template["cache"]["hits"] == 0 and other_template["template"]["id"] == "comb-11"
    other_history = client.post("/rerank", json={**body, "history": HISTORY[:2]}).json()
    assert other_history["cache"]["hits"] == 0
    # whitespace/Unicode-normalised texts share keys
    spaced = client.post("/rerank", json={**body, "intention": {"text": "  co-op   shooter ", "kind": "specific"},
                                          "history": [f" {h} " for h in HISTORY]}).json()
    assert spaced["cache"]["hits"] == 20 and strip(spaced) == strip(first)


def test_a_repeated_request_is_answered_whole_from_the_cache(service):
    """The same request body again is answered from its kept answer: exactly the answer the
    per-candidate cache gives it (every score a hit, nothing scored), under an id of its own."""
    app, client = service
    body = {"history": HISTORY, "preference": "split screen", "candidates": titles(15, seed=21), "top_n": 9}
    hit = {"route": "rerank", "outcome": "hit"}
    miss = {"route": "rerank", "outcome": "miss"}
    hits0, misses0 = metric(client, "instructrec_answer_cache_total", hit), metric(client, "instructrec_answer_cache_total", miss)
    scored0 = metric(client, "instructrec_cache_hits_total")
    first = client.post("/rerank", json=body).json()
    replayed = client.post("/rerank", json=body).json()
    assert metric(client, "instructrec_answer_cache_total", hit) == hits0 + 1
    assert metric(client, "instructrec_answer_cache_total", miss) == misses0 + 1
    assert metric(client, "instructrec_cache_hits_total") == scored0 + 15  # counted as the score cache's hits
    # the same body with its keys in another order is another answer key: the per-candidate cache answers it
    reordered = client.post("/rerank", content=json.dumps(dict(reversed(list(body.items())))),
                            headers={"content-type": "application/json"}).json()
    assert metric(client, "instructrec_answer_cache_total", hit) == hits0 + 1
    assert reordered["cache"] == {"enabled": True, "hits": 15, "misses": 0}
    assert replayed["id"] != first["id"] and replayed["id"] != reordered["id"]
    assert {**replayed, "id": None} == {**reordered, "id": None}
    assert [x["score"] for x in replayed["results"]] == [x["score"] for x in first["results"]]
    assert first["cache"]["misses"] == 15 and len(first["results"]) == 9
    # kept for CACHE_ANSWER_TTL_SECONDS (an hour), the scores for CACHE_TTL_SECONDS (here 600 s)
    state = app.state.service
    key = ServingRerank(state).answer_key(body)
    kept = redis.Redis.from_url(SHARED_REDIS)
    assert 3500 < kept.ttl(key) <= 3600
    # a score's key is NAMESPACE:HEX; "[0-9a-f]*" alone would also match NAMESPACE:answer:... ("a" is hex)
    score_key = next(k for k in kept.scan_iter(f"{state.settings.cache_namespace}:*") if b":answer:" not in k)
    assert 500 < kept.ttl(score_key) <= 600

    # an answer is kept by everything that decides it: the model's version is part of its key
    engine = app.state.service.engine
    version = engine.version
    try:
        engine.version = "another-version"
        other = client.post("/rerank", json=body).json()
    finally:
        engine.version = version
    assert other["model"]["checkpoint_version"] == "another-version" and other["cache"]["hits"] == 0


def test_duplicate_candidates(service):
    app, client = service
    cands = titles(3, seed=6)
    out = client.post("/rerank", json={"intention": {"text": "puzzle"}, "candidates": [cands[0], cands[1], cands[0]]}).json()
    scores = {x["index"]: x["score"] for x in out["results"]}
    assert scores[0] == scores[2] and out["cache"]["misses"] == 2
    assert [x["index"] for x in out["results"]].index(0) < [x["index"] for x in out["results"]].index(2)


# --- auth ------------------------------------------------------------------------------------


def test_auth(service):
    app, client = service
    url = str(client.base_url)
    body = {"intention": {"text": "x"}, "candidates": ["a"]}
    before = metric(client, "instructrec_requests_rejected_total", {"reason": "unauthorized"})
    with httpx.Client(base_url=url) as anon:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
            for path, payload in (("/rerank", body), ("/v1/rerank", {"query": "x", "documents": ["a"]}),
                                  ("/v2/rerank", {"query": "x", "documents": ["a"]})):
                r = anon.post(path, json=payload, headers=headers)
                assert r.status_code == 401, (headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                if path == "/rerank":
                    assert r.json()["error"]["type"] == "unauthorized"
                else:  # Cohere's shape on the compatible routes
                    assert r.json() == {"message": "missing or invalid API key (send 'Authorization: Bearer <key>')"}
        assert anon.post("/rerank", json=body, headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert metric(client, "instructrec_requests_rejected_total", {"reason": "unauthorized"}) - before == 12


# --- bad inputs ------------------------------------------------------------------------------

OK = {"intention": {"text": "a shooter"}, "candidates": ["Halo", "Doom"]}


def _with(**kw):
    return json.dumps({**OK, **kw}).encode()


BAD = [
    # (name, path, raw body, status, error type, field)
    ("missing body", "/rerank", b"", 400, "invalid_request", None),
    ("blank body", "/rerank", b"  \n ", 400, "invalid_request", None),
    ("not json", "/rerank", b"{candidates: [", 400, "invalid_json", None),
    ("invalid utf-8", "/rerank", b'{"intention": {"text": "x"}, "candidates": ["\xff\xfe"]}', 400, "invalid_encoding", None),
    ("5000-digit integer", "/rerank", b'{"candidates": ["a"], "top_n": ' + b"9" * 5000 + b"}", 400, "invalid_json", None),
    ("absurd nesting", "/rerank", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None),
    ("array body", "/rerank", b'["Halo"]', 422, "validation_error", None),
    ("no candidates field", "/rerank", json.dumps({"intention": {"text": "x"}}).encode(), 422, "validation_error", "candidates"),
    ("empty candidates", "/rerank", _with(candidates=[]), 422, "validation_error", "candidates"),
    ("10,001 candidates", "/rerank", _with(candidates=[f"c{i}" for i in range(10_001)]), 422, "validation_error", "candidates"),
    ("1,001 candidates", "/rerank", _with(candidates=[f"c{i}" for i in range(1_001)]), 422, "validation_error", "candidates"),
    ("candidates not a list", "/rerank", _with(candidates="Halo, Doom"), 422, "validation_error", "candidates"),
    ("candidate is a number", "/rerank", _with(candidates=["Halo", 5]), 422, "validation_error", "candidates[1]"),
    ("candidate without title", "/rerank", _with(candidates=[{"id": 1}]), 422, "validation_error", "candidates[0].title"),
    ("candidate id is a float", "/rerank", _with(candidates=[{"id": 1.5, "title": "x"}]), 422, "validation_error", "candidates[0].id"),
    ("blank candidate", "/rerank", _with(candidates=["Halo", "   "]), 422, "validation_error", "candidates[1].title"),
    ("huge candidate string", "/rerank", _with(candidates=["x" * 10_000]), 422, "validation_error", "candidates[0].title"),
    ("huge preference", "/rerank", _with(preference="y" * 501), 422, "validation_error", "preference"),
    ("lone surrogate", "/rerank", b'{"intention": {"text": "x"}, "candidates": ["\\ud800"]}', 422, "validation_error", "candidates[0].title"),
    ("unknown template", "/rerank", _with(template="pref-99"), 422, "template_error", "template"),
    ("incompatible template", "/rerank", _with(template="pref-06"), 422, "template_error", "template"),
    ("non-rankable template", "/rerank", _with(template="int-01"), 422, "template_error", "template"),
    ("nothing to build an instruction from", "/rerank", json.dumps({"candidates": ["a"]}).encode(), 422, "template_error", None),
    ("negative top_n", "/rerank", _with(top_n=-1), 422, "validation_error", "top_n"),
    ("zero top_n", "/rerank", _with(top_n=0), 422, "validation_error", "top_n"),
    ("string top_n", "/rerank", _with(top_n="3"), 422, "validation_error", "top_n"),
    ("float top_n", "/rerank", _with(top_n=2.5), 422, "validation_error", "top_n"),
    ("string return_scores", "/rerank", _with(return_scores="yes"), 422, "validation_error", "return_scores"),
    ("bad intention kind", "/rerank", _with(intention={"text": "x", "kind": "urgent"}), 422, "validation_error", "intention.kind"),
    ("empty intention", "/rerank", _with(intention={"text": " "}), 422, "validation_error", "intention.text"),
    ("intention is a string", "/rerank", _with(intention="a shooter"), 422, "validation_error", "intention"),
    ("preference is a number", "/rerank", _with(preference=42), 422, "validation_error", "preference"),
    ("history is a string", "/rerank", _with(history="Halo"), 422, "validation_error", "history"),
    ("history too long", "/rerank", _with(history=[f"h{i}" for i in range(51)]), 422, "validation_error", "history"),
    ("history item is a list", "/rerank", _with(history=[["Halo"]]), 422, "validation_error", "history[0]"),
    ("unknown field", "/rerank", _with(candidate=["typo"]), 422, "validation_error", "candidate"),
    ("body over the limit", "/rerank", _with(candidates=["z" * 400] * 2600), 413, "payload_too_large", None),
]


@pytest.mark.parametrize("name,path,raw,status,etype,field", BAD, ids=[b[0] for b in BAD])
def test_bad_input(service, name, path, raw, status, etype, field):
    app, client = service
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"type", "message", "field"}
    assert err["type"] == etype and err["field"] == field, err
    assert err["message"] and "Traceback" not in err["message"] and len(err["message"]) < 600


def _q(**kw):
    return json.dumps({"query": "q", "documents": ["a"], **kw}).encode()


COMPAT_BAD = [
    # (name, raw body, status, the field the message names; None: no field)
    ("missing body", b"", 400, None),
    ("not json", b"{query: ", 400, None),
    ("missing query", json.dumps({"documents": ["a"]}).encode(), 422, "query"),
    ("blank query", _q(query="  "), 422, "query"),
    ("empty documents", _q(documents=[]), 422, "documents"),
    ("documents not a list", _q(documents="a, b"), 422, "documents"),
    ("document is a number", _q(documents=["a", 5]), 422, "documents[1]"),
    ("document without text", _q(documents=[{"title": "a"}]), 422, "documents[0].text"),
    ("document text is a number", _q(documents=[{"text": 3}]), 422, "documents[0].text"),
    ("blank document", _q(documents=["a", {"text": " "}]), 422, "documents[1].text"),
    ("huge document", _q(documents=["x" * 501]), 422, "documents[0].text"),
    ("rank field missing", _q(documents=[{"title": "a"}, {"name": "b"}], rank_fields=["title"]), 422,
     "documents[1].title"),
    ("empty rank_fields", _q(rank_fields=[]), 422, "rank_fields"),
    ("negative top_n", _q(top_n=-3), 422, "top_n"),
    ("string top_n", _q(top_n="3"), 422, "top_n"),
    ("zero max_tokens_per_doc", _q(max_tokens_per_doc=0), 422, "max_tokens_per_doc"),
    ("string return_documents", _q(return_documents="yes"), 422, "return_documents"),
    ("10,001 documents", _q(documents=["d"] * 10_001), 422, "documents"),
    ("body over the limit", _q(documents=["z" * 400] * 2600), 413, None),
]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
@pytest.mark.parametrize("name,raw,status,field", COMPAT_BAD, ids=[b[0] for b in COMPAT_BAD])
def test_compat_bad_input(service, path, name, raw, status, field):
    """Cohere's error shape on the compatible routes: {"message": ...}, the message naming the field."""
    app, client = service
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"message"}, body
    message = body["message"]
    assert message and "Traceback" not in message and len(message) < 600
    if field:
        assert message.startswith(f"{field}: "), message


def test_body_limit_without_content_length(service):
    """A chunked body (no Content-Length) is cut off by the streaming guard."""
    app, client = service

    def chunks():
        yield b'{"candidates": ["'
        for _ in range(300):
            yield b"x" * 4096
        yield b'"]}'

    r = client.post("/rerank", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"


def test_other_http_errors_use_the_error_shape(service):
    app, client = service
    r = client.get("/rerank")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = client.get("/v2/rerank")
    assert r.status_code == 405 and r.json() == {"message": "Method Not Allowed"}


def test_rejections_and_histograms_counted(service):
    app, client = service
    invalid = metric(client, "instructrec_requests_rejected_total", {"reason": "invalid"})
    bad = metric(client, "instructrec_requests_rejected_total", {"reason": "bad_request"})
    large = metric(client, "instructrec_requests_rejected_total", {"reason": "body_too_large"})
    assert invalid >= 30 and bad >= 6 and large >= 2  # from test_bad_input
    assert metric(client, "instructrec_request_duration_seconds_count", {"route": "/rerank", "status": "200"}) > 0
    assert metric(client, "instructrec_request_duration_seconds_count", {"route": "/rerank", "status": "422"}) > 0
    assert metric(client, "instructrec_candidates_per_request_count") > 0
    assert metric(client, "instructrec_batch_size_count") > 0 and metric(client, "instructrec_batch_tokens_sum") > 0
    assert metric(client, "instructrec_queue_seconds_count") > 0
    assert metric(client, "instructrec_encode_seconds_sum") > 0 and metric(client, "instructrec_decode_seconds_sum") > 0
    assert metric(client, "instructrec_cache_misses_total") > 0


def test_concurrent_requests_share_batches_and_match_the_ranker():
    """With batch_invariant off, requests arriving together are scored in shared forward passes
    (one batch), and in float32 each answer still equals the ranker called on that request
    alone (within 1e-4, same order)."""
    import asyncio

    settings = Settings(model="tiny-random", device="cpu", dtype="float32", batch_tokens=4096, max_wait_ms=300,
                        redis_url="", batch_invariant=False)
    app = create_app(settings)
    requests = [{"history": HISTORY[: 1 + i % 3], "instruction": f"something like {WORDS[i]}",
                 "candidates": titles(3 + i, seed=40 + i)} for i in range(8)]
    with ServerThread(app) as srv:
        srv.wait_ready()

        async def fire():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/rerank", json=body) for body in requests))

        answers = asyncio.run(fire())
        with httpx.Client(base_url=srv.url) as client:
            batches = metric(client, "instructrec_batch_size_count")
            jobs = metric(client, "instructrec_batch_size_sum")
    assert [a.status_code for a in answers] == [200] * 8
    assert jobs == 8 and batches < 8  # several requests shared a batch
    for body, answer in zip(requests, answers):
        need = UserNeed(history=tuple(body["history"]), intention=body["instruction"], intention_kind=Intention.VAGUE)
        _, scored = direct(app, need, body["candidates"])
        got = answer.json()["results"]
        assert [x["index"] for x in got] == rank_order(scored.scores)
        assert [x["score"] for x in got] == pytest.approx([scored.scores[x["index"]] for x in got], abs=1e-4)
