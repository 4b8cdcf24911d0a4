"""Tests for the template table, rendering and the one selection function."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import string
import subprocess
import sys

import pytest

from instructrec.aspects import Intention, Preference, TaskForm, UserNeed
from instructrec.templates import (
    SLOTS,
    TEMPLATE_VERSION,
    TEMPLATES,
    Strategy,
    Target,
    TemplateError,
    compatible,
    get_template,
    render,
    select,
    table_version,
)

P0, P1, P2 = Preference.NONE, Preference.IMPLICIT, Preference.EXPLICIT
I0, I1, I2 = Intention.NONE, Intention.VAGUE, Intention.SPECIFIC
HIST = ("Dune", "Neuromancer", "Hyperion", "Foundation")
MARKER = re.compile(r"\[\[P2:(.*?)\]\]", re.DOTALL)


def need(history=(), preference=None, intention=None, kind=None, context=None) -> UserNeed:
    return UserNeed(history=history, preference=preference, intention=intention, intention_kind=kind, context=context)


FULL_VAGUE = need(HIST, "I like hard science fiction.", "something long for a trip", I1)
FULL_SPECIFIC = need(HIST, "I like hard science fiction.", "a space opera trilogy", I2)


def fields(text: str) -> list[tuple[str, str, str | None]]:
    return [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None]


# --- the table --------------------------------------------------------------------------


def test_counts_and_groups():
    assert len(TEMPLATES) == 39
    by_group = {g: sum(t.group == g for t in TEMPLATES) for g in ("preference", "intention", "combined")}
    assert by_group == {"preference": 17, "intention": 9, "combined": 13}
    ids = [t.id for t in TEMPLATES]
    assert len(set(ids)) == 39
    assert [t.id for t in TEMPLATES if t.group == "preference"] == [f"pref-{i:02d}" for i in range(1, 18)]
    assert [t.id for t in TEMPLATES if t.group == "intention"] == [f"int-{i:02d}" for i in range(1, 10)]
    assert [t.id for t in TEMPLATES if t.group == "combined"] == [f"comb-{i:02d}" for i in range(1, 14)]


def test_task_and_strategy_coverage():
    tasks = [t.task for t in TEMPLATES]
    assert tasks.count(TaskForm.PAIRWISE) >= 2
    assert tasks.count(TaskForm.POINTWISE) >= 3
    strategies = {t.strategy for t in TEMPLATES}
    assert strategies == set(Strategy)
    assert {t.target for t in TEMPLATES} == set(Target)
    for t in TEMPLATES:
        assert t.rankable == (t.target is Target.ITEM)
        if t.task in (TaskForm.RERANK,):
            assert t.rankable and t.answer == "{item}"
        if t.task is TaskForm.POINTWISE:
            assert t.target is Target.YES_NO
        if t.task is TaskForm.PAIRWISE:
            assert t.target is Target.CHOICE


def test_version_tracks_table_content():
    assert TEMPLATE_VERSION == table_version(TEMPLATES)
    assert re.fullmatch(r"\d{4}\.\d{2}-\d+\+[0-9a-f]{8}", TEMPLATE_VERSION)
    modified = list(TEMPLATES)
    modified[5] = dataclasses.replace(modified[5], text=modified[5].text + " Be brief.")
    assert table_version(modified) != TEMPLATE_VERSION
    modified = list(TEMPLATES)
    modified[0] = dataclasses.replace(modified[0], answer="{item}.")
    assert table_version(modified) != TEMPLATE_VERSION
    assert table_version(list(TEMPLATES)) == TEMPLATE_VERSION


def test_get_template():
    assert get_template("comb-09").id == "comb-09"
    with pytest.raises(TemplateError, match=r"nope.*pref-01"):
        get_template("nope")


@pytest.mark.parametrize("t", TEMPLATES, ids=lambda t: t.id)
def test_slots_match_declared_aspects(t):
    both = t.text + " " + t.answer
    for name, spec, conv in fields(both):
        assert name in SLOTS, f"unknown slot {name!r}"
        assert not spec and conv is None
    names = {n for n, _, _ in fields(both)}
    text_names = {n for n, _, _ in fields(t.text)}
    outside = {n for n, _, _ in fields(MARKER.sub("", both))}
    inside = {n for m in MARKER.finditer(both) for n, _, _ in fields(m.group(1))}
    # no stray braces: removing the slots leaves no brace at all
    assert not re.search(r"[{}]", re.sub(r"\{[a-z_]+\}", "", both))
    # P1 <=> history (history is never optional)
    assert (P1 in t.preferences) == bool({"history", "recent"} & names)
    assert not {"history", "recent"} & inside
    # P2: required <=> outside any marker; optional <=> inside a marker
    assert (P2 in t.preferences) == ("preference" in outside)
    assert (P2 in t.optional_preferences) == ("preference" in inside)
    assert inside <= {"preference"}
    assert (P0 in t.preferences) == (t.preferences == frozenset({P0}))
    assert t.optional_preferences <= {P2}
    # intention slot <=> intentions != {I0}
    assert (t.intentions != frozenset({I0})) == ("intention" in names)
    assert I0 not in t.intentions or t.intentions == frozenset({I0})
    # a P0 template always has an intention slot (else it would use nothing)
    if t.preferences == frozenset({P0}):
        assert t.intentions != frozenset({I0})
    # task slots
    assert (t.task is TaskForm.POINTWISE) == ("candidate" in text_names)
    assert (t.task is TaskForm.PAIRWISE) == ({"candidate_a", "candidate_b"} <= text_names)
    assert ("label" in names) == (t.target is Target.YES_NO)
    assert "label" not in text_names
    # targets
    answer_names = {n for n, _, _ in fields(t.answer)}
    expected = {
        Target.ITEM: {"item"}, Target.CHOICE: {"item"}, Target.YES_NO: {"label"},
        Target.QUERY: {"intention"}, Target.PREFERENCE: {"preference"},
    }
    if t.target in expected:
        assert answer_names == expected[t.target]
    elif t.target is Target.REASONING_ITEM:
        assert "item" in answer_names and t.answer.rstrip(".").endswith("{item}")
    else:
        assert t.answer.index("{history}") < t.answer.index("{item}")
    if t.strategy is Strategy.TURN_AROUND or t.strategy is Strategy.RELATEDNESS:
        assert not t.rankable
    # concise: at most 3 sentences of wording, bounded length
    assert len(t.text) < 260
    assert len(re.findall(r"[.?!](\s|$)", MARKER.sub("", t.text))) <= 4


@pytest.mark.parametrize("t", TEMPLATES, ids=lambda t: t.id)
def test_every_template_renders_with_full_need(t):
    n = FULL_SPECIFIC if I2 in t.intentions and I1 not in t.intentions else FULL_VAGUE
    r = render(t, n, item="Hyperion", candidate="Solaris", pair=("Hyperion", "Solaris"), label=False)
    assert r.source and "{" not in r.source and "[[" not in r.source and "  " not in r.source
    assert r.target and "{" not in r.target and "[[" not in r.target
    assert r.template is t
    assert r.instantiation.task is t.task
    if "history" in t.text:
        assert "1. Dune; 2. Neuromancer; 3. Hyperion; 4. Foundation" in r.source
    if t.target in (Target.ITEM, Target.CHOICE):
        assert r.target == "Hyperion"
    if t.target is Target.YES_NO:
        assert r.target == "no"
    if t.target is Target.QUERY:
        assert r.target == n.intention
    if t.target is Target.PREFERENCE:
        assert r.target == n.preference
    if t.target is Target.REASONING_ITEM:
        assert r.target.endswith("Hyperion.") and len(r.target) > len("Hyperion.") + 10
    if t.target is Target.HISTORY_ITEM:
        assert r.target.index("Foundation") < r.target.index("Hyperion", r.target.index("Foundation"))
    if t.intentions != frozenset({I0}):
        assert n.intention in (r.target if t.target is Target.QUERY else r.source)
        assert r.instantiation.intention is n.intention_aspect
    else:
        assert r.instantiation.intention is I0


def test_target_none_without_item_for_item_templates():
    for t in compatible(FULL_VAGUE, rankable=True):
        r = render(t, FULL_VAGUE)
        assert r.target is None and r.source
    r = render(get_template("pref-09"), need(HIST), candidate="X")
    assert r.target is None
    assert render(get_template("pref-09"), need(HIST), candidate="X", label=True).target == "yes"


def test_optional_preference_kept_and_dropped():
    t = get_template("pref-06")
    with_p2 = render(t, need(HIST, "I like hard science fiction."), item="Hyperion")
    without = render(t, need(HIST), item="Hyperion")
    assert "I like hard science fiction" in with_p2.source
    assert "[[" not in with_p2.source and "]]" not in with_p2.source
    assert "P2" not in with_p2.source
    assert without.source == MARKER.sub("", t.text).format(history="1. Dune; 2. Neuromancer; 3. Hyperion; 4. Foundation")
    assert "  " not in without.source and "[[" not in without.source
    assert len(with_p2.source) > len(without.source)
    assert with_p2.instantiation.preferences == {P1, P2}
    assert without.instantiation.preferences == {P1}
    assert with_p2.instantiation.label() == "<P1,P2,I0,T3>"
    # trailing period of the preference is not doubled inside the sentence
    assert ".." not in with_p2.source
    # optional P2 in an answer (reasoning) follows the same rule
    r = render(get_template("pref-03"), need(HIST, "I like hard science fiction."), item="Solaris")
    assert "hard science fiction" in r.target and r.target.endswith("Solaris.")
    r = render(get_template("pref-03"), need(HIST), item="Solaris")
    assert "hard science" not in r.target and "Foundation" in r.target
    # P0 + optional P2
    r = render(get_template("int-09"), need(preference="cheap", intention="a kettle", kind=I2), item="K")
    assert "cheap" in r.source and r.instantiation.label() == "<P2,I2,T3>"
    r = render(get_template("int-09"), need(intention="a kettle", kind=I2), item="K")
    assert "cheap" not in r.source and r.instantiation.label() == "<P0,I2,T3>"


def test_context_sentence():
    t = get_template("int-07")
    plain = render(t, need(intention="a kettle", kind=I2))
    ctx = render(t, need(intention="a kettle", kind=I2, context="shopping on a phone at night"))
    assert ctx.source == plain.source + " Context: shopping on a phone at night."
    ctx2 = render(t, need(intention="a kettle", kind=I2, context="It is raining."))
    assert ctx2.source.endswith(" Context: It is raining.")
    assert "Context:" not in plain.source


def test_render_errors_on_missing_slots():
    with pytest.raises(TemplateError, match="history"):
        render(get_template("pref-01"), need(preference="x"), item="A")
    with pytest.raises(TemplateError, match="preference"):
        render(get_template("pref-02"), need(HIST), item="A")
    with pytest.raises(TemplateError, match="intention"):
        render(get_template("int-07"), need(HIST))
    with pytest.raises(TemplateError, match="I2"):
        render(get_template("int-02"), need(intention="something fun", kind=I1))
    with pytest.raises(TemplateError, match="item"):
        render(get_template("int-05"), need(intention="kettle", kind=I2))
    with pytest.raises(TemplateError, match="candidate"):
        render(get_template("pref-09"), need(HIST), label=True)
    with pytest.raises(TemplateError, match="pair"):
        render(get_template("pref-11"), need(HIST), item="A")
    with pytest.raises(TemplateError, match="not one of pair"):
        render(get_template("pref-11"), need(HIST), item="C", pair=("A", "B"))


# --- compatibility and selection ------------------------------------------------------------

SERVING_NEEDS = {
    "history": (need(HIST), {P1}, I0),
    "history+pref": (need(HIST, "cozy"), {P1, P2}, I0),
    "pref": (need(preference="cozy"), {P2}, I0),
    "vague": (need(intention="something fun", kind=I1), {P0}, I1),
    "specific": (need(intention="a red kettle", kind=I2), {P0}, I2),
    "history+vague": (need(HIST, intention="something fun", kind=I1), {P1}, I1),
    "history+specific": (need(HIST, intention="a red kettle", kind=I2), {P1}, I2),
    "history+pref+specific": (need(HIST, "cozy", "a red kettle", I2), {P1, P2}, I2),
    "history+pref+vague": (need(HIST, "cozy", "something fun", I1), {P1, P2}, I1),
    "pref+specific": (need(preference="cozy", intention="a red kettle", kind=I2), {P2}, I2),
}


@pytest.mark.parametrize("name", SERVING_NEEDS)
def test_serving_default_uses_everything(name):
    n, prefs, intention = SERVING_NEEDS[name]
    t = select(n)
    assert t.task is TaskForm.RERANK and t.rankable
    inst = render(t, n).instantiation
    assert inst.preferences == prefs
    assert inst.intention is intention
    # deterministic
    assert select(n) is t
    # the chosen one is the first rankable T3 template that uses everything the need carries
    full = [c for c in compatible(n, task=TaskForm.RERANK, rankable=True)
            if render(c, n).instantiation.preferences == prefs and render(c, n).instantiation.intention is intention]
    assert full and full[0] is t


def test_default_prefers_more_aspects_and_table_order():
    n = SERVING_NEEDS["history+pref"][0]
    # pref-06 is the first T3 template; it uses P1 and (P2)
    assert select(n).id == "pref-06"
    # T2: pref-02 (requires P1,P2) comes before pref-04 (P1,(P2)) and beats pref-01 (P1 only)
    assert select(n, task=TaskForm.MATCHING).id == "pref-02"
    assert select(need(HIST), task=TaskForm.MATCHING).id == "pref-01"


def test_compatible_rules():
    hist = need(HIST)
    ids = [t.id for t in compatible(hist)]
    assert "pref-01" in ids and "pref-06" in ids
    assert not any(i.startswith("int-") for i in ids)  # P0 templates need an intention
    assert "pref-02" not in ids and "pref-14" not in ids  # need P2
    # an intention is never silently dropped: no I0 template for a need with an intention
    with_int = need(HIST, "cozy", "a red kettle", I2)
    for t in compatible(with_int):
        assert t.intentions != frozenset({I0}) and I2 in t.intentions
    # P0 templates accept an intention whatever the history
    assert "int-07" in [t.id for t in compatible(with_int)]
    # I1-only templates reject specific intentions and vice versa
    assert "comb-02" not in [t.id for t in compatible(with_int)]
    assert "comb-04" in [t.id for t in compatible(with_int)]
    # filters
    assert all(t.task is TaskForm.POINTWISE for t in compatible(with_int, task=TaskForm.POINTWISE))
    assert [t.id for t in compatible(with_int, task=TaskForm.POINTWISE)] == ["comb-12"]
    assert all(not t.rankable for t in compatible(with_int, rankable=False))
    assert all(t.rankable for t in compatible(with_int, rankable=True))
    # table order is preserved
    order = [t.id for t in TEMPLATES]
    got = [t.id for t in compatible(with_int)]
    assert got == sorted(got, key=order.index)
    # nothing is compatible with an empty need
    assert compatible(need()) == []
    assert compatible(need(context="at home")) == []


def test_select_override():
    n = need(HIST, "cozy")
    assert select(n, template_id="pref-07").id == "pref-07"
    assert select(n, template_id="pref-02", task=TaskForm.MATCHING).id == "pref-02"
    with pytest.raises(TemplateError, match="T2.*T3"):
        select(n, template_id="pref-02")  # T2 template, default task T3
    with pytest.raises(TemplateError, match="intention"):
        select(n, template_id="int-07")
    with pytest.raises(TemplateError, match="drop"):
        select(need(HIST, intention="x", kind=I1), template_id="pref-06")
    with pytest.raises(TemplateError, match="rankable"):
        select(n, template_id="pref-12", task=TaskForm.MATCHING)
    assert select(n, template_id="pref-12", task=TaskForm.MATCHING, rankable=False).id == "pref-12"
    with pytest.raises(TemplateError, match="unknown"):
        select(n, template_id="pref-99")


def test_select_nothing_compatible_lists_need():
    with pytest.raises(TemplateError, match="nothing"):
        select(need())
    with pytest.raises(TemplateError, match=r"P2.*T1"):
        select(need(preference="cozy"), task=TaskForm.PAIRWISE, rankable=False)


def test_rng_selection_reproducible_and_diverse():
    n = FULL_VAGUE
    picks = [select(n, task=None, rankable=False, rng=random.Random(7)).id for _ in range(3)]
    assert len(set(picks)) == 1  # same seed, same choice
    rng_a, rng_b = random.Random(123), random.Random(123)
    seq_a = [select(n, task=None, rankable=False, rng=rng_a).id for _ in range(60)]
    seq_b = [select(n, task=None, rankable=False, rng=rng_b).id for _ in range(60)]
    assert seq_a == seq_b
    pool = {t.id for t in compatible(n)}
    assert set(seq_a) <= pool and len(set(seq_a)) >= 8
    assert {get_template(i).task for i in seq_a} >= {TaskForm.MATCHING, TaskForm.RERANK}
    ranked = {select(n, rng=rng_a).id for _ in range(40)}
    assert ranked == {t.id for t in compatible(n, task=TaskForm.RERANK, rankable=True)} and len(ranked) >= 3


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_json_subprocess():
    out = subprocess.run([sys.executable, "-m", "instructrec.cli", "templates", "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    data = json.loads(out.stdout)
    assert data["version"] == TEMPLATE_VERSION
    assert data["count"] == 39 and len(data["templates"]) == 39
    assert data["templates"][0] == TEMPLATES[0].to_dict()
    assert {"id", "group", "preferences", "optional_preferences", "intentions", "task", "strategy",
            "target", "rankable", "instantiation", "text", "answer"} <= set(data["templates"][0])


def test_cli_does_not_import_torch_and_filters():
    code = (
        "import io, json, sys, contextlib\n"
        "from instructrec.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    rc1 = main(['templates', '--json', '--group', 'intention', '--task', 'T3'])\n"
        "    rc2 = main(['templates'])\n"
        "text = buf.getvalue()\n"
        "first = json.JSONDecoder().raw_decode(text)[0]\n"
        "print(json.dumps({'rc': [rc1, rc2], 'torch': 'torch' in sys.modules,\n"
        "                  'ids': [t['id'] for t in first['templates']], 'table': 'comb-13' in text}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["rc"] == [0, 0]
    assert res["torch"] is False
    assert res["ids"] == ["int-07", "int-08", "int-09"]
    assert res["table"] is True
