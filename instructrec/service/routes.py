"""The endpoints: POST /rerank (native), POST /v1/rerank and /v2/rerank (Cohere v1/v2 and
Jina compatible: one handler), POST /recommend (generation over the catalogue), /health,
/ready, /metrics.

A handler only parses, authorises, calls and serialises: auth -> body (size-limited, UTF-8,
JSON) -> strict validation with the configured limits -> :func:`instructrec.service.pipeline.rerank`
(preparation, cache, batcher) -> ranking (:func:`rank_order`) -> the answer in the shape of
the route's response model.
"""

from __future__ import annotations

import hmac
import json
import math
import uuid
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from instructrec.aspects import Intention, UserNeed
from instructrec.ranker import rank_order
from instructrec.templates import TEMPLATE_VERSION

from . import pipeline
from .errors import ApiError, from_validation
from .schemas import (CompatError, CompatRerankRequest, CompatResponse, ErrorBody, FieldError, Health, HealthFailed,
                      NeedRequest, NotReady, Ready, RecommendRequest, RecommendResponse, RerankRequest, RerankResponse)
from .state import ServiceState

router = APIRouter()

_CODES = (400, 401, 413, 422, 429, 503)
_ERRORS = {code: {"model": ErrorBody} for code in _CODES}
_RECOMMEND_ERRORS = {code: {"model": ErrorBody} for code in (*_CODES, 409)}
_COMPAT_ERRORS = {code: {"model": CompatError} for code in _CODES}


def _json(body: dict) -> Response:
    """A rerank answer as JSON, encoded by orjson (a fifth of the time ``json.dumps`` takes on
    100 results); the standard encoder takes what orjson refuses (an id beyond 64 bits)."""
    try:
        content = orjson.dumps(body)
    except orjson.JSONEncodeError:
        return JSONResponse(body)
    return Response(content, media_type="application/json")


def _state(request: Request) -> ServiceState:
    return request.app.state.service


# --- request intake ------------------------------------------------------------------------


def _check_auth(request: Request, state: ServiceState) -> None:
    key = state.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       headers={"WWW-Authenticate": "Bearer"}, reason="unauthorized")


def _check_ready(state: ServiceState) -> None:
    if not state.ready:
        message = state.load_error or "the model is still loading"
        raise ApiError(503, "unavailable", message, headers={"Retry-After": "5"}, reason="not_ready")


async def _read_json(request: Request, state: ServiceState) -> dict:
    limit = state.settings.max_body_bytes
    too_large = ApiError(413, "payload_too_large", f"request body exceeds {limit} bytes", reason="body_too_large")
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise too_large
        except ValueError:
            raise ApiError(400, "invalid_request", "invalid Content-Length header", reason="bad_request") from None
    body = bytearray()
    async for chunk in request.stream():  # also guards chunked bodies without Content-Length
        body += chunk
        if len(body) > limit:
            raise too_large
    if not body.strip():
        raise ApiError(400, "invalid_request", "missing request body (send a JSON object)", reason="bad_request")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_encoding", f"request body is not valid UTF-8 (byte {exc.start})",
                       reason="bad_request") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                       f"column {exc.colno}", reason="bad_request") from None
    except (ValueError, RecursionError) as exc:  # e.g. a 5,000-digit integer, or absurd nesting
        raise ApiError(400, "invalid_json", f"request body is not acceptable JSON: {str(exc)[:200]}",
                       reason="bad_request") from None
    if not isinstance(data, dict):
        raise ApiError(422, "validation_error", f"request body must be a JSON object, not {type(data).__name__}",
                       reason="invalid")
    return data


def _validate(model, data: dict, state: ServiceState):
    s = state.settings
    context = {"max_text_chars": s.max_text_chars, "max_candidates": s.max_candidates, "max_history": s.max_history}
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise from_validation(exc) from None


def _need(req: NeedRequest) -> UserNeed:
    history = tuple(h.title for h in req.history if h.title)
    intention, kind, context = None, None, None
    if req.intention is not None:
        intention = req.intention.text
        kind = Intention.VAGUE if req.intention.kind == "vague" else Intention.SPECIFIC
        context = req.instruction
    elif req.instruction:
        intention, kind = req.instruction, Intention.VAGUE
    return UserNeed(history=history, preference=req.preference, intention=intention, intention_kind=kind,
                    context=context)


def _begin(request: Request) -> ServiceState:
    state = _state(request)
    _check_auth(request, state)
    _check_ready(state)
    return state


# --- endpoints -----------------------------------------------------------------------------


@router.post("/rerank", response_model=RerankResponse, responses=_ERRORS,
             summary="Rank candidates for a user's need (history, preference, intention)")
async def rerank(request: Request):
    state = _begin(request)
    req = _validate(RerankRequest, await _read_json(request, state), state)
    pipeline.check_template(req.template)
    texts = [c.title for c in req.candidates]
    fusion = pipeline.FusionRequest(req.fusion, [_item_id(c.id) for c in req.candidates],
                                    [_item_id(h.id) for h in req.history if h.title])
    out = await pipeline.rerank(request.receive, state, _need(req), req.template, texts, fusion=fusion)
    return _json(_native_body(req, texts, out, state))


def _item_id(value) -> str | None:
    """An item id as the behaviour index names items (a string), None when not given."""
    return None if value is None or isinstance(value, bool) else str(value)


def _fusion_info(out: pipeline.Outcome, state: ServiceState) -> dict:
    """How an answer was scored (:class:`FusionInfo`)."""
    f, hybrid = out.fusion, state.engine.hybrid
    fused = f.fused
    return {"mode": f.mode, "requested": f.requested, "gate_version": hybrid.gate.version if hybrid else None,
            "hybrid_version": hybrid.version if hybrid else None, "signals": f.signals,
            "weights": fused.weights if fused is not None else None, "without_behaviour": f.without_behaviour}


def _components(out: pipeline.Outcome, i: int) -> dict | None:
    """One fused result's parts (:class:`Components`); None when LM-only."""
    fused = out.fusion.fused
    if fused is None:
        return None
    return {**{name: float(values[i]) for name, values in fused.components.items()}, "lm_loglik": out.scores[i]}


def _template_info(inst) -> dict:
    """The template an answer was made with (:class:`TemplateInfo`)."""
    return {"id": inst.template.id, "label": inst.template.label, "instantiation": inst.rendered.instantiation.label(),
            "table_version": TEMPLATE_VERSION}


def _native_body(req: RerankRequest, texts: list[str], out: pipeline.Outcome, state: ServiceState) -> dict:
    """The /rerank answer, shaped as :class:`RerankResponse`."""
    ranking = out.ranking_scores
    order = rank_order(ranking)[: req.top_n]
    inst = out.prepared.instruction
    engine = state.engine
    candidate_tokens = out.prepared.target_tokens(texts)
    fused, scores = out.fusion.fused, req.return_scores
    return {
        "id": f"rr-{uuid.uuid4().hex}",
        "results": [{"index": i, "id": req.candidates[i].id, "title": texts[i],
                     "score": ranking[i] if scores else None,
                     "relevance": float(fused.relevance[i]) if scores and fused is not None else None,
                     "components": _components(out, i) if scores else None,
                     "cached": out.cached[i]} for i in order],
        "template": _template_info(inst),
        "model": engine.model_info(),
        "usage": {"source_tokens": out.prepared.source_tokens, "candidate_tokens": candidate_tokens,
                  "scored_tokens": out.scored_tokens, "total_tokens": out.prepared.source_tokens + candidate_tokens},
        "cache": {"enabled": out.cache_used, "hits": out.hits, "misses": out.misses},
        "truncated": {"history_dropped": inst.history_dropped, "source_tokens_cut": out.prepared.source_cut,
                      "candidates_cut": [i for i, t in enumerate(texts) if out.prepared.cut(t)]},
        "fusion": _fusion_info(out, state),
    }


@router.post("/recommend", response_model=RecommendResponse, responses=_RECOMMEND_ERRORS,
             summary="Generate the best k catalogue items for a user's need (task form T2)")
async def recommend(request: Request):
    """The model writes the items: constrained beam search over the catalogue's titles
    (``INSTRUCTREC_CATALOGUE``), so every result is a catalogue item and its score is the
    ranker's score of that title under the same (matching) instruction. 409 ``no_catalogue``
    when the service has none."""
    state = _begin(request)
    req = _validate(RecommendRequest, await _read_json(request, state), state)
    if state.engine.catalogue is None:
        raise pipeline.no_catalogue()
    pipeline.check_template(req.template)
    filt = req.filter
    history_ids = tuple(h.id if h.id is None else str(h.id) for h in req.history if h.title)
    out = await pipeline.recommend(request.receive, state, _need(req), req.template, req.top_n, req.fusion, history_ids=history_ids,
                                   exclude_history=req.exclude_history, only_ids=filt.ids if filt else None,
                                   exclude_ids=filt.exclude_ids if filt else (), meta=filt.meta if filt else None)
    return _json(_recommend_body(out, state))


def _recommend_fusion(out: pipeline.Recommendation, state: ServiceState) -> dict:
    """How a /recommend answer was ranked (:class:`FusionInfo`; no per-candidate behaviour list)."""
    hybrid, f = state.engine.hybrid, out.fusion
    return {"mode": "fused" if f else "lm-only", "requested": out.requested,
            "gate_version": hybrid.gate.version if hybrid else None, "hybrid_version": hybrid.version if hybrid else None,
            "signals": f["signals"] if f else ["lm"], "weights": f["weights"] if f else None, "without_behaviour": None}


def _recommend_body(out: pipeline.Recommendation, state: ServiceState) -> dict:
    """The /recommend answer, shaped as :class:`RecommendResponse`."""
    engine = state.engine
    cat = engine.catalogue
    inst = out.prepared.instruction
    return {
        "id": f"rec-{uuid.uuid4().hex}",
        "results": [{"id": cat.items[item[0]].id, "title": cat.items[item[0]].title, "score": item[1],
                     "relevance": item[2] if out.fusion else None, "components": item[3] if out.fusion else None}
                    for item in out.items],
        "fusion": _recommend_fusion(out, state),
        "template": _template_info(inst),
        "model": engine.model_info(),
        "catalogue": {"version": cat.version, "items": len(cat), "allowed": out.prepared.allowed_items},
        "usage": {"source_tokens": out.prepared.source_tokens, "steps": out.steps,
                  "ranked": out.fusion["ranked"] if out.fusion else None},
        "cache": {"enabled": out.cache_used, "hit": out.hit},
        "truncated": {"history_dropped": inst.history_dropped, "source_tokens_cut": out.prepared.source_cut},
    }


def relevance(score: float) -> float:
    """The compatible routes' ``relevance_score``: exp(score), in [0, 1] and in the same order as
    the score. With the mean reduction it is the geometric-mean probability per token of the
    document text (exp of the mean log-likelihood); with the sum reduction, the probability of
    the whole text (which may underflow to 0 for long texts)."""
    return min(1.0, math.exp(score))


@router.post("/v2/rerank", response_model=CompatResponse, responses=_COMPAT_ERRORS,
             summary="Cohere v2-compatible rerank: query + documents (same handler as /v1/rerank)")
@router.post("/v1/rerank", response_model=CompatResponse, responses=_COMPAT_ERRORS,
             summary="Cohere v1/Jina-compatible rerank: query + documents")
async def rerank_compat(request: Request):
    """``query`` is taken as a specific intention (I2), with no history. Fused (a service with a
    gate): ranked by the fused score, ``relevance_score`` the gate's calibrated probability;
    LM-only: ``relevance_score`` is :func:`relevance` of the raw score. ``log_likelihood``
    carries the LM's raw score either way. A document object's ``id`` names the item for the
    behaviour index. Errors are Cohere's ``{"message": ...}``."""
    state = _begin(request)
    req = _validate(CompatRerankRequest, await _read_json(request, state), state)
    try:
        texts = req.candidate_texts(state.settings.max_text_chars)
    except FieldError as exc:
        raise ApiError(422, "validation_error", str(exc), exc.field, reason="invalid") from None
    need = UserNeed(intention=req.query, intention_kind=Intention.SPECIFIC)
    ids = [_item_id(d.get("id")) if isinstance(d, dict) and isinstance(d.get("id"), (str, int)) else None
           for d in req.documents]
    out = await pipeline.rerank(request.receive, state, need, None, texts, req.max_tokens_per_doc,
                                fusion=pipeline.FusionRequest(req.fusion, ids))
    version = "2" if request.url.path.startswith("/v2/") else "1"
    return _json(_compat_body(req, texts, out, state, version))


def _compat_body(req: CompatRerankRequest, texts: list[str], out: pipeline.Outcome, state: ServiceState,
                 version: str) -> dict:
    """The /v1 and /v2 answer, shaped as :class:`CompatResponse` (``document`` only when asked for)."""
    results = []
    fused = out.fusion.fused
    for i in rank_order(out.ranking_scores)[: req.top_n]:
        item: dict[str, Any] = {
            "index": i, "relevance_score": float(fused.relevance[i]) if fused is not None else relevance(out.scores[i]),
            "log_likelihood": out.scores[i]}
        if fused is not None:
            item["components"] = _components(out, i)
        if req.return_documents:
            item["document"] = req.document(i)
        results.append(item)
    tokens = out.prepared.source_tokens + out.prepared.target_tokens(texts)
    return {
        "id": str(uuid.uuid4()),
        "results": results,
        "model": state.engine.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "meta": {"api_version": {"version": version}, "billed_units": {"search_units": 1}},
        "fusion": _fusion_info(out, state),
    }


@router.get("/health", response_model=Health, responses={503: {"model": HealthFailed}}, summary="Liveness")
async def health(request: Request):
    state = _state(request)
    if state.load_error:
        return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
    return {"status": "ok"}


@router.get("/ready", response_model=Ready, responses={503: {"model": NotReady}},
            summary="Readiness: the model is loaded and warmed up")
async def ready(request: Request):
    state = _state(request)
    if not state.ready:
        status = "failed" if state.load_error else "loading"
        body = {"status": status, "model": state.model_name}
        if state.load_error:
            body["error"] = state.load_error
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    engine, cache = state.engine, state.cache
    return {
        "status": "ready",
        "model": {**engine.model_info(), "device": str(engine.loaded.device), "precision": engine.loaded.precision},
        "template_version": TEMPLATE_VERSION,
        "cache": "disabled" if not cache.enabled else ("up" if cache.up else "down"),
        "queue": state.batcher.depth,
        "hybrid_version": engine.hybrid.version if engine.hybrid else None,
    }


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request):
    content, content_type = _state(request).metrics.expose()
    return Response(content, media_type=content_type)
