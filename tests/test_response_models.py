"""Every route's answer validates against the model it documents (``response_model`` for a
success, ``responses[status]["model"]`` for an error), so the OpenAPI schema is the served one."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.routing import APIRoute

from instructrec.service.app import create_app
from instructrec.service.routes import router
from instructrec.service.settings import Settings
from tests.service_fixtures import ServerThread

# a good and a bad request per route: (method, path, body)
CALLS = [
    ("GET", "/health", None),
    ("GET", "/ready", None),
    ("POST", "/rerank", {"history": ["Halo 3", "Doom"], "instruction": "co-op", "candidates": ["Halo 2", "Portal"]}),
    ("POST", "/rerank", {"candidates": [{"id": 7, "title": "Halo 2"}, "Portal"], "return_scores": False, "top_n": 1}),
    ("POST", "/rerank", {"history": [{"id": "h0", "title": "Halo"}], "candidates": ["Halo 2", "Doom", "Unknown"],
                         "fusion": "lm-only"}),
    ("POST", "/rerank", {"candidates": ["a"], "fusion": "both"}),
    ("POST", "/rerank", {"candidates": []}),
    ("POST", "/rerank", {"candidates": ["a"], "template": "no-such-template"}),
    ("POST", "/v1/rerank", {"query": "space shooter", "documents": ["Halo 2", {"text": "Portal", "year": 2007}],
                            "return_documents": True}),
    ("POST", "/v1/rerank", {"query": "q", "documents": [{"title": "x"}]}),
    ("POST", "/v2/rerank", {"query": "space shooter", "documents": ["Halo 2", "Portal"], "top_n": 1}),
    ("POST", "/v2/rerank", {"query": "", "documents": ["Halo 2"]}),
    ("POST", "/recommend", {"history": [{"id": "h2", "title": "Halo 2"}], "instruction": "co-op", "k": 2}),
    ("POST", "/recommend", {"history": ["Halo 2"], "k": 0}),
    ("POST", "/admin/reload", {"model": "/no/such/model"}),  # 422 naming model; the old one keeps serving
]


def _routes() -> dict[str, APIRoute]:
    return {r.path: r for r in router.routes if isinstance(r, APIRoute)}


def _model_for(route: APIRoute, status: int):
    if 200 <= status < 300:
        return route.response_model
    return route.responses[status]["model"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from instructrec.catalogue import CatalogueItem, build_catalogue
    from instructrec.modeling import load_model
    from instructrec.ranker import Ranker

    loaded = load_model("tiny-random", device="cpu", dtype="float32")
    items = [CatalogueItem(f"h{i}", t) for i, t in enumerate(["Halo", "Halo 2", "Portal", "Portal 2", "Doom"])]
    ranker = Ranker(loaded)
    catalogue = build_catalogue(items, loaded.tokenizer, eos=ranker.eos, max_target_tokens=ranker.max_target_tokens)
    path = catalogue.save(tmp_path_factory.mktemp("catalogue") / "c.npz")
    # fused answers by default: a gate and a behaviour index over the catalogue's items
    from instructrec.hybrid.behaviour import build_behaviour_index
    from instructrec.hybrid.gate import Gate

    folder = path.parent
    gate = Gate.neutral().save(folder / "gate.json")
    index = build_behaviour_index([["h0", "h1", "h4"], ["h2", "h3"]], [(it.id, it.title) for it in items], top_n=10)
    settings = Settings(model="tiny-random", device="cpu", dtype="float32", redis_url="", api_key="k",
                        batch_tokens=1024, max_wait_ms=2, catalogue=str(path), gate=str(gate),
                        behaviour=str(index.save(folder / "behaviour.npz")))
    with ServerThread(create_app(settings)) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer k"}, timeout=60) as c:
            yield c


def test_every_json_route_declares_its_models():
    routes = _routes()
    assert set(routes) == {"/rerank", "/v1/rerank", "/v2/rerank", "/recommend", "/health", "/ready", "/metrics",
                           "/admin/reload"}
    for path, route in routes.items():
        if path == "/metrics":  # Prometheus text, not JSON
            continue
        assert route.response_model is not None, path
        assert all("model" in spec for spec in route.responses.values()), path


def test_every_route_answers_in_its_documented_shape(client):
    routes = _routes()
    seen: set[tuple[str, int]] = set()
    for method, path, body in CALLS:
        r = client.request(method, path, json=body)
        model = _model_for(routes[path], r.status_code)
        model.model_validate(r.json())
        seen.add((path, r.status_code))
    # each rerank route answered both a success and an error; the probes answered 200
    for path in ("/rerank", "/v1/rerank", "/v2/rerank", "/recommend"):
        assert (path, 200) in seen and any(p == path and s >= 400 for p, s in seen), path
    assert ("/health", 200) in seen and ("/ready", 200) in seen
    fused = client.post("/rerank", json=CALLS[2][2]).json()
    assert fused["fusion"]["mode"] == "fused" and fused["results"][0]["components"]["lm_loglik"] <= 0
    # /rerank builds its results as dicts (serving.Prebuilt): each one exactly what the model would
    # dump, key for key in declared order (every field set; the components present, in order)
    from instructrec.service.schemas import Components, RankedItem

    no_scores = client.post("/rerank", json={**CALLS[3][2], "history": ["Halo"]})
    assert no_scores.status_code == 200, no_scores.text
    for body in (fused, client.post("/rerank", json=CALLS[4][2]).json(), no_scores.json()):  # fused, LM-only, no scores
        for result in body["results"]:
            model = RankedItem.model_validate(result)
            assert result == model.model_dump(exclude_unset=True)
            assert list(result) == list(RankedItem.model_fields)
            if result["components"] is not None:
                assert list(result["components"]) == [f for f in Components.model_fields if f in result["components"]]
    assert list(fused["results"][0]["components"]) == ["lm", "behaviour", "semantic", "lm_loglik"]
    assert client.post("/v2/rerank", json=CALLS[10][2]).json()["fusion"]["mode"] == "fused"
    unauthorised = client.post("/rerank", json=CALLS[2][2], headers={"Authorization": "Bearer wrong"})
    assert unauthorised.status_code == 401
    _model_for(routes["/rerank"], 401).model_validate(unauthorised.json())
    assert client.get("/metrics").text.startswith("#")


def test_probes_after_a_failed_load(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a directory that is no model: the load fails
    app = create_app(Settings(model=str(tmp_path), redis_url=""))
    routes = _routes()
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for _ in range(200):
            if app.state.service.load_error:
                break
            time.sleep(0.05)
        for path in ("/health", "/ready"):
            r = c.get(path)
            assert r.status_code == 503
            body = _model_for(routes[path], 503).model_validate(r.json())
            assert body.status == "failed"
