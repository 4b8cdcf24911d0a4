"""Instruction data: cases + annotations + templates -> (source, target) examples.

For every case the builder lists the needs the case can express (the history alone, the
history with the teacher's explicit preference, a vague or specific intention alone or
with the history, ...), samples a need, and draws its template with the core's one
selection function (:func:`instructrec.templates.select`, with an RNG and the mixture's
weights), the same one serving uses. Each example records its template, its <P,I,T>, the teacher
whose annotation it used and the user it came from.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping

from instructrec import files
from instructrec.aspects import Intention, UserNeed
from instructrec.instruction import fit
from instructrec.templates import Target, Template, compatible, select

from .annotate.teachers import Kind
from .data.types import Case, InteractionData

# (user_id, target item id, kind) -> annotation with .text and .teacher (see instructrec.training.annotate.pipeline)
Annotations = Mapping[tuple[str, str, str], object]

PREFERENCE, VAGUE, SPECIFIC = Kind.PREFERENCE, Kind.VAGUE, Kind.SPECIFIC


@dataclass(frozen=True)
class Example:
    source: str
    target: str
    template_id: str
    instantiation: str
    strategy: str
    target_form: str
    teacher: str | None  # None when the example uses interaction data only
    user_id: str
    item_id: str
    history_dropped: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass(frozen=True)
class Mixture:
    """How many examples per case and how much weight each kind of target gets."""

    per_case: int = 2
    history_share: float = 0.5  # share of examples on the history-only need (sequential recommendation)
    item_weight: float = 3.0  # rankable item targets (what the ranker scores) vs the other forms
    other_weight: float = 1.0

    def weight(self, template: Template) -> float:
        """A template's chance in the mixture, relative to the other compatible ones."""
        return self.item_weight if template.target is Target.ITEM else self.other_weight


def _text(annotations: Annotations, case: Case, kind: Kind) -> tuple[str | None, str | None]:
    ann = annotations.get((case.user_id, case.target, kind))
    text = getattr(ann, "text", None) if ann is not None else None
    return (text, getattr(ann, "teacher", None)) if text else (None, None)


def needs_for_case(data: InteractionData, case: Case, annotations: Annotations) -> list[tuple[UserNeed, str | None]]:
    """Every need this case can express, each with the teacher it relies on (or None)."""
    history = tuple(data.title(i) for i in case.history)
    pref, pref_teacher = _text(annotations, case, PREFERENCE)
    vague, vague_teacher = _text(annotations, case, VAGUE)
    spec, spec_teacher = _text(annotations, case, SPECIFIC)
    out: list[tuple[UserNeed, str | None]] = [(UserNeed(history=history), None)]
    if pref:
        out += [(UserNeed(history=history, preference=pref), pref_teacher), (UserNeed(preference=pref), pref_teacher)]
    for text, kind, teacher in ((vague, Intention.VAGUE, vague_teacher), (spec, Intention.SPECIFIC, spec_teacher)):
        if not text:
            continue
        out += [(UserNeed(intention=text, intention_kind=kind), teacher),
                (UserNeed(history=history, intention=text, intention_kind=kind), teacher)]
        if pref:
            out.append((UserNeed(history=history, preference=pref, intention=text, intention_kind=kind),
                        teacher if teacher == pref_teacher else f"{pref_teacher}+{teacher}"))
    return out


def _negative(data: InteractionData, case: Case, rng: random.Random, item_ids: list[str]) -> str:
    seen = {x.item_id for x in data.sequences.get(case.user_id, ())}
    for _ in range(100):
        item = item_ids[rng.randrange(len(item_ids))]
        if item not in seen:
            return item
    raise ValueError(f"could not sample a negative for user {case.user_id}")


def build_examples(data: InteractionData, cases: Iterable[Case], annotations: Annotations, tokenizer,
                   max_source_tokens: int, *, seed: int = 0, mixture: Mixture = Mixture()) -> list[Example]:
    rng = random.Random(seed)
    item_ids = sorted(data.items)
    examples: list[Example] = []
    for case in cases:
        # Sample the need first (the scenario), then a template for it: needs that carry more
        # aspects have more compatible templates and would otherwise crowd out the rest.
        variants = [(need, teacher) for need, teacher in needs_for_case(data, case, annotations) if compatible(need)]
        if not variants:
            continue
        rest = (1 - mixture.history_share) / (len(variants) - 1) if len(variants) > 1 else 0.0
        need_weights = [mixture.history_share if not (n.preference or n.intention) else rest for n, _ in variants]
        for _ in range(mixture.per_case):
            need, teacher = rng.choices(variants, weights=need_weights)[0]
            template = select(need, task=None, rankable=False, rng=rng, weight=mixture.weight)
            examples.append(_example(data, case, template, need, teacher, tokenizer, max_source_tokens, rng, item_ids))
    return examples


def _example(data, case, template, need, teacher, tokenizer, max_tokens, rng, item_ids) -> Example:
    item = data.title(case.target)
    kw: dict = {"item": item}
    if template.target is Target.YES_NO:
        positive = rng.random() < 0.5
        kw["candidate"] = item if positive else data.title(_negative(data, case, rng, item_ids))
        kw["label"] = positive
    elif template.target is Target.CHOICE:
        other = data.title(_negative(data, case, rng, item_ids))
        kw["pair"] = (item, other) if rng.random() < 0.5 else (other, item)
    inst = fit(template, need, tokenizer, max_tokens, **kw)
    r = inst.rendered
    return Example(r.source, r.target, template.id, r.instantiation.label(), template.strategy.value,
                   template.target.value, teacher, case.user_id, case.target, inst.history_dropped)


def write_examples(path: Path, examples: Iterable[Example]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(ex.to_json() + "\n")
            n += 1
    return n


def read_examples(path: Path) -> list[Example]:
    out = []
    for lineno, row in files.jsonl_objects(path, lambda p, n, m: ValueError(f"{p}:{n}: not an instruction example ({m})")):
        try:
            out.append(Example(**row))
        except TypeError as exc:
            raise ValueError(f"{path}:{lineno}: not an instruction example ({exc})") from None
    return out


def summary(examples: list[Example]) -> dict:
    """Counts by template, <P,I,T>, target form and teacher (the instruction-data table)."""
    return {
        "examples": len(examples),
        "users": len({e.user_id for e in examples}),
        "templates": len({e.template_id for e in examples}),
        "by_instantiation": dict(Counter(e.instantiation for e in examples).most_common()),
        "by_target_form": dict(Counter(e.target_form for e in examples).most_common()),
        "by_teacher": dict(Counter(e.teacher or "none (interaction data)" for e in examples).most_common()),
    }
