"""The instruction template table, rendering, and the ONE selection function.

39 templates follow the grouping of the paper's Appendices A-C (17 preference-related,
9 intention-related, 13 combined); every wording is original to this project.

Slots (``str.format`` fields; nothing else may appear in braces):

* ``{history}``  the need's history titles, oldest first, rendered ``1. A; 2. B; 3. C``
* ``{recent}``   the last (up to) three history titles, ``A, B, C`` (reasoning answers)
* ``{preference}`` the explicit preference text (P2)
* ``{intention}``  the intention text (I1 vague / I2 specific)
* ``{item}``     the target item title (answers; input of turn-around/relatedness templates)
* ``{candidate}`` the item judged by a T0 (pointwise) template
* ``{candidate_a}``/``{candidate_b}`` the two items compared by a T1 (pairwise) template
* ``{label}``    answer-only: ``yes``/``no`` of a T0 template

Optional explicit preference (the paper's "(P2)"): ``[[P2: ... {preference} ...]]`` is kept
(without the marker) when the need has an explicit preference and dropped otherwise.

Design decision: T3 (rerank) templates do NOT list the candidates; the ranker scores
each candidate title as the decoder output of one instruction, so one instruction serves
any number of candidates. The T3 answer is ``{item}``.

Compatibility rules (:func:`compatible`), applied to a :class:`UserNeed`:

1. Preferences: every REQUIRED preference aspect (P1 = non-empty history, P2 = explicit
   preference) must be present in the need. A need may carry more than a template uses
   (e.g. a P1-only template accepts a need with history and an explicit preference); the
   deterministic default of :func:`select` then prefers templates using more.
   Optional preferences never block compatibility.
2. Intentions: a template with an intention slot (``intentions != {I0}``) needs an
   intention whose kind it accepts. An I0 template (no intention slot) is compatible ONLY
   when the need carries no intention: a request with an intention never silently drops it.
3. Consequently P0 templates (no required preference) are exactly the intention templates
   (every P0 template has an intention slot); they are compatible with any need carrying an
   accepted intention, whatever its history or explicit preference.
4. The paper's "P2/I1/I2" query slot is NOT overloaded here: ``{intention}`` is filled only by
   the need's intention. Needs with only an explicit preference are served by dedicated P2
   templates (pref-14..17), and intention templates may take the explicit preference as an
   optional extra (int-09).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from dataclasses import dataclass
from enum import Enum
from typing import Callable

from instructrec.aspects import Instantiation, Intention, Preference, TaskForm, UserNeed

__all__ = [
    "Strategy",
    "Target",
    "Template",
    "TEMPLATES",
    "TEMPLATE_VERSION",
    "TemplateError",
    "Rendered",
    "get_template",
    "render",
    "select",
    "compatible",
    "table_version",
    "render_history",
    "history_entries",
    "HISTORY_SEPARATOR",
    "SLOTS",
]

_VERSION_PREFIX = "2026.11-1"


class Strategy(str, Enum):
    PLAIN = "plain"
    TURN_AROUND = "turn_around"
    RELATEDNESS = "relatedness"
    REASONING = "reasoning"


class Target(str, Enum):
    ITEM = "item"  # answer is the item title (T2 matching or T3 rerank) -> rankable by likelihood
    YES_NO = "yes_no"  # T0 pointwise: answer "yes" or "no"
    CHOICE = "choice"  # T1 pairwise: answer is the title of the better of two candidates
    QUERY = "query"  # turn-around: answer is the user's intention/query text
    PREFERENCE = "preference"  # turn-around: answer is the explicit preference text
    REASONING_ITEM = "reasoning_item"  # a short explanation first, THEN the item title
    HISTORY_ITEM = "history_item"  # relatedness: past items consistent with the query, then the next item


class TemplateError(ValueError):
    """Unknown template id, or a template incompatible with the need / task / inputs."""


SLOTS = frozenset(
    {"history", "recent", "preference", "intention", "item", "candidate", "candidate_a", "candidate_b", "label"}
)
_OPTIONAL_P2 = re.compile(r"\[\[P2:(.*?)\]\]", re.DOTALL)


def _label(prefs: frozenset[Preference], optional: frozenset[Preference], intentions: frozenset[Intention], task: TaskForm) -> str:
    parts = [p.value for p in sorted(prefs, key=lambda p: p.value)]
    parts += [f"({p.value})" for p in sorted(optional, key=lambda p: p.value)]
    if parts != ["P0"] and "P0" in parts:  # "(P2)" alone reads better than "P0,(P2)"
        parts.remove("P0")
    parts.append("/".join(i.value for i in sorted(intentions, key=lambda i: i.value)))
    parts.append(task.value)
    return "<" + ",".join(parts) + ">"


@dataclass(frozen=True)
class Template:
    id: str
    group: str  # "preference" | "intention" | "combined"
    preferences: frozenset[Preference]
    optional_preferences: frozenset[Preference]
    intentions: frozenset[Intention]
    task: TaskForm
    strategy: Strategy
    target: Target
    text: str
    answer: str

    @property
    def rankable(self) -> bool:
        """True iff candidates can be scored by the likelihood of their title as the answer."""
        return self.target is Target.ITEM

    @property
    def label(self) -> str:
        """Paper-style label of the template, e.g. ``<P1,(P2),I1/I2,T3>``."""
        return _label(self.preferences, self.optional_preferences, self.intentions, self.task)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "group": self.group,
            "preferences": sorted(p.value for p in self.preferences),
            "optional_preferences": sorted(p.value for p in self.optional_preferences),
            "intentions": sorted(i.value for i in self.intentions),
            "task": self.task.value,
            "strategy": self.strategy.value,
            "target": self.target.value,
            "rankable": self.rankable,
            "instantiation": self.label,
            "text": self.text,
            "answer": self.answer,
        }


# --- the table -------------------------------------------------------------------------

P0, P1, P2 = Preference.NONE, Preference.IMPLICIT, Preference.EXPLICIT
I0, I1, I2 = Intention.NONE, Intention.VAGUE, Intention.SPECIFIC
T0, T1, T2, T3 = TaskForm.POINTWISE, TaskForm.PAIRWISE, TaskForm.MATCHING, TaskForm.RERANK
_ANY_INTENTION = (I1, I2)
_REASONING_ANSWER = "The user seems to like things similar to {recent}.[[P2: In their words: {preference}.]] So the next item is {item}."
_HISTORY_ANSWER = "Earlier items: {history}. Next item: {item}."


def _t(
    id: str,
    group: str,
    prefs: tuple,
    intentions: tuple,
    task: TaskForm,
    text: str,
    answer: str = "{item}",
    *,
    optional: tuple = (),
    strategy: Strategy = Strategy.PLAIN,
    target: Target = Target.ITEM,
) -> Template:
    return Template(
        id=id,
        group=group,
        preferences=frozenset(prefs) or frozenset({P0}),
        optional_preferences=frozenset(optional),
        intentions=frozenset(intentions) or frozenset({I0}),
        task=task,
        strategy=strategy,
        target=target,
        text=text,
        answer=answer,
    )


_PREF, _INT, _COMB = "preference", "intention", "combined"

TEMPLATES: tuple[Template, ...] = (
    # ---- preference-related (Appendix A structure): 17 ----
    _t("pref-01", _PREF, (P1,), (), T2,
       "Here are the items a user interacted with, oldest first: {history}. Name the item this user is most likely to interact with next."),
    _t("pref-02", _PREF, (P1, P2), (), T2,
       "A user has interacted with: {history}. Their taste, in their own words: {preference}. Suggest the next item for this user."),
    _t("pref-03", _PREF, (P1,), (), T2,
       "Interaction history of a user: {history}.[[P2: The user also says: {preference}.]] First work out what this user tends to enjoy, then recommend the next item.",
       _REASONING_ANSWER, optional=(P2,), strategy=Strategy.REASONING, target=Target.REASONING_ITEM),
    _t("pref-04", _PREF, (P1,), (), T2,
       "Look for what these past items have in common: {history}.[[P2: Their taste, as they put it: {preference}.]] Then generate the item this user should get next.",
       optional=(P2,)),
    _t("pref-05", _PREF, (P1,), (), T2,
       "Past interactions reveal taste, and this user's record is: {history}.[[P2: Stated preference: {preference}.]] Which item would suit them next? Give its title.",
       optional=(P2,)),
    _t("pref-06", _PREF, (P1,), (), T3,
       "A user's behaviour sequence: {history}.[[P2: What they say they enjoy: {preference}.]] Choose, among the candidate items, the one this user is most likely to pick next.",
       optional=(P2,)),
    _t("pref-07", _PREF, (P1,), (), T3,
       "The user clicked on these items: {history}.[[P2: Their own description of their taste: {preference}.]] Compare the candidate items with this taste and pick the best fit.",
       optional=(P2,)),
    _t("pref-08", _PREF, (P1,), (), T3,
       "[[P2:What the user tells us about themselves: {preference}. ]]Items they interacted with before: {history}. From the candidate items, select the next one that matches this user.",
       optional=(P2,)),
    _t("pref-09", _PREF, (P1,), (), T0,
       "A shopper's purchase record: {history}.[[P2: Their stated taste: {preference}.]] Would they interact with \"{candidate}\" next? Answer yes or no.",
       "{label}", optional=(P2,), target=Target.YES_NO),
    _t("pref-10", _PREF, (P1,), (), T0,
       "Judging from this interaction history: {history}[[P2: and the stated preference \"{preference}\"]], will the user click on \"{candidate}\" next? Reply yes or no.",
       "{label}", optional=(P2,), target=Target.YES_NO),
    _t("pref-11", _PREF, (P1,), (), T1,
       "Given a user's history: {history}.[[P2: Stated preference: {preference}.]] Which of these two would they prefer next: \"{candidate_a}\" or \"{candidate_b}\"? Answer with its title.",
       optional=(P2,), target=Target.CHOICE),
    _t("pref-12", _PREF, (P1, P2), (), T2,
       "Study what these items have in common: {history}. Describe, in one sentence, the taste of the user who chose them.",
       "{preference}", strategy=Strategy.TURN_AROUND, target=Target.PREFERENCE),
    _t("pref-13", _PREF, (P1, P2), (), T2,
       "A person's choices follow from what they like. Their choices so far: {history}. What does this person like?",
       "{preference}", strategy=Strategy.TURN_AROUND, target=Target.PREFERENCE),
    _t("pref-14", _PREF, (P2,), (), T2,
       "Acting as a recommender, suggest an item that fits this user's stated preference: {preference}."),
    _t("pref-15", _PREF, (P2,), (), T2,
       "A user explains what they like: {preference}. Predict the item they will go for next and give its title."),
    _t("pref-16", _PREF, (P2,), (), T3,
       "The user describes their taste as follows: {preference}. Among the candidate items, choose the one that fits it best."),
    _t("pref-17", _PREF, (P2,), (), T0,
       "A user describes what they like: {preference}. Does \"{candidate}\" match that? Answer yes or no.",
       "{label}", target=Target.YES_NO),
    # ---- intention-related (Appendix B structure): 9 ----
    _t("int-01", _INT, (), _ANY_INTENTION, T2,
       "You are a search engine. A user typed: \"{intention}\". Name an item that answers this query."),
    _t("int-02", _INT, (), (I2,), T2,
       "Answer the search query \"{intention}\" with the title of one matching item."),
    _t("int-03", _INT, (), (I2,), T2,
       "A user requests: {intention}. As a recommender, give one item that satisfies the request."),
    _t("int-04", _INT, (), _ANY_INTENTION, T2,
       "A user asks: \"{intention}\". Reply with an item that would help them."),
    _t("int-05", _INT, (), _ANY_INTENTION, T2,
       "A user wants to find \"{item}\" but is unsure what to type into a search box. Write a query for them.",
       "{intention}", strategy=Strategy.TURN_AROUND, target=Target.QUERY),
    _t("int-06", _INT, (), _ANY_INTENTION, T2,
       "Imagine someone searching for \"{item}\". Write the short query they would most likely type, using its type, brand or purpose.",
       "{intention}", strategy=Strategy.TURN_AROUND, target=Target.QUERY),
    _t("int-07", _INT, (), _ANY_INTENTION, T3,
       "Search query: \"{intention}\". Choose, among the candidate items, the one that best answers it."),
    _t("int-08", _INT, (), _ANY_INTENTION, T3,
       "Acting as a search engine, pick from the candidate items the one most relevant to what the user asked for: {intention}."),
    _t("int-09", _INT, (), _ANY_INTENTION, T3,
       "A user is looking for: {intention}.[[P2: About their taste they add: {preference}.]] Among the candidate items, choose the one that best serves this request.",
       optional=(P2,)),
    # ---- combined / personalized search (Appendix C structure): 13 ----
    _t("comb-01", _COMB, (P1, P2), (), T2,
       "You are a search engine with this user's record: {history}. Their stated taste: {preference}. Generate a new item consistent with both."),
    _t("comb-02", _COMB, (P1,), (I1,), T2,
       "This user's earlier items: {history}. Right now they are after something like: {intention}. Name an item that fits this current interest."),
    _t("comb-03", _COMB, (P1,), (I1,), T2,
       "You are a shopping assistant. Recent purchases: {history}. The user would now like more items with these qualities: {intention}. Recommend one."),
    _t("comb-04", _COMB, (P1,), (I2,), T2,
       "A user searches for \"{intention}\". Their past items were: {history}. Generate an item that matches the query and suits their taste."),
    _t("comb-05", _COMB, (P1,), _ANY_INTENTION, T2,
       "After getting {history}, a user realises they still need \"{item}\" but cannot phrase a search for it. Write the query they should use.",
       "{intention}", strategy=Strategy.TURN_AROUND, target=Target.QUERY),
    _t("comb-06", _COMB, (P1, P2), (), T2,
       "Past items: {history}. The user then chose \"{item}\". Explain which taste of theirs leads from this history to that choice.",
       "{preference}", strategy=Strategy.TURN_AROUND, target=Target.PREFERENCE),
    _t("comb-07", _COMB, (P1,), _ANY_INTENTION, T2,
       "A user searched for \"{intention}\" and ended up choosing an item. List earlier items that reflect the same interest, then name the item chosen.",
       _HISTORY_ANSWER, strategy=Strategy.RELATEDNESS, target=Target.HISTORY_ITEM),
    _t("comb-08", _COMB, (P1, P2), (), T2,
       "A user describes their taste: {preference}. Guess what they interacted with before that shows this taste, then predict their next item.",
       _HISTORY_ANSWER, strategy=Strategy.RELATEDNESS, target=Target.HISTORY_ITEM),
    _t("comb-09", _COMB, (P1,), _ANY_INTENTION, T3,
       "Current request: {intention}. History: {history}.[[P2: Stated taste: {preference}.]] Answer the request by choosing, among the candidate items, the one that best fits both.",
       optional=(P2,)),
    _t("comb-10", _COMB, (P1,), _ANY_INTENTION, T3,
       "A user who previously got {history} now searches for \"{intention}\".[[P2: Their taste, in their words: {preference}.]] Select the candidate item that best matches the search and their taste.",
       optional=(P2,)),
    _t("comb-11", _COMB, (P1,), _ANY_INTENTION, T3,
       "This shopper already owns, among other things: {history}.[[P2: In their words: {preference}.]] Today they want: {intention}. Choose from the candidate items the one that suits them best.",
       optional=(P2,)),
    # comb-12/13: this project's own additions (pointwise / pairwise personalized search).
    _t("comb-12", _COMB, (P1,), _ANY_INTENTION, T0,
       "History: {history}.[[P2: Stated taste: {preference}.]] The user now asks for: {intention}. Is \"{candidate}\" a good answer? Reply yes or no.",
       "{label}", optional=(P2,), target=Target.YES_NO),
    _t("comb-13", _COMB, (P1,), _ANY_INTENTION, T1,
       "User history: {history}.[[P2: Stated taste: {preference}.]] Current request: {intention}. Which fits better, \"{candidate_a}\" or \"{candidate_b}\"? Answer with the title.",
       optional=(P2,), target=Target.CHOICE),
)


def table_version(templates: tuple[Template, ...] | list[Template]) -> str:
    """Version string of a template table: prefix + first 8 hex of sha256 of its canonical JSON."""
    canonical = json.dumps([t.to_dict() for t in templates], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"{_VERSION_PREFIX}+{hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:8]}"


TEMPLATE_VERSION: str = table_version(TEMPLATES)
_BY_ID: dict[str, Template] = {t.id: t for t in TEMPLATES}


def get_template(template_id: str) -> Template:
    try:
        return _BY_ID[template_id]
    except KeyError:
        raise TemplateError(f"unknown template id {template_id!r}; valid ids: {', '.join(_BY_ID)}") from None


# --- rendering -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    source: str
    target: str | None
    template: Template
    instantiation: Instantiation


HISTORY_SEPARATOR = "; "


def history_entries(history: tuple[str, ...] | list[str]) -> list[str]:
    """Each history item as the rendered history lists it: ``1. A``, ``2. B``, ..."""
    return [f"{i}. {title}" for i, title in enumerate(history, 1)]


def render_history(history: tuple[str, ...] | list[str]) -> str:
    """``1. A; 2. B; 3. C`` (deterministic)."""
    return HISTORY_SEPARATOR.join(history_entries(history))


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def _resolve_optional(text: str, keep: bool) -> str:
    out = _OPTIONAL_P2.sub(lambda m: m.group(1) if keep else "", text)
    return re.sub(r" {2,}", " ", out).strip()


def _describe(need: UserNeed) -> str:
    parts = []
    if need.history:
        parts.append(f"history of {len(need.history)} item(s) (P1)")
    if need.preference:
        parts.append("an explicit preference (P2)")
    if need.intention:
        kind = "vague" if need.intention_aspect is I1 else "specific"
        parts.append(f"a {kind} intention ({need.intention_aspect.value})")
    return ", ".join(parts) if parts else "nothing (no history, preference or intention)"


def _need_problem(template: Template, need: UserNeed) -> str | None:
    """Why ``need`` cannot fill ``template``'s required slots (None if it can)."""
    if P1 in template.preferences and not need.history:
        return f"template {template.id} needs {{history}} (P1) but the need has an empty history"
    if P2 in template.preferences and not need.preference:
        return f"template {template.id} needs {{preference}} (P2) but the need has no explicit preference"
    if template.intentions != frozenset({I0}):
        accepted = "/".join(sorted(i.value for i in template.intentions))
        if not need.intention:
            return f"template {template.id} needs {{intention}} ({accepted}) but the need has no intention"
        if need.intention_aspect not in template.intentions:
            return (f"template {template.id} accepts intentions {accepted} but the need's intention is "
                    f"{need.intention_aspect.value}")
    return None


def _instantiation(template: Template, need: UserNeed) -> Instantiation:
    prefs = (set(template.preferences) | (set(template.optional_preferences) & set(need.preferences))) - {P0}
    intention = need.intention_aspect if template.intentions != frozenset({I0}) else I0
    return Instantiation(preferences=frozenset(prefs) or frozenset({P0}), intention=intention, task=template.task)


def _example_inputs(template: Template, text_fields: set[str], item: str | None, candidate: str | None,
                    pair: tuple[str, str] | None, label: bool | None) -> dict[str, str]:
    """The per-example slot values (item, candidate(s), label), checked against what the
    instruction text asks for."""
    values: dict[str, str] = {}
    if "item" in text_fields:
        if not item:
            raise TemplateError(f"template {template.id} needs {{item}} (the target item title) in its instruction")
        values["item"] = item
    elif item:
        values["item"] = item
    if "candidate" in text_fields:
        if not candidate:
            raise TemplateError(f"template {template.id} is pointwise (T0) and needs candidate=")
        values["candidate"] = candidate
    if {"candidate_a", "candidate_b"} & text_fields:
        if not pair or len(pair) != 2 or not all(pair):
            raise TemplateError(f"template {template.id} is pairwise (T1) and needs pair=(title_a, title_b)")
        values["candidate_a"], values["candidate_b"] = pair
        if item is not None and item not in pair:
            raise TemplateError(f"template {template.id}: item {item!r} (the better candidate) is not one of pair={pair!r}")
    if label is not None:
        values["label"] = "yes" if label else "no"

    return values


def render(
    template: Template,
    need: UserNeed,
    *,
    item: str | None = None,
    candidate: str | None = None,
    pair: tuple[str, str] | None = None,
    label: bool | None = None,
) -> Rendered:
    """Fill ``template`` from ``need`` and the per-example inputs.

    ``target`` is None when the answer needs an input that was not given (``item`` for
    item/choice/reasoning/history answers, ``label`` for yes/no); turn-around answers
    (query / preference) come from the need itself and are always produced.
    Raises :class:`TemplateError` naming the missing slot when the input cannot be filled.
    """
    problem = _need_problem(template, need)
    if problem:
        raise TemplateError(problem)
    keep_p2 = bool(need.preference)
    text = _resolve_optional(template.text, keep_p2)
    answer = _resolve_optional(template.answer, keep_p2)

    # Free texts lose a trailing period inside sentences ("Stated taste: X." not "X.."); a
    # turn-around answer that IS the text (query / preference target) keeps it verbatim.
    values: dict[str, str] = {
        "history": render_history(need.history),
        "recent": ", ".join(need.history[-3:]),
        "preference": (need.preference or "").strip().rstrip("."),
        "intention": (need.intention or "").strip().rstrip("."),
    }
    values.update(_example_inputs(template, _fields(text), item, candidate, pair, label))
    source = text.format(**values)
    if need.context:
        ctx = need.context.strip()
        source += f" Context: {ctx}" + ("" if ctx[-1] in ".!?" else ".")

    target: str | None
    if template.target is Target.PREFERENCE:
        target = need.preference
    elif template.target is Target.QUERY:
        target = need.intention
    elif all(f in values for f in _fields(answer)):
        target = answer.format(**values)
    else:
        target = None
    return Rendered(source=source, target=target, template=template, instantiation=_instantiation(template, need))


# --- compatibility and selection -------------------------------------------------------


def _incompatibility(t: Template, need: UserNeed, task: TaskForm | None, rankable: bool | None) -> str | None:
    problem = _need_problem(t, need)
    if problem:
        return problem
    if t.intentions == frozenset({I0}) and need.intention:
        return (f"template {t.id} has no intention slot and would drop the need's "
                f"{need.intention_aspect.value} intention")
    if task is not None and t.task is not task:
        return f"template {t.id} is a {t.task.value} template but task {task.value} was requested"
    if rankable is not None and t.rankable is not rankable:
        want = "a rankable (item-title answer)" if rankable else "a non-rankable"
        return f"template {t.id} (target {t.target.value}) is not {want} template"
    return None


def compatible(need: UserNeed, *, task: TaskForm | None = None, rankable: bool | None = None) -> list[Template]:
    """Templates, in table order, that ``need`` can fill without dropping its intention
    (see the module docstring), whose task is ``task`` and whose rankability is
    ``rankable`` when those are given."""
    return [t for t in TEMPLATES if _incompatibility(t, need, task, rankable) is None]


def _uses(t: Template, need: UserNeed) -> int:
    """How many of the need's aspects (P1, P2, intention) the template actually uses."""
    inst = _instantiation(t, need)
    used = len((inst.preferences - {P0}) & need.preferences)
    return used + (1 if inst.intention is not I0 else 0)


def select(
    need: UserNeed,
    *,
    task: TaskForm | None = TaskForm.RERANK,
    template_id: str | None = None,
    rng: random.Random | None = None,
    rankable: bool = True,
    weight: Callable[[Template], float] | None = None,
) -> Template:
    """The one template-selection function shared by training and serving.

    ``task=None`` means any task form; ``rankable=True`` requires an item-title answer,
    ``rankable=False`` imposes no rankability requirement (training mixtures).

    * ``template_id``: that template if compatible, else :class:`TemplateError` saying why.
    * ``rng``: a random choice among the compatible templates (training mixture), uniform
      or by ``weight(template)``.
    * otherwise (serving default): the compatible template that uses the most of what the
      need carries (P1, P2, intention), ties broken by table order.
    """
    want_rankable = True if rankable else None
    if template_id is not None:
        t = get_template(template_id)
        why = _incompatibility(t, need, task, want_rankable)
        if why:
            raise TemplateError(f"{why} (need carries {_describe(need)})")
        return t
    pool = compatible(need, task=task, rankable=want_rankable)
    if not pool:
        what = f"task {task.value}" if task is not None else "any task"
        raise TemplateError(
            f"no template is compatible with a need carrying {_describe(need)} "
            f"({what}{', rankable' if rankable else ''})"
        )
    if rng is not None:
        if weight is not None:
            return rng.choices(pool, weights=[weight(t) for t in pool])[0]
        return rng.choice(pool)
    return max(pool, key=lambda t: _uses(t, need))  # max keeps the first of equal scores
