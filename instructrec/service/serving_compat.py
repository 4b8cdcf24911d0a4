"""POST /v1/rerank and /v2/rerank, Cohere (v1, v2) and Jina compatible: one handler
(:class:`ServingCompat`), the API version only named in the answer."""

from __future__ import annotations

import math
import uuid

from instructrec.aspects import Intention, UserNeed
from instructrec.ranker import rank_order

from . import pipeline
from .errors import ApiError
from .pipeline import Receive
from .schemas import CompatRerankRequest, CompatResponse, CompatResult, CompatUsage, FieldError
from .serving import Serving, components, fusion_info, item_id


def relevance(score: float) -> float:
    """The compatible routes' ``relevance_score``: exp(score), in [0, 1] and in the same order as
    the score. With the mean reduction it is the geometric-mean probability per token of the
    document text (exp of the mean log-likelihood); with the sum reduction, the probability of
    the whole text (which may underflow to 0 for long texts)."""
    return min(1.0, math.exp(score))


class ServingCompat(Serving):
    """``query`` is taken as a specific intention (I2), with no history. Fused (a service with a
    gate): ranked by the fused score, ``relevance_score`` the gate's calibrated probability;
    LM-only: ``relevance_score`` is :func:`relevance` of the raw score. ``log_likelihood``
    carries the LM's raw score either way. A document object's ``id`` names the item for the
    behaviour index."""

    async def handle(self, req: CompatRerankRequest, receive: Receive, api_version: str) -> CompatResponse:
        """``api_version``: "1" or "2", as the client called. Raises :class:`ApiError` (a document
        without its rank field, a full queue, ...) for the edge to answer in Cohere's shape."""
        try:
            texts = req.candidate_texts(self.state.settings.max_text_chars)
        except FieldError as exc:
            raise ApiError(422, "validation_error", str(exc), exc.field, reason="invalid") from None
        need = UserNeed(intention=req.query, intention_kind=Intention.SPECIFIC)
        ids = [item_id(d.get("id")) if isinstance(d, dict) and isinstance(d.get("id"), (str, int)) else None
               for d in req.documents]
        out = await pipeline.rerank(receive, self.state, self.engine, need, None, texts, req.max_tokens_per_doc,
                                    fusion=pipeline.FusionRequest(req.fusion, ids))
        return self.answer(req, texts, out, api_version)

    def answer(self, req: CompatRerankRequest, texts: list[str], out: pipeline.Outcome,
               api_version: str) -> CompatResponse:
        """``components`` only when fused and ``document`` only when asked for: Cohere's clients
        see no field they do not know unless the service fuses."""
        fused = out.fusion.fused
        results = []
        for i in rank_order(out.ranking_scores)[: req.top_n]:
            fields = {"index": i, "log_likelihood": out.scores[i],
                      "relevance_score": float(fused.relevance[i]) if fused is not None else relevance(out.scores[i])}
            if fused is not None:
                fields["components"] = components(out, i)
            if req.return_documents:
                fields["document"] = req.document(i)
            results.append(CompatResult.model_construct(**fields))
        tokens = out.prepared.source_tokens + out.prepared.target_tokens(texts)
        return CompatResponse.model_construct(
            id=str(uuid.uuid4()),
            results=results,
            model=self.engine.name,
            usage=CompatUsage.model_construct(prompt_tokens=tokens, total_tokens=tokens),
            meta={"api_version": {"version": api_version}, "billed_units": {"search_units": 1}},
            fusion=fusion_info(out, self.hybrid_versions()),
        )
