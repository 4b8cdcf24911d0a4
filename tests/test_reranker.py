"""The one-call API (:mod:`instructrec.reranker`): ``Reranker.load(...).rank(...)`` and
``.recommend(...)`` answer what ``instructrec rank --json`` and ``instructrec recommend --json``
answer for the same inputs, on real tiny models, a real gate and a real behaviour index."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from instructrec import Reranker, RerankerError
from instructrec.aspects import Intention, UserNeed
from instructrec.catalogue import CatalogueItem, build_catalogue
from instructrec.checkpoint import write_meta
from instructrec.cli import main
from instructrec.hybrid import load_hybrid
from instructrec.hybrid.behaviour import build_behaviour_index
from instructrec.hybrid.gate import FEATURES, SIGNALS, Gate, load_gate
from instructrec.modeling import build_tiny_prefix_lm, load_model
from instructrec.ranker import Ranker, rank_order
from instructrec.reranker import RerankerWarning, check_template, user_need
from instructrec.templates import TEMPLATE_VERSION
from tests.test_rank_cli_hybrid import CANDIDATES, HISTORY, ITEMS, SEQUENCES  # the same tiny world as the CLI's tests

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CPU = {"device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A gate and a behaviour index over ITEMS, and a tiny prefix-LM checkpoint directory with
    that gate beside it."""
    root = tmp_path_factory.mktemp("reranker")
    w = np.zeros((len(SIGNALS), len(FEATURES)))
    w[SIGNALS.index("behaviour"), FEATURES.index("bias")] = 1.5
    w[SIGNALS.index("behaviour"), FEATURES.index("known")] = 0.4
    w[SIGNALS.index("semantic"), FEATURES.index("bias")] = 0.7
    gate = Gate(w, temperature=1.1).save(root / "gate.json")
    index = build_behaviour_index(SEQUENCES, ITEMS, top_n=20).save(root / "behaviour.npz")
    model_dir = root / "model"
    model, tok = build_tiny_prefix_lm(seed=3)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    write_meta(model_dir, {"template_version": TEMPLATE_VERSION,
                           "preset": {"max_source_tokens": 96, "max_target_tokens": 16}})
    (model_dir / "gate.json").write_text(gate.read_text())
    return root, gate, index, model_dir


def _cli(capsys, argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _rank_argv(model: str, *extra: str, history=HISTORY, candidates=CANDIDATES) -> list[str]:
    argv = ["rank", "--model", model, "--device", "cpu", "--dtype", "float32", *extra]
    for h in history:
        argv += ["--history", h]
    for c in candidates:
        argv += ["--candidate", c]
    return argv


# -- import ------------------------------------------------------------------------------------


def test_import_instructrec_stays_light_and_exports_the_reranker():
    code = ("import sys, instructrec\n"
            "assert 'torch' not in sys.modules, 'import instructrec loaded torch'\n"
            "from instructrec import Reranker, RerankerError\n"
            "assert Reranker.__module__ == 'instructrec.reranker' and issubclass(RerankerError, ValueError)\n"
            "assert 'torch' not in sys.modules, 'the lazy export loaded torch'\n"
            "assert 'Reranker' in dir(instructrec)\n"
            "print(instructrec.__file__)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve() == ROOT / "instructrec" / "__init__.py"
    import instructrec

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        instructrec.Nope  # noqa: B018


# -- the need ----------------------------------------------------------------------------------


def test_the_need_reads_instruction_as_the_service_does():
    # free text alone is a vague intention (I1); beside an intention it is context
    assert user_need(["Halo", " ", "Doom "], instruction="something scary") == UserNeed(
        history=("Halo", "Doom"), intention="something scary", intention_kind=Intention.VAGUE)
    assert user_need(instruction="for my son", intention="a racing game", intention_kind="specific") == UserNeed(
        intention="a racing game", intention_kind=Intention.SPECIFIC, context="for my son")
    assert user_need([("g1", "Halo"), {"id": 7, "title": "Doom"}], preference="co-op") == UserNeed(
        history=("Halo", "Doom"), preference="co-op")
    assert user_need(intention="  ", instruction=" ") == UserNeed()
    with pytest.raises(RerankerError, match="intention_kind must be 'vague' or 'specific', not 'fuzzy'"):
        user_need(intention="x", intention_kind="fuzzy")
    with pytest.raises(RerankerError, match="history must be a list of titles"):
        user_need("Halo 3")
    with pytest.raises(RerankerError, match=r"history\[1\] must be a title"):
        user_need(["Halo", 3])


# -- rank equals the command line --------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-random", "tiny-random-prefixlm"])
def test_lm_only_rank_equals_the_cli(capsys, model):
    need = dict(preference="long campaigns", intention="a fast shooter", intention_kind="specific")
    cli = _cli(capsys, _rank_argv(model, "--preference", need["preference"], "--intention", need["intention"],
                                  "--top-n", "3"))
    reranker = Reranker.load(model, **CPU)
    assert reranker.hybrid is None  # a built-in has no directory, so no gate beside it
    got = reranker.rank(CANDIDATES, history=HISTORY, top_n=3, **need)
    assert got.to_dict() == cli
    assert len(got) == 3 and got.candidate_count == len(CANDIDATES) and got.fusion.mode == "lm-only"
    # the scores are the ranker's under the instruction shown
    lm = Ranker(load_model(model, **CPU)).score(got.instruction, CANDIDATES).scores
    assert [r.index for r in got] == rank_order(lm)[:3]
    assert [r.score for r in got] == pytest.approx([lm[r.index] for r in got], abs=1e-6)
    assert [r.title for r in got] == [CANDIDATES[r.index] for r in got]


@pytest.mark.parametrize("semantic", [False, True])
def test_fused_rank_equals_the_cli_and_the_cores_fusion(capsys, files, semantic):
    _, gate, index, _ = files
    extra = ["--intention", "a scary shooter", "--intention-kind", "vague", "--gate", str(gate), "--behaviour",
             str(index)] + ([] if semantic else ["--no-semantic"])
    cli = _cli(capsys, _rank_argv("tiny-random-prefixlm", *extra))
    reranker = Reranker.load("tiny-random-prefixlm", gate=gate, behaviour=index, semantic=semantic, **CPU)
    got = reranker.rank(CANDIDATES, history=HISTORY, intention="a scary shooter", intention_kind="vague")
    assert got.to_dict() == cli
    assert got.fusion.mode == "fused" and got.fusion.without_behaviour == [4]
    assert set(got.fusion.signals) == ({"lm", "behaviour", "semantic"} if semantic else {"lm", "behaviour"})
    # what the hybrid itself makes of the same LM scores
    hybrid = load_hybrid(gate, index, semantic=semantic)
    lm = reranker.ranker.score(got.instruction, CANDIDATES).scores
    need = UserNeed(history=tuple(HISTORY), intention="a scary shooter", intention_kind=Intention.VAGUE)
    fused = hybrid.fuse(lm, need, CANDIDATES, ["g2", "g3", "g4", "g5", None], ["g0", "g1"])
    assert [r.index for r in got] == rank_order(fused.scores.tolist())
    for r in got:
        assert r.score == pytest.approx(fused.scores[r.index], abs=1e-6)
        assert r.relevance == pytest.approx(fused.relevance[r.index], abs=1e-6)
        assert r.components["lm_loglik"] == pytest.approx(lm[r.index], abs=1e-6)
    # the same reranker, asked for the LM alone, ranks as a reranker without a gate
    alone = reranker.rank(CANDIDATES, history=HISTORY, intention="a scary shooter", intention_kind="vague",
                          fusion="lm-only")
    plain = Reranker.load("tiny-random-prefixlm", **CPU).rank(CANDIDATES, history=HISTORY,
                                                               intention="a scary shooter", intention_kind="vague")
    assert alone.ranked == plain.ranked and alone.fusion.mode == "lm-only" and alone.fusion.requested == "lm-only"
    assert [r.index for r in alone] == rank_order(lm)


def test_candidates_with_ids_are_matched_by_id_before_title(files):
    _, gate, index, _ = files
    reranker = Reranker.load("tiny-random-prefixlm", gate=gate, behaviour=index, semantic=False, **CPU)
    titles = ["Gears", "Dead Space", "Tetris"]  # "Gears" is no title of the index
    by_title = reranker.rank(titles, history=HISTORY)
    assert by_title.fusion.without_behaviour == [0]
    by_id = reranker.rank([("g2", "Gears"), {"title": "Dead Space"}, ("g4", "Tetris")],
                          history=[("g0", "Halo Three"), "Halo 2"])
    assert by_id.fusion.without_behaviour == []
    assert {r.index: r.id for r in by_id} == {0: "g2", 1: None, 2: "g4"}
    assert [r.to_dict().get("id") for r in by_id] == [r.id for r in by_id]


def test_top_n_keeps_the_best_and_counts_all(files):
    reranker = Reranker.load("tiny-random", **CPU)
    full = reranker.rank(CANDIDATES, history=HISTORY)
    top = reranker.rank(CANDIDATES, history=HISTORY, top_n=2)
    assert top.ranked == full.ranked[:2] and top.candidate_count == full.candidate_count == 5
    assert len(reranker.rank(CANDIDATES, history=HISTORY, top_n=50)) == 5
    with pytest.raises(RerankerError, match="top_n must be at least 1, not 0"):
        reranker.rank(CANDIDATES, history=HISTORY, top_n=0)


def test_templates_are_selected_or_named(capsys):
    reranker = Reranker.load("tiny-random", **CPU)
    need = dict(history=["Halo", "Doom", "Quake"], intention="a fast shooter")
    chosen = reranker.rank(CANDIDATES, **need)
    assert (chosen.template, chosen.instantiation) == ("comb-09", "<P1,I2,T3>")  # as `rank` chooses it
    assert "1. Halo; 2. Doom; 3. Quake" in chosen.instruction and "a fast shooter" in chosen.instruction
    named = reranker.rank(CANDIDATES, template="comb-11", **need)
    assert named.template == "comb-11" and named.instruction != chosen.instruction
    cli = _cli(capsys, _rank_argv("tiny-random", "--intention", "a fast shooter", "--template", "comb-11",
                                  history=need["history"]))
    assert named.to_dict() == cli
    # free text alone is a vague intention; beside an intention it is added as context
    vague = reranker.rank(CANDIDATES, history=["Halo"], instruction="something to play with my son")
    assert vague.instantiation == "<P1,I1,T3>" and "something to play with my son" in vague.instruction
    both = reranker.rank(CANDIDATES, intention="a racing game", instruction="for my son")
    assert both.instruction.endswith("Context: for my son.") and "I2" in both.instantiation


def test_bad_requests_raise_the_domain_error():
    reranker = Reranker.load("tiny-random", **CPU)
    with pytest.raises(RerankerError, match="unknown template id 'nope-01'"):
        reranker.rank(CANDIDATES, history=HISTORY, template="nope-01")
    with pytest.raises(RerankerError, match="unknown template id 'nope-01'"):
        check_template("nope-01")
    with pytest.raises(RerankerError, match="intention"):
        reranker.rank(CANDIDATES, history=HISTORY, template="int-07")  # it needs an intention
    with pytest.raises(RerankerError, match="no candidates to rank"):
        reranker.rank([], history=HISTORY)
    with pytest.raises(RerankerError, match=r"candidates\[1\] has an empty title"):
        reranker.rank(["Doom", "  "])
    with pytest.raises(RerankerError, match="candidates must be a list of titles"):
        reranker.rank("Doom")
    with pytest.raises(RerankerError, match="fusion must be one of auto, lm-only, not 'fused'"):
        reranker.rank(CANDIDATES, fusion="fused")


def test_bad_files_and_settings_raise_the_domain_error_before_the_model_loads(files, tmp_path):
    root, gate, index, _ = files
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    # the gate is read first: a missing one is named although this model could not load either
    with pytest.raises(RerankerError, match=r"missing\.json: no such gate file"):
        Reranker.load(empty, gate=root / "missing.json", **CPU)
    with pytest.raises(RerankerError, match=r"behaviour index .*behaviour\.npz needs a gate"):
        Reranker.load("tiny-random", behaviour=index, **CPU)
    with pytest.raises(RerankerError, match="does not exist"):
        Reranker.load(tmp_path / "no-such-dir", **CPU)
    with pytest.raises(RerankerError, match=f"cannot load model {empty}"):
        Reranker.load(empty, **CPU)
    with pytest.raises(RerankerError, match="reduction must be one of mean, sum, not 'max'"):
        Reranker.load("tiny-random", reduction="max", **CPU)
    with pytest.raises(RerankerError, match="fusion must be one of"):
        Reranker.load("tiny-random", fusion="none", **CPU)


def test_default_model_is_resolved_as_rank_resolves_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no quick-start or shipped model here
    with pytest.raises(RerankerError, match="instructrec train --preset quick --out artifacts/quickstart"):
        Reranker.load(**CPU)


def test_a_gate_beside_the_model_fuses_by_default(capsys, files):
    _, gate, _, model_dir = files
    reranker = Reranker.load(model_dir, semantic=False, **CPU)
    assert reranker.hybrid is not None and reranker.hybrid.gate.version == load_gate(gate).version
    got = reranker.rank(CANDIDATES, history=HISTORY, intention="a shooter")
    assert got.fusion.mode == "fused" and got.fusion.signals == ["lm"]  # no behaviour index, no semantic signal
    assert got.to_dict() == _cli(capsys, _rank_argv(str(model_dir), "--intention", "a shooter", "--no-semantic"))
    assert Reranker.load(model_dir, gate=False, **CPU).hybrid is None
    assert Reranker.load(model_dir, fusion="lm-only", **CPU).hybrid is None


def test_a_model_tuned_on_another_template_table_warns(capsys, files, tmp_path):
    _, _, _, model_dir = files
    old = tmp_path / "old-model"
    old.mkdir()
    for f in model_dir.iterdir():
        if f.name != "gate.json":
            (old / f.name).write_bytes(f.read_bytes())
    write_meta(old, {"template_version": "t-0", "preset": {"max_source_tokens": 96, "max_target_tokens": 16}})
    with pytest.warns(RerankerWarning, match=re.escape(f"was tuned on template table t-0, this is {TEMPLATE_VERSION}")):
        Reranker.load(old, **CPU)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(_rank_argv(str(old), "--json")) == 0
    assert not [w for w in seen if issubclass(w.category, RerankerWarning)]  # the command line prints it instead
    err = capsys.readouterr().err
    assert f"warning: {old} was tuned on template table t-0, this is {TEMPLATE_VERSION}" in err.splitlines()


# -- recommend ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    ranker = Ranker(load_model("tiny-random", **CPU))
    titles = ["Halo", "Halo 3", "Zelda", "Mario Kart 8", "Portal", "Portal 2", "Doom"]
    cat = build_catalogue([CatalogueItem(f"i{n}", t) for n, t in enumerate(titles)], ranker.tokenizer,
                          eos=ranker.eos, max_target_tokens=ranker.max_target_tokens)
    return cat, cat.save(tmp_path_factory.mktemp("catalogue") / "c.npz")


def test_recommend_equals_the_cli(capsys, catalogue):
    cat, path = catalogue
    argv = ["recommend", "--model", "tiny-random", "--device", "cpu", "--dtype", "float32", "--catalogue", str(path),
            "--history", "Halo", "--history", "Portal", "--intention", "a shooter", "--top-n", "4", "--beams", "7"]
    cli = _cli(capsys, argv)
    reranker = Reranker.load("tiny-random", **CPU)
    got = reranker.recommend(str(path), history=["Halo", "Portal"], intention="a shooter", top_n=4, beams=7)
    assert got.to_dict() == cli
    assert got.catalogue.path == str(path) and got.catalogue.items == 7 and got.instantiation.endswith("T2>")
    assert len(got) == 4 and not {"Halo", "Portal"} & {r.title for r in got}
    # the scores are the ranker's for those titles under the same instruction
    scores = reranker.ranker.score(got.instruction, [r.title for r in got]).scores
    assert [r.score for r in got] == pytest.approx(scores, abs=1e-4)
    # a catalogue object in memory gives the same items; it has no path
    again = reranker.recommend(cat, history=["Halo", "Portal"], intention="a shooter", top_n=4, beams=7)
    assert again.recommended == got.recommended and again.catalogue.path is None


def test_recommend_leaves_the_history_out_by_id_or_title(catalogue):
    cat, _ = catalogue
    reranker = Reranker.load("tiny-random", **CPU)
    everything = {r.title for r in reranker.recommend(cat, intention="a game", top_n=7)}
    assert everything == {it.title for it in cat.items}
    # "Portal 2!" names no title, but its id i5 is Portal 2's
    left = reranker.recommend(cat, history=["Halo", ("i5", "Portal 2!")], intention="a game", top_n=7)
    assert {r.title for r in left} == everything - {"Halo", "Portal 2"}
    kept = reranker.recommend(cat, history=["Halo", ("i5", "Portal 2!")], intention="a game", top_n=7,
                              keep_history=True)
    assert {r.title for r in kept} == everything


def test_recommend_errors_name_the_setting_or_file(catalogue, tmp_path):
    cat, _ = catalogue
    reranker = Reranker.load("tiny-random", **CPU)
    with pytest.raises(RerankerError, match="top_n must be 1 to 100, not 0"):
        reranker.recommend(cat, top_n=0)
    with pytest.raises(RerankerError, match="beams must be at least 1"):
        reranker.recommend(cat, beams=0)
    with pytest.raises(RerankerError, match="T3"):  # a rerank template cannot write items
        reranker.recommend(cat, history=["Halo"], intention="a shooter", template="comb-09")
    missing = tmp_path / "none.npz"
    with pytest.raises(RerankerError, match=f"{missing}: no such catalogue file"):
        reranker.recommend(missing, history=["Halo"])
    short = build_catalogue(cat.items, reranker.ranker.tokenizer, eos=reranker.ranker.eos, max_target_tokens=8)
    with pytest.raises(RerankerError, match="does not fit this model: its titles are cut to 8 tokens"):
        reranker.recommend(short, history=["Halo"])
