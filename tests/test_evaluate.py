"""`instructrec evaluate`: the metrics against hand-computed cases, the candidate files, and a
whole evaluation on a tiny slice of the Games sample (popularity, the MiniLM bi-encoder
and a tiny random instruction model), end to end."""

import json
import math
from collections import Counter

import pytest

from instructrec.training.data.load import load_dataset
from instructrec.training.data.types import DataError
from instructrec.training.evaluate import candidates as cand
from instructrec.training.evaluate.report import update_readme
from instructrec.training.evaluate.run import EvalConfig, evaluate
from instructrec.training.evaluate.scenarios import SCENARIOS
from instructrec.training.metrics import bootstrap_intervals, metrics_from_ranks, rank_of


def test_metrics_on_a_known_ranking():
    # Positives at ranks 1, 3 and 6 (0-based 0, 2, 5).
    m = metrics_from_ranks([0, 2, 5])
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@3"] == pytest.approx(2 / 3)
    assert m["hr@5"] == pytest.approx(2 / 3)
    # NDCG@k = mean over cases of 1/log2(rank+2) when rank < k: (1 + 1/log2(4) + 0) / 3 = 0.5
    assert m["ndcg@3"] == pytest.approx(0.5)
    assert m["ndcg@5"] == pytest.approx(0.5)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 6) / 3)
    # A positive at rank 2 (0-based 1): NDCG@3 = 1/log2(3)
    assert metrics_from_ranks([1])["ndcg@3"] == pytest.approx(1 / math.log2(3))


def test_rank_of_counts_ties_against_the_positive():
    assert rank_of([0.1, 0.9, 0.5], 1) == 0
    assert rank_of([0.1, 0.9, 0.5], 0) == 2
    assert rank_of([1.0, 1.0, 1.0], 0) == 2  # a constant scorer gets no credit
    assert rank_of([float("-inf"), 0.0], 0) == 1


def test_bootstrap_intervals_bracket_the_mean_and_shrink_with_more_cases():
    small = [0, 1, 3, 0, 9, 0, 2, 5, 0, 4]
    ci = bootstrap_intervals(small, resamples=500, seed=1)
    m = metrics_from_ranks(small)
    for name in ("hr@1", "hr@5", "ndcg@5", "mrr"):
        assert ci[name][0] <= m[name] <= ci[name][1]
    wide = ci["hr@1"][1] - ci["hr@1"][0]
    big = bootstrap_intervals(small * 20, resamples=500, seed=1)
    assert big["hr@1"][1] - big["hr@1"][0] < wide
    assert bootstrap_intervals([0, 0, 0])["hr@1"] == (1.0, 1.0)  # no spread, no interval


@pytest.fixture(scope="module")
def slice_data():
    return load_dataset("games-sample").sample_users(40, seed=3)


def test_candidate_files_round_trip_and_reject_bad_lines(tmp_path, slice_data):
    cases = cand.full_cases(slice_data, "test")[:5]
    rows = cand.uniform_candidates(slice_data, cases, 9, seed=0)
    for row, case in zip(rows, cases):
        assert row.target == case.target and len(row.candidates) == 10 and len(set(row.candidates)) == 10
        seen = {x.item_id for x in slice_data.sequences[case.user_id]}
        assert not (set(row.candidates) - {row.target}) & seen  # negatives never interacted with
    written = cand.write(tmp_path / "c.jsonl", {"dataset": "x"}, rows)
    back = cand.read(tmp_path / "c.jsonl", slice_data)
    assert back.cases == rows and back.digest == written.digest
    # Same seed, same sets: every method and every rerun sees the same candidates.
    assert cand.uniform_candidates(slice_data, cases, 9, seed=0) == rows

    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    bad = json.loads(lines[3])
    bad["candidates"] = [x for x in bad["candidates"] if x != bad["target"]]
    (tmp_path / "bad.jsonl").write_text("\n".join([*lines[:3], json.dumps(bad), *lines[4:]]) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:4: the target"):
        cand.read(tmp_path / "bad.jsonl")
    (tmp_path / "hdr.jsonl").write_text('{"format": "something else"}\n')
    with pytest.raises(DataError, match=r"hdr\.jsonl:1: not a candidate file"):
        cand.read(tmp_path / "hdr.jsonl")


def test_scenarios_use_only_templates_with_their_instantiation():
    assert [t.id for t in SCENARIOS["sequential"].templates()] == ["pref-06", "pref-07", "pref-08"]
    assert [t.id for t in SCENARIOS["product_search"].templates()] == ["int-07", "int-08", "int-09"]
    assert [t.id for t in SCENARIOS["personalized_search"].templates()] == ["comb-09", "comb-10", "comb-11"]
    for s in SCENARIOS.values():
        assert s.templates(), s.name


def test_whole_evaluation_on_a_tiny_slice(tmp_path, slice_data, capsys):
    cfg = EvalConfig(data=slice_data, out=tmp_path / "report", users=12, select_users=8, seed=0,
                     settings=("uniform-10", "hard-10"), scenarios=("sequential", "product_search"),
                     extra_scenarios=("sequential",), base="tiny-random", baselines=("popularity", "bi-encoder"),
                     resamples=200, progress=False, command="test")
    results = evaluate(cfg)
    out = tmp_path / "report"
    for name in ("results.json", "results.md", "scenarios.png", "hr_curves.png", "quality_vs_training.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))

    rows = {(r["setting"], r["scenario"], r["method"]): r for r in results["rows"]}
    methods = ["popularity", "minilm-bi-encoder", "tiny-random (untuned)"]
    for m in methods:
        assert ("uniform-10", "sequential", m) in rows and ("uniform-10", "product_search", m) in rows
        assert ("hard-10", "product_search", m) not in rows  # not an extra scenario
    assert ("hard-10", "sequential", "popularity") in rows and ("hard-10", "sequential", "minilm-bi-encoder") in rows
    assert ("hard-10", "sequential", "tiny-random (untuned)") not in rows  # the zero-shot row: the paper's protocol only
    seq = rows[("uniform-10", "sequential", "popularity")]
    assert seq["cases"] == 12 and seq["candidates"] == 10

    # Popularity recomputed by hand from the candidate file: counts over each user's
    # sequence without its last two items, ties against the positive.
    counts = Counter(x.item_id for s in slice_data.sequences.values() for x in s[:-2])
    test_file = cand.read(out / "candidates" / "test-uniform-10.jsonl", slice_data)
    ranks = []
    for c in test_file.cases:
        p = counts[c.target]
        ranks.append(sum(1 for x in c.candidates if x != c.target and counts[x] >= p))
    assert seq["metrics"] == pytest.approx(metrics_from_ranks(ranks))

    # Templates are chosen on a seeded 8 of the 12 users' validation cases.
    valid_file = cand.read(out / "candidates" / "valid-uniform-10.jsonl", slice_data)
    assert len(valid_file.cases) == 8 and {c.user_id for c in valid_file.cases} <= {c.user_id for c in test_file.cases}
    assert "second-to-last item of a seeded 8 of these users" in (out / "results.md").read_text()

    # The instruction model's template was chosen on validation among the scenario's three.
    spread = [r for r in results["template_spread"] if r["method"] == "tiny-random (untuned)" and r["scenario"] == "sequential"]
    assert sorted(r["template"] for r in spread) == ["pref-06", "pref-07", "pref-08"]
    chosen = [r for r in spread if r["selected"]]
    assert len(chosen) == 1 and chosen[0]["template"] == rows[("uniform-10", "sequential", "tiny-random (untuned)")]["template"]
    best = max(r["metrics"]["hr@1"] for r in spread)
    assert chosen[0]["metrics"]["hr@1"] == best

    # Product search: only cases whose target has a platform or category get a query.
    ps = rows[("uniform-10", "product_search", "popularity")]
    assert 0 < ps["cases"] <= 12 and ps["cases"] + ps["skipped"] == 12

    # Hard negatives come from the bi-encoder's top items for the user's history.
    hard = cand.read(out / "candidates" / "test-hard-10.jsonl", slice_data)
    assert [c.target for c in hard.cases] == [c.target for c in test_file.cases]

    # A rerun computes nothing again: every unit is read back from OUT/units.
    units = sorted(p.name for p in (out / "units").iterdir())
    import instructrec.training.evaluate.methods as methods_mod

    def boom(*a, **k):
        raise AssertionError("a unit was recomputed")

    original = methods_mod.timed_score
    try:
        import instructrec.training.evaluate.run as run_mod

        run_mod.timed_score = boom
        again = evaluate(cfg)
    finally:
        run_mod.timed_score = original
    assert sorted(p.name for p in (out / "units").iterdir()) == units
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in results["rows"]]
    assert results["units"]["reused"] == 0
    assert again["units"]["reused"] == again["units"]["total"] == len(units)
    assert f"reused {len(units)} of its {len(units)} scoring units" in (out / "results.md").read_text()

    # The diagnosis reads the same validation file: with alpha 0 it reproduces the unit's metrics.
    from instructrec.training.evaluate import diagnose

    capsys.readouterr()
    assert diagnose.main(["--model", "tiny-random", "--report", str(out), "--data", "games-sample",
                          "--template", "pref-06", "--alphas", "0,1"]) == 0
    diag = json.loads(capsys.readouterr().out)
    unit = next(r for r in spread if r["template"] == "pref-06")
    assert diag["cases"] == unit["cases"] == 8
    assert diag["prior"][0]["hr@1"] == round(unit["metrics"]["hr@1"], 4)
    assert diag["prior"][0]["ndcg@5"] == round(unit["metrics"]["ndcg@5"], 4)
    assert -1.0 <= diag["encoder_cosine"] <= 1.0

    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- eval:Games:start -->\nold\n<!-- eval:Games:end -->\ntail\n")
    update_readme(readme, results, "artifacts/eval")
    text = readme.read_text()
    assert "old" not in text and "| popularity |" in text and text.endswith("tail\n")


def test_evaluate_cli_names_a_bad_dataset(tmp_path, capsys):
    from instructrec.cli import main

    assert main(["evaluate", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "instructrec evaluate:" in err and "nope" in err and "Traceback" not in err


def test_recbole_epochs_one_budget_or_per_model(tmp_path, capsys):
    from instructrec.cli import main
    from instructrec.training.evaluate.run import recbole_epochs

    assert recbole_epochs(EvalConfig(data="x", out=tmp_path, recbole_epochs=4), "BERT4Rec") == 4
    cfg = EvalConfig(data="x", out=tmp_path, recbole_epochs={"sasrec": 3, "bert4rec": 1})
    assert (recbole_epochs(cfg, "SASRec"), recbole_epochs(cfg, "BERT4Rec")) == (3, 1)
    with pytest.raises(ValueError, match="no budget for BERT4Rec"):
        recbole_epochs(EvalConfig(data="x", out=tmp_path, recbole_epochs={"sasrec": 3}), "BERT4Rec")
    for bad, message in (("gru4rec=2", "unknown RecBole model 'gru4rec'"), ("0", "at least 1"), ("sasrec=x", "invalid")):
        with pytest.raises(SystemExit):
            main(["evaluate", "--out", str(tmp_path / "o"), "--recbole-epochs", bad])
        assert message in capsys.readouterr().err
