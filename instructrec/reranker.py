"""The one-call API: ``Reranker.load(model).rank(candidates, history=..., instruction=...)``.

Everything a caller needs between a user's need and a ranked answer sits here, so the command
line (``instructrec rank``, ``instructrec recommend``), the evaluation and a Python user load a
model the same way and build the same instruction from the same need: the model is resolved as
``--model`` resolves it, a gate (and a sequential model) beside the model fuses by default, and
what cannot work raises :class:`RerankerError` naming the file or the setting.

Only light modules are imported at the top: the model, torch and the hybrid's encoders load
when a reranker does, so ``from instructrec.reranker import RerankerError`` stays cheap.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .aspects import Intention, TaskForm, UserNeed
from .instruction import build
from .templates import TEMPLATE_VERSION, TemplateError, get_template

if TYPE_CHECKING:
    from .catalogue import Catalogue
    from .generation import Generator
    from .hybrid import Hybrid
    from .hybrid.semantic import SemanticEncoder
    from .instruction import Instruction
    from .ranker import Ranker

FUSION_MODES = ("auto", "lm-only")
INTENTION_KINDS = {"vague": Intention.VAGUE, "specific": Intention.SPECIFIC}
SEQUENTIAL_DIR = "sequential"  # beside a model: the sequential model fitted with its gate


class RerankerError(ValueError):
    """A setting, a file or a request the reranker cannot use; the message names which."""


class RerankerWarning(UserWarning):
    """Something works but may not be what was meant (a model tuned on another template table)."""


# -- the user's need -------------------------------------------------------------------------


def _items(given: Sequence[Any], what: str) -> tuple[list[str | None], list[str]]:
    """(ids, titles) of items given as titles, ``(id, title)`` pairs or ``{"id", "title"}`` dicts;
    titles are stripped, ids turned into strings (None: matched by title)."""
    if isinstance(given, (str, bytes)):
        raise RerankerError(f"{what} must be a list of titles (or (id, title) pairs), not one string")
    ids: list[str | None] = []
    titles: list[str] = []
    for n, item in enumerate(given):
        if isinstance(item, str):
            item_id, title = None, item
        elif isinstance(item, Mapping):
            item_id, title = item.get("id"), item.get("title")
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            item_id, title = item
        else:
            raise RerankerError(f"{what}[{n}] must be a title, an (id, title) pair or a dict with a 'title', "
                                f"not {type(item).__name__}")
        if not isinstance(title, str):
            raise RerankerError(f"{what}[{n}]: the title must be a string, not {type(title).__name__}")
        ids.append(None if item_id is None else str(item_id))
        titles.append(title.strip())
    return ids, titles


def _history(history: Sequence[Any]) -> tuple[list[str | None], list[str]]:
    """The history's (ids, titles), oldest first; items without a title are left out."""
    ids, titles = _items(history, "history")
    kept = [(i, t) for i, t in zip(ids, titles) if t]
    return [i for i, _ in kept], [t for _, t in kept]


def user_need(history: Sequence[Any] = (), *, instruction: str | None = None, preference: str | None = None,
              intention: str | None = None, intention_kind: str | Intention = "specific") -> UserNeed:
    """The need a request describes, as the service's /rerank reads it: ``instruction`` (the
    user's free-text request) is a vague intention when no ``intention`` is given, and free
    context beside it otherwise; ``intention_kind`` says whether ``intention`` is vague (I1) or
    specific (I2)."""
    _, titles = _history(history)
    kind = INTENTION_KINDS.get(intention_kind) if isinstance(intention_kind, str) else intention_kind
    if kind not in (Intention.VAGUE, Intention.SPECIFIC):
        raise RerankerError(f"intention_kind must be 'vague' or 'specific', not {intention_kind!r}")
    context = None
    if intention and intention.strip():
        context = instruction
    elif instruction and instruction.strip():
        intention, kind = instruction, Intention.VAGUE
    else:
        kind = None
    return UserNeed(history=tuple(titles), preference=preference, intention=intention, intention_kind=kind,
                    context=context)


def check_template(template_id: str | None) -> None:
    """An unknown template id fails here, before any model loads."""
    if template_id is not None:
        try:
            get_template(template_id)
        except TemplateError as exc:
            raise RerankerError(str(exc)) from None


# -- loading ---------------------------------------------------------------------------------


def resolve_model(model: str | Path | None) -> str:
    """What ``model`` names, as ``--model`` and the service resolve it (None: the default model)."""
    from .modeling import ModelNotFound, resolve_model_name

    try:
        return resolve_model_name(None if model is None else str(model))
    except ModelNotFound as exc:
        raise RerankerError(str(exc)) from None


def load_ranker(model: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
                reduction: str = "mean", **options) -> "Ranker":
    """The model as a ranker with the token limits it was tuned with (``options``: the other
    :class:`~instructrec.ranker.Ranker` settings). A model tuned on another template table loads
    with a :class:`RerankerWarning`: its instructions are worded differently from its training."""
    from .modeling import load_model
    from .ranker import REDUCTIONS, Ranker

    if reduction not in REDUCTIONS:
        raise RerankerError(f"reduction must be one of {', '.join(REDUCTIONS)}, not {reduction!r}")
    name = resolve_model(model)
    try:
        loaded = load_model(name, device=device, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:  # missing/broken checkpoint, bad device or dtype
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RerankerError(f"cannot load model {name}: {first}") from None
    tuned = loaded.meta.get("template_version")
    if tuned and tuned != TEMPLATE_VERSION:
        warnings.warn(f"{name} was tuned on template table {tuned}, this is {TEMPLATE_VERSION}", RerankerWarning,
                      stacklevel=2)
    return Ranker(loaded, reduction=reduction, **options)


def default_gate(model_name: str) -> Path | None:
    """gate.json in the model directory, the gate fitted for that model, if there is one."""
    from .hybrid import GATE_FILE

    path = Path(model_name) / GATE_FILE
    return path if path.is_file() else None


def default_sequential(model_name: str) -> Path | None:
    """sequential/ in the model directory (a shipped model carries it), if there is one."""
    path = Path(model_name) / SEQUENTIAL_DIR
    return path if (path / "sequential.json").is_file() else None


def load_hybrid_of(model_name: str, *, gate: str | Path | bool | None = None, behaviour: str | Path | None = None,
                   sequential: str | Path | bool | None = None, semantic: "bool | Callable[[], SemanticEncoder]" = True,
                   fusion: str = "auto") -> "Hybrid | None":
    """The hybrid that fuses with ``model_name`` (None: the LM alone). ``gate`` and
    ``sequential`` default to the ones beside the model; False turns either off. ``semantic``
    may be a function giving the MiniLM encoder to use (a service shares one across the models
    it loads), called only when there is a gate."""
    from .hybrid import load_hybrid
    from .hybrid.behaviour import BehaviourError
    from .hybrid.gate import GateError
    from .hybrid.sequential import SequentialError

    _fusion_mode(fusion)
    if gate is None:
        gate = default_gate(model_name)
    if not gate and behaviour:
        raise RerankerError(f"behaviour index {behaviour} needs a gate to fuse it with: give gate= a gate.json "
                            f"(or put one in the model directory)")
    if not gate or fusion == "lm-only":
        return None
    if sequential is None:
        sequential = default_sequential(model_name)
    try:
        return load_hybrid(gate, behaviour, sequential=sequential or None,
                           semantic=semantic() if callable(semantic) else semantic)
    except (GateError, BehaviourError, SequentialError) as exc:
        raise RerankerError(str(exc)) from None


def open_catalogue(path: str | Path) -> "Catalogue":
    """The catalogue file (``instructrec catalogue build``) or an error naming it."""
    from .catalogue import CatalogueError, load_catalogue

    try:
        return load_catalogue(path)
    except CatalogueError as exc:
        raise RerankerError(str(exc)) from None


def _fusion_mode(fusion: str) -> str:
    if fusion not in FUSION_MODES:
        raise RerankerError(f"fusion must be one of {', '.join(FUSION_MODES)}, not {fusion!r}")
    return fusion


# -- answers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankedItem:
    index: int  # position of the candidate in the request
    title: str
    score: float  # the fused score when fused, else the title's mean (or sum) token log-likelihood
    id: str | None = None  # the candidate's id, when it was given one
    relevance: float | None = None  # fused: the calibrated probability among the candidates
    components: dict[str, float] | None = None  # fused: each signal's z-score, and lm_loglik

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
        out.update(title=self.title, score=self.score)
        if self.relevance is not None:
            out["relevance"] = self.relevance
        if self.components is not None:
            out["components"] = self.components
        return out


@dataclass(frozen=True)
class Fusion:
    """How an answer was scored: the service's ``fusion`` object."""

    mode: str  # "fused" or "lm-only"
    requested: str  # the fusion asked for: "auto" or "lm-only"
    gate_version: str | None = None
    hybrid_version: str | None = None
    signals: list[str] = field(default_factory=lambda: ["lm"])
    weights: dict[str, float] | None = None
    without_behaviour: list[int] | None = None  # candidates the behaviour index does not know


@dataclass(frozen=True)
class Ranking:
    """The candidates best first, with the instruction that ranked them."""

    model: str
    template: str  # the template id the instruction was made from
    instantiation: str  # its <P,I,T> for this need, e.g. <P1,I2,T3>
    instruction: str  # the instruction text the model read
    history_dropped: int  # oldest history items left out so the instruction fits the model
    reduction: str
    candidate_count: int  # candidates given (``ranked`` holds only the top_n of them)
    ranked: list[RankedItem]
    fusion: Fusion

    def __iter__(self):
        return iter(self.ranked)

    def __len__(self) -> int:
        return len(self.ranked)

    def to_dict(self) -> dict:
        """The answer as ``instructrec rank --json`` prints it."""
        return {"model": self.model, "template": self.template, "instantiation": self.instantiation,
                "history_dropped": self.history_dropped, "reduction": self.reduction, "instruction": self.instruction,
                "candidates": self.candidate_count, "ranked": [r.to_dict() for r in self.ranked],
                "fusion": asdict(self.fusion)}


@dataclass(frozen=True)
class RecommendedItem:
    id: str
    title: str
    score: float  # the title's mean (or sum) token log-likelihood, as rank scores it


@dataclass(frozen=True)
class CatalogueInfo:
    path: str | None  # the file it was read from (None: a catalogue built in memory)
    version: str  # content digest
    items: int


@dataclass(frozen=True)
class Recommendation:
    """Catalogue items the model wrote for a need, best first."""

    model: str
    catalogue: CatalogueInfo
    template: str
    instantiation: str
    instruction: str
    history_dropped: int
    reduction: str
    steps: int  # decoding steps of the beam search
    recommended: list[RecommendedItem]

    def __iter__(self):
        return iter(self.recommended)

    def __len__(self) -> int:
        return len(self.recommended)

    def to_dict(self) -> dict:
        """The answer as ``instructrec recommend --json`` prints it."""
        return {"model": self.model, "catalogue": asdict(self.catalogue), "template": self.template,
                "instantiation": self.instantiation, "history_dropped": self.history_dropped,
                "reduction": self.reduction, "instruction": self.instruction, "steps": self.steps,
                "recommended": [asdict(r) for r in self.recommended]}


# -- the reranker ----------------------------------------------------------------------------


class Reranker:
    """A model (and, with a gate, the signals fused with it) that ranks candidates for a need
    (:meth:`rank`) or writes the best items of a catalogue (:meth:`recommend`)."""

    def __init__(self, ranker: "Ranker", hybrid: "Hybrid | None" = None, *, fusion: str = "auto"):
        self.ranker = ranker
        self.hybrid = hybrid
        self.fusion = _fusion_mode(fusion)
        self._generator: Generator | None = None

    @classmethod
    def load(cls, model: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
             reduction: str = "mean", gate: str | Path | bool | None = None, behaviour: str | Path | None = None,
             sequential: str | Path | bool | None = None, semantic: bool = True, fusion: str = "auto") -> "Reranker":
        """Load ``model`` (a checkpoint directory, a built-in name, a hub id; None: the quick
        start's model, else the shipped one) and, unless ``fusion="lm-only"``, the hybrid: the
        ``gate`` (default: gate.json in the model directory; False: none), the ``behaviour``
        index, the ``sequential`` model (default: sequential/ beside the model; False: none) and
        the MiniLM ``semantic`` signal. The hybrid's files are read first, so a wrong one fails
        before the model loads."""
        _fusion_mode(fusion)
        name = resolve_model(model)
        hybrid = load_hybrid_of(name, gate=gate, behaviour=behaviour, sequential=sequential, semantic=semantic,
                                fusion=fusion)
        return cls(load_ranker(name, device=device, dtype=dtype, reduction=reduction), hybrid, fusion=fusion)

    @property
    def model(self) -> str:
        return self.ranker.loaded.name

    def _instruction(self, need: UserNeed, template: str | None, task: TaskForm) -> "Instruction":
        try:
            return build(need, self.ranker.tokenizer, max_tokens=self.ranker.max_source_tokens, task=task,
                         template_id=template)
        except TemplateError as exc:
            raise RerankerError(str(exc)) from None

    def rank(self, candidates: Sequence[Any], *, history: Sequence[Any] = (), instruction: str | None = None,
             preference: str | None = None, intention: str | None = None, intention_kind: str = "specific",
             template: str | None = None, top_n: int | None = None, fusion: str | None = None) -> Ranking:
        """Rank ``candidates`` (titles, ``(id, title)`` pairs or ``{"id", "title"}`` dicts) for
        the need: the past items (``history``, oldest first, given the same ways), the user's
        free-text ``instruction``, an explicit ``preference`` and the current ``intention``.
        The template is the best fitting rerank one unless ``template`` names one. With a hybrid
        (and ``fusion`` not "lm-only"; None: the load's) the LM is fused with the other signals,
        items matched to the behaviour index by id, else by title."""
        from .ranker import rank_order

        mode = self.fusion if fusion is None else _fusion_mode(fusion)
        if top_n is not None and top_n < 1:
            raise RerankerError(f"top_n must be at least 1, not {top_n}")
        candidate_ids, titles = _items(candidates, "candidates")
        if not titles:
            raise RerankerError("no candidates to rank")
        if not all(titles):
            raise RerankerError(f"candidates[{titles.index('')}] has an empty title")
        history_ids, history_titles = _history(history)
        need = user_need(history_titles, instruction=instruction, preference=preference, intention=intention,
                         intention_kind=intention_kind)
        inst = self._instruction(need, template, TaskForm.RERANK)
        lm = self.ranker.score(inst.source, titles).scores
        hybrid = self.hybrid if mode == "auto" else None
        fused, without = None, None
        if hybrid is not None:
            resolved = hybrid.resolve(candidate_ids, titles)
            fused = hybrid.fuse(lm, need, titles, resolved, hybrid.resolve(history_ids, history_titles))
            known = "behaviour" in fused.components
            without = [i for i, c in enumerate(resolved) if c is None or not known]
        scores = fused.scores.tolist() if fused is not None else lm
        ranked = []
        for i in rank_order(scores)[:top_n]:
            extra = {}
            if fused is not None:
                extra = {"relevance": float(fused.relevance[i]),
                         "components": {**{k: float(v[i]) for k, v in fused.components.items()}, "lm_loglik": lm[i]}}
            ranked.append(RankedItem(i, titles[i], scores[i], candidate_ids[i], **extra))
        if fused is None:
            info = Fusion("lm-only", mode)
        else:
            info = Fusion("fused", mode, hybrid.gate.version, hybrid.version, list(fused.components), fused.weights,
                          without)
        return Ranking(self.model, inst.template.id, inst.rendered.instantiation.label(), inst.source,
                       inst.history_dropped, self.ranker.reduction, len(titles), ranked, info)

    def _generator_for(self, catalogue: "Catalogue") -> "Generator":
        """The generator over ``catalogue``, kept for the next call: checking that a catalogue
        fits the model fingerprints the whole vocabulary."""
        from .catalogue import CatalogueError
        from .generation import Generator

        if self._generator is None or self._generator.catalogue is not catalogue:
            try:
                self._generator = Generator(self.ranker, catalogue, where=catalogue.path)
            except CatalogueError as exc:
                raise RerankerError(str(exc)) from None
        return self._generator

    def recommend(self, catalogue: "str | Path | Catalogue", *, history: Sequence[Any] = (),
                  instruction: str | None = None, preference: str | None = None, intention: str | None = None,
                  intention_kind: str = "specific", top_n: int = 10, beams: int | None = None,
                  keep_history: bool = False, template: str | None = None) -> Recommendation:
        """The ``top_n`` best items of ``catalogue`` (a file from ``instructrec catalogue build``
        or a loaded :class:`~instructrec.catalogue.Catalogue`; pass the object to reuse it) for
        the need, written by the model under the best fitting matching (T2) instruction by
        constrained beam search (``beams`` wide, default ``top_n``), so only catalogue items
        come back. The history's own items (by id, else by title) are left out unless
        ``keep_history``. Generation is the LM's alone: the gate does not take part."""
        import numpy as np

        from .catalogue import Catalogue
        from .generation import MAX_K

        if not 1 <= top_n <= MAX_K:
            raise RerankerError(f"top_n must be 1 to {MAX_K}, not {top_n}")
        if beams is not None and beams < 1:
            raise RerankerError(f"beams must be at least 1, not {beams}")
        history_ids, history_titles = _history(history)
        need = user_need(history_titles, instruction=instruction, preference=preference, intention=intention,
                         intention_kind=intention_kind)
        cat = catalogue if isinstance(catalogue, Catalogue) else open_catalogue(catalogue)
        generator = self._generator_for(cat)
        inst = self._instruction(need, template, TaskForm.MATCHING)
        allowed = None
        if not keep_history and need.history:
            taken = [i for title in need.history for i in cat.indices_of_title(title)]
            taken += [i for i in (cat.index_of_id(h) for h in history_ids if h is not None) if i is not None]
            allowed = np.ones(len(cat), dtype=bool)
            allowed[taken] = False
        out = generator.generate(inst.source, top_n, allowed=allowed, beams=beams)
        return Recommendation(
            self.model, CatalogueInfo(cat.path, cat.version, len(cat)), inst.template.id,
            inst.rendered.instantiation.label(), inst.source, inst.history_dropped, self.ranker.reduction, out.steps,
            [RecommendedItem(cat.items[r.item].id, r.title, r.score) for r in out.items])


__all__ = ["CatalogueInfo", "Fusion", "RankedItem", "Ranking", "Recommendation", "RecommendedItem", "Reranker",
           "RerankerError", "RerankerWarning", "check_template", "default_gate", "default_sequential",
           "load_hybrid_of", "load_ranker", "open_catalogue", "resolve_model", "user_need"]
