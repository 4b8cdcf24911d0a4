"""The HTTP edge of the endpoints: POST /rerank (native), POST /v1/rerank and /v2/rerank (Cohere
v1/v2 and Jina compatible), POST /recommend (generation over the catalogue), /health, /ready,
/metrics, POST /admin/reload (a model swap).

A route only reads, authorises, validates and serialises: auth -> readiness -> body
(size-limited, UTF-8, JSON) -> strict validation with the configured limits -> the endpoint's
``serving_*`` handler (which takes the validated request and returns the response model, or
raises :class:`ApiError`) -> JSON. The work itself, and the answer's shape, live in the handlers.
"""

from __future__ import annotations

import hmac
import json

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from .errors import ApiError, from_validation
from .schemas import (CompatError, CompatRerankRequest, CompatResponse, ErrorBody, Health, HealthFailed, NotReady, Ready,
                      RecommendRequest, RecommendResponse, ReloadRequest, ReloadResponse, RerankRequest,
                      RerankResponse)
from .serving import answer_body
from .serving_compat import ServingCompat
from .serving_ops import ServingOps
from .serving_recommend import ServingRecommend
from .serving_rerank import ServingRerank
from .state import ServiceState

router = APIRouter()

_CODES = (400, 401, 413, 422, 429, 503)
_ERRORS = {code: {"model": ErrorBody} for code in _CODES}
_RECOMMEND_ERRORS = {code: {"model": ErrorBody} for code in (*_CODES, 409)}
_COMPAT_ERRORS = {code: {"model": CompatError} for code in _CODES}


def _json(answer: BaseModel | dict) -> Response:
    """An answer (a response model, or the JSON object of one) as JSON, encoded by orjson (a
    fifth of the time ``json.dumps`` takes on 100 results); the standard encoder takes what
    orjson refuses (an id beyond 64 bits)."""
    body = answer if isinstance(answer, dict) else answer_body(answer)
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
    body = await _read_json(request, state)
    req = _validate(RerankRequest, body, state)
    return _json(await ServingRerank(state).handle(req, request.receive, body))


@router.post("/recommend", response_model=RecommendResponse, responses=_RECOMMEND_ERRORS,
             summary="Generate the best k catalogue items for a user's need (task form T2)")
async def recommend(request: Request):
    """The model writes the items: constrained beam search over the catalogue's titles
    (``INSTRUCTREC_CATALOGUE``), so every result is a catalogue item and its score is the
    ranker's score of that title under the same (matching) instruction. 409 ``no_catalogue``
    when the service has none."""
    state = _begin(request)
    req = _validate(RecommendRequest, await _read_json(request, state), state)
    return _json(await ServingRecommend(state).handle(req, request.receive))


@router.post("/v2/rerank", response_model=CompatResponse, responses=_COMPAT_ERRORS,
             summary="Cohere v2-compatible rerank: query + documents (same handler as /v1/rerank)")
@router.post("/v1/rerank", response_model=CompatResponse, responses=_COMPAT_ERRORS,
             summary="Cohere v1/Jina-compatible rerank: query + documents")
async def rerank_compat(request: Request):
    """``query`` is taken as a specific intention (I2), with no history. Fused (a service with a
    gate): ranked by the fused score, ``relevance_score`` the gate's calibrated probability;
    LM-only: ``relevance_score`` is exp of the raw score. ``log_likelihood`` carries the LM's
    raw score either way. A document object's ``id`` names the item for the behaviour index.
    Errors are Cohere's ``{"message": ...}``."""
    state = _begin(request)
    req = _validate(CompatRerankRequest, await _read_json(request, state), state)
    version = "2" if request.url.path.startswith("/v2/") else "1"
    return _json(await ServingCompat(state).handle(req, request.receive, version))


@router.get("/health", response_model=Health, responses={503: {"model": HealthFailed}}, summary="Liveness")
async def health(request: Request):
    answer = ServingOps(_state(request)).health()
    return JSONResponse(answer_body(answer), status_code=503 if isinstance(answer, HealthFailed) else 200)


@router.get("/ready", response_model=Ready, responses={503: {"model": NotReady}},
            summary="Readiness: the model is loaded and warmed up")
async def ready(request: Request):
    answer = ServingOps(_state(request)).ready()
    if isinstance(answer, NotReady):
        return JSONResponse(answer_body(answer), status_code=503, headers={"Retry-After": "5"})
    return JSONResponse(answer_body(answer))


@router.post("/admin/reload", response_model=ReloadResponse,
             responses={code: {"model": ErrorBody} for code in (400, 401, 409, 422, 503)},
             summary="Swap to a new model version while serving")
async def reload(request: Request):
    """Loads ``model`` (default: the configured model, read again) and warms it up while the old
    one serves, then switches: requests begun before finish on the old model, later ones get the
    new one; every answer names the checkpoint version that scored it. Needs the API key when
    one is set. 409 while a swap runs; 422 naming ``model`` when it cannot be served (the old
    model keeps serving)."""
    state = _begin(request)
    body = await _read_json(request, state) if await request.body() else {}
    req = _validate(ReloadRequest, body, state)
    return _json(await ServingOps(state).reload(req))


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request):
    content, content_type = ServingOps(_state(request)).exposition()
    return Response(content, media_type=content_type)
