"""Tests for fitting an instruction into the model's token budget, with the real MiniLM tokenizer."""

from __future__ import annotations

import dataclasses
import random

import pytest

from instructrec.aspects import Intention, TaskForm, UserNeed
from instructrec.instruction import build, count_tokens, fit
from instructrec.modeling import minilm_tokenizer
from instructrec.templates import TemplateError, get_template, render, select

TITLES = tuple(f"The Chronicles of Item Number {i}: Extended Edition" for i in range(1, 21))
NEED = UserNeed(history=TITLES, preference="I like long story-driven adventures.",
                intention="a relaxing puzzle game", intention_kind=Intention.SPECIFIC)


@pytest.fixture(scope="module")
def tok():
    return minilm_tokenizer()


def tokens_with_last(template, need, k, tok) -> int:
    return count_tokens(tok, render(template, dataclasses.replace(need, history=need.history[-k:])).source)


@pytest.mark.parametrize("template_id", ["comb-09", "pref-06"])
def test_fit_drops_oldest_history_until_it_fits(tok, template_id):
    template = get_template(template_id)
    full = count_tokens(tok, render(template, NEED).source)
    keep7 = tokens_with_last(template, NEED, 7, tok)
    assert tokens_with_last(template, NEED, 6, tok) < keep7 < tokens_with_last(template, NEED, 8, tok) < full
    for budget, kept in ((keep7, 7), (keep7 - 1, 6)):
        inst = fit(template, NEED, tok, budget)
        assert inst.template is template
        assert inst.history_dropped == 20 - kept
        suffix = dataclasses.replace(NEED, history=TITLES[20 - kept:])
        # The template is rendered whole, with exactly the most recent `kept` items.
        assert inst.source == render(template, suffix).source
        assert TITLES[-1] in inst.source and TITLES[20 - kept] in inst.source
        assert TITLES[20 - kept - 1] not in inst.source
        assert count_tokens(tok, inst.source) <= budget
        # Maximal: one more (older) item would not fit.
        assert tokens_with_last(template, NEED, kept + 1, tok) > budget
        assert inst.rendered.instantiation.label() == render(template, NEED).instantiation.label()


def test_fit_big_budget_drops_nothing(tok):
    template = get_template("comb-09")
    inst = fit(template, NEED, tok, 512)
    assert inst.history_dropped == 0
    assert inst.source == render(template, NEED).source
    assert all(t in inst.source for t in TITLES)


def test_fit_keeps_at_least_one_item(tok):
    template = get_template("comb-09")
    inst = fit(template, NEED, tok, 5)  # smaller than the template alone
    assert inst.history_dropped == 19
    assert inst.source == render(template, dataclasses.replace(NEED, history=TITLES[-1:])).source


@pytest.mark.parametrize("need", [
    NEED,
    UserNeed(history=TITLES),
    UserNeed(preference="I like racing games."),
    UserNeed(intention="something scary", intention_kind=Intention.VAGUE),
    UserNeed(history=TITLES[:3], intention="a co-op shooter", intention_kind=Intention.SPECIFIC),
])
def test_build_uses_select(tok, need):
    inst = build(need, tok, max_tokens=512)
    assert inst.template == select(need)
    assert inst.template.task is TaskForm.RERANK and inst.template.rankable
    assert inst.source == render(inst.template, need).source


def test_build_fits_and_honours_template_id(tok):
    chosen = select(NEED)
    other = "comb-10" if chosen.id != "comb-10" else "comb-11"
    inst = build(NEED, tok, max_tokens=512, template_id=other)
    assert inst.template.id == other != chosen.id
    assert inst.history_dropped == 0
    small = build(NEED, tok, max_tokens=tokens_with_last(get_template(other), NEED, 4, tok), template_id=other)
    assert small.template.id == other and small.history_dropped == 16
    # rng picks among compatible templates, the same way training does
    assert build(NEED, tok, 512, rng=random.Random(3)).template == select(NEED, rng=random.Random(3))


def test_build_rejects_bad_template_ids(tok):
    with pytest.raises(TemplateError, match="unknown template id"):
        build(NEED, tok, 512, template_id="nope-99")
    with pytest.raises(TemplateError):  # a T0 (pointwise) template cannot rerank
        build(NEED, tok, 512, template_id="comb-12")
    with pytest.raises(TemplateError):  # needs an intention the need lacks
        build(UserNeed(history=TITLES), tok, 512, template_id="int-07")


@pytest.mark.parametrize("text", ["  Halo\\t3 \\n- Xbox\\x1f360 ", "Pok\u0065\u0301mon\u00a0Red", "plain", "", " \\r\\n "])
def test_normalise_is_nfc_then_collapsed_whitespace(text):
    import unicodedata

    from instructrec.text import normalise

    text = text.encode().decode("unicode_escape") if "\\" in text else text
    assert normalise(text) == " ".join(unicodedata.normalize("NFC", text).split())
    assert normalise(normalise(text)) == normalise(text)
