"""The pipelines the handlers call.

Rerank: preparation in the prep thread (the core's template selection and instruction
fitting, one cache key per distinct candidate; with fusion, the items' ids resolved, the
behaviour signal, the semantic signal when the encoder has every text cached and the
sequential one when its history's state is kept) -> cache lookup -> the misses (and, with
fusion, the signals the prep thread could not compute) go to the batcher (abandoned if the
client disconnects) -> the LM scores of the misses are written back (the cache holds LM
scores only) -> with fusion, the gate fuses the signals.
Recommend: preparation (a matching template, the mask of allowed items; with fusion, the
rerank instruction and the history's ids) -> the whole answer from the cache, or a job through
the same batcher (generation, and with fusion the retrieved items ranked by the fused scorer)
-> the answer cached.
Ranking and the answer's shape stay with the handlers."""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Literal, Sequence

import numpy as np

from instructrec.aspects import UserNeed
from instructrec.hybrid import Fused, Signals
from instructrec.hybrid.semantic import NotCached
from instructrec.hybrid.sequential import SequenceQuery
from instructrec.templates import TemplateError, get_template

from .batcher import Expired, QueueFull, ShuttingDown
from .engine import Engine, HybridJob, Prepared, PreparedRecommend, UnknownItem
from .errors import ApiError, ClientGone
from .schemas import FusionMode
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


@dataclass(frozen=True)
class FusionRequest:
    """How a rerank request wants to be scored, and its items' ids where the client gave them
    (None: resolve by title)."""

    mode: FusionMode = "auto"
    candidate_ids: Sequence[str | None] = ()  # per request candidate
    history_ids: Sequence[str | None] = ()  # per history item of the need


@dataclass
class Fusion:
    """How an answer was scored: ``fused`` (the gate's fusion) or ``lm-only``."""

    mode: Literal["fused", "lm-only"]
    requested: FusionMode
    fused: Fused | None = None
    without_behaviour: list[int] | None = None  # request indices of candidates with no behaviour signal
    signals: list[str] = field(default_factory=lambda: ["lm"])
    counted_without: int = 0  # of those, what instructrec_fusion_candidates_without_behaviour counted

    @property
    def weights(self) -> dict[str, float]:
        """The gate's weights of the present signals ({} when LM-only), as the metrics observe them."""
        return self.fused.weights if self.fused is not None else {}


@dataclass
class Outcome:
    """What the pipeline hands back to a handler: scores in request order and where they came from."""

    prepared: Prepared
    scores: list[float]  # per request candidate: the LM's (mean or sum token log-likelihood)
    cached: list[bool]  # per request candidate
    hits: int
    misses: int
    cache_used: bool
    scored_tokens: int
    fusion: Fusion

    @property
    def ranking_scores(self) -> list[float]:
        """What the answer is ranked by: the fused scores, else the LM's."""
        return self.fusion.fused.scores.tolist() if self.fusion.fused is not None else self.scores


# The ASGI ``receive`` of the request being answered: how the pipeline hears that the client
# left, without knowing the web framework.
Receive = Callable[[], Awaitable[dict]]


async def wait_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects (the request body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def await_scores(receive: Receive, future: asyncio.Future):
    watch = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({future, watch}, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            return future.result()
        raise ClientGone()
    finally:
        watch.cancel()
        if not future.done():
            future.cancel()  # the batcher skips it


@dataclass(frozen=True)
class Prepped:
    """A fused request's signals beside the LM, as far as the prep thread computes them (numpy
    only): the behaviour signal, the semantic one when every text's vector is cached, and the
    sequential one when its history's state is kept; else the model thread computes them."""

    behaviour: np.ndarray | None  # per candidate; None when absent (no history or no candidate the index knows)
    known: float
    candidate_ids: list[str | None]  # resolved through the index (None: unknown)
    history_ids: list[str | None]
    semantic: np.ndarray | None  # per candidate; None when absent or not computed yet
    semantic_pending: bool  # a text was not cached: the model thread computes the semantic signal
    seconds: float  # spent on the semantic and sequential signals here
    sequential: np.ndarray | None = None  # per candidate; None when absent or not computed yet
    sequential_pending: SequenceQuery | None = None  # the state is not kept: the model thread computes it


def prepare(state: ServiceState, engine: Engine, need: UserNeed, template_id: str | None, texts: list[str],
            max_text_tokens: int | None, fusion: FusionRequest | None = None
            ) -> tuple[Prepared, dict[str, str], Prepped | None]:
    """In the prep thread: the instruction, token counts, one cache key per distinct candidate
    and, for a fused request, the behaviour signal (ids resolved by id, else by exact title) and
    the semantic signal if the encoder has every text cached (the model thread never waits for it)."""
    cache = state.cache
    prepared = engine.prepare(need, template_id, texts, max_text_tokens)
    keys: dict[str, str] = {}
    if cache.enabled:
        parts = engine.key_parts(prepared)
        keys = dict(zip(prepared.targets, cache.keys(parts, prepared.targets)))
    signals = None
    if fusion is not None:
        hybrid = engine.hybrid
        candidates = hybrid.resolve(_ids(fusion.candidate_ids, len(texts)), texts)
        history = hybrid.resolve(_ids(fusion.history_ids, len(need.history)), list(need.history))
        score, known = hybrid.behaviour_signal(candidates, history)
        semantic, pending, start = None, False, time.perf_counter()
        try:
            semantic = hybrid.semantic_signal(need, texts, cached_only=True)
        except NotCached:
            pending = True
        query = hybrid.sequential_query(candidates, history)
        sequential = hybrid.sequential.kept_scores(query) if query is not None else None
        signals = Prepped(score, known, candidates, history, semantic, pending, time.perf_counter() - start,
                          sequential, query if sequential is None else None)
    return prepared, keys, signals


def _ids(ids: Sequence[str | None], n: int) -> list[str | None]:
    ids = list(ids) or [None] * n
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} items")
    return ids


def fuses(engine: Engine, mode: FusionMode) -> bool:
    """Whether a request in ``mode`` is fused: ``auto`` on a service with a gate."""
    return mode == "auto" and engine.hybrid is not None


async def _submit(receive: Receive, state: ServiceState, engine: Engine, job, tokens: int):
    """A job through the batcher, scored by ``engine`` (the one that prepared it, even when a
    swap comes between), its result awaited; refusals as the API's errors."""
    try:
        future = state.batcher.submit((engine, job), tokens)
    except QueueFull as exc:
        raise ApiError(429, "rate_limited", "too many requests are waiting for the model; retry later",
                       headers={"Retry-After": str(exc.retry_after)}, reason="queue_full") from None
    except ShuttingDown:
        raise shutting_down() from None
    try:
        return await await_scores(receive, future)
    except ShuttingDown:
        raise shutting_down() from None
    except Expired as exc:
        raise ApiError(503, "overloaded", "the request waited longer than max_queue_wait_ms x queue_expiry_factor "
                       f"for the model ({exc})", headers={"Retry-After": str(exc.retry_after)}, reason="expired") from None


async def rerank(receive: Receive, state: ServiceState, engine: Engine, need: UserNeed, template_id: str | None,
                 texts: list[str], max_text_tokens: int | None = None,
                 fusion: FusionRequest = FusionRequest()) -> Outcome:
    cache, metrics = state.cache, state.metrics
    metrics.candidates_per_request.observe(len(texts))
    loop = asyncio.get_running_loop()
    fused = fuses(engine, fusion.mode)
    start = time.perf_counter()
    try:
        prepared, keys, signals = await loop.run_in_executor(
            state.prep_executor, prepare, state, engine, need, template_id, texts, max_text_tokens,
            fusion if fused else None)
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
    semantic, semantic_seconds = (signals.semantic, signals.seconds) if fused else (None, 0.0)
    encoded = prepared.encoded(misses) if misses else None
    lm_tokens = prepared.source_tokens + prepared.target_tokens(misses) if misses else 0
    result = None
    sequential = signals.sequential if fused else None
    if fused and (signals.semantic_pending or signals.sequential_pending is not None):
        # the LM's misses, the semantic signal if a text is new and the sequential one if its
        # history's state is not kept: one trip to the model thread
        pending, query = signals.semantic_pending, signals.sequential_pending
        job = HybridJob(encoded, need, texts, semantic=pending, sequential=query)
        weight = lm_tokens + (engine.semantic_tokens(need, texts) if pending else 0) + \
            (len(texts) if query is not None else 0)
        done = await _submit(receive, state, engine, job, weight)
        result = done.scored
        if query is not None:
            sequential = done.sequential
        if pending:
            semantic = done.semantic
        semantic_seconds += done.semantic_seconds
    elif misses:
        result = await _submit(receive, state, engine, encoded, lm_tokens)
    if misses:
        for t, value in zip(misses, result.scores):
            scores[t] = value
        scored_tokens = lm_tokens
        if cache.enabled:
            await cache.set_many({keys[t]: scores[t] for t in misses})
    lm = [scores[t] for t in texts]
    if fused:
        outcome = _fuse(state, engine, fusion.mode, need, lm, signals, semantic, sequential, semantic_seconds)
    else:
        outcome = Fusion("lm-only", fusion.mode)
        metrics.observe_fusion("lm-only", {}, 0)
    return Outcome(prepared, lm, [t in from_cache for t in texts], len(from_cache),
                   len(misses) if cached_values is not None else 0, cached_values is not None, scored_tokens,
                   outcome)


def _fuse(state: ServiceState, engine: Engine, mode: FusionMode, need: UserNeed, lm: list[float], signals: Prepped,
          semantic: np.ndarray | None, sequential: np.ndarray | None, semantic_seconds: float) -> Fusion:
    """The gate's fusion of a request's signals (numpy, a few microseconds: on the event loop), counted."""
    hybrid, metrics = engine.hybrid, state.metrics
    start = time.perf_counter()
    fused = hybrid.fuse_signals(lm, need, Signals(signals.behaviour, signals.known, semantic, sequential))
    metrics.fusion_seconds.observe(time.perf_counter() - start + semantic_seconds)
    without = list(range(len(lm))) if signals.behaviour is None else \
        [i for i, c in enumerate(signals.candidate_ids) if c is None]
    counted = len(without) if hybrid.behaviour is not None else 0
    metrics.observe_fusion("fused", fused.weights, counted)
    return Fusion("fused", mode, fused, without, list(fused.components), counted)


@dataclass
class Recommendation:
    """What the recommend pipeline hands back: the items best first, as (catalogue index, score)
    or, fused, (catalogue index, fused score, relevance, components)."""

    prepared: PreparedRecommend
    items: list[tuple]
    steps: int
    cache_used: bool
    hit: bool
    requested: FusionMode = "auto"
    fusion: dict | None = None  # fused: {"weights", "signals", "ranked"} (None: generation only)


def no_catalogue() -> ApiError:
    return ApiError(409, "no_catalogue", "this service has no catalogue to recommend from: build one with "
                    "`instructrec catalogue build --model <the served model> --out CAT` and start the service with "
                    "INSTRUCTREC_CATALOGUE=CAT (/rerank works without one)", reason="no_catalogue")


async def title_vectors_ready(engine: Engine, wait_s: float) -> None:
    """Wait (at most ``wait_s``) while the service computes the catalogue's title vectors, which a
    fused /recommend retrieves by; past that a 503 with the expected wait as Retry-After."""
    vectors = engine.title_vectors
    deadline = time.monotonic() + wait_s
    while vectors.computing and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if vectors.computing:
        raise ApiError(503, "warming_up", f"the service is computing the title vectors of its catalogue, which a fused "
                       f"/recommend retrieves by ({vectors.done:,} of {vectors.total:,} titles; about "
                       f"{vectors.eta_seconds()} s left, once per catalogue: they are kept beside it); /rerank "
                       "answers meanwhile, and so does /recommend with \"fusion\": \"lm-only\"",
                       headers={"Retry-After": str(vectors.eta_seconds())}, reason="warming_up")
    if vectors.error:
        raise ApiError(503, "unavailable", f"the catalogue's title vectors could not be computed ({vectors.error}): a "
                       "fused /recommend cannot retrieve; /rerank and /recommend with \"fusion\": \"lm-only\" "
                       "answer", reason="not_ready")


async def recommend(receive: Receive, state: ServiceState, engine: Engine, need: UserNeed, template_id: str | None,
                    k: int, mode: FusionMode = "auto", **mask) -> Recommendation:
    """``mask``: :meth:`Engine.prepare_recommend`'s history ids, exclusions and filter. Fused
    (``auto`` on a service with a gate): the model's own k and what the signals retrieve, ranked
    by the fused scorer; else the model's own k."""
    cache, metrics = state.cache, state.metrics
    loop = asyncio.get_running_loop()
    fused = fuses(engine, mode)
    if fused:
        await title_vectors_ready(engine, state.settings.max_queue_wait_ms / 1000)
    start = time.perf_counter()
    try:
        prepared = await loop.run_in_executor(state.prep_executor, functools.partial(
            engine.prepare_recommend, need, template_id, k, fused=fused, **mask))
    except TemplateError as exc:
        raise template_error(exc, "template" if template_id else None) from None
    except UnknownItem as exc:
        raise ApiError(422, "validation_error", str(exc), exc.field, reason="invalid") from None
    metrics.prepare_seconds.observe(time.perf_counter() - start)
    if prepared.allowed_items == 0:
        return Recommendation(prepared, [], 0, False, False, mode)
    key = cache.answer_key(engine.recommend_key_parts(prepared)) if cache.enabled else None
    usable, cached = await cache.get_json(key) if key else (False, None)
    if cached is not None:
        metrics.answer_cache.labels("recommend", "hit").inc()
        if fused:
            return Recommendation(prepared, [(int(i), float(s), float(r), c) for i, s, r, c in cached["items"]], 0,
                                  True, True, mode, cached["fusion"])
        return Recommendation(prepared, [(int(i), float(s)) for i, s in cached], 0, True, True, mode)
    if key:
        metrics.answer_cache.labels("recommend", "miss" if usable else "bypassed").inc()
    generated = await _submit(receive, state, engine, prepared.job, engine.job_tokens(prepared))
    metrics.generate_steps.observe(generated.steps)
    if fused:
        fusion = {"weights": generated.fused.weights, "signals": list(generated.fused.components),
                  "ranked": generated.ranked}
        metrics.observe_fusion("fused", generated.fused.weights, 0)
        if usable:
            await cache.set_json(key, {"items": generated.items, "fusion": fusion})
        return Recommendation(prepared, generated.items, generated.steps, usable, False, mode, fusion)
    metrics.observe_fusion("lm-only", {}, 0)
    items = [(r.item, r.score) for r in generated.items]
    if usable:
        await cache.set_json(key, items)
    return Recommendation(prepared, items, generated.steps, usable, False, mode)
