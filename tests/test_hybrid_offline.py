"""Hybrid scoring offline: `instructrec behaviour build`, `instructrec gate fit` and the
evaluation's behaviour and hybrid rows, on a slice of the Games sample with a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from instructrec.checkpoint import write_meta
from instructrec.cli import main
from instructrec.hybrid.behaviour import load_behaviour_index
from instructrec.hybrid.gate import FEATURES, SIGNALS, load_gate
from instructrec.templates import TEMPLATE_VERSION
from instructrec.training.data.load import load_dataset, sample_path
from instructrec.training.data.make_sample import make_sample
from instructrec.training.evaluate import candidates as cand
from instructrec.training.evaluate.run import EvalConfig, evaluate
from instructrec.training.metrics import rank_of


def tiny_model(path, seed: int):
    """A tiny prefix-LM saved as `instructrec train` saves a checkpoint."""
    from instructrec.modeling import build_tiny_prefix_lm

    model, tok = build_tiny_prefix_lm(seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    write_meta(path, {"template_version": TEMPLATE_VERSION,
                      "preset": {"name": "smoke", "max_history": 5, "max_source_tokens": 96, "max_target_tokens": 16}})
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"), seed=5)


@pytest.fixture(scope="module")
def games_slice(tmp_path_factory):
    """500 users of the Games sample as a dataset directory (3,161 of its 9,511 items): a gate fit
    that draws retrieved negatives encodes every title of the catalogue, about 50 s for the
    whole sample on one thread. (On this slice's sparse neighbours alone the held-out users'
    retrieval never finds a target; the sequential test's SASRec, trained on the whole sample,
    finds some.)"""
    out = tmp_path_factory.mktemp("games-slice")
    make_sample(sample_path("games"), out, users=500, seed=0)
    return out


def test_behaviour_build_cli_leaves_out_the_holdout(tmp_path, capsys):
    out = tmp_path / "b.npz"
    assert main(["behaviour", "build", "--data", "games-sample", "--out", str(out), "--top-n", "50"]) == 0
    assert "neighbour pairs" in capsys.readouterr().out
    index = load_behaviour_index(out)
    data = load_dataset("games-sample")
    assert len(index) == len(data.items) and index.header["top_n"] == 50
    # popularity counts every sequence without its last two items: no validation or test answer
    counts = np.zeros(len(index), dtype=int)
    for seq in data.sequences.values():
        for x in seq[:-2]:
            counts[index.position[x.item_id]] += 1
    assert index.popularity.tolist() == counts.tolist()
    assert main(["behaviour", "build", "--data", "games-sample", "--out", str(out), "--holdout", "-1"]) == 2
    assert "--holdout must be 0 or more" in capsys.readouterr().err
    assert main(["behaviour", "show", str(tmp_path / "none.npz")]) == 2
    assert "none.npz: no such behaviour index" in capsys.readouterr().err


def test_gate_fit_then_the_hybrid_rows_of_an_evaluation(tmp_path, model_dir, games_slice, capsys):
    assert main(["gate", "fit", "--model", str(model_dir), "--data", str(games_slice), "--users", "40",
                 "--scenarios", "sequential,vague_intention,product_search", "--work", str(tmp_path / "work"), "--folds", "2",
                 "--hard-report", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| sequential |" in out and "| vague_intention |" in out
    # the product searches again without the history's signals, as a request without history: reported only
    assert out.count("| product_search_anonymous |") == 2  # held out, and every user out of fold
    # every user's cases ranked out of fold, and their hard-10 sequential cases, reported only
    assert "ranked by the gate of the other 1 folds" in out and "| hard-10:sequential | 40 |" in out
    gate = load_gate(model_dir / "gate.json")
    report = gate.info["report"]
    assert gate.info["examples"] > 0 and gate.info["users_held_out"] == 8 and gate.temperature > 0
    # the uniform cases of both scenarios, their retrieved-10 cases where retrieval found the
    # target and their alike-10 cases where the target is among the need's 50 nearest titles
    assert {"sequential", "vague_intention", "product_search", "product_search_anonymous", "all"} <= set(report["held_out"])
    assert report["cross_validated"]["sequential"]["cases"] == 40
    cv = report["cross_validated"]
    assert cv["product_search_anonymous"]["cases"] == cv["product_search"]["cases"] > 0
    assert cv["product_search_anonymous"]["lm_hr@1"] == cv["product_search"]["lm_hr@1"]
    assert "hard-10:sequential" not in report["fitted"] and "product_search_anonymous" not in report["fitted"]
    pooled = set(report["fitted"]) - {"sequential", "vague_intention", "product_search", "all"}
    assert {name.split(":")[0] for name in pooled} == {"retrieved-10", "alike-10"}, pooled
    assert 0 <= report["held_out"]["all"]["ece"] <= 1
    # hard-10 cases as calibration: the same weights (the LM's scores kept in the work folder),
    # a temperature per request fitted with them, their held-out users' rows reported apart
    assert main(["gate", "fit", "--model", str(model_dir), "--data", str(games_slice), "--users", "40",
                 "--scenarios", "sequential,vague_intention,product_search", "--work", str(tmp_path / "work"), "--calibrate-hard",
                 "--out", str(tmp_path / "calibrated.json"), "--no-progress"]) == 0
    capsys.readouterr()
    calibrated = load_gate(tmp_path / "calibrated.json")
    assert np.array_equal(calibrated.weights, gate.weights) and calibrated.info["calibration_examples"] > 0
    assert calibrated.temperature_weights is not None and "hard-10:sequential" in calibrated.info["report"]["held_out"]
    assert calibrated.info["report"]["held_out"]["all"]["cases"] == report["held_out"]["all"]["cases"]

    data = load_dataset("games-sample").sample_users(60, seed=3)
    cfg = EvalConfig(data=data, out=tmp_path / "eval", users=12, select_users=6, seed=0, settings=("uniform-10",),
                     scenarios=("sequential", "personalized_search", "vague_intention", "product_search",
                                "product_search_anonymous"),
                     base=None, models=(f"tiny={model_dir}",), baselines=("behaviour",), hybrid=True, resamples=50,
                     progress=False, command="test")
    results = evaluate(cfg)
    rows = {(r["scenario"], r["method"]): r for r in results["rows"]}
    assert {m for _, m in rows} == {"behaviour (item-to-item counts)", "tiny", "tiny + hybrid"}
    # an anonymous request has no history: no row for a signal that reads only the history's ids
    assert ("product_search", "behaviour (item-to-item counts)") in rows
    assert {m for s, m in rows if s == "product_search_anonymous"} == {"tiny", "tiny + hybrid"}
    hybrid_row = rows[("sequential", "tiny + hybrid")]
    assert 0 <= hybrid_row["ece"] <= 1 and hybrid_row["reliability"]
    assert "Calibration of the hybrid" in (tmp_path / "eval" / "results.md").read_text()
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 0

    # The hybrid row recomputed by hand from the LM's scores with the hybrid's template (chosen on
    # validation like every instruction row's): z(lm) + w . z(signals), times the request's temperature
    test_file = cand.read(tmp_path / "eval" / "candidates" / "test-uniform-10.jsonl", data)
    units = [json.loads(p.read_text())["unit"] for p in (tmp_path / "eval" / "units").iterdir()]
    hy_unit = next(u for u in units if u["method"] == "tiny + hybrid" and u["scenario"] == "sequential"
                   and u["split"] == "test")
    from instructrec.aspects import UserNeed
    from instructrec.hybrid.semantic import SemanticEncoder
    from instructrec.training.evaluate.methods import InstructionModel
    from instructrec.training.hybrid.behaviour_cli import build_for

    index = build_for(data)
    enc = SemanticEncoder()
    by_user = {c.user_id: c for c in test_file.cases}
    cases = [by_user[u] for u in hy_unit["user_ids"]]
    needs = [UserNeed(history=tuple(data.title(i) for i in c.history[-5:])) for c in cases]
    lm_scores = InstructionModel(data, model_dir).score(cases, needs, hy_unit["template"], str(test_file.path))
    for case, need, lm, fused in zip(cases, needs, lm_scores, hy_unit["scores"]):
        beh = index.features(list(case.history), list(case.candidates))
        sem = enc.similarities(need, [data.title(i) for i in case.candidates])
        want = gate.fuse(lm, need, behaviour=beh.score, semantic=sem, known=beh.known)
        assert np.allclose(fused, want.temperature * want.scores, atol=1e-6)  # the fused order, the relevance's scale
    assert hybrid_row["metrics"]["hr@1"] == pytest.approx(
        np.mean([rank_of(s, c.positive) == 0 for c, s in zip(cases, hy_unit["scores"])]))

    # One query signed in and anonymous: the LM scores it the same; the anonymous hybrid fuses the
    # LM with the semantic signal alone (as the service does a request without history), while
    # the signed-in one reads the history's behaviour too
    from instructrec.text import normalise_need
    from instructrec.training.annotate.pipeline import load_annotations
    from instructrec.training.evaluate.scenarios import SCENARIOS

    def unit(method, scenario):
        return next(u for u in units if u["method"] == method and u["scenario"] == scenario and u["split"] == "test")

    lm_signed, lm_anonymous = unit("tiny", "product_search"), unit("tiny", "product_search_anonymous")
    assert lm_signed["template"] == lm_anonymous["template"] and lm_signed["scores"] == lm_anonymous["scores"]
    signed, anonymous = unit("tiny + hybrid", "product_search"), unit("tiny + hybrid", "product_search_anonymous")
    assert signed["user_ids"] == anonymous["user_ids"] and anonymous["user_ids"]
    annotations = load_annotations(tmp_path / "eval" / "annotations.jsonl")
    queried = [by_user[u] for u in anonymous["user_ids"]]
    needs = [SCENARIOS["product_search_anonymous"].need(data, c.user_id, c.history, c.target, annotations)
             for c in queried]
    tiny = InstructionModel(data, model_dir)

    def by_hand(lm, need, case, signed_in=True):
        """The fused scores of one case, from its LM scores and the signals its need and ids give."""
        need = normalise_need(need)
        sem = enc.similarities(need, [data.title(i) for i in case.candidates])
        if not signed_in:
            want = gate.fuse(lm, need, semantic=sem)
            return want.temperature * want.scores
        beh = index.features(list(case.history), list(case.candidates))
        want = gate.fuse(lm, need, behaviour=beh.score, semantic=sem, known=beh.known)
        return want.temperature * want.scores

    lm_anon = tiny.score(queried, needs, anonymous["template"], str(test_file.path))
    lm_sign = tiny.score(queried, needs, signed["template"], str(test_file.path))
    for case, need, la, ls, fused, fused_signed in zip(queried, needs, lm_anon, lm_sign, anonymous["scores"],
                                                       signed["scores"]):
        assert np.allclose(fused, by_hand(la, need, case, signed_in=False), atol=1e-6)
        assert np.allclose(fused_signed, by_hand(ls, need, case), atol=1e-6)
    assert any(index.features(list(c.history), list(c.candidates)).score is not None for c in queried)

    # Personalized search and vague intention share their templates (comb-*) with other needs:
    # each hybrid row fuses the LM's scores of its own needs, whichever scenario the LM scored last
    for name in ("personalized_search", "vague_intention"):
        fused_unit = unit("tiny + hybrid", name)
        asked = [by_user[u] for u in fused_unit["user_ids"]]
        needs = [SCENARIOS[name].need(data, c.user_id, c.history, c.target, annotations, 5) for c in asked]
        lm_scores = tiny.score(asked, needs, fused_unit["template"], str(test_file.path))
        for case, need, lm, fused in zip(asked, needs, lm_scores, fused_unit["scores"]):
            assert np.allclose(fused, by_hand(lm, need, case), atol=1e-6), name


def test_alike_cases_draw_every_candidate_from_the_needs_nearest_titles(tmp_path, model_dir, games_slice, capsys):
    """The gate's alike-10 cases: the true item and 9 negatives, all among the need's nearest
    titles by the bi-encoder (the history left out), and only cases whose true item is one of
    them; a bad --alike-negatives is refused before anything runs."""
    from instructrec.hybrid import Hybrid
    from instructrec.hybrid.semantic import SemanticEncoder
    from instructrec.text import normalise_need
    from instructrec.training.evaluate.methods import InstructionModel
    from instructrec.training.evaluate.scenarios import get_scenarios
    from instructrec.training.hybrid.behaviour_cli import build_for
    from instructrec.training.hybrid.fit import CatalogueRetrieval, alike_examples

    data = load_dataset(str(games_slice))
    hybrid = Hybrid(gate=None, behaviour=build_for(data), semantic=SemanticEncoder())
    lm = InstructionModel(data, model_dir, device="cpu", dtype="float32")
    retrieval = CatalogueRetrieval.of(data, hybrid, tmp_path)
    cases = cand.pick_users(cand.full_cases(data, "valid"), 120, 7)
    [scenario] = get_scenarios("sequential")
    got = alike_examples(data, lm, hybrid, cases, {}, [scenario], retrieval=retrieval, negatives=9, pool=50, work=tmp_path)
    by_user = {c.user_id: c for c in cases}
    kept = 0
    for case in cases:
        need = scenario.need(data, case.user_id, case.history, case.target, {}, lm.max_history)
        nearest = {retrieval.items[i].id for i in retrieval.nearest(case, need, 50)}
        kept += case.target in nearest
        assert not nearest & set(case.history)
    assert 0 < len(got) == kept < len(cases)
    for row in got:
        case = by_user[row.user_id]
        need = scenario.need(data, case.user_id, case.history, case.target, {}, lm.max_history)
        positions = retrieval.nearest(case, need, 50)
        farthest = float(retrieval.retriever.title_vectors[positions[-1]] @ hybrid.semantic.query(normalise_need(need)))
        assert row.scenario == "alike-10:sequential" and len(row.example.lm) == 10
        # every candidate at least as close to the need as the 50th nearest title
        assert row.example.semantic.min() >= farthest - 1e-4
    assert main(["gate", "fit", "--model", str(model_dir), "--alike-negatives", "9", "--alike-pool", "9"]) == 2
    assert "--alike-negatives must be 0 or more and below --alike-pool" in capsys.readouterr().err


def test_gate_refit_reads_the_lm_scores_kept_in_work(tmp_path, model_dir):
    """The LM's scores are kept in --work: a refit asks the model nothing (edited kept scores
    change its LM row), and a different model does not read them."""
    work = tmp_path / "work"
    args = ["gate", "fit", "--model", str(model_dir), "--data", "games-sample", "--users", "20",
            "--scenarios", "sequential", "--retrieved-negatives", "0", "--alike-negatives", "0", "--work", str(work),
            "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a.json")]) == 0
    kept = sorted((work / "lm-scores").glob("*.json"))
    assert len(kept) == 1
    first = load_gate(tmp_path / "a.json").info["report"]["fitted"]["sequential"]["hr@1"]["lm"]
    scores = json.loads(kept[0].read_text())
    kept[0].write_text(json.dumps([[-v for v in row] for row in scores]))  # every ranking reversed
    assert main([*args, "--out", str(tmp_path / "b.json")]) == 0
    assert sorted((work / "lm-scores").glob("*.json")) == kept
    assert load_gate(tmp_path / "b.json").info["report"]["fitted"]["sequential"]["hr@1"]["lm"] != first
    other = tmp_path / "other"
    tiny_model(other, seed=6)
    args[args.index(str(model_dir))] = str(other)
    assert main([*args, "--out", str(tmp_path / "c.json")]) == 0
    assert len(list((work / "lm-scores").glob("*.json"))) == 2


def test_evaluation_without_a_gate_says_how_to_fit_one(tmp_path, capsys):
    from instructrec.modeling import build_tiny_prefix_lm

    path = tmp_path / "m"
    model, tok = build_tiny_prefix_lm(seed=1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    write_meta(path, {"template_version": TEMPLATE_VERSION, "preset": {"name": "smoke", "max_source_tokens": 96,
                                                                        "max_target_tokens": 16}})
    code = main(["evaluate", "--data", "games-sample", "--users", "5", "--select-users", "3", "--settings", "uniform-10",
                 "--scenarios", "sequential", "--base", "none", "--baselines", "", "--model", str(path), "--hybrid",
                 "--out", str(tmp_path / "eval"), "--no-progress"])
    assert code == 2
    assert f"instructrec gate fit --model {path}" in capsys.readouterr().err


def test_sequential_train_resumes_and_feeds_the_gate_and_the_evaluation(tmp_path, model_dir, games_slice, capsys):
    out = tmp_path / "seq"
    common = ["sequential", "train", "--data", "games-sample", "--out", str(out), "--hidden", "16", "--valid-users", "30",
              "--batch-size", "64", "--no-progress"]
    assert main([*common, "--epochs", "1"]) == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["epochs_run"] == 1 and 0 <= first["best"]["hr@1"] <= 1
    assert main([*common, "--epochs", "2"]) == 0  # continues from the checkpoint: epoch 1 is not redone
    second = json.loads((out / "summary.json").read_text())
    assert second["epochs_run"] == 2 and second["curve"][0] == first["curve"][0]
    assert main([*common, "--epochs", "0"]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err

    gate_path = tmp_path / "gate.json"
    # fitted on the slice (its catalogue's title vectors take a third of the whole sample's time): the
    # SASRec of the whole sample retrieves some of its held-out users' targets
    assert main(["gate", "fit", "--model", str(model_dir), "--data", str(games_slice), "--users", "100",
                 "--scenarios", "sequential", "--sequential", str(out / "model"), "--out", str(gate_path),
                 "--retrieved-users", "100", "--per-source", "20", "--work", str(tmp_path / "work"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| sequential |" in printed and "| retrieved |" in printed
    gate = load_gate(gate_path)
    assert gate.info["sequential"] and "sequential" in gate.info["report"]["held_out"]["all"]["hr@1"]
    fitted = gate.info["report"]["fitted"]
    assert fitted["retrieved"]["cases"] > 0 and list((tmp_path / "work").glob("title-vectors-*.npy"))

    from instructrec.hybrid.sequential import load_sequential

    data = load_dataset("games-sample").sample_users(40, seed=3)
    cfg = EvalConfig(data=data, out=tmp_path / "eval", users=10, select_users=5, seed=0, settings=("uniform-10",),
                     scenarios=("sequential",), base=None, baselines=(), sequential=str(out / "model"),
                     resamples=50, progress=False, command="test")
    results = evaluate(cfg)
    row = next(r for r in results["rows"] if r["method"] == "SASRec (plain torch)")
    scorer = load_sequential(out / "model")
    test_file = cand.read(tmp_path / "eval" / "candidates" / "test-uniform-10.jsonl", data)
    ranks = [rank_of(list(scorer.scores(list(c.history), list(c.candidates))), c.positive) for c in test_file.cases]
    assert row["metrics"]["hr@1"] == pytest.approx(np.mean([r == 0 for r in ranks]))


def test_full_catalogue_hybrid_ranks_the_retrieved_union(tmp_path, model_dir):
    """The full setting's hybrid row: a target no signal proposes is a miss; otherwise its rank
    is its place among the fused scores of the union (recomputed here by hand)."""
    from instructrec.hybrid import Hybrid
    from instructrec.hybrid.gate import Gate
    from instructrec.hybrid.semantic import SemanticEncoder
    from instructrec.hybrid.sequential import SASRecConfig, new_scorer
    from instructrec.modeling import load_model
    from instructrec.ranker import Ranker
    from instructrec.training.evaluate.full_catalogue import HybridFull
    from instructrec.training.hybrid.behaviour_cli import build_for

    data = load_dataset("games-sample").sample_users(40, seed=3)
    ids = sorted(data.items)
    seq = new_scorer(SASRecConfig(items=len(ids), hidden=16, heads=2, inner=32), ids)
    seq.save(tmp_path / "seq")
    rng = np.random.default_rng(0)
    gate_dir = tmp_path / "m"
    import shutil

    shutil.copytree(model_dir, gate_dir)
    Gate(rng.normal(size=(len(SIGNALS), len(FEATURES)))).save(gate_dir / "gate.json")
    hybrid = Hybrid(load_gate(gate_dir / "gate.json"), build_for(data), SemanticEncoder(), seq)
    full = HybridFull(data, str(gate_dir), "tiny", hybrid, per_source=5, device="cpu", dtype="float32")
    cases = cand.pick_users(cand.full_cases(data, "test"), 8, 0)
    ranks = full.ranks(cases, progress=False)
    assert ranks.method == "tiny + hybrid" and len(ranks.ranks) == 8
    assert full.miss in ranks.ranks and any(r < full.miss for r in ranks.ranks)  # both branches below
    ranker = Ranker(load_model(str(gate_dir), device="cpu", dtype="float32"))
    from instructrec.aspects import UserNeed
    from instructrec.instruction import build as build_instruction

    for case, rank in zip(cases, ranks.ranks):
        need = UserNeed(history=tuple(data.title(i) for i in case.history[-5:]))
        allowed = np.array([i not in case.history for i in ids])
        got = full.retriever.retrieve(need, list(case.history), allowed=allowed, per_source=5)
        assert len(got.items) <= 15 and all(allowed[p] for p in got.items)
        pos = ids.index(case.target)
        if pos not in got.sources:
            assert rank == full.miss
            continue
        titles = [data.title(ids[p]) for p in got.items]
        lm = ranker.score(build_instruction(need, ranker.tokenizer, ranker.max_source_tokens).source, titles).scores
        fused = hybrid.fuse(lm, need, titles, [ids[p] for p in got.items], list(case.history)).scores
        assert rank == int((fused >= fused[got.items.index(pos)]).sum()) - 1


def test_cross_validated_report_ranks_each_user_by_the_other_folds_gate(capsys):
    """Every user's cases are ranked by a gate fitted without that user; report-only cases are
    ranked the same way but neither fitted on nor counted in "all". Here the behaviour signal
    points at the true item and the LM away from it: a gate fitted on the other folds learns
    that, so out of fold every case ranks first."""
    from instructrec.aspects import UserNeed
    from instructrec.hybrid.gate import Example
    from instructrec.training.hybrid.fit import Labelled, cross_validated

    rng = np.random.default_rng(0)

    def case(user: int, scenario: str) -> Labelled:
        positive = int(rng.integers(10))
        behaviour = rng.normal(size=10)
        behaviour[positive] += 10.0
        lm = rng.normal(size=10)
        lm[positive] -= 2.0
        return Labelled(scenario, f"u{user}", Example(lm, UserNeed(history=("a", "b")), behaviour, None, 1.0, positive))

    examples = [case(u, "sequential") for u in range(40)]
    held = [case(u, "hard-10:sequential") for u in range(40)]
    result = cross_validated(examples, 4, report_only=held)
    assert set(result) == {"sequential", "all", "hard-10:sequential"}
    assert result["all"]["cases"] == result["sequential"]["cases"] == 40 == result["hard-10:sequential"]["cases"]
    assert result["sequential"]["hr@1"] == 1.0 and result["hard-10:sequential"]["hr@1"] == 1.0
    assert 0 <= result["all"]["ece"] <= 1
    assert main(["gate", "fit", "--model", "none", "--folds", "1"]) == 2
    assert "--folds must be 0 or at least 2" in capsys.readouterr().err
    assert main(["gate", "fit", "--model", "none", "--hard-report"]) == 2
    assert "--hard-report needs it" in capsys.readouterr().err


def test_anonymous_copies_are_the_product_searches_without_the_historys_signals():
    """What a request without history gets, reported beside the signed-in product searches: the
    same LM scores and query, no behaviour or sequential signal, never fitted on. Here the
    behaviour signal finds the true item and the LM only leans to it, so the signed-in cases
    rank it first out of fold and their anonymous copies rank as the LM does."""
    from instructrec.aspects import Intention, UserNeed
    from instructrec.hybrid.gate import Example
    from instructrec.training.hybrid.fit import Labelled, anonymous_copies, cross_validated

    rng = np.random.default_rng(1)

    def case(user: int, scenario: str) -> Labelled:
        positive = int(rng.integers(10))
        behaviour, sequential, lm = rng.normal(size=10), rng.normal(size=10), rng.normal(size=10)
        behaviour[positive] += 10.0
        lm[positive] += 1.0
        need = (UserNeed(intention="for PC", intention_kind=Intention.SPECIFIC) if scenario == "product_search"
                else UserNeed(history=("a", "b")))
        return Labelled(scenario, f"u{user}", Example(lm, need, behaviour, None, 1.0, positive, sequential))

    examples = [case(u, "product_search") for u in range(40)] + [case(u, "sequential") for u in range(40)]
    anonymous = anonymous_copies(examples)
    assert len(anonymous) == 40 and {a.scenario for a in anonymous} == {"product_search_anonymous"}
    for a, e in zip(anonymous, examples):
        assert a.user_id == e.user_id and a.example.lm is e.example.lm and a.example.need is e.example.need
        assert a.example.behaviour is None and a.example.sequential is None and a.example.known == 0.0
        assert a.example.positive == e.example.positive
    assert anonymous_copies([*examples, *anonymous]) == []  # already fitted on: no second row of that name
    result = cross_validated(examples, 4, report_only=anonymous)
    signed, bare = result["product_search"], result["product_search_anonymous"]
    assert result["all"]["cases"] == 80 and bare["cases"] == signed["cases"] == 40
    lm_alone = np.mean([rank_of(list(e.example.lm), e.example.positive) == 0 for e in examples[:40]])
    assert signed["lm_hr@1"] == bare["lm_hr@1"] == pytest.approx(lm_alone) and lm_alone < 1.0
    assert signed["hr@1"] == 1.0 and bare["hr@1"] == pytest.approx(lm_alone)  # only the LM left: its order
