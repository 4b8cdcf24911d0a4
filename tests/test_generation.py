"""Constrained generation over a catalogue (task form T2): every backend, real tiny models.

The search is checked against the ranker itself: with a beam as wide as the catalogue the
search is exhaustive, so its answer must be the ranker's full sort of every title, score for
score; with a narrow beam every result must be a catalogue title whose score is the ranker's
score of that title. The catalogue is built to be awkward: titles that are prefixes of other
titles, long shared prefixes, exact duplicates, and titles cut to the same tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instructrec.catalogue import CatalogueItem, build_catalogue
from instructrec.generation import Generator
from instructrec.modeling import load_model
from instructrec.ranker import Ranker, rank_order

torch.set_num_threads(1)

TITLES = [
    "Halo", "Halo 3", "Halo 3 ODST", "Halo 3 ODST Limited Edition", "Halo 3 ODST Limited Edition - Xbox 360",
    "Halo Reach", "Zelda", "The Legend of Zelda", "The Legend of Zelda: Breath of the Wild",
    "The Legend of Zelda: Breath of the Wild - Nintendo Switch", "Mario Kart 8", "Mario Kart 8 Deluxe", "Mario",
    "Halo 3",  # a duplicate title: one leaf, two items
    "Portal 2", "Portal",
    # two long titles equal up to the 12-token cut: the same token sequence, one leaf
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu",
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu xi omicron",
]
SOURCE = "The user played Halo and Portal, and likes long adventures. Which game should they play next?"
BACKENDS = ["tiny-random-prefixlm", "tiny-random", "tiny-random-t5", "tiny-random-flan-t5", "tiny-random-causal"]


@pytest.fixture(scope="module", params=BACKENDS)
def setup(request):
    loaded = load_model(request.param, device="cpu", dtype="float32")
    ranker = Ranker(loaded, max_target_tokens=12)
    items = [CatalogueItem(f"id-{i}", t) for i, t in enumerate(TITLES)]
    catalogue = build_catalogue(items, loaded.tokenizer, eos=ranker.eos, max_target_tokens=ranker.max_target_tokens)
    return ranker, catalogue, Generator(ranker, catalogue)


def _reference(ranker, reduction="mean"):
    return ranker.score(SOURCE, TITLES, reduction=reduction).scores


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_an_exhaustive_beam_is_the_rankers_full_sort(setup, reduction):
    ranker, catalogue, generator = setup
    ref = _reference(ranker, reduction)
    got = generator.top_k(SOURCE, len(TITLES), beams=len(TITLES), reduction=reduction)
    assert [r.item for r in got] == rank_order(ref)  # every item, ties (duplicates) in catalogue order
    for r in got:
        assert r.score == pytest.approx(ref[r.item], abs=1e-4)
        assert r.title == TITLES[r.item]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_narrow_beams_stay_in_the_catalogue_and_score_as_the_ranker(setup, k):
    ranker, catalogue, generator = setup
    got = generator.top_k(SOURCE, k)
    assert 1 <= len(got) <= k
    ref = _reference(ranker)
    for r in got:
        assert r.title in TITLES and r.title == catalogue.items[r.item].title
        assert r.score == pytest.approx(ref[r.item], abs=1e-4)
    assert [r.score for r in got] == sorted((r.score for r in got), reverse=True)


def test_duplicate_titles_and_cut_titles_share_a_leaf(setup):
    ranker, catalogue, generator = setup
    got = generator.top_k(SOURCE, len(TITLES), beams=len(TITLES))
    by_item = {r.item: r for r in got}
    assert by_item[1].score == by_item[13].score  # "Halo 3" twice
    assert by_item[16].score == by_item[17].score  # equal up to the cut
    assert catalogue.header["leaves"] == len(TITLES) - 2


def test_distinct_gives_one_item_per_title_in_the_rankers_order(setup):
    ranker, catalogue, generator = setup
    full = generator.top_k(SOURCE, len(TITLES), beams=len(TITLES))
    got = generator.top_k(SOURCE, len(TITLES), beams=len(TITLES), distinct=True)
    # the later item of each shared leaf is left out: 13 ("Halo 3" again) and 17 (equal to 16 up to the cut)
    assert [r.item for r in got] == [r.item for r in full if r.item not in (13, 17)]
    assert [r.score for r in got] == [r.score for r in full if r.item not in (13, 17)]
    narrow = generator.top_k(SOURCE, 5, distinct=True)  # a narrow beam: still no title twice
    assert len({r.title for r in narrow}) == len(narrow)


def test_the_filter_is_obeyed_and_the_rest_ranked_as_the_ranker_ranks_it(setup):
    ranker, catalogue, generator = setup
    allowed = np.array([i % 3 != 0 for i in range(len(TITLES))])
    got = generator.top_k(SOURCE, len(TITLES), beams=len(TITLES), allowed=allowed)
    ref = _reference(ranker)
    assert [r.item for r in got] == [i for i in rank_order(ref) if allowed[i]]
    narrow = generator.top_k(SOURCE, 2, allowed=allowed)
    assert narrow and all(allowed[r.item] for r in narrow)
    # a prefix title excluded ("Halo") while its longer titles stay: the node stays open, the leaf does not
    only_halo3 = np.zeros(len(TITLES), dtype=bool)
    only_halo3[[1, 2]] = True
    assert {r.item for r in generator.top_k(SOURCE, 5, allowed=only_halo3)} == {1, 2}
    assert generator.top_k(SOURCE, 3, allowed=np.zeros(len(TITLES), dtype=bool)) == []


def test_every_step_is_limited_to_the_prefix_tree(setup):
    """Drive the search with a model that wants a token outside the catalogue above all: the
    beams still only ever hold catalogue prefixes."""
    ranker, catalogue, generator = setup
    seen = []
    real = ranker.backend.steps

    class Spy:
        def __init__(self, inner):
            self.inner, self.count, self.rows = inner, 0, [[]]

        def first(self):
            return self._bias(self.inner.first())

        def advance(self, parents, tokens):
            self.rows = [self.rows[p] + [t] for p, t in zip(parents, tokens)]
            seen.extend(self.rows)
            return self._bias(self.inner.advance(parents, tokens))

        @staticmethod
        def _bias(lp):
            lp = lp.clone()
            lp[:, 0] = 0.0  # token 0 is in no title: the constraint must hold it off
            return lp

    ranker.backend.steps = lambda s: Spy(real(s))
    try:
        got = generator.top_k(SOURCE, 4)
    finally:
        del ranker.backend.steps
    rows = {tuple(catalogue.row_tokens(i)) for i in range(len(catalogue))}
    assert seen and got
    for prefix in seen:
        assert any(row[: len(prefix)] == tuple(prefix) for row in rows), prefix


def test_a_catalogue_for_another_tokenizer_or_limit_is_refused():
    from instructrec.catalogue import CatalogueError

    import copy

    bert = load_model("tiny-random", device="cpu", dtype="float32")
    ranker = Ranker(bert, max_target_tokens=12)
    items = [CatalogueItem("a", "Halo"), CatalogueItem("b", "Portal")]
    grown = copy.deepcopy(bert.tokenizer)
    grown.add_tokens(["halo3odst"])  # one more word: other ids for some titles
    other = build_catalogue(items, grown, eos=ranker.eos, max_target_tokens=12)
    with pytest.raises(CatalogueError, match="another tokenizer"):
        Generator(ranker, other)
    longer = build_catalogue(items, bert.tokenizer, eos=ranker.eos, max_target_tokens=20)
    with pytest.raises(CatalogueError, match="cut to 20 tokens"):
        Generator(ranker, longer)
