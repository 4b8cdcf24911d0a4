"""POST /rerank: a user's need and candidates in, the candidates ranked out (:class:`ServingRerank`)."""

from __future__ import annotations

import uuid

from instructrec.ranker import rank_order

from . import pipeline
from .pipeline import Receive
from .schemas import CacheInfo, RerankRequest, RerankResponse, Truncation, Usage
from .serving import Prebuilt, Serving, components_body, fusion_info, item_id, need_of, template_info


class ServingRerank(Serving):
    """The native rerank: template check, scoring (cache, batcher, fusion) and the ranked answer."""

    async def handle(self, req: RerankRequest, receive: Receive) -> RerankResponse:
        """Raises :class:`.errors.ApiError` (an unknown template, a full queue, ...) for the edge to answer."""
        pipeline.check_template(req.template)
        texts = [c.title for c in req.candidates]
        fusion = pipeline.FusionRequest(req.fusion, [item_id(c.id) for c in req.candidates],
                                        [item_id(h.id) for h in req.history if h.title])
        out = await pipeline.rerank(receive, self.state, self.engine, need_of(req), req.template, texts, fusion=fusion)
        return self.answer(req, texts, out)

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

