"""The rerank pipeline the handlers call: preparation in the prep thread (the core's template
selection and instruction fitting, one cache key per distinct candidate) -> cache lookup ->
the misses go to the batcher (abandoned if the client disconnects) -> the scores of the
misses are written back. Ranking and the answer's shape stay with the handlers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fastapi import Request

from instructrec.aspects import UserNeed
from instructrec.templates import TemplateError, get_template

from .batcher import Expired, QueueFull, ShuttingDown
from .engine import Prepared
from .errors import ApiError, ClientGone
from .state import ServiceState


def template_error(exc: TemplateError, field: str | None) -> ApiError:
    """The one answer to a template that cannot serve the request."""
    return ApiError(422, "template_error", str(exc), field, reason="invalid")


def check_template(template_id: str | None) -> None:
    """Refuse an unknown template id before any work is queued."""
    if template_id is not None:
        try:
            get_template(template_id)
        except TemplateError as exc:
            raise template_error(exc, "template") from None


def shutting_down() -> ApiError:
    return ApiError(503, "unavailable", "the service is shutting down", headers={"Retry-After": "5"})


@dataclass
class Outcome:
    """What the pipeline hands back to a handler: scores in request order and where they came from."""

    prepared: Prepared
    scores: list[float]  # per request candidate
    cached: list[bool]  # per request candidate
    hits: int
    misses: int
    cache_used: bool
    scored_tokens: int


async def wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the request body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def await_scores(request: Request, future: asyncio.Future):
    watch = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({future, watch}, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            return future.result()
        raise ClientGone()
    finally:
        watch.cancel()
        if not future.done():
            future.cancel()  # the batcher skips it


def prepare(state: ServiceState, need: UserNeed, template_id: str | None, texts: list[str],
            max_text_tokens: int | None) -> tuple[Prepared, dict[str, str]]:
    """In the prep thread: the instruction, token counts, and one cache key per distinct candidate."""
    engine, cache = state.engine, state.cache
    prepared = engine.prepare(need, template_id, texts, max_text_tokens)
    keys: dict[str, str] = {}
    if cache.enabled:
        parts = engine.key_parts(prepared)
        keys = dict(zip(prepared.targets, cache.keys(parts, prepared.targets)))
    return prepared, keys


async def rerank(request: Request, state: ServiceState, need: UserNeed, template_id: str | None,
                 texts: list[str], max_text_tokens: int | None = None) -> Outcome:
    cache, metrics = state.cache, state.metrics
    metrics.candidates_per_request.observe(len(texts))
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    try:
        prepared, keys = await loop.run_in_executor(state.prep_executor, prepare, state, need, template_id, texts,
                                                    max_text_tokens)
    except TemplateError as exc:
        raise template_error(exc, "template" if template_id else None) from None
    metrics.prepare_seconds.observe(time.perf_counter() - start)

    unique = list(prepared.targets)  # distinct candidate texts, in request order
    scores: dict[str, float] = {}
    from_cache: set[str] = set()
    cached_values = None
    if cache.enabled:
        cached_values = await cache.get_many([keys[t] for t in unique])
        if cached_values is None:
            metrics.cache_bypassed.inc(len(unique))
        else:
            for t, value in zip(unique, cached_values):
                if value is not None:
                    scores[t] = value
                    from_cache.add(t)
            metrics.cache_hits.inc(len(from_cache))
            metrics.cache_misses.inc(len(unique) - len(from_cache))
    misses = [t for t in unique if t not in scores]
    scored_tokens = 0
    if misses:
        tokens = prepared.source_tokens + prepared.target_tokens(misses)
        try:
            future = state.batcher.submit(prepared.encoded(misses), tokens)
        except QueueFull as exc:
            raise ApiError(429, "rate_limited", "too many requests are waiting for the model; retry later",
                           headers={"Retry-After": str(exc.retry_after)}, reason="queue_full") from None
        except ShuttingDown:
            raise shutting_down() from None
        try:
            result = await await_scores(request, future)
        except ShuttingDown:
            raise shutting_down() from None
        except Expired as exc:
            raise ApiError(503, "overloaded", f"the request waited longer than max_queue_wait_ms for the model ({exc})",
                           headers={"Retry-After": str(exc.retry_after)}, reason="expired") from None
        for t, value in zip(misses, result.scores):
            scores[t] = value
        scored_tokens = tokens
        if cache.enabled:
            await cache.set_many({keys[t]: scores[t] for t in misses})
    return Outcome(prepared, [scores[t] for t in texts], [t in from_cache for t in texts], len(from_cache),
                   len(misses) if cached_values is not None else 0, cached_values is not None, scored_tokens)
