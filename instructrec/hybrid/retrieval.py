"""Candidates from a whole catalogue, for the fused ranker to order (``/recommend``, T2).

The LM writing titles by constrained beam search finds titles it likes, not the user's next
item (over Games' 16,859 titles the quick model's HR@10 was at popularity's level). Each
signal beside it can instead propose its own best items over the whole catalogue, cheaply:

* behaviour — the history's neighbours in the index, by decayed transition + co-occurrence weight;
* sequential — the SASRec's top items (one state, one matrix product over the item table);
* semantic — the titles nearest the need's vector (one matrix product over the title table);
* the LM's own beams, when the caller ran generation.

Their union (each source's best ``per_source`` allowed items, in source order, no item twice)
is what the fused ranker then scores: the LM reranks them as candidates and the gate mixes
the signals, so the answer is ranked exactly as ``/rerank`` would rank those candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..aspects import UserNeed
from .behaviour import DECAY, MAX_HISTORY, BehaviourIndex
from .semantic import SemanticEncoder
from .sequential import SequentialScorer, left_pad

PER_SOURCE = 50


@dataclass
class Retrieved:
    """Catalogue positions to rank, and which sources proposed each (for the answer's "why")."""

    items: list[int]
    sources: dict[int, list[str]] = field(default_factory=dict)


def _top(scores: np.ndarray, allowed: np.ndarray | None, k: int) -> list[int]:
    scores = np.where(allowed, scores, -np.inf) if allowed is not None else scores
    k = min(k, int(np.isfinite(scores).sum()))
    if k <= 0:
        return []
    top = np.argpartition(-scores, k - 1)[:k]
    return [int(i) for i in top[np.lexsort((top, -scores[top]))]]  # best first, ties by position


class Retriever:
    """Proposes catalogue items (positions in ``item_ids``, the catalogue's order)."""

    def __init__(self, item_ids: Sequence[str], titles: Sequence[str], *, behaviour: BehaviourIndex | None = None,
                 sequential: SequentialScorer | None = None, semantic: SemanticEncoder | None = None,
                 title_vectors: np.ndarray | None = None):
        self.item_ids = list(item_ids)
        self.titles = list(titles)
        self.position = {item: i for i, item in enumerate(self.item_ids)}
        self.behaviour, self.sequential, self.semantic = behaviour, sequential, semantic
        if semantic is not None and title_vectors is None:
            title_vectors = semantic.encode_all(self.titles)
        self.title_vectors = title_vectors
        # catalogue position of each behaviour-index row / sequential-model item (-1: not in the catalogue)
        self._beh_rows = self._map(behaviour.item_ids) if behaviour is not None else None
        self._seq_rows = self._map(sequential.item_ids) if sequential is not None else None

    def _map(self, ids: Sequence[str]) -> np.ndarray:
        return np.array([self.position.get(i, -1) for i in ids], dtype=np.int64)

    def _scatter(self, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        out = np.full(len(self.item_ids), -np.inf)
        keep = rows >= 0
        out[rows[keep]] = values[keep]
        return out

    def by_behaviour(self, history: Sequence[str], allowed: np.ndarray | None, k: int) -> list[int]:
        if self.behaviour is None:
            return []
        idx = self.behaviour
        sums = np.zeros(len(idx))
        weight, any_known = 1.0, False
        for item in reversed(list(history)[-MAX_HISTORY:]):
            i = idx.position.get(item)
            if i is not None:
                any_known = True
                lo, hi = idx.indptr[i], idx.indptr[i + 1]
                np.add.at(sums, idx.indices[lo:hi], weight * (idx.transition[lo:hi] + idx.cooccurrence[lo:hi]))
            weight *= DECAY
        if not any_known:
            return []
        return [i for i in _top(self._scatter(self._beh_rows, np.where(sums > 0, sums, -np.inf)), allowed, k)]

    def by_sequence(self, history: Sequence[str], allowed: np.ndarray | None, k: int) -> list[int]:
        if self.sequential is None:
            return []
        import torch

        seq = self.sequential
        hist = [seq.position[h] for h in history if h in seq.position]
        if not hist:
            return []
        with torch.inference_mode():
            state = seq.model.last_state(left_pad([hist], seq.model.config.max_length))[0]
            scores = (seq.model.items.weight[1:] @ state).double().numpy()
        return _top(self._scatter(self._seq_rows, scores), allowed, k)

    def by_meaning(self, need: UserNeed, allowed: np.ndarray | None, k: int) -> list[int]:
        if self.semantic is None or self.title_vectors is None:
            return []
        q = self.semantic.query(need)
        if q is None:
            return []
        return _top(self.title_vectors.astype(np.float64) @ q.astype(np.float64), allowed, k)

    def retrieve(self, need: UserNeed, history: Sequence[str], *, allowed: np.ndarray | None = None,
                 per_source: int = PER_SOURCE, beams: Sequence[int] = ()) -> Retrieved:
        """The union of every source's best ``per_source`` allowed items (``beams``: positions the
        LM's generation found, kept first)."""
        out = Retrieved([])
        sources = (("lm", list(beams)), ("sequential", self.by_sequence(history, allowed, per_source)),
                   ("behaviour", self.by_behaviour(history, allowed, per_source)),
                   ("semantic", self.by_meaning(need, allowed, per_source)))
        for name, items in sources:
            for i in items:
                if i not in out.sources:
                    out.items.append(i)
                    out.sources[i] = []
                out.sources[i].append(name)
        return out
