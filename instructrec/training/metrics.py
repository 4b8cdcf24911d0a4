"""The paper's ranking protocol pieces: candidate sampling and HR@k / NDCG@k.

Each case ranks its ground truth among negatives sampled uniformly from the items the
user never interacted with (seeded per user, so every method sees the same sets).
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Iterable, Sequence

from .data.types import Case, InteractionData

KS = (1, 3, 5)


def case_rng(seed: int, case: Case) -> random.Random:
    """An RNG that depends only on the seed and the case, not on iteration order."""
    digest = hashlib.sha256(f"{seed}:{case.user_id}:{case.target}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def sample_negatives(data: InteractionData, case: Case, n: int, seed: int, item_ids: Sequence[str] | None = None) -> list[str]:
    """``n`` distinct items the user never interacted with, uniformly at random."""
    pool = item_ids if item_ids is not None else sorted(data.items)
    seen = {x.item_id for x in data.sequences.get(case.user_id, ())} | {case.target}
    if len(pool) - len(seen) < n:
        raise ValueError(f"only {len(pool) - len(seen)} items are left to sample {n} negatives for user {case.user_id}")
    rng = case_rng(seed, case)
    out: list[str] = []
    chosen: set[str] = set()
    while len(out) < n:
        item = pool[rng.randrange(len(pool))]
        if item not in seen and item not in chosen:
            chosen.add(item)
            out.append(item)
    return out


def candidate_set(data: InteractionData, case: Case, n_negatives: int, seed: int, item_ids: Sequence[str] | None = None) -> list[str]:
    """Ground truth plus negatives, shuffled by the case's RNG (position carries no signal)."""
    cands = [case.target, *sample_negatives(data, case, n_negatives, seed, item_ids)]
    case_rng(seed + 1, case).shuffle(cands)
    return cands


def rank_of(scores: Sequence[float], positive: int) -> int:
    """0-based rank of the positive; ties count against it (a constant scorer gets no credit)."""
    p = scores[positive]
    return sum(1 for i, s in enumerate(scores) if i != positive and s >= p)


def metrics_from_ranks(ranks: Iterable[int], ks: Sequence[int] = KS) -> dict[str, float]:
    ranks = list(ranks)
    if not ranks:
        return {}
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = sum(r < k for r in ranks) / len(ranks)
        if k > 1:
            out[f"ndcg@{k}"] = sum(1 / math.log2(r + 2) for r in ranks if r < k) / len(ranks)
    out["mrr"] = sum(1 / (r + 1) for r in ranks) / len(ranks)
    out["cases"] = len(ranks)
    return out


def bootstrap_intervals(ranks: Sequence[int], ks: Sequence[int] = KS, *, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every metric of :func:`metrics_from_ranks`, resampling cases."""
    import numpy as np

    r = np.asarray(list(ranks), dtype=np.int64)
    if r.size == 0:
        return {}
    idx = np.random.default_rng(seed).integers(0, r.size, size=(resamples, r.size))
    per_case = {f"hr@{k}": (r < k).astype(float) for k in ks}
    per_case |= {f"ndcg@{k}": np.where(r < k, 1 / np.log2(r + 2), 0.0) for k in ks if k > 1}
    per_case["mrr"] = 1 / (r + 1)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for name, values in per_case.items():
        means = values[idx].mean(axis=1)
        out[name] = (float(np.percentile(means, lo)), float(np.percentile(means, hi)))
    return out
