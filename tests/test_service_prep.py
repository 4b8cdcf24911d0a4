"""Request preparation in the service: tokens made once in the preparation thread (and kept
for repeated titles and instructions), and the per-candidate cache keys."""

from __future__ import annotations

import hashlib

import pytest
import torch

from instructrec.aspects import Intention, UserNeed
from instructrec.modeling import TINY
from instructrec.service.cache import score_keys
from instructrec.service.engine import load_engine
from instructrec.service.settings import Settings

torch.set_num_threads(1)

NEED = UserNeed(history=("Halo 3", "Doom Eternal"), intention="co-op shooter", intention_kind=Intention.SPECIFIC)
CANDS = ["Gears of War 4 - Xbox One", "Stardew Valley", "Halo 5 " + "guardians " * 60, "Stardew Valley"]


class CountingTokenizer:
    """The real tokenizer, recording what it was asked to tokenise."""

    def __init__(self, real):
        self.real = real
        self.calls: list = []

    def __call__(self, text, *args, **kwargs):
        self.calls.append(text)
        return self.real(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def _engine(**overrides):
    settings = Settings(model=TINY, device="cpu", dtype="float32", redis_url="", warmup=False, **overrides)
    engine = load_engine(settings, TINY)
    engine._prep_tokenizer = CountingTokenizer(engine._prep_tokenizer)
    return engine


@pytest.fixture(scope="module")
def engine():
    return _engine()


def test_prepared_ids_are_what_the_ranker_makes(engine):
    prepared = engine.prepare(NEED, None, CANDS)
    assert list(prepared.targets) == CANDS[:3]  # distinct texts, in request order
    expected = engine.ranker.encode(prepared.instruction.source, CANDS[:3])
    assert prepared.encoded(CANDS[:3]) == expected
    assert prepared.encoded([CANDS[1]]).targets == [expected.targets[1]]
    assert prepared.cut(CANDS[2]) and not prepared.cut(CANDS[0]) and expected.targets_cut == 1
    assert prepared.target_tokens(CANDS) == sum(len(t) for t in expected.targets) + len(expected.targets[1])


def test_repeated_request_tokenises_nothing(engine):
    tok = engine._prep_tokenizer
    first = engine.prepare(NEED, "comb-11", CANDS)
    seen = len(tok.calls)
    assert engine.prepare(NEED, "comb-11", CANDS) == first and len(tok.calls) == seen
    # a new title: only it is tokenised, in one call; the instruction is remembered
    more = engine.prepare(NEED, "comb-11", [*CANDS, "Portal 2"])
    assert tok.calls[seen:] == [["Portal 2"]]
    assert more.targets[CANDS[0]] == first.targets[CANDS[0]]
    # without the preparation caches: the same result, tokenised again every time
    plain = _engine(prep_cache_size=0)
    assert plain.prepare(NEED, "comb-11", CANDS) == first
    calls = len(plain._prep_tokenizer.calls)
    plain.prepare(NEED, "comb-11", CANDS)
    assert len(plain._prep_tokenizer.calls) == 2 * calls


def test_score_keys_hash_the_whole_joined_key():
    parts = ("ckpt-1", "torch.float32", "comb-11", "the rendered instruction")
    keys = score_keys("ns", parts, ["a", "b", "a"])
    joined = "\x1f".join((*parts, "a")).encode()
    assert keys[0] == "ns:" + hashlib.sha256(joined).hexdigest()
    assert keys[0] == keys[2] != keys[1]
    # text moved between the instruction and the candidate is another key
    assert score_keys("ns", ("x", "ab"), ["c"]) != score_keys("ns", ("x", "a"), ["bc"])
    assert score_keys("ns", parts, []) == []


def test_int8_engine_scores_close_to_float32_under_its_own_cache_keys(engine):
    """INSTRUCTREC_DTYPE=int8 serves the dynamically quantised model: its scores are close to
    float32's but not equal, so its cache keys must differ from a float32 replica's."""
    int8 = load_engine(Settings(model=TINY, device="cpu", dtype="int8", redis_url="", warmup=False), TINY)
    assert int8.loaded.precision == "int8" and engine.loaded.precision == "torch.float32"
    a, b = engine.prepare(NEED, None, CANDS), int8.prepare(NEED, None, CANDS)
    assert a.instruction.source == b.instruction.source
    assert engine.key_parts(a) != int8.key_parts(b)
    fp32 = engine.ranker.score_many([a.encoded(CANDS[:3])])[0].scores
    q8 = int8.ranker.score_many([b.encoded(CANDS[:3])])[0].scores
    assert fp32 != q8 and max(abs(x - y) for x, y in zip(fp32, q8)) < 0.2


def test_the_handlers_answer_without_the_web_framework():
    """A ``serving_*`` handler takes a validated request and an ASGI ``receive`` and returns the
    response model, or raises ``ApiError``: run here on a started ``ServiceState`` with no app."""
    import asyncio

    from instructrec.ranker import rank_order
    from instructrec.service.errors import ApiError
    from instructrec.service.schemas import (CompatRerankRequest, RankedItem, RecommendRequest, RerankRequest,
                                             RerankResponse)
    from instructrec.service.serving import answer_body
    from instructrec.service.serving_compat import ServingCompat
    from instructrec.service.serving_recommend import ServingRecommend
    from instructrec.service.serving_rerank import ServingRerank
    from instructrec.service.state import ServiceState

    async def never_leaves():
        await asyncio.Event().wait()

    async def run():
        state = ServiceState(Settings(model=TINY, device="cpu", dtype="float32", redis_url="", warmup=False,
                                      max_wait_ms=1), TINY)
        await state.start()
        try:
            while not state.ready:
                assert state.load_error is None
                await asyncio.sleep(0.01)
            req = RerankRequest.model_validate({"history": ["Halo 3"], "instruction": "co-op",
                                                "candidates": [{"id": 4, "title": "Portal"}, "Doom", "Tetris"],
                                                "top_n": 2})
            native = await ServingRerank(state).handle(req, never_leaves)
            compat = await ServingCompat(state).handle(
                CompatRerankRequest.model_validate({"query": "co-op", "documents": ["Portal", "Doom"]}), never_leaves,
                "2")
            errors = []
            for call in (ServingRerank(state).handle(RerankRequest.model_validate(
                             {"candidates": ["a"], "template": "no-such-template"}), never_leaves),
                         ServingRecommend(state).handle(RecommendRequest.model_validate({}), never_leaves)):
                with pytest.raises(ApiError) as err:
                    await call
                errors.append((err.value.status, err.value.type))
            return native, compat, errors
        finally:
            await state.stop()

    native, compat, errors = asyncio.run(run())
    assert isinstance(native, RerankResponse)
    # the results come as the JSON objects RankedItem dumps to (serving.Prebuilt)
    results = [RankedItem.model_validate(r) for r in native.results]
    scores = [r.score for r in results]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert {r.title for r in results} <= {"Portal", "Doom", "Tetris"}
    assert native.fusion.mode == "lm-only" and results[0].components is None
    body = answer_body(native)
    assert list(body) == list(RerankResponse.model_fields) and body["id"].startswith("rr-")
    assert body["results"] == [r.model_dump() for r in results]
    assert compat.meta["api_version"] == {"version": "2"}
    assert [r.index for r in compat.results] == rank_order([r.log_likelihood for r in
                                                            sorted(compat.results, key=lambda r: r.index)])
    assert "components" not in answer_body(compat)["results"][0]  # LM-only: Cohere's fields only
    assert errors == [(422, "template_error"), (409, "no_catalogue")]
