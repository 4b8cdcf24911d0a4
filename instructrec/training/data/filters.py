"""Filters over user sequences shared by the loaders."""

from __future__ import annotations

from collections import Counter

from instructrec.training.data.types import Interaction


def k_core(sequences: dict[str, list[Interaction]], k: int) -> dict[str, list[Interaction]]:
    """Iteratively drop users with fewer than ``k`` interactions and items with fewer than
    ``k`` interactions until both hold for everything left (the usual "k-core" filter).

    Returns a new dict (user order and each user's interaction order are kept); the input
    is not modified. ``k <= 1`` only drops users without interactions.
    """
    seqs = {u: list(s) for u, s in sequences.items() if s}
    if k <= 1:
        return seqs
    while True:
        counts = Counter(x.item_id for s in seqs.values() for x in s)
        rare = {i for i, c in counts.items() if c < k}
        short = any(len(s) < k for s in seqs.values())
        if not rare and not short:
            return seqs
        kept: dict[str, list[Interaction]] = {}
        for u, s in seqs.items():
            if rare:
                s = [x for x in s if x.item_id not in rare]
            if len(s) >= k:
                kept[u] = s
        seqs = kept


def describe_k_core(before: dict[str, list[Interaction]], after: dict[str, list[Interaction]], k: int) -> str:
    """A one-line note of what :func:`k_core` removed."""
    items_before = {x.item_id for s in before.values() for x in s}
    items_after = {x.item_id for s in after.values() for x in s}
    n_before = sum(len(s) for s in before.values())
    n_after = sum(len(s) for s in after.values())
    return (
        f"{k}-core filter: removed {len(before) - len(after)} users, "
        f"{len(items_before) - len(items_after)} items, {n_before - n_after} interactions; "
        f"kept {len(after)} users, {len(items_after)} items, {n_after} interactions"
    )
