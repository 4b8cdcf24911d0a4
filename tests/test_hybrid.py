"""Hybrid scoring in the core: the behaviour index, the semantic encoder and the gate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from instructrec.aspects import Intention, UserNeed
from instructrec.hybrid import Hybrid, load_hybrid
from instructrec.hybrid.behaviour import (DECAY, POPULARITY_WEIGHT, BehaviourError, build_behaviour_index,
                                          load_behaviour_index, zscore)
from instructrec.hybrid.gate import (FEATURES, SIGNALS, Example, Gate, GateError, expected_calibration_error, fit_gate,
                                      load_gate, softmax)

ITEMS = [(f"i{k}", f"Game {k}") for k in range(8)]
SEQUENCES = [["i0", "i1", "i2"], ["i0", "i1", "i3"], ["i1", "i2"], ["i4", "i5", "i4", "i6"]]


def brute_force(sequences, n_items):
    """The index's weights computed the slow, obvious way (no top-n cut)."""
    ids = [i for i, _ in ITEMS]
    pos = {i: k for k, i in enumerate(ids)}
    trans = np.zeros((n_items, n_items))
    co = np.zeros((n_items, n_items))
    count = np.zeros(n_items)
    for seq in sequences:
        s = [pos[i] for i in seq]
        for a in s:
            count[a] += 1
        for i, a in enumerate(s):
            for j, b in enumerate(s):
                if a == b:
                    continue
                if 0 < j - i <= 3:
                    trans[a, b] += 1 / (j - i)
                if 0 < abs(j - i) <= 20:
                    co[a, b] += 1
    out = trans.sum(1, keepdims=True)
    trans = np.divide(trans, out, out=np.zeros_like(trans), where=out > 0)
    co = co / np.sqrt(np.maximum(np.outer(count, count), 1))
    return trans, co, count


def test_index_weights_equal_the_brute_force_counts(tmp_path):
    index = build_behaviour_index(SEQUENCES, ITEMS, top_n=50)
    trans, co, count = brute_force(SEQUENCES, len(ITEMS))
    for a, (item, _) in enumerate(ITEMS):
        got = {n: (t, c) for n, t, c in index.neighbours(item)}
        want = {ITEMS[b][0]: (trans[a, b], co[a, b]) for b in range(len(ITEMS)) if trans[a, b] or co[a, b]}
        assert got.keys() == want.keys()
        for n in got:
            assert got[n] == pytest.approx(want[n], rel=1e-6)
    assert index.popularity.tolist() == count.astype(int).tolist()
    # saved and loaded: the same arrays, header and version
    loaded = load_behaviour_index(index.save(tmp_path / "b.npz"))
    assert loaded.header == index.header and loaded.version == index.version
    assert loaded.item_ids == index.item_ids and loaded.titles == index.titles
    for name in ("indptr", "indices", "transition", "cooccurrence", "popularity"):
        assert np.array_equal(getattr(loaded, name), getattr(index, name))


def test_top_n_keeps_the_strongest_neighbours_by_either_weight():
    seqs = [["i0", f"i{k}"] for k in range(1, 8)] + [["i0", "i1"]] * 3 + [["i0", "i2"]] * 2
    full = build_behaviour_index(seqs, ITEMS, top_n=50)
    cut = build_behaviour_index(seqs, ITEMS, top_n=2)
    assert [n for n, _, _ in cut.neighbours("i0")] == [n for n, _, _ in full.neighbours("i0")][:2] == ["i1", "i2"]
    assert cut.version != full.version


def test_a_requests_score_sums_the_decayed_history_then_z_scores():
    index = build_behaviour_index(SEQUENCES, ITEMS, top_n=50)
    trans, co, count = brute_force(SEQUENCES, len(ITEMS))
    history, candidates = ["i0", "i1"], ["i2", "i3", "i5", "i7"]
    t, c, rows = index.sums(history, candidates)
    cols = [int(x[1:]) for x in candidates]
    assert t == pytest.approx(trans[1, cols] + DECAY * trans[0, cols])
    assert c == pytest.approx(co[1, cols] + DECAY * co[0, cols])
    feats = index.features(history, candidates)
    pop = np.log1p(count[cols])
    assert feats.score == pytest.approx(zscore(t) + zscore(c) + POPULARITY_WEIGHT * zscore(pop))
    assert feats.known == 1.0


def test_unknown_items_and_titles():
    index = build_behaviour_index(SEQUENCES, ITEMS, top_n=50)
    # no known history, or no known candidate: the signal is absent
    assert index.features(["nope"], ["i1", "i2"]).score is None
    assert index.features(["i0"], ["x", None]).score is None
    half = index.features(["i0"], ["i1", None])
    assert half.known == 0.5 and half.score is not None
    # by id, else by exact title (normalised as the service normalises request titles)
    assert index.resolve("i3", None) == "i3"
    assert index.resolve("zz", "Game  3") == "i3"
    assert index.resolve(None, "Game 99") is None


def test_bad_index_files_are_clear_errors(tmp_path):
    with pytest.raises(BehaviourError, match="no such behaviour index"):
        load_behaviour_index(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BehaviourError, match="junk.npz: not a readable behaviour index"):
        load_behaviour_index(tmp_path / "junk.npz")
    with pytest.raises(BehaviourError, match="distinct"):
        build_behaviour_index([], [("a", "A"), ("a", "B")])


NEED = UserNeed(history=("Game 0", "Game 1"), intention="something calm", intention_kind=Intention.VAGUE)


def test_fusion_adds_the_gated_signals_and_leaves_out_absent_ones():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(len(SIGNALS), len(FEATURES)))
    gate = Gate(w, temperature=1.7)
    lm, beh, sem = rng.normal(size=5), rng.normal(size=5), rng.normal(size=5)
    fused = gate.fuse(lm, NEED, behaviour=beh, semantic=sem, known=0.8)
    wb, ws = fused.weights["behaviour"], fused.weights["semantic"]
    assert fused.scores == pytest.approx(zscore(lm) + wb * zscore(beh) + ws * zscore(sem))
    assert fused.relevance == pytest.approx(softmax(1.7 * fused.scores)) and fused.relevance.sum() == pytest.approx(1)
    # without behaviour: exactly the LM and the semantic signal at the weight the gate gives them
    no_beh = gate.fuse(lm, NEED, semantic=sem)
    assert set(no_beh.components) == {"lm", "semantic"}
    assert no_beh.scores == pytest.approx(zscore(lm) + no_beh.weights["semantic"] * zscore(sem))
    # nothing beside the LM: the LM's order
    alone = gate.fuse(lm, NEED)
    assert np.argsort(-alone.scores).tolist() == np.argsort(-lm).tolist()


def test_the_weights_depend_on_the_request():
    w = np.zeros((len(SIGNALS), len(FEATURES)))
    w[SIGNALS.index("semantic"), FEATURES.index("vague")] = 4.0
    gate = Gate(w)
    lm, sem = np.array([3.0, 2.0, 1.0]), np.array([0.0, 0.0, 1.0])
    assert gate.fuse(lm, NEED, semantic=sem).scores.argmax() == 2  # the vague need follows the semantic signal
    plain = UserNeed(history=("Game 0",))
    assert gate.fuse(lm, plain, semantic=sem).scores.argmax() == 0  # the sequential one does not


def test_fitting_recovers_a_gate_that_ranks_better(tmp_path):
    """Synthetic requests where the semantic signal decides vague needs and behaviour decides
    history-only ones: the fitted gate must learn both and beat the LM alone on held-out ones."""
    rng = np.random.default_rng(1)

    def example(vague: bool) -> Example:
        truth = rng.integers(10)
        lm = rng.normal(size=10)
        beh = rng.normal(size=10)
        sem = rng.normal(size=10)
        (sem if vague else beh)[truth] += 2.5
        need = NEED if vague else UserNeed(history=("Game 0", "Game 1"))
        return Example(lm, need, beh, sem, 1.0, int(truth))

    train = [example(k % 2 == 0) for k in range(600)]
    test = [example(k % 2 == 0) for k in range(400)]
    gate = fit_gate(train, info={"data": "synthetic"})
    def mean_weight(signal: str, vague: bool) -> float:
        """The gate's weight of ``signal`` averaged over the held-out requests of one kind."""
        return float(np.mean([gate.fuse(e.lm, e.need, behaviour=e.behaviour, semantic=e.semantic, known=1.0).weights[signal]
                              for e in test if (e.need is NEED) == vague]))

    # vague needs weigh the semantic signal more than history-only needs do, and behaviour less
    assert mean_weight("semantic", True) - mean_weight("semantic", False) > 0.5
    assert mean_weight("behaviour", True) - mean_weight("behaviour", False) < -0.5

    def hr1(scorer):
        return np.mean([scorer(e).argmax() == e.positive for e in test])

    fused = hr1(lambda e: gate.fuse(e.lm, e.need, behaviour=e.behaviour, semantic=e.semantic, known=1.0).scores)
    assert fused > hr1(lambda e: e.lm) + 0.3
    # the loaded gate is the same gate
    again = load_gate(gate.save(tmp_path / "gate.json"))
    assert again.version == gate.version and np.allclose(again.weights, gate.weights)
    assert again.info["data"] == "synthetic" and again.info["examples"] == 600


def test_calibration_cases_set_the_temperature_and_never_the_order(tmp_path):
    """Cases whose sampling the ranking must not learn (the evaluation's hard negatives) only
    set the temperature, per request log-linear in its features: the weights are those fitted
    without them, every request's order stays, and the probabilities follow those cases."""
    rng = np.random.default_rng(2)

    def example(hard: bool) -> Example:
        truth = int(rng.integers(10))
        lm, beh, sem = rng.normal(size=10), rng.normal(size=10), rng.normal(size=10)
        beh[truth] += 3.0
        if hard:  # every candidate looks like the need and the signals are unsure: the sure top is wrong more often
            sem = 0.8 + 0.01 * rng.normal(size=10)
            beh[truth] -= 2.5
        return Example(lm, NEED, beh, sem, 1.0, truth)

    fit, hard = [example(False) for _ in range(300)], [example(True) for _ in range(300)]
    plain, calibrated = fit_gate(fit), fit_gate(fit, calibration=hard)
    assert np.array_equal(plain.weights, calibrated.weights) and np.array_equal(plain.lm_weights, calibrated.lm_weights)
    assert calibrated.version != plain.version and calibrated.info["calibration_examples"] == 300
    probe = [example(h) for h in (False, True) for _ in range(200)]
    for e in probe:
        a = plain.fuse(e.lm, e.need, behaviour=e.behaviour, semantic=e.semantic, known=1.0)
        b = calibrated.fuse(e.lm, e.need, behaviour=e.behaviour, semantic=e.semantic, known=1.0)
        assert np.array_equal(a.scores, b.scores) and np.argsort(-a.relevance).tolist() == np.argsort(-b.relevance).tolist()
        assert b.relevance == pytest.approx(softmax(b.temperature * b.scores))

    def ece(gate, cases):
        fused = [gate.fuse(e.lm, e.need, behaviour=e.behaviour, semantic=e.semantic, known=1.0) for e in cases]
        return expected_calibration_error([f.relevance for f in fused], [e.positive for e in cases])

    hard_probe = probe[200:]
    assert ece(calibrated, hard_probe) < ece(plain, hard_probe) - 0.05
    # the request's temperature comes back from the file
    again = load_gate(calibrated.save(tmp_path / "gate.json"))
    assert again.version == calibrated.version and np.array_equal(again.temperature_weights, calibrated.temperature_weights)
    e = hard_probe[0]
    assert again.fuse(e.lm, e.need, behaviour=e.behaviour, semantic=e.semantic, known=1.0).relevance == pytest.approx(
        calibrated.fuse(e.lm, e.need, behaviour=e.behaviour, semantic=e.semantic, known=1.0).relevance)


def test_bad_gate_files_are_clear_errors(tmp_path):
    with pytest.raises(GateError, match="no such gate file"):
        load_gate(tmp_path / "gate.json")
    path = tmp_path / "g.json"
    doc = Gate.neutral().to_json()
    doc["features"] = ["bias"]
    path.write_text(json.dumps(doc))
    with pytest.raises(GateError, match="refit it"):
        load_gate(path)
    doc = Gate.neutral().to_json()
    doc["temperature_weights"] = [0.5]
    path.write_text(json.dumps(doc))
    with pytest.raises(GateError, match=f"g.json: temperature_weights must be {len(FEATURES)} finite numbers"):
        load_gate(path)
    with pytest.raises(GateError, match="no examples"):
        fit_gate([])


def test_semantic_similarities_equal_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from instructrec.hybrid.semantic import SemanticEncoder
    from instructrec.modeling import minilm_path

    enc = SemanticEncoder()
    titles = ["Halo 3 - Xbox 360", "Alien: Isolation - PlayStation 4", "a calm puzzle game", "Tetris"]
    ref = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(titles, normalize_embeddings=True)
    got = enc.embed(titles)
    assert np.abs(got - ref).max() < 1e-5
    need = UserNeed(history=("Tetris", "Dr. Mario"), intention="a calm puzzle game", intention_kind=Intention.VAGUE)
    sims = enc.similarities(need, titles)
    h = ref[3] + enc.embed(["Dr. Mario"])[0]
    q = h / np.linalg.norm(h) + ref[2]
    assert sims == pytest.approx(ref @ (q / np.linalg.norm(q)), abs=1e-5)
    assert enc.similarities(UserNeed(), titles) is None


def test_catalogue_vectors_kept_in_a_file_fill_a_new_encoders_cache(tmp_path):
    """A process that reads a catalogue's kept vectors encodes none of its titles again, and
    reads for each title the file's vector, whatever it encoded before."""
    from instructrec.hybrid.semantic import NotCached, SemanticEncoder

    titles = ["Halo 3 - Xbox 360", "Alien: Isolation - PlayStation 4", "Tetris", "Dr. Mario"]
    first = SemanticEncoder().catalogue_vectors(titles, tmp_path / "vectors")
    enc = SemanticEncoder()
    before = enc.embed(["Tetris", "a calm puzzle game"])  # encoded in another batch than the file's
    with pytest.raises(NotCached):
        enc.embed(titles, cached_only=True)
    again = enc.catalogue_vectors(titles, tmp_path / "vectors")
    assert np.array_equal(again, first)
    assert np.array_equal(enc.embed(titles, cached_only=True), first)
    assert np.abs(before[0] - first[2]).max() < 1e-5
    need = UserNeed(history=("Tetris", "Dr. Mario"))
    assert enc.similarities(need, titles, cached_only=True) == pytest.approx(enc.similarities(need, titles))


def test_a_texts_vector_does_not_depend_on_what_was_encoded_with_it():
    """The same title asked alone by one encoder and among other new titles by another has the
    same vector bit for bit: a request's semantic signal never depends on earlier requests."""
    from instructrec.hybrid.semantic import SemanticEncoder

    titles = ["Halo 3 - Xbox 360", "Alien: Isolation - PlayStation 4", "The Legend of Zelda: Breath of the Wild",
              "Tetris", "a calm puzzle game for the Switch"]
    together = SemanticEncoder().embed(titles)
    alone = SemanticEncoder()
    assert all(np.array_equal(alone.embed([t])[0], row) for t, row in zip(titles, together))


def test_hybrid_resolves_titles_and_falls_back(tmp_path):
    index = build_behaviour_index(SEQUENCES, ITEMS, top_n=50)
    gate_path = Gate.neutral().save(tmp_path / "m" / "gate.json")
    hybrid = load_hybrid(tmp_path / "m", index.save(tmp_path / "b.npz"), semantic=False)
    assert hybrid.resolve(["i0", None, None], ["x", "Game 2", "Unknown"]) == ["i0", "i2", None]
    lm = [0.1, 0.5, 0.3]
    need = UserNeed(history=("Game 0", "Game 1"))
    fused = hybrid.fuse(lm, need, ["Game 2", "Game 3", "Game 7"], ["i2", "i3", "i7"], ["i0", "i1"])
    assert set(fused.components) == {"lm", "behaviour"}
    # no history the index knows: ranks exactly as the LM alone
    alone = hybrid.fuse(lm, need, ["Game 2", "Game 3", "Game 7"], ["i2", "i3", "i7"], [None])
    assert set(alone.components) == {"lm"} and alone.scores == pytest.approx(zscore(np.array(lm)))
    assert Hybrid(load_gate(gate_path)).version != hybrid.version
    assert math.isclose(fused.relevance.sum(), 1.0)


def test_sasrec_is_causal_and_round_trips(tmp_path):
    import torch

    from instructrec.hybrid.sequential import SASRecConfig, SequentialError, left_pad, load_sequential, new_scorer

    scorer = new_scorer(SASRecConfig(items=8, hidden=16, heads=2, inner=32, max_length=6), [i for i, _ in ITEMS])
    model = scorer.model.eval()
    with torch.no_grad():  # a later item never changes an earlier position's state
        a = model.states(torch.tensor([[0, 0, 1, 2, 3, 4]]))
        b = model.states(torch.tensor([[0, 0, 1, 2, 3, 7]]))
    assert torch.allclose(a[0, 2:5], b[0, 2:5]) and not torch.allclose(a[0, 5], b[0, 5])
    got = scorer.scores(["i0", "i1", "zz"], ["i2", "i3", "nope", None])
    with torch.no_grad():
        state = model.last_state(torch.tensor([[0, 0, 0, 0, 1, 2]]))[0]
        want = (model.items.weight[[3, 4]] @ state).double().numpy()
    assert got[:2] == pytest.approx(want, abs=1e-6) and got[2] == got[3] == got[:2].min()
    assert scorer.scores(["zz"], ["i1"]) is None and scorer.scores(["i0"], ["zz"]) is None
    for rows in ([5], [1, 2, 3, 4, 5, 6], [7, 1, 2, 3, 4, 5, 6, 8]):  # short, full, longer than max_length
        with torch.no_grad():  # serving's unpadded state is the padded row's
            assert torch.allclose(model.history_state(rows), model.last_state(left_pad([rows], 6))[0], atol=1e-5)
    again = load_sequential(scorer.save(tmp_path / "seq"))
    assert again.version == scorer.version and again.item_ids == scorer.item_ids
    assert again.scores(["i0", "i1"], ["i2", "i3"]) == pytest.approx(scorer.scores(["i0", "i1"], ["i2", "i3"]))
    with pytest.raises(SequentialError, match="no sequential.json"):
        load_sequential(tmp_path / "none")


def test_the_sequential_signal_is_fused_with_its_own_weight():
    w = np.zeros((len(SIGNALS), len(FEATURES)))
    w[SIGNALS.index("sequential"), 0] = 2.0
    lm, seq = np.array([1.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.2])
    fused = Gate(w).fuse(lm, UserNeed(history=("a",)), sequential=seq)
    assert fused.weights == {"lm": 1.0, "sequential": 2.0}
    assert fused.scores == pytest.approx(zscore(lm) + 2.0 * zscore(seq))


def test_a_candidates_sequential_score_is_the_same_alone_kept_or_recomputed():
    """A candidate's sequential score depends on its history alone: not on the other
    candidates, nor on whether the history's state was kept; new weights (stamped) are not
    answered from a state of the old ones."""
    import torch

    from instructrec.hybrid.sequential import SASRecConfig, new_scorer, stamp

    torch.manual_seed(1)
    seq = new_scorer(SASRecConfig(items=8, hidden=16, heads=2, inner=32, max_length=6), [i for i, _ in ITEMS])
    cands = ["i2", "i3", "i4", "i5", "i6", "i7", None]
    query = seq.query(["i0", "i1"], cands)
    assert seq.kept_scores(query) is None
    first = seq.scores(["i0", "i1"], cands)
    assert seq.kept_scores(query).tolist() == first.tolist()
    assert first[-1] == first[:-1].min()  # unknown: the lowest known score
    for k in range(len(cands) - 1):
        assert seq.scores(["i0", "i1"], [cands[k]])[0] == first[k]
    seq.forget()
    assert seq.kept_scores(query) is None and seq.scores(["i0", "i1"], cands).tolist() == first.tolist()
    assert seq.query(["x"], cands) is None and seq.query(["i0"], ["x", None]) is None
    with torch.no_grad():
        seq.model.items.weight.mul_(2.0)
    stamp(seq)
    assert seq.scores(["i0", "i1"], cands).tolist() != first.tolist()


def test_retrieval_unions_each_sources_best_allowed_items():
    from instructrec.hybrid.retrieval import Retriever
    from instructrec.hybrid.sequential import SASRecConfig, new_scorer

    index = build_behaviour_index(SEQUENCES, ITEMS, top_n=50)
    seq = new_scorer(SASRecConfig(items=8, hidden=16, heads=2, inner=32, max_length=6), [i for i, _ in ITEMS])
    # the catalogue in another order than the index and the model: positions must be mapped
    catalogue = list(reversed(ITEMS))
    r = Retriever([i for i, _ in catalogue], [t for _, t in catalogue], behaviour=index, sequential=seq)
    pos = {i: p for p, (i, _) in enumerate(catalogue)}
    # behaviour: i0 then i1 -> neighbours i2 (both), i3 (after i1), strongest first
    got = [catalogue[p][0] for p in r.by_behaviour(["i0", "i1"], None, 3)]
    trans, co, _ = brute_force(SEQUENCES, len(ITEMS))
    w = (trans[1] + co[1]) + DECAY * (trans[0] + co[0])
    want = [ITEMS[j][0] for j in np.argsort(-w, kind="stable") if w[j] > 0][:3]
    assert got == want
    allowed = np.ones(len(catalogue), dtype=bool)
    allowed[pos["i2"]] = False
    assert "i2" not in [catalogue[p][0] for p in r.by_behaviour(["i0", "i1"], allowed, 5)]
    # sequential: the model's full sort, best first, restricted to allowed items
    full = seq.scores(["i0", "i1"], [i for i, _ in catalogue])
    top = r.by_sequence(["i0", "i1"], allowed, 3)
    assert top == [p for p in np.argsort(-full, kind="stable") if allowed[p]][:3]
    union = r.retrieve(UserNeed(history=("Game 0", "Game 1")), ["i0", "i1"], allowed=allowed, per_source=3,
                       beams=[pos["i7"]])
    assert union.items[0] == pos["i7"] and union.sources[pos["i7"]][0] == "lm"
    assert len(union.items) == len(set(union.items)) and all(allowed[p] for p in union.items[1:])
    assert set(top) <= set(union.items) and r.by_meaning(UserNeed(), None, 3) == []
