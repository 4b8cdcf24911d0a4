"""Hybrid scoring: the instruction LM fused with behaviour and semantic signals by a gate.

The LM alone is weak where users notice (sequential needs below popularity, vague
intentions below an untrained bi-encoder); item-to-item counts (:mod:`.behaviour`) and a
sentence encoder (:mod:`.semantic`) carry what it misses, and a gate fitted on validation
cases (:mod:`.gate`) mixes them per request. :class:`Hybrid` is the one object callers
hold: give it a request's LM scores and it returns the fused ranking with its parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..aspects import UserNeed
from .behaviour import BehaviourIndex, load_behaviour_index
from .gate import Fused, Gate, load_gate
from .semantic import SemanticEncoder
from .sequential import SequenceQuery, SequentialScorer, load_sequential

GATE_FILE = "gate.json"  # beside a model: the gate fitted for it


@dataclass(frozen=True)
class Signals:
    """One request's signals beside the LM; a signal the request cannot have is None."""

    behaviour: np.ndarray | None = None
    known: float = 0.0  # share of candidates the behaviour index knows
    semantic: np.ndarray | None = None
    sequential: np.ndarray | None = None


@dataclass
class Hybrid:
    gate: Gate
    behaviour: BehaviourIndex | None = None
    semantic: SemanticEncoder | None = None
    sequential: SequentialScorer | None = None

    @property
    def version(self) -> str:
        """Part of every cache key and report row: changes when any part would score differently."""
        return ":".join([f"gate-{self.gate.version}", f"beh-{self.behaviour.version}" if self.behaviour else "beh-none",
                         f"sem-{self.semantic.version}" if self.semantic else "sem-none",
                         f"seq-{self.sequential.version}" if self.sequential else "seq-none"])

    def resolve(self, ids: Sequence[str | None], titles: Sequence[str | None]) -> list[str | None]:
        """Index ids of items given by id or, failing that, by exact title (None: unknown)."""
        if self.behaviour is None:
            return [None] * len(ids)
        return [self.behaviour.resolve(i, t) for i, t in zip(ids, titles)]

    def behaviour_signal(self, candidate_ids: Sequence[str | None],
                         history_ids: Sequence[str | None]) -> tuple[np.ndarray | None, float]:
        """(behaviour, share of candidates the index knows) of one request: numpy only, so a
        caller may compute it on any thread."""
        if self.behaviour is None:
            return None, 0.0
        history = [h for h in history_ids if h is not None]
        feats = self.behaviour.features(history, list(candidate_ids))
        return feats.score, feats.known

    def semantic_signal(self, need: UserNeed, titles: Sequence[str], *, cached_only: bool = False) -> np.ndarray | None:
        """The semantic similarities of one request (torch: a service runs this on its model
        thread; with ``cached_only``, from cached vectors alone, numpy only, or
        :class:`~.semantic.NotCached`)."""
        return self.semantic.similarities(need, titles, cached_only=cached_only) if self.semantic is not None else None

    def sequential_signal(self, candidate_ids: Sequence[str | None],
                          history_ids: Sequence[str | None]) -> np.ndarray | None:
        """The sequential model's scores of one request (torch unless the history's state is
        kept: a service runs this on its model thread)."""
        query = self.sequential_query(candidate_ids, history_ids)
        return None if query is None else self.sequential.scores_of(query)

    def sequential_query(self, candidate_ids: Sequence[str | None],
                         history_ids: Sequence[str | None]) -> SequenceQuery | None:
        """The request as the sequential model sees it (None: no sequential signal); numpy only."""
        if self.sequential is None:
            return None
        return self.sequential.query([h for h in history_ids if h is not None], list(candidate_ids))

    def signals(self, need: UserNeed, titles: Sequence[str], candidate_ids: Sequence[str | None],
                history_ids: Sequence[str | None]) -> Signals:
        """The request's signals from its (resolved) ids and normalised texts. The semantic
        encoder and the sequential model run torch: call this on the thread that runs the LM."""
        behaviour, known = self.behaviour_signal(candidate_ids, history_ids)
        return Signals(behaviour, known, self.semantic_signal(need, titles),
                       self.sequential_signal(candidate_ids, history_ids))

    def fuse_signals(self, lm: Sequence[float], need: UserNeed, signals: Signals) -> Fused:
        """:meth:`fuse` from signals already computed (:meth:`signals`, or its parts)."""
        return self.gate.fuse(lm, need, behaviour=signals.behaviour, semantic=signals.semantic,
                              sequential=signals.sequential, known=signals.known)

    def fuse(self, lm: Sequence[float], need: UserNeed, titles: Sequence[str], candidate_ids: Sequence[str | None],
             history_ids: Sequence[str | None]) -> Fused:
        return self.fuse_signals(lm, need, self.signals(need, titles, candidate_ids, history_ids))


    def fuse_retrieved(self, ranker, source: str, need: UserNeed, ids: Sequence[str | None], titles: Sequence[str],
                       history_ids: Sequence[str | None]) -> tuple[Fused, list[float]]:
        """Items a retriever proposed, ranked as /rerank would rank them as candidates: each
        distinct title scored once by the LM (``ranker``) under the rerank instruction ``source``,
        then fused. Returns the fusion and the LM's score per item. Used by the service's fused
        /recommend and by the full-catalogue evaluation, so the evaluation measures the service."""
        distinct = list(dict.fromkeys(titles))
        by_title = dict(zip(distinct, ranker.score(source, distinct).scores))
        lm = [by_title[t] for t in titles]
        return self.fuse(lm, need, titles, ids, history_ids), lm


def load_hybrid(gate: str | Path, behaviour: str | Path | None, *, sequential: str | Path | None = None,
                semantic: bool | SemanticEncoder | None = True) -> Hybrid:
    """A hybrid from its files: the gate (a gate.json, or a model directory holding one), the
    behaviour index and the sequential model's directory (None: no such signal); ``semantic``:
    True for a new MiniLM encoder, or the encoder to use."""
    gate_path = Path(gate)
    if gate_path.is_dir():
        gate_path = gate_path / GATE_FILE
    return Hybrid(load_gate(gate_path), load_behaviour_index(behaviour) if behaviour else None,
                  SemanticEncoder() if semantic is True else (semantic or None),
                  load_sequential(sequential) if sequential else None)


__all__ = ["GATE_FILE", "Fused", "Gate", "Hybrid", "Signals", "load_hybrid"]
