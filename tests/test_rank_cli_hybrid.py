"""``instructrec rank`` with hybrid scoring: --gate, --behaviour, --fusion, components printed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from instructrec.aspects import Intention, UserNeed
from instructrec.cli import main
from instructrec.hybrid import load_hybrid
from instructrec.hybrid.behaviour import build_behaviour_index
from instructrec.hybrid.gate import FEATURES, SIGNALS, Gate
from instructrec.modeling import load_model
from instructrec.ranker import Ranker, rank_order

torch.set_num_threads(1)

MODEL = "tiny-random-prefixlm"
ITEMS = [("g0", "Halo 3"), ("g1", "Halo 2"), ("g2", "Gears of War"), ("g3", "Dead Space"), ("g4", "Tetris"),
         ("g5", "Stardew Valley")]
SEQUENCES = [["g0", "g1", "g2", "g3"], ["g1", "g2", "g3"], ["g4", "g5"], ["g0", "g2"]]
CANDIDATES = ["Gears of War", "Dead Space", "Tetris", "Stardew Valley", "Not In The Index"]
HISTORY = ["Halo 3", "Halo 2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank-hybrid")
    w = np.zeros((len(SIGNALS), len(FEATURES)))
    w[SIGNALS.index("behaviour"), FEATURES.index("bias")] = 1.5
    w[SIGNALS.index("semantic"), FEATURES.index("bias")] = 0.7
    gate = Gate(w, temperature=1.1).save(root / "gate.json")
    index = build_behaviour_index(SEQUENCES, ITEMS, top_n=20).save(root / "behaviour.npz")
    return root, gate, index


def _argv(*extra: str) -> list[str]:
    argv = ["rank", "--model", MODEL, "--device", "cpu", "--dtype", "float32", "--intention", "a scary shooter",
            "--intention-kind", "vague", *extra]
    for h in HISTORY:
        argv += ["--history", h]
    for c in CANDIDATES:
        argv += ["--candidate", c]
    return argv


def _run(capsys, *extra: str) -> dict:
    assert main(_argv(*extra, "--json")) == 0
    return json.loads(capsys.readouterr().out)


def _lm(instruction: str) -> list[float]:
    return Ranker(load_model(MODEL, device="cpu", dtype="float32")).score(instruction, CANDIDATES).scores


@pytest.mark.parametrize("semantic", [False, True])
def test_fused_ranking_equals_the_cores_fusion(capsys, files, semantic):
    _, gate, index = files
    extra = ["--gate", str(gate), "--behaviour", str(index)] + ([] if semantic else ["--no-semantic"])
    out = _run(capsys, *extra)
    lm = _lm(out["instruction"])
    hybrid = load_hybrid(gate, index, semantic=semantic)
    need = UserNeed(history=tuple(HISTORY), intention="a scary shooter", intention_kind=Intention.VAGUE)
    ids = hybrid.resolve([None] * len(CANDIDATES), CANDIDATES)
    assert ids == ["g2", "g3", "g4", "g5", None]  # matched by title
    fused = hybrid.fuse(lm, need, CANDIDATES, ids, ["g0", "g1"])
    assert set(fused.components) == {"lm", "behaviour", "semantic"} if semantic else {"lm", "behaviour"}
    assert [r["index"] for r in out["ranked"]] == rank_order(fused.scores.tolist())
    for r in out["ranked"]:
        i = r["index"]
        assert r["score"] == pytest.approx(fused.scores[i], abs=1e-6)
        assert r["relevance"] == pytest.approx(fused.relevance[i], abs=1e-6)
        assert r["components"]["lm_loglik"] == pytest.approx(lm[i], abs=1e-5)
        for k, v in fused.components.items():
            assert r["components"][k] == pytest.approx(v[i], abs=1e-5)
    f = out["fusion"]
    assert f["mode"] == "fused" and f["without_behaviour"] == [4] and f["hybrid_version"] == hybrid.version
    assert f["weights"] == pytest.approx(fused.weights)

    # the table shows each result's components
    assert main(_argv(*extra)) == 0
    table = capsys.readouterr().out
    assert "by fused score" in table and "z(beh)" in table and "without behaviour signal: 1 of 5" in table


def test_lm_only_and_no_gate_rank_by_the_lm(capsys, files):
    _, gate, index = files
    plain = _run(capsys)
    off = _run(capsys, "--gate", str(gate), "--behaviour", str(index), "--fusion", "lm-only")
    for out in (plain, off):
        assert out["fusion"]["mode"] == "lm-only"
        assert [set(r) for r in out["ranked"]] == [{"index", "title", "score"}] * len(CANDIDATES)
    assert off["ranked"] == plain["ranked"]
    lm = _lm(plain["instruction"])
    assert [r["index"] for r in plain["ranked"]] == rank_order(lm)
    assert main(_argv()) == 0
    assert "log-likelihood" in capsys.readouterr().out


def test_a_gate_beside_the_model_is_the_default(files, tmp_path):
    from instructrec.reranker import load_hybrid_of

    _, gate, _ = files
    args = dict(gate=None, behaviour=None, fusion="auto", semantic=False)
    assert load_hybrid_of(MODEL, **args) is None  # a built-in model: no directory, no gate
    (tmp_path / "gate.json").write_text(gate.read_text())
    hybrid = load_hybrid_of(str(tmp_path), **args)
    assert hybrid is not None and hybrid.semantic is None and hybrid.behaviour is None
    assert load_hybrid_of(str(tmp_path), **{**args, "fusion": "lm-only"}) is None


@pytest.mark.parametrize("extra, message", [
    (["--behaviour", "b.npz"], "needs a gate"),
    (["--gate", "missing.json"], "missing.json: no such gate file"),
])
def test_errors_name_the_file(capsys, files, extra, message):
    root = files[0]
    extra = [str(root / x) if x.endswith((".npz", ".json")) else x for x in extra]
    assert main(_argv(*extra, "--no-semantic")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
