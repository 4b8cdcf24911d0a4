"""POST /recommend: the model writes the best k catalogue items for a user's need (task form T2),
:class:`ServingRecommend`."""

from __future__ import annotations

import uuid

from . import pipeline
from .pipeline import Receive
from .schemas import (AnswerCache, CatalogueInfo, Components, FusionInfo, InstructionTruncation, RecommendedItem,
                      RecommendRequest, RecommendResponse, RecommendUsage)
from .serving import Serving, need_of, template_info


class ServingRecommend(Serving):
    """Constrained beam search over the catalogue's titles, so every result is a catalogue item
    and its score is the ranker's score of that title under the same (matching) instruction;
    fused on a service with a gate."""

    async def handle(self, req: RecommendRequest, receive: Receive) -> RecommendResponse:
        """Raises :class:`.errors.ApiError`: 409 ``no_catalogue`` when the service has none (before
        the template is looked at), an unknown template, a full queue, ..."""
        if self.engine.catalogue is None:
            raise pipeline.no_catalogue()
        pipeline.check_template(req.template)
        filt = req.filter
        history_ids = tuple(h.id if h.id is None else str(h.id) for h in req.history if h.title)
        out = await pipeline.recommend(receive, self.state, self.engine, need_of(req), req.template, req.top_n,
                                       req.fusion, history_ids=history_ids, exclude_history=req.exclude_history,
                                       only_ids=filt.ids if filt else None, exclude_ids=filt.exclude_ids if filt else (),
                                       meta=filt.meta if filt else None)
        return self.answer(out)

    def answer(self, out: pipeline.Recommendation) -> RecommendResponse:
        cat = self.engine.catalogue
        inst = out.prepared.instruction
        fused = out.fusion
        results = [RecommendedItem.model_construct(
            id=cat.items[item[0]].id, title=cat.items[item[0]].title, score=item[1],
            relevance=item[2] if fused else None,
            components=Components.model_construct(**item[3]) if fused else None) for item in out.items]
        return RecommendResponse.model_construct(
            id=f"rec-{uuid.uuid4().hex}",
            results=results,
            fusion=FusionInfo.model_construct(
                mode="fused" if fused else "lm-only", requested=out.requested, **self.hybrid_versions(),
                signals=fused["signals"] if fused else ["lm"], weights=fused["weights"] if fused else None,
                without_behaviour=None),  # the behaviour list is per candidate: /recommend has none
            template=template_info(inst),
            model=self.model_info(),
            catalogue=CatalogueInfo.model_construct(version=cat.version, items=len(cat),
                                                    allowed=out.prepared.allowed_items),
            usage=RecommendUsage.model_construct(source_tokens=out.prepared.source_tokens, steps=out.steps,
                                                 ranked=fused["ranked"] if fused else None),
            cache=AnswerCache.model_construct(enabled=out.cache_used, hit=out.hit),
            truncated=InstructionTruncation.model_construct(history_dropped=inst.history_dropped,
                                                            source_tokens_cut=out.prepared.source_cut),
        )
