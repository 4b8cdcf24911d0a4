"""The RecBole baselines end to end: SASRec trained for real (2 epochs, 300 users of the
shipped Games sample, one thread) in RecBole's own environment, scoring candidate files
written here. Skipped only when that environment is not installed."""

from __future__ import annotations

import gzip
import json
import math
import random
import time
from pathlib import Path

import pytest

from instructrec.training.baselines.recbole import (
    INTER_HEADER,
    RecBoleError,
    RecBolePaused,
    recbole_python,
    run_recbole,
    write_inter,
)
from instructrec.training.data.load import load_dataset
from instructrec.training.data.types import DataError, Interaction, InteractionData, Item

UNKNOWN_ITEM = "no-such-item"


def _env_or_skip():
    try:
        return recbole_python()
    except RecBoleError:
        pytest.skip("RecBole environment not installed: run `bash scripts/install_recbole.sh`")


def _candidates(data: InteractionData, user: str, target: str, rng: random.Random) -> list[str]:
    """The target and 9 items the user never interacted with, shuffled."""
    seen = {x.item_id for x in data.sequences[user]}
    pool = sorted(set(data.items) - seen)
    cands = [target, *rng.sample(pool, 9)]
    rng.shuffle(cands)
    return cands


def _write(path, cases, **header):
    with path.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"format": "instructrec-candidates", "version": 1, **header}) + "\n")
        for c in cases:
            f.write(json.dumps(c) + "\n")
    return path


@pytest.fixture(scope="module")
def games_300():
    return load_dataset("games-sample").sample_users(300, seed=0)


@pytest.fixture(scope="module")
def sasrec_run(games_300, tmp_path_factory):
    _env_or_skip()
    tmp = tmp_path_factory.mktemp("recbole")
    data = games_300
    # the test split: each user's last interaction, its full history, 9 never-seen negatives
    rng = random.Random(0)
    cases = [
        {"user_id": c.user_id, "history": list(c.history), "target": c.target, "candidates": _candidates(data, c.user_id, c.target, rng)}
        for c in data.split(max_history=10**6).test
    ]
    base = _write(tmp / "base.jsonl", cases, dataset="games-300", split="test")
    rev = _write(tmp / "reversed.jsonl", [{**c, "candidates": c["candidates"][::-1]} for c in cases])
    # unknown history items are dropped, an unknown candidate scores -inf
    pert = _write(
        tmp / "perturbed.jsonl",
        [
            {
                **c,
                "history": [UNKNOWN_ITEM + "-h1", *c["history"][:1], UNKNOWN_ITEM + "-h2", *c["history"][1:]],
                "candidates": [*c["candidates"], UNKNOWN_ITEM],
            }
            for c in cases
        ],
    )
    t0 = time.perf_counter()
    result = run_recbole(data, "SASRec", [base, rev, pert], tmp / "out", epochs=2, patience=2, seed=0, threads=1, max_seq_len=20,
                         full_rank=True)
    return {"cases": cases, "files": (base, rev, pert), "result": result, "out": tmp / "out", "seconds": time.perf_counter() - t0}


def test_scores_one_finite_score_per_candidate_in_order(sasrec_run):
    cases, (base, rev, pert) = sasrec_run["cases"], sasrec_run["files"]
    scores = sasrec_run["result"]["scores"]
    assert set(scores) == {str(base), str(rev), str(pert)}
    b, r, p = scores[str(base)], scores[str(rev)], scores[str(pert)]
    assert set(b) == {c["user_id"] for c in cases}
    distinct = 0
    for c in cases:
        s = b[c["user_id"]]
        assert len(s) == len(c["candidates"]) == 10
        assert all(math.isfinite(x) for x in s)
        distinct += len(set(s)) > 1
        # candidate order is preserved: the reversed file gets the reversed scores
        assert r[c["user_id"]] == pytest.approx(s[::-1], abs=1e-5)
        # dropped unknown history items change nothing; the unknown candidate gets -inf
        assert p[c["user_id"]][:-1] == pytest.approx(s, abs=1e-5)
        assert p[c["user_id"]][-1] == -math.inf
    assert distinct == len(cases)  # a trained model, not a constant

    # the files on disk: one line per case, in the file's order
    lines = [json.loads(x) for x in (sasrec_run["out"] / "base.scores.jsonl").read_text().splitlines()]
    assert [x["user_id"] for x in lines] == [c["user_id"] for c in cases]


def test_full_ranks_agree_with_the_candidate_scores(sasrec_run, games_300):
    """The target's rank among every item but the history is at least its rank among its 9
    sampled negatives (a subset of those items), and below the item count."""
    from instructrec.training.baselines.recbole import read_full_ranks

    cases, (base, _, pert) = sasrec_run["cases"], sasrec_run["files"]
    out = sasrec_run["out"]
    ranks = read_full_ranks(out / "base.scores.jsonl")
    scores = sasrec_run["result"]["scores"][str(base)]
    n_items = len({x.item_id for s in games_300.sequences.values() for x in s})
    beaten = 0
    for c in cases:
        s = scores[c["user_id"]]
        target = s[c["candidates"].index(c["target"])]
        among_ten = sum(1 for i, x in enumerate(s) if c["candidates"][i] != c["target"] and x >= target)
        assert among_ten <= ranks[c["user_id"]] < n_items - len(set(c["history"])) or c["target"] in c["history"]
        beaten += ranks[c["user_id"]] > among_ten
    assert beaten > len(cases) // 2  # the full catalogue holds far more competitors than 9 negatives
    assert read_full_ranks(out / "perturbed.scores.jsonl") == ranks  # unknown history items change nothing


def test_summary(sasrec_run, games_300):
    summary = sasrec_run["result"]["summary"]
    n = len(sasrec_run["cases"])
    assert summary["model"] == "SASRec"
    assert summary["recbole_version"] == "1.2.1"
    assert summary["epochs_run"] == 2 and 1 <= summary["best_epoch"] <= 2
    assert summary["converged"] is False  # 2 epochs cannot outlast a patience of 2: the budget ended it
    assert [e["epoch"] for e in summary["epoch_log"]] == [1, 2] and all(e["seconds"] > 0 for e in summary["epoch_log"])
    assert summary["train_seconds"] > 0 and summary["score_seconds"] >= 0
    assert summary["n_users"] == 300
    assert summary["n_items"] == len({x.item_id for s in games_300.sequences.values() for x in s})
    assert summary["n_interactions"] == sum(len(s) for s in games_300.sequences.values())
    assert summary["config"]["valid_metric"] == "NDCG@10" and summary["config"]["MAX_ITEM_LIST_LENGTH"] == 20
    assert summary["config"]["eval_args"]["split"] == {"LS": "valid_and_test"} and summary["config"]["eval_args"]["order"] == "TO"
    assert set(summary["recbole_test"]) >= {"hit@10", "ndcg@10"}
    counts = {name.rsplit("/", 1)[-1]: v for name, v in summary["files"].items()}
    assert counts["base.jsonl"]["cases"] == n and counts["base.jsonl"]["unknown_candidates"] == 0
    assert counts["perturbed.jsonl"]["unknown_candidates"] == n
    assert counts["perturbed.jsonl"]["unknown_history_items"] == 2 * n
    # RecBole's own files stay in the output directory
    assert (sasrec_run["out"] / "recbole" / "saved").is_dir()
    assert sasrec_run["seconds"] < 120


def test_a_stopped_run_resumes_to_the_same_model(sasrec_run, games_300, tmp_path):
    """Stopped after an epoch and resumed, the run trains the batches an unbroken run trains,
    in the same order, to the same weights: every score equals the unbroken fixture run's. A
    finished run asked to resume, here with a smaller budget, only scores again."""
    files, out = list(sasrec_run["files"]), tmp_path / "out"
    kw = dict(epochs=2, patience=2, seed=0, threads=1, max_seq_len=20, full_rank=True)
    with pytest.raises(RecBolePaused, match="stopped after 1 epoch"):
        run_recbole(games_300, "SASRec", files, out, stop_after=1, **kw)
    assert not (out / "summary.json").exists() and (out / "recbole" / "resume.pth").is_file()
    resumed = run_recbole(games_300, "SASRec", files, out, resume=True, **kw)
    assert resumed["scores"] == sasrec_run["result"]["scores"]
    summary = resumed["summary"]
    assert summary["resumed_after_epochs"] == [1] and summary["epochs_run"] == 2
    assert [e["epoch"] for e in summary["epoch_log"]] == [1, 2]
    assert [e["train_loss"] for e in summary["epoch_log"]] == [e["train_loss"] for e in sasrec_run["result"]["summary"]["epoch_log"]]
    assert summary["best_epoch"] == sasrec_run["result"]["summary"]["best_epoch"]

    # finished, and asked again with a smaller budget: it trains nothing and scores its best epoch
    # (another seed or other data would start over: test_a_saved_state_is_resumed_only_by_the_same_run)
    again = run_recbole(games_300, "SASRec", files, out, resume=True, **{**kw, "epochs": 1, "patience": 0})
    assert again["scores"] == resumed["scores"]
    assert again["summary"]["epoch_log"] == summary["epoch_log"]
    assert again["summary"]["resumed_after_epochs"] == [1, 2]  # nothing trained: it resumed after the last epoch


def test_bad_candidates_file_names_file_and_line(tmp_path, games_300):
    _env_or_skip()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"format": "instructrec-candidates", "version": 1}\n'
        '{"user_id": "u1", "history": [], "target": "1", "candidates": ["1", "2"]}\n'
        '{"user_id": "u2", "history": [], "candidates": ["1", "2"]}\n'
    )
    with pytest.raises(RecBoleError) as e:
        run_recbole(games_300, "SASRec", [bad], tmp_path / "out", epochs=1, patience=1, seed=0)
    assert f"{bad}:3: missing field 'target'" in str(e.value)
    assert "Traceback" not in str(e.value)


def test_missing_environment_says_how_to_install(tmp_path):
    with pytest.raises(RecBoleError, match=r"RecBole environment not found at .*: run `bash scripts/install_recbole.sh`"):
        recbole_python(tmp_path / "nowhere")


def test_write_inter_timestamps_or_positions(tmp_path):
    items = {i: Item(i, i) for i in ("a", "b", "c")}
    timed = InteractionData("t", items, {"u2": [Interaction("a", 5.0), Interaction("b", 5.0)], "u1": [Interaction("c", 1.5)]})
    lines = write_inter(timed, tmp_path / "t.inter").read_text().splitlines()
    assert lines == [INTER_HEADER, "u1\tc\t1.5", "u2\ta\t5", "u2\tb\t5"]
    untimed = InteractionData("p", items, {"u1": [Interaction("a", 3.0), Interaction("b")]})
    lines = write_inter(untimed, tmp_path / "p.inter").read_text().splitlines()
    assert lines == [INTER_HEADER, "u1\ta\t0", "u1\tb\t1"]


def test_kept_result_ranks_as_the_run_and_refuses_other_candidates(tmp_path):
    """Scores kept at float32's shortest text order every candidate as the run's float32 scores
    did (ties stay ties, -inf stays); a result made for other candidates is a clear error."""
    import struct

    from instructrec.training.baselines.stored import load_result, save_result

    rng = random.Random(0)
    f32 = [struct.unpack("f", struct.pack("f", rng.uniform(-3, 3)))[0] for _ in range(400)]
    close = [f32[0], struct.unpack("f", struct.pack("f", f32[0] + 1e-6))[0], f32[0]]  # neighbours and a tie
    table = {f"u{i}": row for i, row in enumerate([f32[j:j + 10] for j in range(0, 400, 10)] + [close + [-math.inf]])}
    stamp = {"model": "SASRec", "epochs": 5, "candidate_files": ["abc"]}
    path = save_result(tmp_path / "kept" / "games-sasrec.json.gz", stamp, {"epochs_run": 5, "inter": "/local/path"},
                       {"abc": table}, "0123abcd")
    kept = load_result(path, stamp)
    assert kept["commit"] == "0123abcd" and kept["summary"] == {"epochs_run": 5}  # machine paths are not kept
    for user, row in table.items():
        back = kept["scores"]["abc"][user]
        order = sorted(range(len(row)), key=lambda i: (row[i], i))
        assert sorted(range(len(back)), key=lambda i: (back[i], i)) == order, user
        assert [struct.unpack("f", struct.pack("f", x))[0] for x in back] == row
    assert load_result(tmp_path / "nothing.json.gz", stamp) is None
    with pytest.raises(DataError, match=r"games-sasrec\.json\.gz: made for other settings \(differ: epochs\); holds no "
                                        r"scores for the candidate file\(s\) def \(it keeps abc; a hard-10 file"):
        load_result(path, {**stamp, "epochs": 6, "candidate_files": ["def"]})
    with pytest.raises(DataError, match=r"holds no scores for the candidate file\(s\) def .*uniform-10,uniform-100"):
        load_result(path, {**stamp, "candidate_files": ["abc", "def"]})
    wider = save_result(tmp_path / "wider.json.gz", {**stamp, "candidate_files": ["abc", "def"]}, {"epochs_run": 5},
                        {"abc": table, "def": {"u0": [1.0, 2.0]}}, None)
    assert load_result(wider, stamp)["scores"]["abc"] == kept["scores"]["abc"]  # a kept superset serves a subset
    (tmp_path / "bad.json.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"bad\.json\.gz: not a readable RecBole result"):
        load_result(tmp_path / "bad.json.gz", stamp)


def test_the_kept_games_sasrec_reads_as_the_readme_uses_it():
    """docs/baselines/Games-sasrec.json.gz (the converged SASRec the README's tables reuse) reads
    with this code: the path `--recbole-results docs/baselines` looks for, a run that stopped
    early after its best epoch, and one finite score per candidate for each of the three
    candidate files of the README's 300 users."""
    from instructrec.training.baselines.stored import load_result, result_path

    path = result_path(Path(__file__).parent.parent / "docs" / "baselines", "Games", "SASRec")
    assert path.name == "Games-sasrec.json.gz" and path.is_file()
    stamp = json.loads(gzip.decompress(path.read_bytes()))["stamp"]
    assert stamp["dataset"] == "Games" and stamp["epochs"] == 100 and stamp["patience"] == 5
    kept = load_result(path, stamp)
    summary = kept["summary"]
    assert summary["stopped_early"] and summary["best_epoch"] < summary["epochs_run"] <= summary["max_epochs"]
    assert len(summary["epoch_log"]) == summary["epochs_run"]
    assert sorted(kept["scores"]) == sorted(stamp["candidate_files"])
    sizes = sorted(len(next(iter(table.values()))) for table in kept["scores"].values())
    assert sizes == [10, 10, 100]  # uniform-10, hard-10, 1+99
    for table in kept["scores"].values():
        assert len(table) == 300 and all(math.isfinite(x) for row in table.values() for x in row)


def test_evaluate_keeps_the_recbole_result_and_reuses_it_without_training(tmp_path):
    """`evaluate --recbole-results DIR` trains once and keeps the result; a second evaluation
    (a fresh report folder, no RecBole environment at all) reads it and reports the same rows."""
    _env_or_skip()
    from instructrec.training.evaluate.run import EvalConfig, evaluate

    data = load_dataset("games-sample").sample_users(120, seed=1)
    kw = dict(data=data, users=20, select_users=10, seed=0, settings=("uniform-10",), scenarios=("sequential",),
              base=None, baselines=("sasrec",), recbole_epochs=1, recbole_patience=1, recbole_threads=1,
              recbole_results=tmp_path / "kept", resamples=50, progress=False, command="test")
    first = evaluate(EvalConfig(out=tmp_path / "a", **kw))
    kept = tmp_path / "kept" / f"{data.name}-sasrec.json.gz"
    assert kept.is_file()
    second = evaluate(EvalConfig(out=tmp_path / "b", recbole_env=str(tmp_path / "no-env"), **kw))
    rows = lambda r: [(x["scenario"], x["method"], x["metrics"]) for x in r["rows"]]  # noqa: E731
    assert rows(second) == rows(first) and [m for _, m, _ in rows(first)] == ["SASRec"]
    notes = {m["name"]: m["notes"] for m in second["methods"]}
    assert notes["SASRec"].endswith(": not converged (the epoch budget ended it before early stopping)"), notes
    # other candidates (more users): the kept result is refused, naming the file
    with pytest.raises(DataError, match=r"\.json\.gz: holds no scores for the candidate file\(s\) [0-9a-f]{16}"):
        evaluate(EvalConfig(out=tmp_path / "c", **{**kw, "users": 30}))


def test_a_saved_state_is_resumed_only_by_the_same_run(tmp_path, capsys):
    """The run's key (data and settings) must match; fields a key no longer holds (a run saved
    when the budget was part of it) do not count."""
    import torch

    from instructrec.training.baselines import recbole_runner as runner

    key = {"inter_sha256": "ab", "model": "SASRec", "seed": 0}
    (tmp_path / runner.RUN_KEY_FILE).write_text(json.dumps({**key, "epochs": 100, "patience": 5}))
    assert runner.load_resume_state(tmp_path, key, torch) is None  # no state saved yet
    torch.save({"epoch": 3}, tmp_path / runner.RESUME_FILE)
    assert runner.load_resume_state(tmp_path, key, torch) == {"epoch": 3}
    assert runner.load_resume_state(tmp_path, {**key, "seed": 1}, torch) is None
    assert "other data or settings: starting over" in capsys.readouterr().err
    (tmp_path / runner.RESUME_FILE).write_bytes(b"truncated")
    assert runner.load_resume_state(tmp_path, key, torch) is None
    assert "cannot read" in capsys.readouterr().err


def test_the_methods_table_says_whether_early_stopping_ended_the_run():
    from instructrec.training.evaluate.run import _convergence

    assert _convergence({"converged": True, "stopped_early": False}) == ": converged (early stopping)"
    assert _convergence({"converged": False, "stopped_early": False}).startswith(": not converged")
    # a summary written before the runner said so: stopping before the budget was early stopping
    assert _convergence({"stopped_early": True}) == ": converged (early stopping)"
    assert _convergence({"stopped_early": False}).startswith(": not converged")
    assert _convergence({}) == ""
