"""Clients nobody on this project wrote, against a live service: the official Cohere Python SDK
(``cohere.Client`` for v1, ``cohere.ClientV2`` for v2) and LangChain's ``CohereRerank``.

The Serve snippets of docs/serving.md are extracted and run as they are, only their
``base_url`` pointed at the uvicorn server on loopback (tiny-random model, API key
"my-key" as in the snippets). What the clients parse is checked against the ranker
called directly: the order, ``top_n``, the documents and the score range.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import httpx
import pytest
import torch

from instructrec.aspects import Intention, UserNeed
from instructrec.instruction import build
from instructrec.ranker import rank_order
from instructrec.service.app import create_app
from instructrec.service.settings import Settings
from tests.service_fixtures import ServerThread

cohere = pytest.importorskip("cohere", reason="the test extra is not installed (pip install -e '.[test]')")
pytest.importorskip("langchain_cohere", reason="the test extra is not installed (pip install -e '.[test]')")

torch.set_num_threads(1)

README = Path(__file__).resolve().parents[1] / "docs" / "serving.md"  # where the Serve snippets live
KEY = "my-key"  # the key the README snippets use
README_URL = "http://127.0.0.1:8000"
QUERY = "a relaxing farming game"


def snippet(name: str) -> str:
    """The python code block after ``<!-- snippet: name -->`` in docs/serving.md."""
    m = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"docs/serving.md has no snippet {name!r}"
    return m.group(1)


@pytest.fixture(scope="module")
def live():
    settings = Settings(model="tiny-random", device="cpu", dtype="float32", redis_url="", api_key=KEY,
                        batch_tokens=1024, max_wait_ms=1, warmup=False)
    app = create_app(settings)
    with ServerThread(app) as srv:
        srv.wait_ready()
        yield app, srv.url


def run_snippet(name: str, url: str, capsys) -> dict:
    code = snippet(name)
    assert README_URL in code
    namespace: dict = {}
    exec(compile(code.replace(README_URL, url), f"README:{name}", "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    assert printed.strip(), f"snippet {name} printed nothing"
    return namespace


def expected(app, texts: list[str]) -> list[float]:
    """The ranker's scores for the query as the service frames it (a specific intention)."""
    engine = app.state.service.engine
    need = UserNeed(intention=QUERY, intention_kind=Intention.SPECIFIC)
    inst = build(need, engine.loaded.tokenizer, max_tokens=engine.ranker.max_source_tokens)
    return engine.ranker.score(inst.source, texts).scores


def test_cohere_v2_sdk_readme_snippet(live, capsys):
    app, url = live
    ns = run_snippet("cohere-v2", url, capsys)
    docs = ["Stardew Valley", "Doom Eternal", "Harvest Moon", "Tetris"]
    scores = expected(app, docs)
    results = ns["response"].results
    assert [r.index for r in results] == rank_order(scores)[:2]  # top_n=2
    for r in results:
        assert 0 <= r.relevance_score <= 1
        assert r.relevance_score == pytest.approx(math.exp(scores[r.index]), rel=1e-5)
        assert r.log_likelihood == pytest.approx(scores[r.index], abs=1e-5)  # the raw score, an extra field
    assert results[0].relevance_score >= results[1].relevance_score
    assert ns["response"].meta.billed_units.search_units == 1 and ns["response"].meta.api_version.version == "2"


def test_cohere_v1_sdk_readme_snippet(live, capsys):
    app, url = live
    ns = run_snippet("cohere-v1", url, capsys)
    docs = [{"title": "Stardew Valley", "appid": "413150"}, {"title": "Doom Eternal", "appid": "782330"}]
    scores = expected(app, [d["title"] for d in docs])  # rank_fields=["title"]: the title is scored
    results = ns["response"].results
    assert [r.index for r in results] == rank_order(scores)
    for r in results:
        assert 0 <= r.relevance_score <= 1
        assert r.relevance_score == pytest.approx(math.exp(scores[r.index]), rel=1e-5)
        # every field of the document object comes back (the SDK keeps fields besides text)
        assert r.document.model_dump(exclude_none=True) == docs[r.index]  # (the SDK adds text=None)


def test_langchain_cohere_rerank_readme_snippet(live, capsys):
    app, url = live
    ns = run_snippet("langchain", url, capsys)
    texts = ["Stardew Valley", "Doom Eternal", "Harvest Moon", "Tetris"]
    scores = expected(app, texts)
    kept = ns["kept"]
    assert [d.page_content for d in kept] == [texts[i] for i in rank_order(scores)[:2]]
    for d in kept:
        i = texts.index(d.page_content)
        assert 0 <= d.metadata["relevance_score"] <= 1
        assert d.metadata["relevance_score"] == pytest.approx(math.exp(scores[i]), rel=1e-5)


def test_langchain_rerank_with_dict_documents(live):
    """LangChain formats dict documents (its rank_fields) as YAML before sending them."""
    from langchain_cohere import CohereRerank

    app, url = live
    reranker = CohereRerank(model="instructrec", cohere_api_key=KEY, base_url=url, top_n=3)
    docs = [{"title": "Harvest Moon", "year": 1996}, {"title": "Halo 3", "year": 2007},
            {"title": "Stardew Valley", "year": 2016}, {"title": "Tetris", "year": 1984}]
    out = reranker.rerank(docs, QUERY, rank_fields=["title"])
    scores = expected(app, [f"title: {d['title']}" for d in docs])  # yaml.dump({"title": ...}), normalised
    assert [r["index"] for r in out] == rank_order(scores)[:3]
    assert all(0 <= r["relevance_score"] <= 1 for r in out)


def test_sdk_exceptions_carry_the_service_message(live):
    app, url = live
    co = cohere.ClientV2(api_key=KEY, base_url=url)
    with pytest.raises(cohere.UnprocessableEntityError) as err:
        co.rerank(model="instructrec", query="   ", documents=["Halo"])
    assert err.value.status_code == 422 and err.value.body == {"message": "query: must not be empty"}
    with pytest.raises(cohere.UnprocessableEntityError) as err:
        co.rerank(model="instructrec", query=QUERY, documents=["Halo"], top_n=0)
    assert err.value.body["message"].startswith("top_n: ")
    with pytest.raises(cohere.UnauthorizedError) as err:
        cohere.ClientV2(api_key="wrong", base_url=url).rerank(model="instructrec", query=QUERY, documents=["Halo"])
    assert err.value.status_code == 401 and "API key" in err.value.body["message"]
    v1 = cohere.Client(api_key=KEY, base_url=url)
    with pytest.raises(cohere.UnprocessableEntityError) as err:
        v1.rerank(query=QUERY, documents=[{"title": "Halo"}])  # no text and no rank_fields
    assert err.value.body == {"message": "documents[0].text: Field required"}
    # the native route keeps its own shape
    r = httpx.post(f"{url}/rerank", json={"candidates": []}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "candidates"
