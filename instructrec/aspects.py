"""The instruction format: what a user's need is made of (paper Section 2.1).

A need has a preference part (P0 none, P1 implicit = interaction history,
P2 explicit = the user's own words), an intention part (I0 none, I1 vague,
I2 specific), a task form (T0 pointwise yes/no, T1 pairwise, T2 matching =
generate the item, T3 rerank candidates) and optional free context. These
types are shared by training (which instantiates templates from data) and
serving (which instantiates them from a request).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Preference(str, Enum):
    NONE = "P0"
    IMPLICIT = "P1"
    EXPLICIT = "P2"


class Intention(str, Enum):
    NONE = "I0"
    VAGUE = "I1"
    SPECIFIC = "I2"


class TaskForm(str, Enum):
    POINTWISE = "T0"
    PAIRWISE = "T1"
    MATCHING = "T2"
    RERANK = "T3"


@dataclass(frozen=True)
class UserNeed:
    """Everything known about one user's need, in natural language.

    ``history`` holds item titles, oldest first. ``intention_kind`` says whether
    ``intention`` is vague (I1) or specific (I2); it is required when
    ``intention`` is given.
    """

    history: tuple[str, ...] = ()
    preference: str | None = None
    intention: str | None = None
    intention_kind: Intention | None = None
    context: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "history", tuple(self.history))
        for name in ("preference", "intention", "context"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                object.__setattr__(self, name, None)
        if self.intention is not None:
            if self.intention_kind not in (Intention.VAGUE, Intention.SPECIFIC):
                raise ValueError("intention_kind must be Intention.VAGUE or Intention.SPECIFIC when an intention is given")
        elif self.intention_kind not in (None, Intention.NONE):
            raise ValueError("intention_kind given without an intention text")

    @property
    def preferences(self) -> frozenset[Preference]:
        """The preference aspects this need carries ({P0} when it carries none)."""
        found = set()
        if self.history:
            found.add(Preference.IMPLICIT)
        if self.preference:
            found.add(Preference.EXPLICIT)
        return frozenset(found) or frozenset({Preference.NONE})

    @property
    def intention_aspect(self) -> Intention:
        return self.intention_kind if self.intention else Intention.NONE


@dataclass(frozen=True)
class Instantiation:
    """The <P, I, T> a rendered instruction actually uses."""

    preferences: frozenset[Preference]
    intention: Intention
    task: TaskForm

    def label(self) -> str:
        """Paper-style label, e.g. ``<P1,P2,I0,T3>``."""
        prefs = sorted(p.value for p in self.preferences)
        return "<" + ",".join([*prefs, self.intention.value, self.task.value]) + ">"
