"""POST /recommend end to end: a real uvicorn server on loopback driven by httpx, the machine's
Redis (unique namespace), a catalogue built by the real CLI code for the tiny prefix-LM.

The answers are checked against the ranker called directly with the same matching (T2)
instruction: with k as large as the catalogue and a beam as wide, generation is exhaustive,
so the answer must be the ranker's full sort of every allowed title, score for score.
"""

from __future__ import annotations

import random

import httpx
import pytest
import torch

from instructrec.aspects import Intention, TaskForm, UserNeed
from instructrec.catalogue import CatalogueItem, build_catalogue
from instructrec.instruction import build
from instructrec.modeling import load_model
from instructrec.ranker import Ranker, rank_order
from instructrec.service.app import ConfigError, create_app
from instructrec.service.settings import Settings
from tests.service_fixtures import SHARED_REDIS, ServerThread, delete_namespace, metric, redis_up, unique_namespace

torch.set_num_threads(1)

MODEL = "tiny-random-prefixlm"
WORDS = "legend zelda mario kart halo doom quest star wars edition remastered deluxe racing puzzle farm".split()
N = 40


def _titles() -> list[str]:
    rnd = random.Random(7)
    out = [" ".join(rnd.choice(WORDS) for _ in range(1 + i % 4)) for i in range(N - 4)]
    return out + ["Halo", "Halo 3", "Halo 3", "Doom Eternal"]  # a prefix title and a duplicate


TITLES = _titles()
IDS = [f"g{i}" for i in range(N)]
# metadata for the filters: a platform on every item but the last, a list of tags
META = [{"platform": "PC" if n % 2 else "PS4", "tags": ["co-op"] if n % 3 == 0 else ["solo", "story"]}
        for n in range(N - 1)] + [None]


@pytest.fixture(scope="module")
def catalogue_file(tmp_path_factory):
    loaded = load_model(MODEL, device="cpu", dtype="float32")
    ranker = Ranker(loaded)
    cat = build_catalogue([CatalogueItem(i, t, META[n]) for n, (i, t) in enumerate(zip(IDS, TITLES))],
                          loaded.tokenizer, eos=ranker.eos, max_target_tokens=ranker.max_target_tokens, model=MODEL)
    return cat.save(tmp_path_factory.mktemp("catalogue") / "games.npz")


def _settings(**kw) -> Settings:
    base = dict(model=MODEL, device="cpu", dtype="float32", batch_tokens=1024, max_wait_ms=2, redis_url=SHARED_REDIS,
                cache_ttl_seconds=600, max_text_chars=500, max_history=50)
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def service(catalogue_file):
    if not redis_up():
        pytest.skip("no Redis at 127.0.0.1:6379")
    namespace = unique_namespace()
    app = create_app(_settings(catalogue=str(catalogue_file), cache_namespace=namespace, beams=N))
    try:
        with ServerThread(app) as srv:
            srv.wait_ready()
            with httpx.Client(base_url=srv.url, timeout=60) as client:
                yield app, client
    finally:
        delete_namespace(SHARED_REDIS, namespace)


def direct(app, need: UserNeed) -> list[float]:
    """Every catalogue title scored by the ranker with the matching instruction the service builds."""
    engine = app.state.service.engine
    inst = build(need, engine.loaded.tokenizer, max_tokens=engine.ranker.max_source_tokens, task=TaskForm.MATCHING)
    return engine.ranker.score(inst.source, TITLES).scores


NEED = {"instruction": "something to race with friends", "history": ["Halo", {"id": "g1", "title": "renamed"}]}


def distinct(order: list[int]) -> list[int]:
    """The first item of each title in ``order``: /recommend answers one item per title."""
    seen: set[str] = set()
    return [i for i in order if not (TITLES[i] in seen or seen.add(TITLES[i]))]


def test_exhaustive_generation_is_the_rankers_sort_of_the_allowed_items(service):
    app, client = service
    r = client.post("/recommend", json={**NEED, "k": N})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["template"]["instantiation"].endswith("T2>")
    ref = direct(app, UserNeed(history=("Halo", "renamed"), intention="something to race with friends",
                               intention_kind=Intention.VAGUE))
    excluded = {TITLES.index("Halo"), 1}  # by title, and by id (its title in the request differs)
    allowed = [i for i in rank_order(ref) if i not in excluded]
    want = distinct(allowed)  # of the two "Halo 3" items only the first in catalogue order (ties keep it)
    assert len(want) == len({TITLES[i] for i in allowed}) < len(allowed)
    assert [x["id"] for x in body["results"]] == [IDS[i] for i in want]
    for x in body["results"]:
        assert x["title"] == TITLES[IDS.index(x["id"])]
        assert x["score"] == pytest.approx(ref[IDS.index(x["id"])], abs=1e-4)
    assert body["catalogue"]["items"] == N and body["catalogue"]["allowed"] == N - 2
    assert body["usage"]["steps"] > 1 and body["cache"] == {"enabled": True, "hit": False}

    again = client.post("/recommend", json={**NEED, "k": N}).json()
    assert again["cache"] == {"enabled": True, "hit": True} and again["usage"]["steps"] == 0
    assert again["results"] == body["results"]  # scores bit for bit (repr-exact JSON floats)

    kept = client.post("/recommend", json={**NEED, "k": N, "exclude_history": False}).json()
    assert [x["id"] for x in kept["results"]] == [IDS[i] for i in distinct(rank_order(ref))]


def test_k_and_the_filters(service):
    app, client = service
    top = client.post("/recommend", json={**NEED, "top_n": 3}).json()["results"]
    assert len(top) == 3
    # k, the earlier name, still works and means the same; the default is 10
    assert client.post("/recommend", json={**NEED, "k": 3}).json()["results"] == top
    assert client.post("/recommend", json={**NEED, "k": 3, "top_n": 3}).json()["results"] == top
    assert len(client.post("/recommend", json=NEED).json()["results"]) == 10
    only = ["g5", "g7", "g9", "g36"]
    got = client.post("/recommend", json={**NEED, "k": 10, "filter": {"ids": only}}).json()
    assert sorted(x["id"] for x in got["results"]) == ["g5", "g7", "g9"]  # g36 is "Halo": in the history
    assert got["catalogue"]["allowed"] == 3
    out = client.post("/recommend", json={**NEED, "k": N, "filter": {"exclude_ids": ["g0", "g2", "g3", 17, "unknown"]}}).json()
    assert not {"g0", "g2", "g3"} & {x["id"] for x in out["results"]} and out["catalogue"]["allowed"] == N - 5
    allowed = [i for i in range(N) if IDS[i] not in ("g0", "g2", "g3", "g1") and TITLES[i] != "Halo"]  # 17 is no id
    assert len(allowed) == N - 5 and len(out["results"]) == len({TITLES[i] for i in allowed})  # one item per title
    none = client.post("/recommend", json={**NEED, "k": 5, "filter": {"ids": ["g36"]}}).json()
    assert none["results"] == [] and none["catalogue"]["allowed"] == 0


def test_the_metadata_filter(service):
    app, client = service
    ref = direct(app, UserNeed(history=("Halo", "renamed"), intention="something to race with friends",
                               intention_kind=Intention.VAGUE))
    history = {TITLES.index("Halo"), 1}
    body = {**NEED, "k": N, "filter": {"meta": {"platform": "PS4", "tags": ["co-op", "no-such-tag"]}}}
    got = client.post("/recommend", json=body).json()
    want = [i for i in rank_order(ref) if i not in history and i < N - 1 and i % 2 == 0 and i % 3 == 0]
    assert want and [x["id"] for x in got["results"]] == [IDS[i] for i in want]
    assert got["catalogue"]["allowed"] == len(want)
    # with ids: both must hold; a key no item has allows nothing
    both = client.post("/recommend", json={**NEED, "k": 5, "filter": {"ids": ["g0", "g6", "g7"], "meta": {"platform": "PS4"}}})
    assert sorted(x["id"] for x in both.json()["results"]) == ["g0", "g6"]
    nothing = client.post("/recommend", json={**NEED, "filter": {"meta": {"colour": "red"}}}).json()
    assert nothing["results"] == [] and nothing["catalogue"]["allowed"] == 0


@pytest.mark.parametrize("body, field", [
    ({"k": 0}, "k"),
    ({"top_n": 0}, "top_n"),
    ({"top_n": 3, "k": 4}, "k"),
    ({"k": 101}, "k"),
    ({"k": "3"}, "k"),
    ({"filter": {"ids": []}}, "filter.ids"),
    ({"filter": {"ids": ["g1", "nope"]}}, "filter.ids[1]"),
    ({"filter": {"where": {}}}, "filter.where"),
    ({"filter": {"meta": {}}}, "filter.meta"),
    ({"filter": {"meta": {"platform": {"name": "PC"}}}}, "filter.meta.platform"),
    ({"filter": {"meta": {"platform": []}}}, "filter.meta.platform"),
    ({"candidates": ["x"]}, "candidates"),
    ({"template": "int-01", "instruction": None}, "template"),
])
def test_bad_requests_name_the_field(service, body, field):
    app, client = service
    r = client.post("/recommend", json={**NEED, **body})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field


def test_a_rerank_template_is_refused_for_generation(service):
    app, client = service
    r = client.post("/recommend", json={**NEED, "template": "comb-09"})
    assert r.status_code == 422 and "T3" in r.json()["error"]["message"] and "T2" in r.json()["error"]["message"]


def test_metrics_count_generation_and_the_answer_cache(service):
    app, client = service
    steps = metric(client, "instructrec_generate_steps_count")
    hits = metric(client, "instructrec_answer_cache_total", {"route": "recommend", "outcome": "hit"})
    need = {"instruction": "a puzzle game for a long trip", "k": 2}
    client.post("/recommend", json=need)
    client.post("/recommend", json=need)
    assert metric(client, "instructrec_generate_steps_count") == steps + 1
    assert metric(client, "instructrec_answer_cache_total", {"route": "recommend", "outcome": "hit"}) == hits + 1
    assert metric(client, "instructrec_request_duration_seconds_count", {"route": "/recommend", "status": "200"}) >= 2


def test_without_a_catalogue_recommend_says_how_to_get_one():
    app = create_app(_settings(redis_url=""))
    with ServerThread(app) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            r = client.post("/recommend", json=NEED)
            assert r.status_code == 409
            from instructrec.service.routes import router

            route = next(x for x in router.routes if getattr(x, "path", None) == "/recommend")
            route.responses[409]["model"].model_validate(r.json())  # the documented error shape
            err = r.json()["error"]
            assert err["type"] == "no_catalogue" and "instructrec catalogue build" in err["message"]
            assert metric(client, "instructrec_requests_rejected_total", {"reason": "no_catalogue"}) == 1
            assert client.post("/rerank", json={**NEED, "candidates": ["Halo"]}).status_code == 200


def test_a_missing_or_mismatched_catalogue_fails_the_start(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        create_app(_settings(catalogue=str(tmp_path / "nope.npz"), redis_url=""))
    loaded = load_model(MODEL, device="cpu", dtype="float32")
    other = build_catalogue([CatalogueItem("a", "Halo")], loaded.tokenizer, eos=Ranker(loaded).eos,
                            max_target_tokens=20).save(tmp_path / "short.npz")
    app = create_app(_settings(catalogue=str(other), redis_url=""))
    with ServerThread(app) as srv:
        with pytest.raises(RuntimeError, match="cut to 20 tokens"):
            srv.wait_ready()
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and "instructrec catalogue build" in health.json()["error"]


def test_a_batch_mixing_rerank_and_generation_jobs_answers_each_as_alone(service):
    """The batcher's score function takes both kinds of job in one batch (batch invariance off
    lets the service batch several requests): each gets what it gets alone."""
    import numpy as np

    from instructrec.ranker import Encoded
    from instructrec.service.engine import RecommendJob

    app, _ = service
    engine = app.state.service.engine
    source = engine.ranker.source_ids("The user played Halo. Which game next?")[0]
    rerank = engine.ranker.encode("The user played Halo. Which game next?", ["Halo 3", "Doom Eternal"])
    allowed = np.ones(N, dtype=bool)
    allowed[0] = False
    job = RecommendJob(source, 4, allowed, N)
    results, _, decode = engine.run_jobs([rerank, job, rerank])
    assert decode > 0
    assert results[0].scores == results[2].scores == engine.ranker.score_many([rerank])[0].scores
    alone = engine.generate(job)
    assert [(r.item, r.score) for r in results[1].items] == [(r.item, r.score) for r in alone.items]
    assert len(alone.items) == 4 and 0 not in {r.item for r in alone.items}
    assert isinstance(rerank, Encoded)
