"""Hybrid scoring in the service: /rerank, /v1/rerank and /v2/rerank fuse the LM's scores with
the behaviour and semantic signals through the service's gate.

Real uvicorn on loopback, httpx, the machine's Redis (LM scores cached, fusion per request),
a tiny random prefix-LM, a gate with known weights saved as gate.json, a behaviour index built
over a few items and the real MiniLM encoder (one per process, shared with the reference). Every
fused answer is checked against :meth:`Hybrid.fuse` computed directly on the same LM scores.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from instructrec.aspects import Intention, UserNeed
from instructrec.hybrid import Hybrid
from instructrec.hybrid.behaviour import build_behaviour_index, load_behaviour_index
from instructrec.hybrid.gate import FEATURES, SIGNALS, Gate
from instructrec.ranker import rank_order
from instructrec.service.app import ConfigError, create_app
from instructrec.service.engine import shared_semantic_encoder
from instructrec.service.settings import Settings
from tests.service_fixtures import SHARED_REDIS, ServerThread, delete_namespace, metric, redis_up, unique_namespace

torch.set_num_threads(1)

MODEL = "tiny-random-prefixlm"
TITLES = ["Halo 3", "Halo 2", "Gears of War", "Portal", "Portal 2", "Stardew Valley", "Harvest Moon", "Doom",
          "Dead Space", "Tetris"]
ITEMS = [(f"g{k}", t) for k, t in enumerate(TITLES)]
SEQUENCES = [["g0", "g1", "g2", "g8"], ["g1", "g0", "g2"], ["g3", "g4", "g9"], ["g5", "g6", "g9"], ["g0", "g2", "g7"],
             ["g2", "g8", "g7"], ["g5", "g6"], ["g3", "g4"]]


def known_gate() -> Gate:
    """Weights chosen so both signals matter and depend on the request."""
    w = np.zeros((len(SIGNALS), len(FEATURES)))
    w[SIGNALS.index("behaviour"), FEATURES.index("bias")] = 0.8
    w[SIGNALS.index("behaviour"), FEATURES.index("known")] = 0.4
    w[SIGNALS.index("semantic"), FEATURES.index("bias")] = 0.5
    w[SIGNALS.index("semantic"), FEATURES.index("vague")] = 1.5
    return Gate(w, temperature=1.3, info={"test": True})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from instructrec.catalogue import CatalogueItem, build_catalogue
    from instructrec.modeling import load_model
    from instructrec.ranker import Ranker

    root = tmp_path_factory.mktemp("hybrid")
    gate = known_gate().save(root / "gate.json")
    index = build_behaviour_index(SEQUENCES, ITEMS, top_n=50).save(root / "behaviour.npz")
    loaded = load_model(MODEL, device="cpu", dtype="float32")
    ranker = Ranker(loaded)

    def catalogue(items, name):
        cat = build_catalogue([CatalogueItem(i, t) for i, t in items], loaded.tokenizer, eos=ranker.eos,
                              max_target_tokens=ranker.max_target_tokens)
        return cat.save(root / name)

    return {"gate": gate, "behaviour": index, "catalogue": catalogue(ITEMS, "cat.npz"),
            "other_catalogue": catalogue(ITEMS[:-1] + [("x1", "Another Game")], "other.npz"), "root": root}


def _settings(**kw) -> Settings:
    base = dict(model=MODEL, device="cpu", dtype="float32", batch_tokens=1024, max_wait_ms=1, torch_threads=1,
                redis_url=SHARED_REDIS if redis_up() else "")
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def hybrid_service(files):
    namespace = unique_namespace()
    settings = _settings(gate=str(files["gate"]), behaviour=str(files["behaviour"]), catalogue=str(files["catalogue"]),
                         cache_namespace=namespace)
    with ServerThread(create_app(settings)) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            yield client
    if settings.cache_enabled:
        delete_namespace(SHARED_REDIS, namespace)


@pytest.fixture(scope="module")
def reference(files) -> Hybrid:
    """The core's hybrid on the same files (the process's one MiniLM encoder)."""
    from instructrec.hybrid.gate import load_gate

    return Hybrid(load_gate(files["gate"]), load_behaviour_index(files["behaviour"]), shared_semantic_encoder())


REQUEST = {"history": [{"id": "g0", "title": "Halo 3"}, {"id": "g1", "title": "Halo 2"}],
           "instruction": "a scary shooter",
           "candidates": [{"id": "g2", "title": "Gears of War"}, {"id": "g8", "title": "Dead Space"},
                          {"id": "g5", "title": "Stardew Valley"}, {"id": "g9", "title": "Tetris"},
                          {"id": "g7", "title": "Doom"}]}


def need_of(body: dict) -> UserNeed:
    """The need /rerank builds: history titles, ``instruction`` as a vague intention."""
    history = tuple(h["title"] if isinstance(h, dict) else h for h in body.get("history", []))
    return UserNeed(history=history, intention=body.get("instruction"),
                    intention_kind=Intention.VAGUE if body.get("instruction") else None)


def _titles(body: dict) -> list[str]:
    return [c["title"] if isinstance(c, dict) else c for c in body["candidates"]]


def lm_scores(client: httpx.Client, body: dict) -> list[float]:
    """The LM's scores per request candidate, from the same service's lm-only answer."""
    answer = client.post("/rerank", json={**body, "fusion": "lm-only"}).json()
    scores = [0.0] * len(body["candidates"])
    for r in answer["results"]:
        scores[r["index"]] = r["score"]
    return scores


def check_fused(answer: dict, expected, lm: list[float]) -> None:
    """A fused /rerank answer equals the core's fusion of the same LM scores."""
    assert answer["fusion"]["mode"] == "fused"
    order = rank_order(expected.scores.tolist())
    assert [r["index"] for r in answer["results"]] == order
    for r in answer["results"]:
        i = r["index"]
        assert r["score"] == pytest.approx(expected.scores[i], abs=1e-6)
        assert r["relevance"] == pytest.approx(expected.relevance[i], abs=1e-6)
        assert set(r["components"]) == {*expected.components, "lm_loglik"}
        for name, values in expected.components.items():
            assert r["components"][name] == pytest.approx(values[i], abs=1e-6)
        assert r["components"]["lm_loglik"] == lm[i]
    assert answer["fusion"]["weights"] == pytest.approx(expected.weights, abs=1e-9)
    assert answer["fusion"]["signals"] == list(expected.components)
    assert sum(r["relevance"] for r in answer["results"]) == pytest.approx(1.0)


def test_fused_answer_equals_the_cores_fusion_of_the_same_lm_scores(hybrid_service, reference):
    lm = lm_scores(hybrid_service, REQUEST)
    first = hybrid_service.post("/rerank", json=REQUEST)
    assert first.status_code == 200, first.text
    answer = first.json()
    ids = [c["id"] for c in REQUEST["candidates"]]
    expected = reference.fuse(lm, need_of(REQUEST), _titles(REQUEST), ids, ["g0", "g1"])
    assert set(expected.components) == {"lm", "behaviour", "semantic"}
    check_fused(answer, expected, lm)
    f = answer["fusion"]
    assert f["requested"] == "auto" and f["without_behaviour"] == []
    assert f["gate_version"] == reference.gate.version and f["hybrid_version"] == reference.version
    assert hybrid_service.get("/ready").json()["hybrid_version"] == reference.version
    # again: the LM scores come from the cache (LM-only there), the fusion is the same
    again = hybrid_service.post("/rerank", json=REQUEST).json()
    if again["cache"]["enabled"]:
        assert again["cache"]["hits"] == len(ids) and all(r["cached"] for r in again["results"])
    assert [(r["index"], r["score"], r["relevance"]) for r in again["results"]] == \
        [(r["index"], r["score"], r["relevance"]) for r in answer["results"]]


def test_the_sequential_signal_from_a_model_beside_the_gate(files, tmp_path):
    """A SASRec (INSTRUCTREC_SEQUENTIAL) adds its own z-scored component, computed on the model
    thread from the resolved ids; the answer equals the core's fusion with it, and a gate fitted
    with a sequential model refuses to start without one."""
    from instructrec.hybrid.gate import load_gate
    from instructrec.hybrid.sequential import SASRecConfig, load_sequential, new_scorer

    torch.manual_seed(3)
    new_scorer(SASRecConfig(items=len(ITEMS), hidden=16, heads=2, inner=32), [i for i, _ in ITEMS]).save(tmp_path / "seq")
    w = known_gate().weights.copy()
    w[SIGNALS.index("sequential"), FEATURES.index("bias")] = 1.2
    gate = Gate(w, temperature=1.3, info={"sequential": "test"}).save(tmp_path / "gate.json")
    settings = _settings(gate=str(gate), behaviour=str(files["behaviour"]), sequential=str(tmp_path / "seq"),
                         redis_url="")
    with ServerThread(create_app(settings)) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            lm = lm_scores(client, REQUEST)
            answer = client.post("/rerank", json=REQUEST).json()
    reference = Hybrid(load_gate(gate), load_behaviour_index(files["behaviour"]), shared_semantic_encoder(),
                       load_sequential(tmp_path / "seq"))
    expected = reference.fuse(lm, need_of(REQUEST), _titles(REQUEST), [c["id"] for c in REQUEST["candidates"]],
                              ["g0", "g1"])
    assert set(expected.components) == {"lm", "behaviour", "semantic", "sequential"}
    check_fused(answer, expected, lm)
    without = _settings(gate=str(gate), behaviour=str(files["behaviour"]), redis_url="", sequential="none")
    with ServerThread(create_app(without)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        with pytest.raises(RuntimeError, match="was fitted with a sequential model"):
            srv.wait_ready()
        assert client.get("/health").status_code == 503


@pytest.mark.skipif(not redis_up(), reason="needs the Redis at " + SHARED_REDIS)
def test_a_cached_fused_request_is_answered_without_the_model(files, tmp_path):
    """With every LM score cached and the history's sequential state kept, a fused request is
    answered from the prep thread alone: no batch is scored, and the answer equals the first
    one. The same history with new candidates needs the LM, not the sequential model's state,
    and still equals the core's fusion."""
    from instructrec.hybrid.gate import load_gate
    from instructrec.hybrid.sequential import SASRecConfig, load_sequential, new_scorer

    torch.manual_seed(5)
    new_scorer(SASRecConfig(items=len(ITEMS), hidden=16, heads=2, inner=32), [i for i, _ in ITEMS]).save(tmp_path / "seq")
    w = known_gate().weights.copy()
    w[SIGNALS.index("sequential"), FEATURES.index("bias")] = 1.2
    gate = Gate(w, temperature=1.3, info={"sequential": "test"}).save(tmp_path / "gate.json")
    namespace = unique_namespace()
    settings = _settings(gate=str(gate), behaviour=str(files["behaviour"]), sequential=str(tmp_path / "seq"),
                         catalogue=str(files["catalogue"]), cache_namespace=namespace)
    reference = Hybrid(load_gate(gate), load_behaviour_index(files["behaviour"]), shared_semantic_encoder(),
                       load_sequential(tmp_path / "seq"))
    other = {**REQUEST, "candidates": [{"id": "g7", "title": "Doom"}, {"id": "g4", "title": "Portal 2"},
                                       {"id": "g6", "title": "Harvest Moon"}]}
    try:
        with ServerThread(create_app(settings)) as srv:
            srv.wait_ready()
            with httpx.Client(base_url=srv.url, timeout=60) as client:
                first = client.post("/rerank", json=REQUEST).json()
                batches = metric(client, "instructrec_batch_size_count")
                again = client.post("/rerank", json=REQUEST).json()
                assert metric(client, "instructrec_batch_size_count") == batches
                new = client.post("/rerank", json=other).json()
                assert metric(client, "instructrec_batch_size_count") == batches + 1  # the LM's misses
                lm = lm_scores(client, other)
    finally:
        delete_namespace(SHARED_REDIS, namespace)
    assert again["cache"]["hits"] == len(REQUEST["candidates"]) and first["fusion"]["mode"] == "fused"
    assert "sequential" in first["fusion"]["signals"]
    assert [(r["index"], r["score"], r["relevance"], r["components"]) for r in again["results"]] == \
        [(r["index"], r["score"], r["relevance"], r["components"]) for r in first["results"]]
    expected = reference.fuse(lm, need_of(other), _titles(other), [c["id"] for c in other["candidates"]], ["g0", "g1"])
    check_fused(new, expected, lm)


def test_lm_only_is_todays_answer(hybrid_service, files):
    """fusion=lm-only on the hybrid service, and auto on a service without a gate, answer what
    /rerank answered before fusion: ranked by the LM's score, no relevance or components."""
    lm_only = hybrid_service.post("/rerank", json={**REQUEST, "fusion": "lm-only"}).json()
    with ServerThread(create_app(_settings(redis_url=""))) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as plain:
            auto = plain.post("/rerank", json=REQUEST).json()
            assert plain.get("/ready").json()["hybrid_version"] is None
    for answer, requested in ((lm_only, "lm-only"), (auto, "auto")):
        assert answer["fusion"]["mode"] == "lm-only" and answer["fusion"]["requested"] == requested
        assert answer["fusion"]["weights"] is None and answer["fusion"]["without_behaviour"] is None
        assert answer["fusion"]["signals"] == ["lm"]
        assert all(r["relevance"] is None and r["components"] is None for r in answer["results"])
    assert auto["fusion"]["gate_version"] is None and lm_only["fusion"]["gate_version"] is not None
    assert [(r["index"], r["score"]) for r in lm_only["results"]] == [(r["index"], r["score"]) for r in auto["results"]]
    scores = [r["score"] for r in auto["results"]]
    assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)


def test_titles_only_are_matched_by_title(hybrid_service, reference):
    """History and candidates sent as titles (as the README demo does) are the index's items by
    exact title (normalised): the same answer as with ids."""
    titles_only = {"history": ["Halo 3", "Halo  2 "], "instruction": REQUEST["instruction"],
                   "candidates": _titles(REQUEST)}
    with_ids = hybrid_service.post("/rerank", json=REQUEST).json()
    answer = hybrid_service.post("/rerank", json=titles_only).json()
    assert answer["fusion"]["without_behaviour"] == []
    assert [(r["index"], r["score"], r["relevance"]) for r in answer["results"]] == \
        pytest.approx([(r["index"], r["score"], r["relevance"]) for r in with_ids["results"]], abs=1e-6)


def test_unknown_items_fall_back(hybrid_service, reference):
    """Unknown candidates have no behaviour signal (listed); with no history item the index
    knows the behaviour signal is absent and the answer ranks exactly as LM + semantic would."""
    partly = {**REQUEST, "candidates": [*REQUEST["candidates"], {"id": "nope", "title": "Unknown Game"},
                                        "Another Unknown"]}
    lm = lm_scores(hybrid_service, partly)
    answer = hybrid_service.post("/rerank", json=partly).json()
    ids = [c.get("id") if isinstance(c, dict) else None for c in partly["candidates"]]
    expected = reference.fuse(lm, need_of(partly), _titles(partly), [*ids[:5], None, None], ["g0", "g1"])
    check_fused(answer, expected, lm)
    assert answer["fusion"]["without_behaviour"] == [5, 6]

    strangers = {**REQUEST, "history": [{"id": "h-unknown", "title": "Not In The Index"}, "Nor This"]}
    lm = lm_scores(hybrid_service, strangers)
    answer = hybrid_service.post("/rerank", json=strangers).json()
    need = need_of(strangers)
    semantic = reference.semantic.similarities(need, _titles(strangers))
    remaining = reference.gate.fuse(lm, need, semantic=semantic)  # the LM and the semantic signal alone
    check_fused(answer, remaining, lm)
    assert answer["fusion"]["signals"] == ["lm", "semantic"]
    assert answer["fusion"]["without_behaviour"] == list(range(5))
    assert all("behaviour" not in r["components"] for r in answer["results"])


def test_bad_fusion_value_is_a_422_naming_the_field(hybrid_service):
    r = hybrid_service.post("/rerank", json={**REQUEST, "fusion": "semantic-only"})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "fusion" and "auto" in r.json()["error"]["message"]
    r = hybrid_service.post("/v2/rerank", json={"query": "q", "documents": ["Halo"], "fusion": 1})
    assert r.status_code == 422 and r.json()["message"].startswith("fusion: ")


def test_cohere_relevance_score_is_the_fused_relevance(hybrid_service, reference):
    docs = ["Stardew Valley", "Doom", {"id": "g6", "text": "Harvest Moon"}, "Tetris"]
    query = "a relaxing farming game"
    body = {"model": "instructrec", "query": query, "documents": docs}
    lm_only = hybrid_service.post("/v2/rerank", json={**body, "fusion": "lm-only"}).json()
    lm = [0.0] * len(docs)
    for r in lm_only["results"]:
        lm[r["index"]] = r["log_likelihood"]
        assert r["relevance_score"] == pytest.approx(np.exp(r["log_likelihood"]))
    answer = hybrid_service.post("/v2/rerank", json=body).json()
    need = UserNeed(intention=query, intention_kind=Intention.SPECIFIC)
    texts = ["Stardew Valley", "Doom", "Harvest Moon", "Tetris"]
    expected = reference.fuse(lm, need, texts, [None, None, "g6", None], [])
    assert set(expected.components) == {"lm", "semantic"}  # no history: no behaviour signal
    assert [r["index"] for r in answer["results"]] == rank_order(expected.scores.tolist())
    for r in answer["results"]:
        assert r["relevance_score"] == pytest.approx(expected.relevance[r["index"]], abs=1e-6)
        assert r["log_likelihood"] == lm[r["index"]]
        assert r["components"]["semantic"] == pytest.approx(expected.components["semantic"][r["index"]], abs=1e-6)
    assert answer["fusion"]["mode"] == "fused"
    v1 = hybrid_service.post("/v1/rerank", json=body).json()
    assert [(r["index"], r["relevance_score"]) for r in v1["results"]] == \
        [(r["index"], r["relevance_score"]) for r in answer["results"]]


def test_cohere_sdk_reads_a_fused_answer(hybrid_service):
    cohere = pytest.importorskip("cohere")
    co = cohere.ClientV2(api_key="any", base_url=str(hybrid_service.base_url).rstrip("/"))
    response = co.rerank(model="instructrec", query="a relaxing farming game", top_n=2,
                         documents=["Stardew Valley", "Doom", "Harvest Moon", "Tetris"])
    assert len(response.results) == 2
    assert all(0 <= r.relevance_score <= 1 for r in response.results)
    assert response.results[0].relevance_score >= response.results[1].relevance_score


def test_fusion_metrics(hybrid_service):
    def read():
        return {"fused": metric(hybrid_service, "instructrec_fusion_requests_total", {"mode": "fused"}),
                "lm": metric(hybrid_service, "instructrec_fusion_requests_total", {"mode": "lm-only"}),
                "without": metric(hybrid_service, "instructrec_fusion_candidates_without_behaviour_total"),
                "w_beh": metric(hybrid_service, "instructrec_fusion_gate_weight_count", {"signal": "behaviour"}),
                "w_sem": metric(hybrid_service, "instructrec_fusion_gate_weight_count", {"signal": "semantic"}),
                "seconds": metric(hybrid_service, "instructrec_fusion_seconds_count")}

    first = {**REQUEST, "top_n": 4}  # a request no other test sends: its fusion is computed here
    before = read()
    hybrid_service.post("/rerank", json=first)
    hybrid_service.post("/rerank", json={**REQUEST, "candidates": [*REQUEST["candidates"], "Unknown Title"]})
    hybrid_service.post("/rerank", json={**REQUEST, "fusion": "lm-only"})
    after = read()
    delta = {k: after[k] - before[k] for k in before}
    assert delta == {"fused": 2, "lm": 1, "without": 1, "w_beh": 2, "w_sem": 2, "seconds": 2}
    # the same request again is answered whole from the cache: counted as fused with the gate's
    # weights as the first time, but no fusion is computed
    hybrid_service.post("/rerank", json=first)
    again = read()
    assert {k: again[k] - after[k] for k in before} == {"fused": 1, "lm": 0, "without": 0, "w_beh": 1, "w_sem": 1,
                                                        "seconds": 0}
    # the gate's weight of this request: 0.8 + 0.4 * known (1.0) for behaviour
    text = hybrid_service.get("/metrics").text
    assert 'instructrec_fusion_gate_weight_bucket{le="2.0",signal="behaviour"}' in text


def test_an_index_for_another_catalogue_is_refused_at_start_up(files):
    settings = _settings(redis_url="", gate=str(files["gate"]), behaviour=str(files["behaviour"]),
                         catalogue=str(files["other_catalogue"]))
    with ServerThread(create_app(settings)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        with pytest.raises(RuntimeError, match="another item set"):
            srv.wait_ready()
        health = client.get("/health")
        assert health.status_code == 503
        error = health.json()["error"]
        assert str(files["behaviour"]) in error and str(files["other_catalogue"]) in error and "rebuild" in error


def test_missing_and_bad_files_are_clear_errors(files, tmp_path):
    with pytest.raises(ConfigError, match=f"gate file {tmp_path / 'none.json'} does not exist"):
        create_app(_settings(gate=str(tmp_path / "none.json")))
    with pytest.raises(ConfigError, match=f"behaviour index {tmp_path / 'b.npz'} does not exist"):
        create_app(_settings(gate=str(files["gate"]), behaviour=str(tmp_path / "b.npz")))
    with pytest.raises(ConfigError, match="without a gate"):
        create_app(_settings(behaviour=str(files["behaviour"])))
    bad = tmp_path / "gate.json"
    bad.write_text("{not json")
    with ServerThread(create_app(_settings(redis_url="", gate=str(bad)))) as srv:
        with pytest.raises(RuntimeError, match="not a readable gate file"):
            srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            assert str(bad) in client.get("/health").json()["error"]


def test_the_gate_beside_the_model_is_the_default(files, tmp_path):
    """A checkpoint directory holding gate.json fuses by default; INSTRUCTREC_GATE=none turns it off."""
    from instructrec.service.engine import gate_path

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    assert gate_path(_settings(), str(model_dir)) is None
    (model_dir / "gate.json").write_text(files["gate"].read_text())
    assert gate_path(_settings(), str(model_dir)) == model_dir / "gate.json"
    assert gate_path(_settings(gate="none"), str(model_dir)) is None
    assert gate_path(_settings(gate=str(model_dir)), MODEL) == model_dir / "gate.json"


def test_without_scores_the_answer_still_ranks_by_the_fusion(hybrid_service):
    hidden = hybrid_service.post("/rerank", json={**REQUEST, "return_scores": False, "top_n": 2}).json()
    full = hybrid_service.post("/rerank", json=REQUEST).json()
    assert hidden["fusion"]["mode"] == "fused"
    assert [r["index"] for r in hidden["results"]] == [r["index"] for r in full["results"][:2]]
    assert all(r["score"] is None and r["relevance"] is None and r["components"] is None for r in hidden["results"])


def test_the_encoder_runs_only_on_the_inference_thread(hybrid_service):
    """Every MiniLM pass of the service is on its one model thread (two threads running torch
    ops would be two OpenMP teams); with every vector cached no pass runs at all."""
    import threading

    encoder = shared_semantic_encoder()
    threads: list[str] = []
    original = encoder._encode

    def recording(texts):
        threads.append(threading.current_thread().name)
        return original(texts)

    encoder._encode = recording
    try:
        body = {**REQUEST, "instruction": "a brand new wish", "candidates": [*REQUEST["candidates"], "Fresh Title 1"]}
        first = hybrid_service.post("/rerank", json=body).json()
        assert threads and all(name.startswith("instructrec-infer") for name in threads), threads
        seen = len(threads)
        again = hybrid_service.post("/rerank", json=body).json()
        assert len(threads) == seen  # all cached: computed without the model
    finally:
        del encoder._encode
    assert [(r["index"], r["score"]) for r in again["results"]] == [(r["index"], r["score"]) for r in first["results"]]


def test_cached_only_similarities_equal_the_encoders():
    from instructrec.hybrid.semantic import NotCached

    encoder = shared_semantic_encoder()
    need = UserNeed(history=("Halo 3",), intention="never seen before 42", intention_kind=Intention.VAGUE)
    with pytest.raises(NotCached):
        encoder.similarities(need, ["Doom"], cached_only=True)
    computed = encoder.similarities(need, ["Doom", "Tetris"])
    assert np.array_equal(encoder.similarities(need, ["Doom", "Tetris"], cached_only=True), computed)


def test_fused_recommend_ranks_what_the_signals_retrieve_as_rerank_would(files):
    """/recommend on a service with a gate: with every source proposing the whole (small)
    catalogue, the answer is /rerank's fused ranking of every allowed item, top k, scores and
    relevance equal; one item per title; lm-only is the model's own generation."""
    settings = _settings(gate=str(files["gate"]), behaviour=str(files["behaviour"]), catalogue=str(files["catalogue"]),
                         retrieve_per_source=100, redis_url="")
    body = {"history": REQUEST["history"], "instruction": REQUEST["instruction"], "k": 4}
    with ServerThread(create_app(settings)) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            answer = client.post("/recommend", json=body)
            assert answer.status_code == 200, answer.text
            answer = answer.json()
            allowed = [{"id": i, "title": t} for i, t in ITEMS if i not in ("g0", "g1")]
            reranked = client.post("/rerank", json={"history": REQUEST["history"], "instruction": REQUEST["instruction"],
                                                    "candidates": allowed}).json()
            plain = client.post("/recommend", json={**body, "fusion": "lm-only"}).json()
    assert answer["fusion"]["mode"] == "fused" and answer["usage"]["ranked"] == len(allowed)
    want = [(allowed[r["index"]]["id"], r["score"], r["relevance"]) for r in reranked["results"]][:4]
    got = [(r["id"], r["score"], r["relevance"]) for r in answer["results"]]
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want):
        assert g[1] == pytest.approx(w[1], abs=1e-6) and g[2] == pytest.approx(w[2], abs=1e-6)
    assert answer["fusion"]["weights"] == pytest.approx(reranked["fusion"]["weights"], abs=1e-9)
    assert all(set(r["components"]) >= {"lm", "behaviour", "semantic", "lm_loglik"} for r in answer["results"])
    assert plain["fusion"]["mode"] == "lm-only" and all(r["relevance"] is None for r in plain["results"])
    assert plain["usage"]["ranked"] is None and len({r["title"] for r in plain["results"]}) == len(plain["results"])


def test_fused_answers_on_two_lanes_are_the_answers_alone(files):
    """Two lanes: fused /recommend (retrieval through the MiniLM encoder, the LM scoring the
    retrieved titles as text with the ranker's own tokenizer, on a lane) and fused /rerank requests
    sent at once, each gets its answer alone: the same items in the same order, the same scores
    bit for bit (every text's semantic vector is encoded alone, so no batch leaves its rounding)."""
    import asyncio

    settings = _settings(gate=str(files["gate"]), behaviour=str(files["behaviour"]), catalogue=str(files["catalogue"]),
                         retrieve_per_source=100, redis_url="", lanes=2)
    calls = []
    for k in range(6):
        history = [TITLES[(k + j) % len(TITLES)] for j in range(1 + k % 3)]
        need = {"history": history, "instruction": f"something like {TITLES[(k + 5) % len(TITLES)]}"}
        calls.append(("/recommend", {**need, "k": 2 + k % 3}))
        calls.append(("/rerank", {**need, "candidates": TITLES[k % 4 : k % 4 + 6]}))

    def items(body: dict) -> list:
        return [(r.get("id", r.get("index")), r["score"]) for r in body["results"]]

    with ServerThread(create_app(settings)) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            alone = [client.post(route, json=body).json() for route, body in calls]

        async def together():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as ac:
                return await asyncio.gather(*(ac.post(route, json=body) for route, body in calls))

        answers = asyncio.run(together())
        peak = srv.app.state.service.batcher.peak_busy
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    assert peak == 2
    for a, r in zip(alone, answers):
        assert a["fusion"]["mode"] == "fused"
        want, got = items(a), items(r.json())
        assert [g[0] for g in got] == [w[0] for w in want]
        assert [g[1] for g in got] == [w[1] for w in want]


def test_title_vectors_are_computed_while_rerank_answers(files, tmp_path, monkeypatch):
    """Without title vectors kept beside the catalogue the service is ready at once and computes
    them in the background, each title alone: meanwhile /rerank answers as it does afterwards,
    even with the background stopped in the middle of encoding a title (it holds no lock there),
    a fused /recommend gets a 503 naming the progress with a Retry-After (lm-only answers); then
    the fused /recommend answers, and the file kept holds each title's vector encoded alone."""
    import threading
    import time

    from instructrec.catalogue import CatalogueItem, build_catalogue
    from instructrec.hybrid.semantic import catalogue_keep
    from instructrec.modeling import load_model
    from instructrec.ranker import Ranker

    # titles no other test encodes, so this process computes each of them here
    items = [(f"v{k}", f"Quiet Lighthouse Saga {word}") for k, word in
             enumerate(["Amber", "Birch", "Cobalt", "Dune", "Ember", "Fjord", "Garnet", "Heath", "Iris", "Juniper"])]
    loaded = load_model(MODEL, device="cpu", dtype="float32")
    cat = build_catalogue([CatalogueItem(i, t) for i, t in items], loaded.tokenizer, eos=Ranker(loaded).eos,
                          max_target_tokens=Ranker(loaded).max_target_tokens).save(tmp_path / "cat.npz")
    sequences = [["v0", "v1", "v2"], ["v1", "v3", "v4"], ["v2", "v5", "v6"], ["v0", "v7", "v8", "v9"]]
    index = build_behaviour_index(sequences, items, top_n=50).save(tmp_path / "behaviour.npz")
    encoder = shared_semantic_encoder()
    titles = [t for _, t in items]
    kept = encoder.kept_vectors_path(titles, catalogue_keep(cat))
    assert not kept.exists()

    release = threading.Event()
    encode = encoder._encode

    def held(texts, *args, **kwargs):  # the background stops inside its fourth title until the test lets it go on
        if threading.current_thread().name == "instructrec-infer-title-vectors" and texts == [titles[3]]:
            release.wait(60)
        return encode(texts, *args, **kwargs)

    monkeypatch.setattr(encoder, "_encode", held)
    settings = _settings(gate=str(files["gate"]), behaviour=str(index), catalogue=str(cat), redis_url="",
                         max_queue_wait_ms=300, retrieve_per_source=100)
    rerank = {"history": [{"id": "v0", "title": titles[0]}, {"id": "v1", "title": titles[1]}],
              "instruction": "a calm seaside story",
              "candidates": [{"id": f"v{k}", "title": titles[k]} for k in (2, 5, 6, 8, 9)]}
    recommend = {"history": rerank["history"], "instruction": rerank["instruction"], "top_n": 3}
    try:
        with ServerThread(create_app(settings)) as srv:
            srv.wait_ready()
            with httpx.Client(base_url=srv.url, timeout=60) as client:
                for _ in range(1000):
                    ready = client.get("/ready").json()
                    if ready.get("title_vectors", {}).get("done") == 3:
                        break
                    time.sleep(0.01)
                assert ready["status"] == "ready" and ready["title_vectors"]["total"] == 10, ready
                assert ready["title_vectors"]["done"] == 3 and ready["title_vectors"]["seconds_left"] >= 1
                during = client.post("/rerank", json=rerank, timeout=30)  # new titles: encoded while it waits
                assert during.status_code == 200, during.text
                refused = client.post("/recommend", json=recommend)
                assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
                error = refused.json()["error"]
                assert error["type"] == "warming_up" and "3 of 10 titles" in error["message"], error
                assert client.post("/recommend", json={**recommend, "fusion": "lm-only"}).status_code == 200
                assert metric(client, "instructrec_requests_rejected_total", {"reason": "warming_up"}) == 1
                assert not kept.exists()
                release.set()
                for _ in range(1000):
                    if "title_vectors" not in client.get("/ready").json():
                        break
                    time.sleep(0.01)
                fused = client.post("/recommend", json=recommend)
                assert fused.status_code == 200, fused.text
                assert fused.json()["fusion"]["mode"] == "fused" and len(fused.json()["results"]) == 3
                after = client.post("/rerank", json=rerank)
        assert after.json()["results"] == during.json()["results"]
    finally:
        release.set()
    vectors = np.load(kept)
    assert vectors.shape == (10, 384)
    for k, title in enumerate(titles):
        assert np.array_equal(vectors[k], encoder._encode([title])[0]), title
