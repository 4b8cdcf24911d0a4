"""The model side of the service: loading, versioning, warm-up, request preparation, scoring,
and the hybrid scorer (gate, behaviour index, semantic encoder) fused with the LM's scores.

Preparation (template selection, instruction fitting, tokenisation) runs in its own thread
with its own copy of the tokenizer; scoring runs in the inference threads, one per lane (see
:mod:`instructrec.service.batcher`), which may score with one engine at once: what they share
is read-only during scoring, or per thread (the encoder timing), or locked (the ranker's own
tokenizer, the MiniLM encoder and its cache, the retriever's one-time build). Nothing here
runs on the event loop.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from cachetools import LRUCache

from instructrec.aspects import TaskForm, UserNeed
from instructrec.catalogue import load_catalogue
from instructrec.checkpoint import checkpoint_version
from instructrec.generation import Generation, Generator
from instructrec.hybrid import GATE_FILE, Hybrid
from instructrec.hybrid.sequential import SequenceQuery
from instructrec.instruction import Instruction, build, count_tokens
from instructrec.ranker import Encoded, Ranker, Scored, targets_ids
from instructrec.reranker import RerankerWarning, load_hybrid_of, load_ranker
from instructrec.templates import TEMPLATE_VERSION

from .settings import Settings

log = logging.getLogger("instructrec.service")

# A generation job's cost in the batcher's units (scored candidate tokens) per beam; see Engine.job_tokens.
GENERATION_TOKENS_PER_BEAM = 100

def model_version(name: str) -> str:
    """What the cache keys on: the weights' content hash for a checkpoint directory; for a
    built-in (deterministically initialised) or hub model its name plus the template table."""
    if Path(name).is_dir():
        return checkpoint_version(name)
    return f"{name}+{TEMPLATE_VERSION}"


@dataclass(frozen=True)
class Prepared:
    """A request after preparation: the fitted instruction and the token ids of it and of
    each distinct candidate text, so the model thread never tokenises."""

    instruction: Instruction
    source_ids: list[int]  # instruction tokens the model sees
    source_cut: int  # instruction tokens cut by the ranker (0 when it fit)
    targets: dict[str, tuple[list[int], bool]]  # per distinct candidate text: (ids with end-of-sequence, was cut)
    max_target_tokens: int | None = None  # a request's own (lower) candidate limit; None: the ranker's

    @property
    def source_tokens(self) -> int:
        return len(self.source_ids)

    def target_tokens(self, texts: Sequence[str]) -> int:
        return sum(len(self.targets[t][0]) for t in texts)

    def cut(self, text: str) -> bool:
        return self.targets[text][1]

    def encoded(self, texts: Sequence[str]) -> Encoded:
        """What the ranker scores for these candidate texts (a subset, e.g. the cache misses)."""
        return Encoded(self.source_ids, self.source_cut, [self.targets[t][0] for t in texts],
                       sum(self.targets[t][1] for t in texts))


@dataclass(frozen=True)
class RecommendJob:
    """What the inference thread needs to generate one request's items (the batcher's job)."""

    source_ids: list[int]
    k: int
    allowed: "np.ndarray | None"  # a bool per catalogue item; None: all
    beams: int
    fused: "FusedRecommend | None" = None  # rank what the signals retrieve with the fused scorer (None: generation only)


@dataclass(frozen=True)
class FusedRecommend:
    """A fused /recommend: the need, its history's ids (resolved through the behaviour index) and
    the rerank (T3) instruction the LM scores the retrieved items with."""

    need: UserNeed
    history_ids: list
    rerank_source: str
    per_source: int


@dataclass(frozen=True)
class FusedItems:
    """A fused /recommend's answer: (catalogue index, fused score, relevance, components) best
    first, distinct by title; the fusion itself; decoding steps; and how many items were ranked."""

    items: list
    fused: object  # instructrec.hybrid.Fused over the ranked union
    steps: int
    ranked: int


@dataclass(frozen=True)
class PreparedRecommend:
    """A /recommend request after preparation (prep thread)."""

    instruction: Instruction
    source_cut: int
    job: RecommendJob
    allowed_items: int
    filter_digest: str  # of the allowed mask ("" when every item is allowed)

    @property
    def source_tokens(self) -> int:
        return len(self.job.source_ids)


@dataclass(frozen=True)
class HybridJob:
    """A fused rerank request's work for the inference thread: the LM's cache misses (None when
    every score came from the cache), the semantic signal (need, candidate texts) when a text is
    not cached, and the sequential signal when its history's state is not kept: all torch, so all
    on the job's model thread."""

    encoded: Encoded | None
    need: UserNeed
    texts: list[str]
    semantic: bool = True  # compute the semantic signal (False: the prep thread had every vector cached)
    sequential: "SequenceQuery | None" = None  # the sequential signal to compute (None: none, or kept)


@dataclass(frozen=True)
class HybridResult:
    scored: Scored | None  # the LM's scores of the misses
    semantic: "np.ndarray | None"  # similarity per candidate text; None when the need has no text (or not asked)
    semantic_seconds: float  # the semantic and sequential signals' time
    sequential: "np.ndarray | None" = None  # the sequential model's score per candidate; None when absent


def gate_path(settings: Settings, model_name: str) -> Path | None:
    """The gate the service fuses with: ``INSTRUCTREC_GATE`` (a gate.json or a directory holding
    one), else gate.json in the model directory when it exists; None: LM-only ('none')."""
    if settings.gate_disabled:
        return None
    if settings.gate:
        path = Path(settings.gate)
        return path / GATE_FILE if path.is_dir() else path
    default = Path(model_name) / GATE_FILE
    return default if default.is_file() else None


def sequential_path(settings: Settings, model_name: str) -> Path | None:
    """The sequential model the service fuses: ``INSTRUCTREC_SEQUENTIAL``, else sequential/ in the
    model directory when it exists (a shipped model carries it); None: no sequential signal."""
    if (settings.sequential or "").strip().lower() in ("none", "off"):
        return None
    if settings.sequential:
        return Path(settings.sequential)
    default = Path(model_name) / "sequential"
    return default if (default / "sequential.json").is_file() else None


@functools.lru_cache(maxsize=2)
def shared_semantic_encoder(path: str | None = None):
    """One MiniLM encoder (and title-vector cache) per process: a service has one engine; tests
    start several services in one process and need not load it each time."""
    from instructrec.hybrid.semantic import SemanticEncoder

    return SemanticEncoder(path)


def load_hybrid_for(settings: Settings, model_name: str, catalogue=None) -> Hybrid | None:
    """The service's hybrid (None without a gate), loaded by the core's
    :func:`~instructrec.reranker.load_hybrid_of` from the settings' files, with the service's
    own rules on top: a behaviour index or sequential model must be built over the catalogue's
    items when a catalogue is served, and a gate fitted with a sequential model needs one. Every
    error names its file. The MiniLM encoder is the process's one (its vectors are torch: only the
    inference thread runs it)."""
    from instructrec.hybrid.behaviour import BehaviourError, items_digest
    from instructrec.hybrid.sequential import SequentialError

    gate = gate_path(settings, model_name)
    if gate is None and settings.behaviour:
        raise BehaviourError(f"behaviour index {settings.behaviour} given without a gate to fuse it with: set "
                             f"INSTRUCTREC_GATE (or put {GATE_FILE} in the model directory)")
    sequential = sequential_path(settings, model_name)
    hybrid = load_hybrid_of(model_name, gate=gate or False, behaviour=settings.behaviour,
                            sequential=sequential or False, semantic=shared_semantic_encoder if settings.semantic
                            else False)
    if hybrid is None:
        return None
    want = items_digest([it.id for it in catalogue.items]) if catalogue is not None else None
    for part, what, where, error, fix in ((hybrid.behaviour, "behaviour index", settings.behaviour, BehaviourError,
                                           "rebuild it over the catalogue's items"),
                                          (hybrid.sequential, "sequential model", sequential, SequentialError,
                                           "train it on the catalogue's data set")):
        if part is not None and want is not None and part.items_version != want:
            raise error(f"{what} {where} was built over another item set (items digest {part.items_version}) than "
                        f"catalogue {settings.catalogue} ({want}): {fix}")
    if hybrid.gate.info.get("sequential") and hybrid.sequential is None:
        raise SequentialError(f"gate {gate} was fitted with a sequential model: give one (INSTRUCTREC_SEQUENTIAL, or "
                              "sequential/ in the model directory)")
    return hybrid


class UnknownItem(ValueError):
    """A filter names an id the catalogue does not hold."""

    def __init__(self, field: str, item_id: str):
        super().__init__(f"{field}: item {item_id!r} is not in the catalogue")
        self.field = field


def _candidate_set(targets: dict) -> str:
    """A digest of a request's distinct candidate texts in request order."""
    h = hashlib.sha256()
    for text in targets:
        h.update(text.encode("utf-8", "surrogatepass") + b"\x1f")
    return h.hexdigest()


def _cap(ids: list[int], cut: bool, limit: int) -> tuple[list[int], bool]:
    """Candidate ids (ending with end-of-sequence) cut to ``limit`` ids, end-of-sequence kept."""
    if len(ids) <= limit:
        return ids, cut
    return ids[: limit - 1] + ids[-1:], True


class TitleVectors:
    """Progress of the catalogue's title vectors when the service computes them itself (no file
    kept beside the catalogue): /ready reports it, a fused /recommend waits while ``computing``."""

    def __init__(self) -> None:
        self.done = self.total = 0
        self.computing = False
        self.error: str | None = None
        self._started = self._finished = 0.0

    def start(self, total: int) -> None:
        self.done, self.total, self._started, self.computing = 0, total, time.monotonic(), True

    def progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def finish(self) -> None:
        self.done, self._finished, self.computing = self.total, time.monotonic(), False

    def failed(self, error: str) -> None:
        self.error, self.computing = error, False

    def seconds(self) -> float:
        return (self._finished or time.monotonic()) - self._started

    def eta_seconds(self) -> int:
        """Seconds until done at the rate so far (at least 1)."""
        elapsed = self.seconds()
        rate = self.done / elapsed if self.done and elapsed > 0 else 0.0
        return max(1, round((self.total - self.done) / rate)) if rate else max(1, round(self.total / 50))


class Engine:
    """A loaded model + ranker, with the numbers the service reports about it."""

    def __init__(self, ranker: Ranker, settings: Settings):
        loaded = ranker.loaded
        self.loaded = loaded
        self.settings = settings
        self.ranker = ranker
        self.warmup_report: dict = {}
        self.name = loaded.name
        self.version = model_version(loaded.name)
        self.tuned_template_version = loaded.meta.get("template_version") or ""
        if self.tuned_template_version and self.tuned_template_version != TEMPLATE_VERSION:
            log.warning("%s was tuned on template table %s, this service uses %s", self.name,
                        self.tuned_template_version, TEMPLATE_VERSION)
        # Preparation runs in another thread than the model: it gets its own tokenizer so the
        # two never share a (not thread-safe) Rust tokenizer object.
        self._prep_tokenizer = copy.deepcopy(loaded.tokenizer)
        # Catalogue titles and returning users repeat: the preparation thread keeps the token
        # ids of recent candidate texts and fitted instructions (a fully cached request then
        # tokenises nothing). Only the preparation thread touches these. An instruction entry
        # (rendered text and ~200 ids) weighs about as much as 16 titles' ids.
        size = settings.prep_cache_size
        self._target_ids: LRUCache | None = LRUCache(size) if size else None
        self._instruction = functools.lru_cache(maxsize=max(1, size // 16))(self._fit) if size else self._fit
        self._local = threading.local()
        self._install_timing_hooks()
        self.generator: Generator | None = None
        if settings.catalogue:
            # a named catalogue that cannot serve this model fails the start: /health says why
            self.generator = Generator(self.ranker, load_catalogue(settings.catalogue), where=settings.catalogue)
            self._recommend_fit = functools.lru_cache(maxsize=max(1, size // 16))(self._fit_matching) if size \
                else self._fit_matching
        self.hybrid: Hybrid | None = load_hybrid_for(settings, loaded.name, self.catalogue)
        self._retriever = None  # /recommend's candidate retrieval, built on an inference thread at warm-up
        self._retriever_lock = threading.Lock()  # lanes may ask for it at once: it is built once
        self.title_vectors = TitleVectors()  # the catalogue's title vectors, when the service computes them

    # -- cache key parts ----------------------------------------------------------------
    @property
    def shares_scores_across_requests(self) -> bool:
        """Whether a candidate's cached score may serve another request with other candidates.
        In float32 a candidate's score moves by ~1e-6 with the candidates it is bucketed with; in
        bf16, fp16 or int8 by up to ~1e-2, enough to reorder near-ties, so there a score is cached
        for its whole request (same candidates, same order) and an answer is always the one the
        request gets alone."""
        import torch

        return self.loaded.dtype == torch.float32 and not self.loaded.quantized

    def model_info(self) -> dict:
        """What every answer names as the model that scored it."""
        return {"name": self.name, "checkpoint_version": self.version}

    def key_parts(self, prepared: Prepared) -> tuple[str, ...]:
        r = self.ranker
        # precision is part of the key: a bf16 or int8 replica's scores differ slightly from float32's
        limit = prepared.max_target_tokens or r.max_target_tokens
        parts = (self.version, self.loaded.precision, TEMPLATE_VERSION, prepared.instruction.template.id, r.reduction,
                 str(r.max_source_tokens), str(limit), prepared.instruction.source)
        if not self.shares_scores_across_requests:
            parts += (_candidate_set(prepared.targets),)
        return parts

    # -- preparation (prep thread) -------------------------------------------------------
    def prepare(self, need: UserNeed, template_id: str | None, candidates: Sequence[str],
                max_text_tokens: int | None = None) -> Prepared:
        """Select the template (the core's one selection function), fit the instruction, and
        tokenise it and each distinct candidate. ``max_text_tokens`` (a request's
        ``max_tokens_per_doc``) cuts each candidate to that many of its own tokens, plus
        end-of-sequence, when that is below the ranker's limit."""
        inst, source_ids, source_cut = self._instruction(need, template_id)
        targets = self._targets(list(dict.fromkeys(candidates)))
        limit = None
        if max_text_tokens is not None and max_text_tokens + 1 < self.ranker.max_target_tokens:
            limit = max_text_tokens + 1
            targets = {t: _cap(ids, cut, limit) for t, (ids, cut) in targets.items()}
        return Prepared(inst, source_ids, source_cut, targets, limit)

    def _fit(self, need: UserNeed, template_id: str | None) -> tuple[Instruction, list[int], int]:
        inst = build(need, self._prep_tokenizer, max_tokens=self.ranker.max_source_tokens, template_id=template_id)
        return (inst, *self.ranker.source_ids(inst.source, tokenizer=self._prep_tokenizer))

    def _targets(self, texts: list[str]) -> dict[str, tuple[list[int], bool]]:
        r, known = self.ranker, self._target_ids
        if known is None:
            return dict(zip(texts, targets_ids(self._prep_tokenizer, texts, r.max_target_tokens, r.eos)))
        found = {t: known[t] for t in texts if t in known}
        new = [t for t in texts if t not in found]
        for t, value in zip(new, targets_ids(self._prep_tokenizer, new, r.max_target_tokens, r.eos)):
            known[t] = found[t] = value
        return {t: found[t] for t in texts}

    # -- /recommend (preparation in the prep thread, generation in the inference thread) ------
    @property
    def catalogue(self):
        return self.generator.catalogue if self.generator else None

    def _fit_matching(self, need: UserNeed, template_id: str | None) -> tuple[Instruction, list[int], int]:
        inst = build(need, self._prep_tokenizer, max_tokens=self.ranker.max_source_tokens, task=TaskForm.MATCHING,
                     template_id=template_id)
        return (inst, *self.ranker.source_ids(inst.source, tokenizer=self._prep_tokenizer))

    def prepare_recommend(self, need: UserNeed, template_id: str | None, k: int, *, history_ids=(),
                          exclude_history: bool = True, only_ids=None, exclude_ids=(), meta=None,
                          fused: bool = False) -> PreparedRecommend:
        """Select a matching (T2) template, fit the instruction, and make the request's mask of
        allowed items: ``only_ids`` (all when None) whose metadata matches every ``meta`` key (a
        value, or a list of values any of which will do), minus ``exclude_ids``, minus the history
        (its ids where given, else its titles) with ``exclude_history``. Raises
        :class:`UnknownItem` for an ``only_ids`` id the catalogue lacks. ``fused``: the items are
        what the signals retrieve, ranked by the fused scorer (:meth:`generate`)."""
        cat = self.catalogue
        inst, source_ids, source_cut = self._recommend_fit(need, template_id)
        allowed = None
        if only_ids is not None:
            allowed = np.zeros(len(cat), dtype=bool)
            for j, item_id in enumerate(only_ids):
                index = cat.index_of_id(item_id)
                if index is None:
                    raise UnknownItem(f"filter.ids[{j}]", item_id)
                allowed[index] = True
        for key, values in (meta or {}).items():
            matching = np.zeros(len(cat), dtype=bool)
            matching[cat.indices_where(key, values if isinstance(values, list) else [values])] = True
            allowed = matching if allowed is None else allowed & matching
        out = [i for i in (cat.index_of_id(x) for x in exclude_ids) if i is not None]
        if exclude_history:
            ids = history_ids or (None,) * len(need.history)
            for item_id, title in zip(ids, need.history):  # by id where the catalogue knows it, else by title
                index = cat.index_of_id(item_id) if item_id is not None else None
                out.extend([index] if index is not None else cat.indices_of_title(title))
        if out:
            allowed = np.ones(len(cat), dtype=bool) if allowed is None else allowed
            allowed[out] = False
        digest = "" if allowed is None else hashlib.sha256(np.packbits(allowed).tobytes()).hexdigest()[:32]
        beams = max(k, self.settings.beams or k)
        fusion = None
        if fused:
            hybrid = self.hybrid
            ids = list(history_ids) or [None] * len(need.history)
            rerank = build(need, self._prep_tokenizer, self.ranker.max_source_tokens).source
            fusion = FusedRecommend(need, hybrid.resolve(ids, list(need.history)), rerank, self.settings.retrieve_per_source)
        job = RecommendJob(source_ids, k, allowed, beams, fusion)
        return PreparedRecommend(inst, source_cut, job, len(cat) if allowed is None else int(allowed.sum()), digest)

    def rerank_answer_parts(self) -> tuple[str, ...]:
        """What decides a /rerank answer beside its request body (the whole answer is cached by
        both): the served model and its name, precision, templates, scoring limits, and the gate
        with every signal's version (an id is resolved by the behaviour index: its version too)."""
        r = self.ranker
        return ("rerank", self.name, self.version, self.loaded.precision, TEMPLATE_VERSION, r.reduction,
                str(r.max_source_tokens), str(r.max_target_tokens), self.hybrid.version if self.hybrid else "lm-only")

    def recommend_key_parts(self, prepared: PreparedRecommend) -> tuple[str, ...]:
        """A /recommend answer is cached whole, by everything that decides it. Generation runs
        each request alone, so in any precision a cached answer is the one it gets uncached."""
        r, job = self.ranker, prepared.job
        fused = ("fused", self.hybrid.version, str(job.fused.per_source), job.fused.rerank_source,
                 "|".join(str(h) for h in job.fused.history_ids)) if job.fused else ("lm-only",)
        return ("recommend", self.version, self.loaded.precision, TEMPLATE_VERSION, prepared.instruction.template.id,
                r.reduction, str(r.max_source_tokens), self.catalogue.version, str(job.k), str(job.beams),
                prepared.filter_digest, prepared.instruction.source, *fused)

    def job_tokens(self, prepared: PreparedRecommend) -> int:
        """A generation job's weight in the batcher's token units (its queue-wait estimate): each
        decoding step reads the whole vocabulary head, about what scoring this many candidate
        tokens costs (measured: k=10 on Games ~ a 100-candidate rerank)."""
        return prepared.source_tokens + GENERATION_TOKENS_PER_BEAM * prepared.job.beams

    def generate(self, job: RecommendJob) -> "Generation | FusedItems":
        """The model's own top k titles (one item per title); with ``job.fused``, those and what
        the sequential model, the behaviour index and the semantic encoder propose, ranked by the
        fused scorer as /rerank would rank them (inference thread: all of it is torch)."""
        generated = self.generator.generate(job.source_ids, job.k, allowed=job.allowed, beams=job.beams, distinct=True)
        if job.fused is None:
            return generated
        f, cat = job.fused, self.catalogue
        history = [h for h in f.history_ids if h is not None]
        got = self.retriever().retrieve(f.need, history, allowed=job.allowed, per_source=f.per_source,
                                        beams=[r.item for r in generated.items])
        titles = [cat.items[i].title for i in got.items]
        fused, lm = self.hybrid.fuse_retrieved(self.ranker, f.rerank_source, f.need,
                                               [cat.items[i].id for i in got.items], titles, f.history_ids)
        items, seen = [], set()
        for j in sorted(range(len(titles)), key=lambda j: (-fused.scores[j], j)):
            if titles[j] not in seen and len(items) < job.k:
                seen.add(titles[j])
                items.append((got.items[j], float(fused.scores[j]), float(fused.relevance[j]),
                              {name: float(v[j]) for name, v in fused.components.items()} | {"lm_loglik": lm[j]}))
        return FusedItems(items, fused, generated.steps, len(got.items))

    def retriever(self):
        """/recommend's retrieval over the catalogue (built once, on an inference thread: the
        title vectors are the semantic encoder's, kept in a file beside the catalogue)."""
        with self._retriever_lock:
            if self._retriever is None:
                self._retriever = self._build_retriever()
            return self._retriever

    def _build_retriever(self):
        from instructrec.hybrid.retrieval import Retriever
        from instructrec.hybrid.semantic import catalogue_keep

        cat, hybrid = self.catalogue, self.hybrid
        titles = [it.title for it in cat.items]
        vectors = None
        if hybrid.semantic is not None:
            # Not kept in a file: each computed alone, as a request naming the title would, so no
            # answer depends on whether it came before or after this
            vectors = hybrid.semantic.catalogue_vectors(titles, catalogue_keep(self.settings.catalogue), alone=True,
                                                        on_text=self.title_vectors.progress)
        return Retriever([it.id for it in cat.items], titles, behaviour=hybrid.behaviour,
                         sequential=hybrid.sequential, semantic=hybrid.semantic, title_vectors=vectors)

    def _title_vectors_kept(self) -> bool:
        from instructrec.hybrid.semantic import catalogue_keep

        semantic = self.hybrid.semantic
        titles = [it.title for it in self.catalogue.items]
        return semantic is None or semantic.kept_vectors_path(titles, catalogue_keep(self.settings.catalogue)).is_file()

    def _retriever_in_background(self) -> None:
        try:
            self.retriever()
        except Exception as exc:  # noqa: BLE001 - /recommend answers with it; /rerank is unaffected
            log.error("could not compute the catalogue's title vectors", exc_info=exc)
            self.title_vectors.failed(f"{type(exc).__name__}: {exc}")
            return
        self.title_vectors.finish()
        log.info("title vectors of the catalogue's %d titles computed in %.1fs and kept beside %s: /recommend answers",
                 self.title_vectors.total, self.title_vectors.seconds(), self.settings.catalogue)

    def semantic_tokens(self, need: UserNeed, texts: Sequence[str]) -> int:
        """A semantic job's weight in the batcher's token units: about the tokens of the texts
        the encoder has not cached (a cached text costs nothing). Read from the event loop while
        the model thread may add to the cache: an estimate, like every job weight."""
        encoder = self.hybrid.semantic if self.hybrid else None
        if encoder is None:
            return 0
        texts = dict.fromkeys([*need.history, need.preference or "", need.intention or "", *texts])
        return sum(len(t) // 4 + 2 for t in texts if t and t not in encoder.cache)

    def run_jobs(self, jobs: list) -> tuple[list, float, float]:
        """The batcher's score function: rerank jobs (``Encoded``, and the LM part of a
        ``HybridJob``) scored together by :meth:`score_many`, then each ``HybridJob``'s semantic
        signal, generation jobs each alone; (results in job order, encoder seconds, decoder
        seconds)."""
        results: list = [None] * len(jobs)
        lm_part = [j.encoded if isinstance(j, HybridJob) else j for j in jobs]
        rerank = [i for i, j in enumerate(jobs) if not isinstance(j, RecommendJob) and lm_part[i] is not None]
        enc = dec = 0.0
        if rerank:
            scored, enc, dec = self.score_many([lm_part[i] for i in rerank])
            for i, value in zip(rerank, scored):
                results[i] = value
        for i, job in enumerate(jobs):
            if isinstance(job, HybridJob):
                start = time.perf_counter()
                semantic = self.hybrid.semantic_signal(job.need, job.texts) if job.semantic else None
                sequential = self.hybrid.sequential.scores_of(job.sequential) if job.sequential is not None else None
                results[i] = HybridResult(results[i], semantic, time.perf_counter() - start, sequential)
        for i, job in enumerate(jobs):
            if isinstance(job, RecommendJob):
                start = time.perf_counter()
                results[i] = self.generate(job)
                dec += time.perf_counter() - start
        return results, enc, dec

    # -- scoring (inference thread) ------------------------------------------------------
    def score_many(self, requests: list[Encoded | tuple[str, list[str]]]) -> tuple[list[Scored], float, float]:
        """Score requests together in the calling thread; returns (Scored per request, encoder
        seconds, decoder seconds) of the whole batch."""
        self._local.encoder = 0.0
        start = time.perf_counter()
        scored = self.ranker.score_many(requests)
        total = time.perf_counter() - start
        enc = min(getattr(self._local, "encoder", 0.0), total)
        return scored, enc, total - enc

    def warm_up(self, shared: bool = True) -> tuple[int, int]:
        """The worst batches the settings allow, so a budget that does not fit fails at start-up:
        one full-length instruction with as many full-length candidates as the token budget holds
        (the largest decoder activations), then, when requests share passes (``batch_invariant``
        off) of a seq2seq model or a prefix-LM, the largest mixed batch:
        ``max_batch_requests`` full-length instructions (as many as the budget holds) whose
        candidates share decoder passes with as many per-row key/value copies as ``mixed_kv_mb``
        allows, each row as long as the token budget then permits; and for a prefix-LM one small
        request at every padded instruction length (``Ranker.warm_instruction_lengths``); with
        ``shared``, :meth:`warm_up_shared` too (without: the model's own parts only, which any
        thread may run before the engine serves). Returns (instruction tokens, candidates) of the
        first; ``warmup_report`` describes them all."""
        r = self.ranker
        special = count_tokens(r.tokenizer, "")
        per_word = max(1, count_tokens(r.tokenizer, "word") - special)
        source = " ".join(["word"] * max(1, (r.max_source_tokens - special) // per_word))  # fills the budget
        candidate = " ".join(["item"] * r.max_target_tokens)  # cut to max_target_tokens
        count = max(1, r.batch_tokens // r.max_target_tokens)
        (scored,), _, _ = self.score_many([(source, [candidate] * count)])
        started = time.perf_counter()  # again, timed: the batcher's first drain rate (see Batcher.calibrate)
        self.score_many([(source, [candidate] * count)])
        per_token = (time.perf_counter() - started) / (scored.source_tokens + count * r.max_target_tokens)
        self.warmup_report = {"single": {"source_tokens": scored.source_tokens, "candidates": count,
                                         "seconds_per_token": per_token}}
        if not r.batch_invariant and r.backend.shares_passes():
            self.warmup_report["mixed"] = self._warm_up_mixed(source, scored.source_tokens)
        self.warmup_report["instruction_lengths"] = r.warm_instruction_lengths()
        if self.generator is not None:  # the decoding step's kernels, before the first /recommend
            started = time.perf_counter()
            steps = self.generator.generate(source, 2).steps
            self.warmup_report["generation"] = {"steps": steps, "seconds": round(time.perf_counter() - started, 3)}
        if shared:
            self.warm_up_shared()
        return scored.source_tokens, count

    def warm_up_shared(self) -> float:
        """The warm-up of what this engine shares with the process's other engines (the MiniLM
        encoder): on an inference thread while no batch runs. Returns its seconds."""
        total = 0.0
        if self.hybrid is not None and self.hybrid.semantic is not None:  # the encoder's first pass
            started = time.perf_counter()
            self.hybrid.semantic_signal(UserNeed(history=("warm up",)), ["warm up"])
            self.warmup_report["semantic"] = {"seconds": round(time.perf_counter() - started, 3)}
            total += time.perf_counter() - started
        if self.generator is not None and self.hybrid is not None:  # /recommend's retrieval and title vectors
            started = time.perf_counter()
            if self._title_vectors_kept():
                self.retriever()
                self.warmup_report["retrieval"] = {"seconds": round(time.perf_counter() - started, 3)}
                total += time.perf_counter() - started
            else:  # minutes on a CPU: /rerank answers meanwhile, /recommend waits for them (503 past its deadline)
                self.title_vectors.start(len(self.catalogue))
                log.info("computing the title vectors of the catalogue's %d titles in the background (each alone, "
                         "kept beside %s once done); /recommend answers when they are", len(self.catalogue),
                         self.settings.catalogue)
                threading.Thread(target=self._retriever_in_background, name="instructrec-infer-title-vectors",
                                 daemon=True).start()
                self.warmup_report["retrieval"] = {"background": True}
        return total

    def _warm_up_mixed(self, source: str, source_tokens: int) -> dict:
        r = self.ranker
        row_bytes = r.kv_row_bytes(source_tokens)
        requests = max(2, min(self.settings.max_batch_requests, r.batch_tokens // max(1, source_tokens)))
        copy_rows = r.mixed_kv_bytes // row_bytes if row_bytes else 0  # rows a mixed pass may copy for
        rows = max(requests + 1, copy_rows)  # one request has 2 or more candidates: the shared path
        # decoder tokens per row after the shared start step: the rows fill the token budget
        width = max(1, min(r.max_target_tokens - 1, r.batch_tokens // rows))
        rows = max(3, min(rows, r.batch_tokens // width))
        requests = min(requests, rows - 1)
        counts = [rows // requests] * requests
        counts[0] += rows % requests
        special = count_tokens(r.tokenizer, "")
        per_word = max(1, count_tokens(r.tokenizer, "item") - special)
        text = " ".join(["item"] * max(1, width // per_word))  # width tokens, then end-of-sequence
        self.score_many([(source, [text] * n) for n in counts])
        owners = [k for k, n in enumerate(counts) for _ in range(n)]
        mixed = [p for p in r.split_mixed(list(range(rows)), owners, row_bytes) if len({owners[i] for i in p}) > 1]
        return {"requests": requests, "candidates": counts, "row_tokens": width + 1, "row_bytes": row_bytes,
                "mixed_copy_bytes": max((len(p) * row_bytes for p in mixed), default=0)}

    def _install_timing_hooks(self) -> None:
        """Time the encoder forward (seq2seq) so decode time = scoring time - encoder time."""
        encoder = self.ranker.backend.encoder()
        if encoder is None:
            return
        local = self._local
        # CUDA runs asynchronously: without a synchronisation the clock would stop when the
        # encoder's kernels were queued, not when they finished (decode time would absorb them)
        cuda = self.loaded.device.type == "cuda"

        def before(_module, _args, _kwargs=None):
            if cuda:
                import torch

                torch.cuda.synchronize(self.loaded.device)
            local.enc_start = time.perf_counter()

        def after(_module, _args, _output):
            if cuda:
                import torch

                torch.cuda.synchronize(self.loaded.device)
            started = getattr(local, "enc_start", None)
            if started is not None:
                local.encoder = getattr(local, "encoder", 0.0) + time.perf_counter() - started
                local.enc_start = None

        encoder.register_forward_pre_hook(before)
        encoder.register_forward_hook(after)


def ranker_settings(settings: Settings) -> dict:
    """The :class:`~instructrec.ranker.Ranker` options the service's settings give (a token limit
    left unset: the one the checkpoint was tuned with)."""
    return {"reduction": settings.reduction, "max_source_tokens": settings.max_source_tokens,
            "max_target_tokens": settings.max_target_tokens, "batch_tokens": settings.batch_tokens,
            "mixed_kv_bytes": int(settings.mixed_kv_mb * 2**20), "batch_invariant": settings.batch_invariant}


def service_torch_threads(lanes: int, torch_threads: int | None) -> int | None:
    """The torch threads the service sets (None: torch's default): ``torch_threads``, else one
    when several lanes share the process."""
    return torch_threads or (1 if lanes > 1 else None)


def load_engine(settings: Settings, model_name: str) -> Engine:
    """The model as the service runs it, loaded by the core's :func:`~instructrec.reranker.load_ranker`.
    With several lanes torch runs one thread (for the whole process): each lane's kernels then
    run on the lane's own thread, in parallel with the others, the same whichever lane it is."""
    threads = service_torch_threads(settings.lanes, settings.torch_threads)
    if threads:
        import torch

        torch.set_num_threads(threads)
    with warnings.catch_warnings():  # the engine logs a model tuned on another template table itself
        warnings.simplefilter("ignore", RerankerWarning)
        ranker = load_ranker(model_name, device=settings.device, dtype=settings.dtype, **ranker_settings(settings))
    return Engine(ranker, settings)
