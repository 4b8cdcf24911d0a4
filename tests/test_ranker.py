"""Tests for the likelihood ranker on tiny random models (BERT2BERT, T5, GPT-2 style) and `instructrec rank`."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from instructrec.modeling import TINY, TINY_CAUSAL, TINY_PREFIX, TINY_T5, build_base, can_pack, load_model
from instructrec.ranker import PASS_COST_TOKENS, Encoded, Ranker, rank_order, target_ids, targets_ids

torch.set_num_threads(1)

SOURCE = "A user played: 1. Halo; 2. Doom; 3. Quake. They ask for a fast shooter. Pick the best candidate."
OTHER_SOURCE = "Someone who loves gardening and cooking wants a calm farming game for a long winter evening."
WORDS = "legend zelda mario kart halo doom quest star wars edition remastered deluxe racing puzzle".split()


def _candidates(n: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    lengths = [0, 1, 2, 4, 9, 20, 60]  # 60 words: cut at max_target_tokens
    return [" ".join(rnd.choice(WORDS) for _ in range(lengths[i % len(lengths)])) or "x" for i in range(n)]


CANDS = _candidates(21)


@pytest.fixture(scope="module")
def models():
    cache: dict = {}

    def get(name, dtype="float32"):
        if (name, dtype) not in cache:
            cache[name, dtype] = load_model(name, device="cpu", dtype=dtype)
        return cache[name, dtype]

    return get


def _close(fast, naive, tol=1e-4):
    assert len(fast) == len(naive)
    for f, n in zip(fast, naive):
        assert f == pytest.approx(n, abs=tol, rel=1e-6), (fast, naive)


@pytest.mark.parametrize("name", [TINY, TINY_T5, TINY_CAUSAL])
def test_fast_equals_naive(models, name):
    ranker = Ranker(models(name), batch_tokens=16)
    ids = [target_ids(ranker.tokenizer, c, ranker.max_target_tokens, ranker.eos)[0] for c in CANDS]
    assert len({len(t) for t in ids}) >= 5 and len(ranker.chunks(ids)) > 5  # several buckets and chunks
    for reduction in ("sum", "mean"):
        fast = ranker.score(SOURCE, CANDS, reduction=reduction)
        naive = ranker.score(SOURCE, CANDS, reduction=reduction, naive=True)
        _close(fast.scores, naive.scores)
        assert fast.target_tokens == naive.target_tokens == sum(len(t) for t in ids)
        assert fast.targets_truncated == naive.targets_truncated == sum(len(c.split()) == 60 for c in CANDS) > 0
    # one candidate
    _close(ranker.score(SOURCE, ["Mario Kart"]).scores, ranker.score(SOURCE, ["Mario Kart"], naive=True).scores)
    # 300 candidates, default batch budget: the fast path against naive on a subset
    many = _candidates(300, seed=1)
    fast = Ranker(models(name)).score(SOURCE, many, reduction="sum").scores
    assert len(fast) == 300
    subset = list(range(0, 300, 23))
    _close([fast[i] for i in subset], ranker.score(SOURCE, [many[i] for i in subset], reduction="sum", naive=True).scores)


@pytest.mark.parametrize("name", [TINY, TINY_T5, TINY_CAUSAL])
def test_scores_depend_on_instruction_and_candidate(models, name):
    ranker = Ranker(models(name), reduction="sum")
    cands = ["Mario Kart 8", "Stardew Valley", "Doom Eternal"]
    a, b = ranker.score(SOURCE, cands).scores, ranker.score(OTHER_SOURCE, cands).scores
    assert max(abs(x - y) for x, y in zip(a, b)) > 1e-5
    assert len({round(s, 5) for s in a}) == 3
    # the same candidate gets the same score wherever it stands in the request
    assert ranker.score(SOURCE, list(reversed(cands))).scores == pytest.approx(list(reversed(a)), abs=1e-5)


def test_cross_attention_kv_computed_once(models):
    loaded = models(TINY)
    layers = loaded.model.decoder.bert.encoder.layer
    calls: list[int] = []
    hooks = [layer.crossattention.self.key.register_forward_hook(lambda *_, k=k: calls.append(k))
             for k, layer in enumerate(layers)]
    try:
        ranker = Ranker(loaded, batch_tokens=16)
        cands = [f"game {i} " + "deluxe " * (i % 6) for i in range(50)]
        ids = [target_ids(ranker.tokenizer, c, ranker.max_target_tokens, ranker.eos)[0] for c in cands]
        assert len(ranker.chunks(ids)) >= 10
        ranker.score(SOURCE, cands)
        assert calls == list(range(len(layers)))  # once per layer (the probe), not per chunk
        calls.clear()
        ranker.score(SOURCE, cands, naive=True)
        assert len(calls) == 50 * len(layers)
    finally:
        for h in hooks:
            h.remove()


def test_mean_is_sum_over_target_tokens(models):
    ranker = Ranker(models(TINY))
    sums = ranker.score(SOURCE, CANDS, reduction="sum").scores
    means = ranker.score(SOURCE, CANDS, reduction="mean").scores
    for c, s, m in zip(CANDS, sums, means):
        n = len(target_ids(ranker.tokenizer, c, ranker.max_target_tokens, ranker.eos)[0])
        assert n == min(len(ranker.tokenizer(c, add_special_tokens=False)["input_ids"]) + 1, ranker.max_target_tokens)
        assert m == pytest.approx(s / n, abs=1e-6)
    assert Ranker(models(TINY), reduction="sum").score(SOURCE, CANDS).scores == pytest.approx(sums, abs=1e-5)


def test_rank_order_ties_and_top_n(models):
    ranker = Ranker(models(TINY))
    cands = ["Doom", "Mario Kart 8", "Doom", "Tetris", "Mario Kart 8", "Doom"]
    scores = ranker.score(SOURCE, cands).scores
    assert scores[0] == scores[2] == scores[5] and scores[1] == scores[4]
    ranked = ranker.rank(SOURCE, cands)
    assert [r.index for r in ranked] == rank_order(scores)
    assert sorted(r.index for r in ranked) == list(range(6))
    assert all(a.score >= b.score for a, b in zip(ranked, ranked[1:]))
    for a, b in zip(ranked, ranked[1:]):  # equal scores keep request order
        if a.score == b.score:
            assert a.index < b.index
    assert [r.index for r in ranked if r.text == "Doom"] == [0, 2, 5]
    assert all(r.text == cands[r.index] and r.score == scores[r.index] for r in ranked)
    top = ranker.rank(SOURCE, cands, top_n=2)
    assert top == ranked[:2]
    assert ranker.rank(SOURCE, cands, top_n=2, reduction="sum")[0].score == pytest.approx(
        max(ranker.score(SOURCE, cands, reduction="sum").scores))
    assert rank_order([1.0, 3.0, 3.0, 2.0, 3.0]) == [1, 2, 4, 3, 0]


def test_errors(models):
    ranker = Ranker(models(TINY))
    with pytest.raises(ValueError):
        ranker.score(SOURCE, [])
    with pytest.raises(ValueError):
        ranker.rank(SOURCE, [])
    with pytest.raises(ValueError, match="reduction"):
        ranker.score(SOURCE, ["Doom"], reduction="max")
    with pytest.raises(ValueError, match="reduction"):
        Ranker(models(TINY), reduction="median")


@pytest.mark.parametrize("name", [TINY, TINY_CAUSAL])
def test_truncation(models, name):
    ranker = Ranker(models(name), max_target_tokens=8)
    limit = ranker.max_source_tokens
    assert limit == (512 - 8 if name == TINY_CAUSAL else 512)
    long_source = " ".join(f"item{i}" for i in range(400)) + " " + SOURCE
    n_tokens = len(ranker.tokenizer(long_source)["input_ids"])
    assert n_tokens > 600
    cands = ["Doom", " ".join(["remastered"] * 30), "Halo " * 7]
    fast = ranker.score(long_source, cands)
    naive = ranker.score(long_source, cands, naive=True)
    assert fast.source_tokens == limit and fast.source_truncated == n_tokens - limit > 0
    _close(fast.scores, naive.scores)
    assert all(torch.isfinite(torch.tensor(fast.scores)))
    assert fast.targets_truncated == 1  # "Halo " * 7 is 7 tokens + end = 8: fits exactly
    assert fast.target_tokens == 2 + 8 + 8
    # the cut keeps the end of the instruction (the question), so the tail still matters
    tail_changed = ranker.score(long_source.replace("Pick the best", "Choose the worst"), cands).scores
    assert max(abs(x - y) for x, y in zip(fast.scores, tail_changed)) > 0
    short = ranker.score(SOURCE, cands)
    assert short.source_truncated == 0 and short.source_tokens == len(ranker.tokenizer(SOURCE)["input_ids"])


def _bf16_works() -> bool:
    try:
        x = torch.ones(2, 2, dtype=torch.bfloat16)
        return bool(torch.isfinite((x @ x).float()).all())
    except RuntimeError:
        return False


@pytest.mark.skipif(not _bf16_works(), reason="bfloat16 matmul is not supported on this CPU")
def test_bf16_close_to_fp32(models):
    fp32 = Ranker(models(TINY)).score(SOURCE, CANDS).scores
    bf16 = Ranker(models(TINY, "bfloat16")).score(SOURCE, CANDS).scores
    assert models(TINY, "bfloat16").model.dtype == torch.bfloat16
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, abs=0.1)


# -- instructrec rank -------------------------------------------------------------------------


def test_rank_cli_json(capsys, tmp_path):
    from instructrec.cli import main

    history = tmp_path / "history.txt"
    history.write_text("Halo\nDoom\n\nQuake\n", encoding="utf-8")
    cands = ["Mario Kart 8", "Doom Eternal", "Stardew Valley", "Tetris"]
    argv = ["rank", "--model", "tiny-random", "--device", "cpu", "--dtype", "float32", "--history-file", str(history),
            "--intention", "a fast shooter", "--intention-kind", "specific", "--top-n", "3", "--json"]
    for c in cands:
        argv += ["--candidate", c]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["template"] == "comb-09"
    assert out["instantiation"] == "<P1,I2,T3>"
    assert out["history_dropped"] == 0
    assert "1. Halo; 2. Doom; 3. Quake" in out["instruction"] and "a fast shooter" in out["instruction"]
    ranked = out["ranked"]
    assert len(ranked) == 3
    assert all(r["title"] == cands[r["index"]] for r in ranked)
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    # same scores as the library call on the same instruction
    expected = Ranker(load_model(TINY, device="cpu", dtype="float32")).rank(out["instruction"], cands, top_n=3)
    assert [r["index"] for r in ranked] == [r.index for r in expected]
    assert [r["score"] for r in ranked] == pytest.approx([r.score for r in expected], abs=1e-5)

    assert main(argv + ["--template", "comb-11"]) == 0
    assert json.loads(capsys.readouterr().out)["template"] == "comb-11"


@pytest.mark.parametrize("extra, message", [
    (["--history", "Halo", "--candidate", "Doom", "--template", "nope-01"], "unknown template id"),
    (["--history", "Halo", "--candidate", "Doom", "--template", "int-07"], "intention"),
    (["--history", "Halo"], "no candidates"),
])
def test_rank_cli_errors(capsys, extra, message):
    from instructrec.cli import main

    assert main(["rank", "--model", "tiny-random", "--device", "cpu", "--json", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in captured.err


def test_rank_cli_missing_model(capsys, tmp_path, monkeypatch):
    from instructrec.cli import main

    monkeypatch.chdir(tmp_path)  # no artifacts/quickstart/model here
    assert main(["rank", "--history", "Halo", "--candidate", "Doom"]) == 2
    assert "instructrec train --preset quick --out artifacts/quickstart" in capsys.readouterr().err
    assert main(["rank", "--model", str(tmp_path / "no-such-dir"), "--history", "Halo", "--candidate", "Doom"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("invariant", [True, False])
@pytest.mark.parametrize("name", [TINY, TINY_T5, TINY_CAUSAL])
def test_score_many_equals_one_request_at_a_time(models, name, invariant):
    """Several instructions of different lengths scored together (per request, or sharing passes:
    one padded encoder batch, candidates of different requests mixed in decoder passes) equal
    separate naive scoring."""
    ranker = Ranker(models(name), batch_tokens=40, batch_invariant=invariant)
    requests = [(SOURCE, CANDS[:7]), ("short one", CANDS[7:9]), (SOURCE + " and more words " * 5, CANDS[9:21]),
                ("x", ["only candidate"])]
    together = ranker.score_many(requests)
    assert len(together) == len(requests)
    for (source, cands), got in zip(requests, together):
        alone = ranker.score(source, cands, naive=True)
        _close(got.scores, alone.scores)
        assert (got.source_tokens, got.target_tokens, got.targets_truncated) == (
            alone.source_tokens, alone.target_tokens, alone.targets_truncated)


@pytest.mark.parametrize("name", [TINY, TINY_T5, TINY_CAUSAL, "tiny-random-prefixlm"])
def test_batch_invariant_scores_are_those_of_the_request_alone_bit_for_bit(models, name):
    """In bf16, where sharing passes moves scores, a request scored among others gets exactly
    the scores it gets alone (the default); sharing passes is opt-in."""
    ranker = Ranker(models(name, "bfloat16"), batch_tokens=64)
    probe = (SOURCE, CANDS[:9])
    others = [(OTHER_SOURCE, CANDS[9:15]), ("short one", CANDS[3:5]), (SOURCE + " and more" * 4, CANDS[12:21])]
    alone = ranker.score_many([probe])[0].scores
    assert ranker.score_many([others[0], probe, *others[1:]])[1].scores == alone


def test_score_many_shares_passes_across_requests(models):
    """Ten small requests go through fewer decoder passes than ten separate calls: one probe
    step for all instructions, then the candidates of every request bucketed together."""
    loaded = models(TINY)
    ranker = Ranker(loaded, batch_tokens=4096, batch_invariant=False)
    passes: list[int] = []
    hook = loaded.model.decoder.bert.register_forward_hook(lambda *_: passes.append(1))
    try:
        requests = [(f"{SOURCE} user {i}", CANDS[i : i + 3]) for i in range(10)]
        ranker.score_many(requests)
        together = len(passes)
        passes.clear()
        for source, cands in requests:
            ranker.score(source, cands)

        def tails(cands):  # what the decoder runs after the shared first step
            return [t[1:] for t in (target_ids(ranker.tokenizer, c, ranker.max_target_tokens, ranker.eos)[0]
                                    for c in cands) if len(t) > 1]

        assert together == 1 + len(ranker.chunks([t for _, c in requests for t in tails(c)]))
        assert len(passes) == sum(1 + len(ranker.chunks(tails(c))) for _, c in requests)
        assert together <= len(passes) / 2
    finally:
        hook.remove()


def test_cross_kv_not_shared_gives_the_same_scores(models):
    loaded = models(TINY)
    shared = Ranker(loaded, batch_tokens=16).score(SOURCE, CANDS).scores
    _close(Ranker(loaded, batch_tokens=16, share_cross_kv=False).score(SOURCE, CANDS).scores, shared)


@pytest.mark.parametrize("name", [TINY, TINY_T5, TINY_CAUSAL])
def test_encoded_requests_score_as_text_requests(models, name):
    """Token ids made once (``encode``, as the service's preparation thread does) score exactly
    as the text they came from, alone and mixed with text requests in one call."""
    ranker = Ranker(models(name), batch_tokens=40)
    long_source = SOURCE + " and more words" * 200  # cut to the ranker's source limit
    encoded = ranker.encode(long_source, CANDS)
    assert encoded.source_cut > 0 and len(encoded.source) == ranker.max_source_tokens
    assert encoded.targets_cut == sum(len(c.split()) == 60 for c in CANDS) > 0
    from_text = ranker.score(long_source, CANDS)
    from_ids, mixed_text = ranker.score_many([encoded, ("short one", CANDS[:3])])
    _close(from_ids.scores, from_text.scores)
    assert (from_ids.source_tokens, from_ids.source_truncated, from_ids.target_tokens, from_ids.targets_truncated) == (
        from_text.source_tokens, from_text.source_truncated, from_text.target_tokens, from_text.targets_truncated)
    _close(mixed_text.scores, ranker.score("short one", CANDS[:3]).scores)
    with pytest.raises(ValueError, match="no candidates"):
        ranker.score_many([Encoded(encoded.source, 0, [], 0)])


@pytest.mark.parametrize("name", [TINY, TINY_T5])
def test_batched_target_ids_equal_one_at_a_time(models, name):
    tok = models(name).tokenizer
    ranker = Ranker(models(name))
    texts = [*CANDS, "Ünïcödé — title", "  spaced   out  "]
    one = [target_ids(tok, t, ranker.max_target_tokens, ranker.eos) for t in texts]
    assert targets_ids(tok, texts, ranker.max_target_tokens, ranker.eos) == one
    assert any(cut for _, cut in one) and all(ids[-1] == ranker.eos for ids, _ in one)
    assert targets_ids(tok, [], 8, ranker.eos) == []


def test_chunks_cover_every_row_within_budget_with_little_padding(models):
    """Length buckets: every row once, each pass within the token budget, and padding far below
    one bucket padded to the longest row (what made a 100-title request 2.3x its real tokens)."""
    ranker = Ranker(models(TINY), batch_tokens=256)
    rnd = random.Random(3)
    ids = [[7] * rnd.choice([2, 3, 3, 4, 5, 6, 8, 9, 12, 22]) for _ in range(100)]
    chunks = ranker.chunks(ids)
    assert sorted(i for c in chunks for i in c) == list(range(100))
    for c in chunks:
        assert len(c) * max(len(ids[i]) for i in c) <= 256
    padded = sum(len(c) * max(len(ids[i]) for i in c) for c in chunks)
    real = sum(map(len, ids))
    one_bucket = 100 * max(map(len, ids))
    assert padded - real <= 0.1 * real < one_bucket - real
    # a pass costs PASS_COST_TOKENS: padding fewer rows than that by a token is cheaper, more is not
    few, many = PASS_COST_TOKENS // 2, PASS_COST_TOKENS * 2
    assert len(Ranker(models(TINY)).chunks([[7] * 4] * few + [[7] * 5] * 100)) == 1
    assert len(Ranker(models(TINY)).chunks([[7] * 4] * many + [[7] * 5] * 100)) == 2
    assert ranker.chunks([]) == []
    # one row longer than the budget still gets a pass of its own
    assert Ranker(models(TINY), batch_tokens=4).chunks([[7] * 9, [7] * 2]) == [[1], [0]]


@pytest.mark.parametrize("name", [TINY, TINY_T5])
def test_single_token_targets_score_from_the_shared_first_step(models, name):
    """A target of only end-of-sequence is scored by the first decoder step, which the fast path
    shares across candidates (no pass of its own); mixed with longer ones it equals naive."""
    ranker = Ranker(models(name), reduction="sum", batch_invariant=False)
    src = ranker.encode(SOURCE, ["x"]).source
    eos, other = ranker.eos, ranker.encode(SOURCE, ["mario kart"]).targets[0]
    for targets in ([[eos]], [[eos], other, [eos], other[1:]]):
        request = Encoded(src, 0, targets, 0)
        fast = ranker.score_many([request, Encoded(src[:5], 0, targets[::-1], 0)])
        with torch.inference_mode():
            for got, (s, t) in zip(fast, [(src, targets), (src[:5], targets[::-1])]):
                _close(got.scores, ranker.backend.naive(s, t))


def test_int8_load_quantises_linear_layers_on_cpu_only(models, monkeypatch):
    import instructrec.modeling as modeling

    q = load_model(TINY, device="cpu", dtype="int8")
    assert q.quantized == "int8" and q.precision == "int8" and q.dtype == torch.float32
    linears = [m for m in q.model.modules() if type(m).__name__ == "Linear"]
    assert linears and all("quantized" in type(m).__module__ for m in linears)
    fp32 = Ranker(models(TINY)).score(SOURCE, CANDS).scores
    int8 = Ranker(q).score(SOURCE, CANDS).scores
    assert max(abs(a - b) for a, b in zip(fp32, int8)) < 0.2
    monkeypatch.setattr(modeling, "resolve_device", lambda _d: torch.device("cuda"))
    with pytest.raises(ValueError, match="int8 .* CPU only"):
        load_model(TINY, device="cuda", dtype="int8")
    with pytest.raises(ValueError, match="int8"):  # listed among the choices
        load_model(TINY, device="cpu", dtype="int4")


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16), reason="no native bf16 / oneDNN on this CPU")
def test_bf16_load_packs_linear_layers_and_scores_as_unpacked(models):
    """A bf16 model on a CPU with bf16 gets its linear layers laid out once for oneDNN; the
    output layer stays (the ranker reads its weight), and the scores are those of plain
    ``F.linear`` on the same weights, to bf16's rounding (the tiny models' small matmuls take
    another kernel without packing)."""
    from instructrec.modeling import PackedLinear, pack_linears

    name = TINY_PREFIX
    loaded = models(name, "bfloat16")
    packed = [m for m in loaded.model.modules() if isinstance(m, PackedLinear)]
    plain = [m for m in loaded.model.modules() if type(m) is torch.nn.Linear]
    assert packed and plain == [loaded.model.get_output_embeddings()]
    assert not any(k.endswith("packed") for k in loaded.model.state_dict())
    assert pack_linears(loaded.model) == 0  # nothing left to pack
    unpacked = build_base(name, torch.bfloat16)[0].eval()  # the same seeded weights, not packed
    reference = Ranker(dataclasses.replace(loaded, model=unpacked)).score(SOURCE, CANDS).scores
    got = Ranker(loaded).score(SOURCE, CANDS).scores
    assert max(abs(a - b) for a, b in zip(got, reference)) < 1e-2  # bf16 rounding (0 on the real model, AMX)
    assert not can_pack(torch.device("cpu"), torch.float32)
    for other in (models(name), models(TINY_T5, "bfloat16")):  # float32, and a model whose code reads .weight
        assert not any(isinstance(m, PackedLinear) for m in other.model.modules())


def test_one_candidate_per_instruction_runs_one_decoder_pass(models):
    """Sharing the start-token step pays off from two candidates; with one per instruction the
    fast path runs a single decoder pass, as naive does, and still equals naive."""
    loaded = models(TINY)
    ranker = Ranker(loaded, batch_invariant=False)
    passes: list[int] = []
    hook = loaded.model.decoder.bert.register_forward_hook(lambda *_: passes.append(1))
    try:
        single = ranker.score_many([(SOURCE, ["Mario Kart"]), (OTHER_SOURCE, ["Stardew Valley"])])
        assert len(passes) == 1
        passes.clear()
        ranker.score(SOURCE, ["Mario Kart", "Stardew Valley"])
        assert len(passes) == 2  # the shared step, then the rest of both titles
    finally:
        hook.remove()
    _close([s.scores[0] for s in single], [ranker.score(SOURCE, ["Mario Kart"], naive=True).scores[0],
                                           ranker.score(OTHER_SOURCE, ["Stardew Valley"], naive=True).scores[0]])


@pytest.mark.parametrize("name", [TINY, TINY_T5])
def test_vocabulary_blocks_give_the_full_log_softmax(models, name):
    """log p(label) by blocks of the vocabulary (BERT's head with a bias, T5's without, 30,522
    entries: not a multiple of the block) equals log_softmax over the full logits."""
    from instructrec.backends import Head, decoder_parts
    from instructrec.ranker import VOCAB_BLOCK_COLUMNS, _blocked_logprobs

    loaded = models(name)
    _, head = decoder_parts(loaded.model)
    assert isinstance(head, Head) and (head.final.bias is not None) == (name == TINY)
    assert head.final.weight.shape[0] % VOCAB_BLOCK_COLUMNS != 0
    torch.manual_seed(0)
    hidden = torch.randn(70, head.final.weight.shape[1]) * 3
    labels = torch.randint(0, head.final.weight.shape[0], (70,))
    with torch.inference_mode():
        full = torch.log_softmax(head(hidden), -1).gather(-1, labels[:, None]).squeeze(-1)
        blocked = _blocked_logprobs(head, hidden, labels)
        via_ranker = Ranker(loaded).head_logprobs(hidden, labels, head)
    assert torch.allclose(blocked, full, atol=1e-4) and torch.allclose(via_ranker, full, atol=1e-4)
    # training's validation: float32 weights under bf16 autocast, without grad
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _blocked_logprobs(head, hidden, labels)
    assert torch.allclose(autocast, full, atol=0.5)  # bf16 logits; the point is that it runs
