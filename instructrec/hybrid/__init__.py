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

GATE_FILE = "gate.json"  # beside a model: the gate fitted for it


@dataclass
class Hybrid:
    gate: Gate
    behaviour: BehaviourIndex | None = None
    semantic: SemanticEncoder | None = None

    @property
    def version(self) -> str:
        """Part of every cache key and report row: changes when any part would score differently."""
        return ":".join([f"gate-{self.gate.version}", f"beh-{self.behaviour.version}" if self.behaviour else "beh-none",
                         f"sem-{self.semantic.version}" if self.semantic else "sem-none"])

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

    def signals(self, need: UserNeed, titles: Sequence[str], candidate_ids: Sequence[str | None],
                history_ids: Sequence[str | None]) -> tuple[np.ndarray | None, float, np.ndarray | None]:
        """(behaviour, share of candidates the index knows, semantic) of one request; a signal
        the request cannot have is None."""
        behaviour, known = self.behaviour_signal(candidate_ids, history_ids)
        return behaviour, known, self.semantic_signal(need, titles)

    def fuse_signals(self, lm: Sequence[float], need: UserNeed, behaviour: np.ndarray | None, known: float,
                     semantic: np.ndarray | None) -> Fused:
        """:meth:`fuse` from signals already computed (:meth:`behaviour_signal`, :meth:`semantic_signal`)."""
        return self.gate.fuse(lm, need, behaviour=behaviour, semantic=semantic, known=known)

    def fuse(self, lm: Sequence[float], need: UserNeed, titles: Sequence[str], candidate_ids: Sequence[str | None],
             history_ids: Sequence[str | None]) -> Fused:
        behaviour, known, semantic = self.signals(need, titles, candidate_ids, history_ids)
        return self.fuse_signals(lm, need, behaviour, known, semantic)


def load_hybrid(gate: str | Path, behaviour: str | Path | None, *, semantic: bool = True) -> Hybrid:
    """A hybrid from its files: the gate (a gate.json, or a model directory holding one) and
    the behaviour index (None: no behaviour signal)."""
    gate_path = Path(gate)
    if gate_path.is_dir():
        gate_path = gate_path / GATE_FILE
    return Hybrid(load_gate(gate_path), load_behaviour_index(behaviour) if behaviour else None,
                  SemanticEncoder() if semantic else None)


__all__ = ["GATE_FILE", "Fused", "Gate", "Hybrid", "load_hybrid"]
