"""Instruction data and the ranking metrics: real data types, the real template table."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from instructrec.modeling import minilm_tokenizer
from instructrec.templates import get_template
from instructrec.training.annotate.pipeline import Annotation
from instructrec.training.annotate.teachers import Kind
from instructrec.training.data.types import Case, Interaction, InteractionData, Item
from instructrec.training.instructions import Mixture, build_examples, needs_for_case, read_examples, write_examples
from instructrec.training.metrics import candidate_set, metrics_from_ranks, rank_of, sample_negatives


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


def _data(n_items: int = 40) -> InteractionData:
    items = {str(i): Item(str(i), f"Game number {i} - {'PC' if i % 2 else 'Xbox 360'}") for i in range(n_items)}
    seqs = {f"u{u}": [Interaction(str((u * 3 + k) % n_items)) for k in range(6)] for u in range(8)}
    return InteractionData("toy", items, seqs)


def _ann(case: Case, kind: Kind, text: str, teacher: str = "t1") -> tuple:
    return (case.user_id, case.target, kind), Annotation(case.user_id, case.target, kind, text, teacher, "k")


def test_needs_cover_every_scenario_the_annotations_allow():
    data = _data()
    case = data.split().train[0]
    assert [n.preferences for n, _ in needs_for_case(data, case, {})] == [frozenset({"P1"})]
    anns = dict([_ann(case, Kind.PREFERENCE, "I like shooters."), _ann(case, Kind.VAGUE, "something scary"),
                 _ann(case, Kind.SPECIFIC, "a PC game", "t2")])
    needs = needs_for_case(data, case, anns)
    labels = {(bool(n.history), bool(n.preference), n.intention_aspect.value) for n, _ in needs}
    assert labels == {(True, False, "I0"), (True, True, "I0"), (False, True, "I0"), (False, False, "I1"),
                      (True, False, "I1"), (True, True, "I1"), (False, False, "I2"), (True, False, "I2"), (True, True, "I2")}
    teachers = {(n.preference is not None, n.intention): t for n, t in needs}
    assert teachers[(True, "a PC game")] == "t1+t2" and teachers[(False, None)] is None


def test_examples_record_their_origin_and_follow_the_mixture(tokenizer, tmp_path):
    data = _data()
    split = data.split()
    anns = {}
    for c in split.train:
        anns.update([_ann(c, Kind.PREFERENCE, "I play on PC."), _ann(c, Kind.VAGUE, "something fun"),
                     _ann(c, Kind.SPECIFIC, "an Xbox 360 game")])
    examples = build_examples(data, split.train, anns, tokenizer, 128, seed=1, mixture=Mixture(per_case=30, history_share=0.5))
    assert len(examples) == 30 * len(split.train)
    for ex in examples[:200]:
        t = get_template(ex.template_id)
        assert ex.target_form == t.target.value and ex.strategy == t.strategy.value
        assert ex.user_id in data.sequences and ex.item_id in data.items
        assert len(tokenizer(ex.source)["input_ids"]) <= 128
        if t.target.value == "item":
            assert ex.target == data.title(ex.item_id)
        if t.target.value == "yes_no":
            assert ex.target in ("yes", "no")
    history_only = sum(1 for e in examples if e.teacher is None)
    assert 0.4 < history_only / len(examples) < 0.6  # the history-only scenario gets its share
    assert len({e.template_id for e in examples}) >= 30  # the mixture reaches most of the table
    assert len(Counter(e.target_form for e in examples)) == 7
    # the same seed gives the same data; the file round-trips
    again = build_examples(data, split.train, anns, tokenizer, 128, seed=1, mixture=Mixture(per_case=30, history_share=0.5))
    assert again == examples
    path = tmp_path / "ex.jsonl"
    write_examples(path, examples)
    assert read_examples(path) == examples


def test_bad_example_file_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"source": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        read_examples(path)


def test_metrics_on_a_hand_computed_ranking():
    # ranks 0, 2 and 6: HR@1 = 1/3, HR@3 = 2/3, HR@5 = 2/3, NDCG@3 = (1 + 1/log2(4)) / 3
    m = metrics_from_ranks([0, 2, 6])
    assert m["hr@1"] == pytest.approx(1 / 3) and m["hr@3"] == pytest.approx(2 / 3) and m["hr@5"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["ndcg@5"] == pytest.approx((1 + 0.5) / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 7) / 3)


def test_ties_count_against_the_positive():
    assert rank_of([0.5, 0.5, 0.1], 0) == 1
    assert rank_of([0.1, 0.9, 0.9], 2) == 1
    assert rank_of([1.0, 1.0, 1.0], 1) == 2  # a constant scorer gets no credit


def test_candidates_are_never_interacted_and_fixed_by_seed():
    data = _data()
    for case in data.split().valid:
        cands = candidate_set(data, case, 9, seed=7)
        assert len(cands) == 10 == len(set(cands)) and case.target in cands
        seen = {x.item_id for x in data.sequences[case.user_id]}
        assert not (set(cands) - {case.target}) & seen
        assert cands == candidate_set(data, case, 9, seed=7)
    case = data.split().valid[0]
    assert sample_negatives(data, case, 9, 1) != sample_negatives(data, case, 9, 2)
    with pytest.raises(ValueError, match="negatives"):
        sample_negatives(data, case, 100, 0)
