"""POST /rerank: a user's need and candidates in, the candidates ranked out (:class:`ServingRerank`)."""

from __future__ import annotations

import uuid

import orjson

from instructrec.ranker import rank_order

from . import pipeline
from .pipeline import Receive
from .schemas import CacheInfo, RerankRequest, RerankResponse, Truncation, Usage
from .serving import Prebuilt, Serving, answer_body, components_body, fusion_info, item_id, need_of, template_info


class ServingRerank(Serving):
    """The native rerank: template check, scoring (cache, batcher, fusion) and the ranked answer."""

    async def handle(self, req: RerankRequest, receive: Receive, body: dict | None = None) -> RerankResponse | dict:
        """Raises :class:`.errors.ApiError` (an unknown template, a full queue, ...) for the edge to answer.
        ``body``: the request's JSON object; with it (and the setting ``cache_answers``) the whole
        answer is kept in the cache by the body and the engine's :meth:`~.engine.Engine.rerank_answer_parts`,
        and a repeated request is answered from it (:func:`replayed`)."""
        pipeline.check_template(req.template)
        cache, metrics = self.state.cache, self.state.metrics
        key = self.answer_key(body)
        usable = False
        if key is not None:
            usable, kept = await cache.get_text(key)
            if kept is not None:
                return self.replay(req, kept)
            metrics.answer_cache.labels("rerank", "miss" if usable else "bypassed").inc()
        texts = [c.title for c in req.candidates]
        fusion = pipeline.FusionRequest(req.fusion, [item_id(c.id) for c in req.candidates],
                                        [item_id(h.id) for h in req.history if h.title])
        out = await pipeline.rerank(receive, self.state, self.engine, need_of(req), req.template, texts, fusion=fusion)
        answer = self.answer(req, texts, out)
        if not usable:
            return answer
        dumped = answer_body(answer)  # dumped once: kept, and answered (the edge takes the object as it is)
        await self.keep(key, dumped, out)
        return dumped

    def answer_key(self, body: dict | None) -> str | None:
        """The cache key of a request's whole answer (None: not kept)."""
        if body is None or not self.state.cache.enabled or not self.state.settings.cache_answers:
            return None
        try:
            request = orjson.dumps(body).decode()
        except orjson.JSONEncodeError:  # an id beyond 64 bits: answered, not kept whole
            return None
        return self.state.cache.answer_key((*self.engine.rerank_answer_parts(), request))

    async def keep(self, key: str, body: dict, out: pipeline.Outcome) -> None:
        """Keep the whole answer (its JSON object), with what a replay counts in the metrics as
        this request counted it."""
        f = out.fusion
        entry = {"answer": body, "distinct": len(out.prepared.targets),
                 "fusion": {"mode": f.mode, "weights": f.weights, "without": f.counted_without}}
        try:
            text = orjson.dumps(entry)
        except orjson.JSONEncodeError:
            return
        await self.state.cache.set_text(key, text, self.state.settings.cache_answer_ttl_seconds)

    def replay(self, req: RerankRequest, kept: str) -> dict:
        """A kept answer as this request's, counted in the metrics as a request answered from the score cache."""
        entry = orjson.loads(kept)
        metrics = self.state.metrics
        metrics.answer_cache.labels("rerank", "hit").inc()
        metrics.candidates_per_request.observe(len(req.candidates))
        metrics.cache_hits.inc(entry["distinct"])
        fusion = entry["fusion"]
        metrics.observe_fusion(fusion["mode"], fusion["weights"], fusion["without"])
        return replayed(entry["answer"], entry["distinct"])

    def answer(self, req: RerankRequest, texts: list[str], out: pipeline.Outcome) -> RerankResponse:
        ranking = out.ranking_scores
        order = rank_order(ranking)[: req.top_n]
        prepared = out.prepared
        inst = prepared.instruction
        candidate_tokens = prepared.target_tokens(texts)
        fused, scores = out.fusion.fused, req.return_scores
        # each result as RankedItem dumps it (every field set, in declared order): Prebuilt
        results = Prebuilt({
            "index": i, "id": req.candidates[i].id, "title": texts[i], "score": ranking[i] if scores else None,
            "relevance": float(fused.relevance[i]) if scores and fused is not None else None,
            "components": components_body(out, i) if scores else None, "cached": out.cached[i]} for i in order)
        return RerankResponse.model_construct(
            id=f"rr-{uuid.uuid4().hex}",
            results=results,
            template=template_info(inst),
            model=self.model_info(),
            usage=Usage.model_construct(source_tokens=prepared.source_tokens, candidate_tokens=candidate_tokens,
                                        scored_tokens=out.scored_tokens,
                                        total_tokens=prepared.source_tokens + candidate_tokens),
            cache=CacheInfo.model_construct(enabled=out.cache_used, hits=out.hits, misses=out.misses),
            truncated=Truncation.model_construct(history_dropped=inst.history_dropped,
                                                 source_tokens_cut=prepared.source_cut,
                                                 candidates_cut=[i for i, t in enumerate(texts) if prepared.cut(t)]),
            fusion=fusion_info(out, self.hybrid_versions()),
        )


def replayed(body: dict, distinct: int) -> dict:
    """A kept answer as the request repeated gets it: what the answer would be with every
    candidate's score read from the cache (each result cached, ``distinct`` hits and no miss,
    nothing scored), under an id of its own; everything else is the answer as it was made."""
    body["id"] = f"rr-{uuid.uuid4().hex}"
    for result in body["results"]:
        result["cached"] = True
    body["usage"]["scored_tokens"] = 0
    body["cache"] = {"enabled": True, "hits": distinct, "misses": 0}
    return body
