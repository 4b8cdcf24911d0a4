"""Hard negatives for the listwise objective: items a matching stage puts near the user.

Uniform and popular negatives are easy: a title from another genre rarely competes with the
target. The evaluation's hard-10 setting draws its negatives from the 50 unseen items the
MiniLM bi-encoder finds nearest the user's history (:func:`..evaluate.candidates.hard_candidates`),
and there the LM alone ranks near chance. ``--hard-negatives N`` trains against the same kind
of items: each rankable example's N negatives come from the bi-encoder's nearest items to its
case's history (the titles' embeddings, averaged as the bi-encoder baseline averages them),
the rest from popularity and uniformly as before.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from instructrec.aspects import UserNeed

from .data.types import Case, InteractionData

log = logging.getLogger(__name__)

POOL = 50  # the nearest unseen items a hard negative is drawn from, as in the hard-10 evaluation
RETRIEVED = POOL + 64  # retrieved per example, so that POOL remain once the user's own items are left out
CHUNK = 4096  # queries per matrix product (4,096 x 17k similarities: about 280 MB)


class HardPools:
    """Per example, the item ids nearest its case's history, best first (an empty list for an
    example without a history the catalogue knows)."""

    def __init__(self, ids: list[str], rows: np.ndarray, owner: np.ndarray):
        self._ids = ids
        self._rows = rows  # (queries, RETRIEVED) item positions
        self._owner = owner  # example index -> query row, -1: none

    def __getitem__(self, example: int) -> list[str]:
        q = int(self._owner[example])
        return [] if q < 0 else [self._ids[j] for j in self._rows[q]]


def hard_pools(examples: Sequence, cases: Sequence[Case], data: InteractionData, *, max_history: int,
               cache_dir: str | Path | None = None, progress: bool = False) -> HardPools:
    """The bi-encoder's nearest items to each example's case history (``examples`` name their
    case by user and target item; ``cases`` are the training cases they were built from)."""
    from .evaluate.methods import BiEncoder

    start = time.perf_counter()
    history = {(c.user_id, c.target): c.history[-max_history:] for c in cases}
    ids = sorted(data.items)
    try:
        encoder = BiEncoder(data, cache_dir=cache_dir, progress=progress)
    except RuntimeError as exc:  # sentence-transformers missing: say which option needs it
        raise RuntimeError(f"--hard-negatives: {exc}") from None
    matrix = encoder.catalogue(ids).astype(np.float32)  # unit rows, and every title's vector cached
    queries: dict[tuple[str, ...], int] = {}
    owner = np.full(len(examples), -1, dtype=np.int64)
    for k, ex in enumerate(examples):
        hist = tuple(i for i in history.get((ex.user_id, ex.item_id), ()) if i in data.items)
        if hist:
            owner[k] = queries.setdefault(hist, len(queries))
    rows = np.zeros((len(queries), min(RETRIEVED, len(ids))), dtype=np.int32)
    keys = list(queries)
    for lo in range(0, len(keys), CHUNK):
        # the bi-encoder's own query (its mean of the history titles' unit vectors), as hard-10 retrieves
        q = np.stack([encoder.query(UserNeed(history=tuple(data.title(i) for i in h))) for h in keys[lo:lo + CHUNK]])
        sims = q.astype(np.float32) @ matrix.T
        top = np.argpartition(-sims, rows.shape[1] - 1, axis=1)[:, : rows.shape[1]]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        rows[lo:lo + len(q)] = np.take_along_axis(top, order, axis=1)
    log.info("hard negatives: the %d items nearest each of %d histories (%d examples) in %.0f s", rows.shape[1],
             len(keys), int((owner >= 0).sum()), time.perf_counter() - start)
    return HardPools(ids, rows, owner)
