"""The full-catalogue (T2) evaluation: ranks checked against brute force, resumption, the README block.

On a catalogue small enough for the beam to hold every title, generation is exhaustive, so
each user's rank must be the target's place in the ranker's own sort of every title outside
the user's history, under the same matching instruction.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from instructrec.aspects import TaskForm
from instructrec.instruction import build
from instructrec.ranker import rank_order
from instructrec.text import normalise, normalise_need
from instructrec.training.data.types import Interaction, InteractionData, Item
from instructrec.training.evaluate import full_catalogue
from instructrec.training.evaluate.candidates import full_cases
from instructrec.training.evaluate.run import EvalConfig, evaluate
from instructrec.training.evaluate.scenarios import SCENARIOS

torch.set_num_threads(1)

WORDS = "legend zelda mario kart halo doom quest star wars racing puzzle farm".split()


def _data() -> InteractionData:
    rnd = random.Random(3)
    items = {f"i{j}": Item(f"i{j}", " ".join(rnd.choice(WORDS) for _ in range(1 + j % 3)) + f" {j}") for j in range(14)}
    ids = sorted(items)
    sequences = {}
    for u in range(9):
        chosen = rnd.sample(ids, 4 + u % 3)
        sequences[f"u{u}"] = [Interaction(i, float(t)) for t, i in enumerate(chosen)]
    return InteractionData("tiny-games", items, sequences)


def _config(tmp_path, **kw) -> EvalConfig:
    base = dict(data=_data(), out=tmp_path / "eval", users=None, settings=("full",), models=("tiny=tiny-random-prefixlm",),
                base=None, baselines=("popularity",), device="cpu", dtype="float32", resamples=50, progress=False,
                full_k=20, command="instructrec evaluate --settings full (test)")
    return EvalConfig(**{**base, **kw})


def test_ranks_are_the_brute_force_ranks(tmp_path):
    cfg = _config(tmp_path)
    data = cfg.data
    results = evaluate(cfg)["full"]
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"popularity", "tiny"}
    cases = full_cases(data, "test")

    # popularity: training-part counts, ties by id, history left out
    counts = Counter(x.item_id for seq in data.sequences.values() for x in seq[:-2])
    want = []
    for c in cases:
        order = [i for i in sorted(data.items, key=lambda i: (-counts.get(i, 0), i)) if i not in c.history]
        want.append(order.index(c.target) if c.target in order else len(data.items))
    saved = full_catalogue.popularity_ranks(data, cases)
    assert saved.ranks == want

    # generation with a beam as wide as the catalogue: the ranker's sort of the allowed titles
    gen = full_catalogue.Generation(data, "tiny-random-prefixlm", "tiny", k=20, beams=20, device="cpu", dtype="float32")
    titles = [normalise(data.title(i)) for i in sorted(data.items)]
    ids = sorted(data.items)
    ranks = gen.ranks(cases, progress=False)
    for c, rank in zip(cases, ranks.ranks):
        need = SCENARIOS["sequential"].need(data, c.user_id, c.history, c.target, {}, gen.max_history)
        source = build(normalise_need(need), gen.loaded.tokenizer, gen.ranker.max_source_tokens, task=TaskForm.MATCHING).source
        scores = gen.ranker.score(source, titles).scores
        allowed = [ids[j] for j in rank_order(scores) if ids[j] not in c.history]
        assert rank == (allowed.index(c.target) if c.target in allowed else gen.miss)
    hits = sum(r < 10 for r in ranks.ranks) / len(cases)
    assert rows["tiny"]["metrics"]["hr@10"] == pytest.approx(hits)
    assert rows["tiny"]["cases"] == len(cases) == 9


def test_a_rerun_reuses_the_saved_ranks_and_fills_the_readme(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    first = evaluate(cfg)["full"]

    def fail(*_a, **_k):
        raise AssertionError("recomputed a method whose ranks were saved")

    monkeypatch.setattr(full_catalogue.Generation, "ranks", fail)
    again = evaluate(_config(tmp_path))["full"]
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in first["rows"]]
    assert (cfg.out / "results.md").read_text().startswith("# Full-catalogue evaluation")

    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- eval:tiny-games-full:start -->\nstale table\n<!-- eval:tiny-games-full:end -->\nafter\n")
    full_catalogue.update_readme(readme, again, "artifacts/eval")
    text = readme.read_text()
    assert "stale table" not in text and "| popularity | 9 |" in text and text.endswith("after\n")
    assert "reusing the rankings of popularity" not in text and "reusing the rankings of tiny" in text
    assert "instructrec evaluate --settings full (test)" in text
    readme.write_text("<!-- eval:Other-full:start -->\nstale block\n<!-- eval:Other-full:end -->\n")
    full_catalogue.update_readme(readme, again, "artifacts/eval", name="Other")  # --readme-name Other
    assert "stale block" not in readme.read_text() and "| popularity | 9 |" in readme.read_text()


def test_bad_full_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="full_k must be 1 to 100"):
        _config(tmp_path, full_k=0)
    with pytest.raises(ValueError, match="unknown setting 'fully'"):
        _config(tmp_path, settings=("fully",))
