"""The paper's interaction scenarios, each a fixed <P, I, T> and the needs that fill it.

A scenario turns a case (history + target) and the teacher's annotations of that target
into the :class:`~instructrec.aspects.UserNeed` a user in that scenario would bring:
sequential recommendation brings only the history; product search only a query about
the target (on Games its platform); personalized search both. Product search comes twice:
as a signed-in user's search (the signals that read the history's ids see it, the LM reads
only the query) and anonymous (nothing sees the history), which is what a ``/rerank``
request without history gets. A case whose annotation
is missing (the teacher had nothing to go on) is left out of that scenario, and the
report counts how many were left out. The instruction model is scored with every
rerank template whose instantiation is exactly the scenario's, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from instructrec.aspects import Intention, TaskForm, UserNeed
from instructrec.templates import Template, compatible, render

from ..annotate.teachers import Kind
from ..data.types import MAX_HISTORY, InteractionData


EVAL_PHRASING = "v1"  # every published table was written in offline-v1's phrasing: rerunning one gives its numbers


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str  # the <P, I, T> of the paper, as the template table labels it
    title: str  # for reports
    history: bool
    preference: bool = False
    intention: Intention | None = None
    phrasing: str = EVAL_PHRASING  # the offline teacher's phrasing families its needs are written in
    signed_in: bool = True  # False: the case's history ids are hidden from every method (an anonymous request)

    def kinds(self) -> tuple[Kind, ...]:
        out = []
        if self.preference:
            out.append(Kind.PREFERENCE)
        if self.intention is Intention.VAGUE:
            out.append(Kind.VAGUE)
        if self.intention is Intention.SPECIFIC:
            out.append(Kind.SPECIFIC)
        return tuple(out)

    def need(self, data: InteractionData, user_id: str, history: Sequence[str], target: str,
             annotations: Mapping, max_history: int = MAX_HISTORY) -> UserNeed | None:
        """The need of this scenario for one case, or None when an annotation it needs is missing."""
        texts = {}
        for kind in self.kinds():
            ann = annotations.get((user_id, target, kind))
            text = getattr(ann, "text", None) if ann is not None else None
            if not text:
                return None
            texts[kind] = text
        titles = tuple(data.title(i) for i in history[-max_history:]) if self.history and max_history > 0 else ()
        if self.history and not titles:
            return None
        intention = texts.get(Kind.VAGUE) or texts.get(Kind.SPECIFIC)
        return UserNeed(history=titles, preference=texts.get(Kind.PREFERENCE), intention=intention,
                        intention_kind=self.intention if intention else None)

    def templates(self) -> list[Template]:
        """Rerank templates whose instantiation is exactly this scenario's <P, I, T>."""
        probe = UserNeed(history=("a", "b") if self.history else (), preference="p" if self.preference else None,
                         intention="q" if self.intention else None, intention_kind=self.intention)
        return [t for t in compatible(probe, task=TaskForm.RERANK, rankable=True)
                if render(t, probe, item="x").instantiation.label() == self.label]


def needs_of(data: InteractionData, cases: Sequence, scenario: Scenario, annotations: Mapping,
             max_history: int = MAX_HISTORY) -> list:
    """(case, need) of the ``cases`` (each with user_id, history, target) this scenario can use;
    an anonymous scenario's cases come without their history."""
    pairs = [(c, scenario.need(data, c.user_id, c.history, c.target, annotations, max_history)) for c in cases]
    return [(c if scenario.signed_in else replace(c, history=()), n) for c, n in pairs if n is not None]


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("sequential", "<P1,I0,T3>", "sequential recommendation", history=True),
    Scenario("product_search", "<P0,I2,T3>", "product search", history=False, intention=Intention.SPECIFIC),
    Scenario("product_search_anonymous", "<P0,I2,T3>", "product search, anonymous", history=False,
             intention=Intention.SPECIFIC, signed_in=False),
    Scenario("personalized_search", "<P1,I2,T3>", "personalized search", history=True, intention=Intention.SPECIFIC),
    Scenario("explicit_preference", "<P1,P2,I0,T3>", "history + explicit preference", history=True, preference=True),
    Scenario("vague_intention", "<P1,I1,T3>", "history + vague intention", history=True, intention=Intention.VAGUE),
)}


def with_phrasings(scenarios: Sequence[Scenario], phrasings: Sequence[str]) -> list[Scenario]:
    """Each scenario that reads a teacher's text once per phrasing, side by side: the one in
    :data:`EVAL_PHRASING` keeps its name, another is ``NAME@PHRASING`` ("vague_intention@held-out")."""
    out = []
    for s in scenarios:
        if not s.kinds():
            out.append(s)
            continue
        out += [s if p == EVAL_PHRASING else replace(s, name=f"{s.name}@{p}", title=f"{s.title} ({p} phrasing)", phrasing=p)
                for p in phrasings]
    return out


def get_scenarios(names: str | Sequence[str] | None) -> list[Scenario]:
    if names is None:
        return list(SCENARIOS.values())
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    return [SCENARIOS[n] for n in names]
