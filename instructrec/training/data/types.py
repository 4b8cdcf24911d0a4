"""In-memory form of interaction data with item text, shared by loaders, annotation,
instruction generation and evaluation.

Every loader returns an :class:`InteractionData`; :meth:`InteractionData.split`
applies the paper's chronological leave-one-out split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

MAX_HISTORY = 20  # the paper truncates histories to the last 20 items


class DataError(ValueError):
    """Bad input data; the message names the file and (when known) the line."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    categories: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Interaction:
    item_id: str
    timestamp: float | None = None
    rating: float | None = None
    review: str = ""  # the user's review text of this item, when the data has one


@dataclass(frozen=True)
class Case:
    """One prediction: the last ``MAX_HISTORY`` items before ``target`` and the target."""

    user_id: str
    history: tuple[str, ...]  # item ids, oldest first
    target: str  # item id
    review: str = ""  # the user's review of the target, if any (source of vague intentions)


@dataclass
class Split:
    train: list[Case]
    valid: list[Case]
    test: list[Case]


@dataclass
class InteractionData:
    name: str
    items: dict[str, Item]
    sequences: dict[str, list[Interaction]]  # user id -> interactions, oldest first
    source: str = ""
    notes: list[str] = field(default_factory=list)  # what the loader did (filters, drops)

    def title(self, item_id: str) -> str:
        return self.items[item_id].title

    def split(self, max_history: int = MAX_HISTORY) -> Split:
        """Chronological leave-one-out: last item = test, the one before = validation,
        every earlier position (with at least one item before it) = a training case."""
        train: list[Case] = []
        valid: list[Case] = []
        test: list[Case] = []
        for user_id, seq in self.sequences.items():
            ids = [x.item_id for x in seq]
            if len(ids) < 3:
                continue
            for t in range(1, len(ids)):
                case = Case(user_id, tuple(ids[max(0, t - max_history) : t]), ids[t], seq[t].review)
                if t == len(ids) - 1:
                    test.append(case)
                elif t == len(ids) - 2:
                    valid.append(case)
                else:
                    train.append(case)
        return Split(train, valid, test)

    def sample_users(self, n: int, seed: int = 0) -> "InteractionData":
        """A seeded subsample of ``n`` users (all of them if ``n`` >= the user count)."""
        users = sorted(self.sequences)
        if n < len(users):
            users = sorted(random.Random(seed).sample(users, n))
        seqs = {u: self.sequences[u] for u in users}
        used = {x.item_id for s in seqs.values() for x in s}
        items = {i: it for i, it in self.items.items() if i in used}
        return InteractionData(self.name, items, seqs, self.source, [*self.notes, f"sampled {len(users)} users (seed {seed})"])
