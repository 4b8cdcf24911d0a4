"""Tests for fitting an instruction into the model's token budget, with the real MiniLM tokenizer."""

from __future__ import annotations

import dataclasses
import random

import pytest

from instructrec.aspects import Intention, TaskForm, UserNeed
from instructrec.instruction import build, count_tokens, fit
from instructrec.modeling import minilm_tokenizer
from instructrec.templates import TemplateError, compatible, get_template, render, select

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


def _fit_by_search(template, need, tok, budget):
    """The reference: the largest number of most recent items that fits, by binary search."""
    if count_tokens(tok, render(template, need).source) <= budget or len(need.history) <= 1:
        return 0
    lo, hi, best = 1, len(need.history) - 1, 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if tokens_with_last(template, need, mid, tok) <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return len(need.history) - best


def test_fit_keeps_what_a_binary_search_keeps_with_at_most_three_tokenisations(tok, monkeypatch):
    """Random real-looking histories (titles of 1 to 12 words, numbers and punctuation), every
    history template, budgets from too small to roomy: fit drops exactly the items a binary
    search over the counts drops, and tokenises the instruction at most three times."""
    import instructrec.instruction as instruction

    rng = random.Random(7)
    words = ["Mario", "Kart", "8", "Deluxe", "The", "Legend", "of", "Zelda:", "Breath", "Wild", "Call", "Duty",
             "Black-Ops", "II", "(PS4)", "FIFA", "2019", "Édition", "Spider-Man", "Tom", "Clancy's", "3DS", "&", "XL"]
    calls = []
    real = tok.__class__.__call__

    def counted(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    cases = 0
    for _ in range(60):
        history = tuple(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(2, 40)))
        need = UserNeed(history=history, preference="I like co-op games.", intention="a racing game",
                        intention_kind=rng.choice([Intention.SPECIFIC, Intention.VAGUE]))
        template = rng.choice([t for t in compatible(need, rankable=True) if "{history}" in t.text])
        full = count_tokens(tok, render(template, need).source)
        for budget in (8, full // 3, full // 2, full - 3, full - 1, full):
            expected = _fit_by_search(template, need, tok, budget)
            monkeypatch.setattr(tok.__class__, "__call__", counted)
            calls.clear()
            inst = fit(template, need, tok, budget)
            monkeypatch.setattr(tok.__class__, "__call__", real)
            assert inst.history_dropped == expected, (template.id, budget, len(history))
            assert len(calls) <= 3, (template.id, budget, len(calls))
            cases += 1
    assert cases == 360


@pytest.mark.parametrize("off_by", [-7, -2, -1, 1, 2, 7])
def test_fit_recovers_from_a_wrong_guess(tok, monkeypatch, off_by):
    """Where the guess from the token offsets is wrong (counts that are not additive across
    items), the verifications and the binary search they leave still find what the search
    alone finds."""
    import instructrec.instruction as instruction

    guess = instruction._guess_kept
    monkeypatch.setattr(instruction, "_guess_kept",
                        lambda *a: max(1, min(len(a[1]) - 1, guess(*a) + off_by)))
    template = get_template("comb-09")
    full = count_tokens(tok, render(template, NEED).source)
    for budget in (8, full // 3, full // 2, full - 5, full - 1):
        assert fit(template, NEED, tok, budget).history_dropped == _fit_by_search(template, NEED, tok, budget)
