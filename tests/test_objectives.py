"""The listwise objective: negatives, the scores it trains (= the ranker's), a loss that falls;
and the cut decoder it is used with."""

from __future__ import annotations

import random

import pytest
import torch

from instructrec.modeling import TINY, TINY_PREFIX, TINY_T5, build_base, cut_decoder, load_model
from instructrec.ranker import Ranker, decoder_start_id, eos_id, targets_ids
from instructrec.training.data.load import load_dataset
from instructrec.training.instructions import Example
from instructrec.training.objectives import (ListwiseCollator, NegativeSampler, attach_negatives, candidate_logprobs,
                                 freeze_bottom, listwise_loss, rankable)

torch.set_num_threads(1)

SOURCES = ["A user played Halo 3 and Gears of War 2 on the Xbox 360. What should they play next?",
           "Someone who loves farming games asks for something calm."]
CANDIDATES = [["Mass Effect - Xbox 360", "Mario Kart Wii", "Left 4 Dead - Xbox 360 Game of the Year Edition"],
              ["Harvest Moon", "Doom", "Stardew Valley Collector's Edition - PC"]]


@pytest.fixture(scope="module")
def games():
    data = load_dataset("games-sample")
    return data, data.split(10)


def test_negatives_never_touch_the_users_items_and_follow_the_mix(games):
    data, split = games
    sampler = NegativeSampler(data, split.train, popular=2, uniform=3)
    rng = random.Random(0)
    users = sorted(data.sequences)[:300]
    drawn = []
    for user in users:
        negs = sampler.sample(user, rng)
        assert len(negs) == 5 == len(set(negs))
        assert not set(negs) & {x.item_id for x in data.sequences[user]}
        drawn.append(negs)
    # popularity-weighted draws land on frequent training targets far more often than uniform ones
    counts = {}
    for case in split.train:
        counts[case.target] = counts.get(case.target, 0) + 1
    popular = sum(counts.get(i, 0) for negs in drawn for i in negs[:2]) / (2 * len(drawn))
    uniform = sum(counts.get(i, 0) for negs in drawn for i in negs[2:]) / (3 * len(drawn))
    assert popular > 1.5 * uniform  # the sample is sparse (many items once), +1 smoothing flattens it
    with pytest.raises(ValueError, match="at least one negative"):
        NegativeSampler(data, split.train, popular=0, uniform=0)


def test_negatives_attach_only_to_item_targets(games):
    data, split = games
    loaded = load_model(TINY, device="cpu", dtype="float32")
    tok, eos = loaded.tokenizer, eos_id(loaded.tokenizer, loaded.model)
    case = split.train[0]
    title = data.title(case.target)
    examples = [Example("src", title, "t", "<P1,I0,T3>", "s", "item", None, case.user_id, case.target),
                Example("src", "yes", "t", "<P1,I0,T0>", "s", "yes_no", None, case.user_id, case.target),
                Example("src", "not the title", "t", "<P1,I0,T3>", "s", "item", None, case.user_id, case.target)]
    assert [rankable(e, data) for e in examples] == [True, False, False]
    feats = [{"input_ids": [1, 2], "labels": [3, eos]} for _ in examples]
    sampler = NegativeSampler(data, split.train, popular=1, uniform=2)
    assert attach_negatives(feats, examples, data, sampler, tok, 48, eos, seed=0) == 1
    assert len(feats[0]["negatives"]) == 3 and feats[1]["negatives"] == feats[2]["negatives"] == []
    assert all(ids[-1] == eos for ids in feats[0]["negatives"])
    again = [{"input_ids": [1, 2], "labels": [3, eos]} for _ in examples]
    attach_negatives(again, examples, data, sampler, tok, 48, eos, seed=0)
    assert again == feats  # seeded: a resumed run trains on the same negatives


def test_hard_negatives_come_from_the_bi_encoders_nearest_unseen_items(tmp_path):
    """--hard-negatives: each rankable example's hard negatives are drawn from the first 50
    unseen items the MiniLM bi-encoder retrieves for its case's history, the same items the
    hard-10 evaluation's matching stage (``BiEncoder.retrieve``) finds; popular and uniform
    ones follow, and uniform ones make up for a pool too small."""
    from instructrec.training.evaluate.methods import BiEncoder
    from instructrec.training.hard_negatives import POOL, RETRIEVED, hard_pools

    data = load_dataset("games-sample").sample_users(60, seed=0)
    split = data.split(10)
    cases = [c for c in split.train if c.history][:30]
    examples = [Example("src", data.title(c.target), "t", "<P1,I0,T3>", "s", "item", None, c.user_id, c.target)
                for c in cases]
    pools = hard_pools(examples, split.train, data, max_history=10, cache_dir=tmp_path)
    assert list(tmp_path.glob("titles-*.npy"))  # the titles' embeddings are kept for the next run
    want = BiEncoder(data, cache_dir=tmp_path).retrieve(cases, RETRIEVED)
    for k in range(len(cases)):
        assert len(set(pools[k][:POOL]) & set(want[k][:POOL])) >= POOL - 2  # float ties may swap the edge
    sampler = NegativeSampler(data, split.train, popular=1, uniform=1, hard=3)
    rng = random.Random(0)
    for k, case in enumerate(cases):
        seen = {x.item_id for x in data.sequences[case.user_id]}
        negs = sampler.sample(case.user_id, rng, pools[k])
        assert len(negs) == 5 == len(set(negs)) and not set(negs) & seen
        assert set(negs[:3]) <= set([i for i in pools[k] if i not in seen][:POOL])
    alone = sampler.sample(cases[0].user_id, rng, ())  # no pool: uniform ones instead
    assert len(alone) == 5 == len(set(alone))
    loaded = load_model(TINY, device="cpu", dtype="float32")
    tok, eos = loaded.tokenizer, eos_id(loaded.tokenizer, loaded.model)
    feats = [{"input_ids": [1, 2], "labels": [3, eos]} for _ in examples]
    assert attach_negatives(feats, examples, data, sampler, tok, 48, eos, seed=0, pools=pools) == len(examples)
    assert all(len(f["negatives"]) == 5 for f in feats)


def _batch(loaded, sources=SOURCES, candidates=CANDIDATES):
    tok, eos = loaded.tokenizer, eos_id(loaded.tokenizer, loaded.model)
    feats = []
    for src, cands in zip(sources, candidates):
        ids = [t for t, _ in targets_ids(tok, cands, 48, eos)]
        feats.append({"input_ids": tok(src)["input_ids"], "labels": ids[0], "negatives": ids[1:]})
    return ListwiseCollator(tok.pad_token_id)(feats)


@pytest.mark.parametrize("name", [TINY, TINY_T5, TINY_PREFIX])
def test_trained_scores_are_the_rankers_scores(name):
    loaded = load_model(name, device="cpu", dtype="float32")
    batch = _batch(loaded)
    with torch.no_grad():
        sums, lengths = candidate_logprobs(loaded.model, batch["input_ids"], batch["attention_mask"], batch["cand_labels"],
                                           batch["cand_owner"], decoder_start_id(loaded.model), loaded.tokenizer.pad_token_id)
    trained = (sums / lengths).tolist()
    ranker = Ranker(loaded)
    served = [s for src, cands in zip(SOURCES, CANDIDATES) for s in ranker.score(src, cands).scores]
    assert trained == pytest.approx(served, abs=1e-4)


def _fit(loaded, steps: int = 30):
    """Train on one fixed batch with the listwise loss; (first loss, its parts, last loss, its parts)."""
    model = loaded.model
    model.train()
    batch = _batch(loaded)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    kw = dict(start_id=decoder_start_id(model), pad_id=loaded.tokenizer.pad_token_id, mle_weight=0.5)
    first, parts0 = listwise_loss(model, batch, **kw)
    for _ in range(steps):
        loss, parts = listwise_loss(model, batch, **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, parts0, loss, parts


def test_listwise_loss_falls_and_puts_the_target_first():
    loaded = load_model(TINY, device="cpu", dtype="float32")
    model = loaded.model
    for p in model.get_encoder().parameters():  # the frozen-encoder path: no_grad, eval mode
        p.requires_grad_(False)
    first, parts0, loss, parts = _fit(loaded)
    assert not model.get_encoder().training and model.decoder.training
    assert loss.item() < 0.5 * first.item()
    assert parts["listwise"] < parts0["listwise"] and parts["target_first"] == 1.0
    assert all(p.grad is None for p in model.get_encoder().parameters())


def test_likelihood_only_examples_train_on_mle():
    loaded = load_model(TINY, device="cpu", dtype="float32")
    tok, eos = loaded.tokenizer, eos_id(loaded.tokenizer, loaded.model)
    feats = [{"input_ids": tok(SOURCES[0])["input_ids"], "labels": targets_ids(tok, ["yes"], 48, eos)[0][0], "negatives": []}]
    batch = ListwiseCollator(tok.pad_token_id)(feats)
    loss, parts = listwise_loss(loaded.model, batch, start_id=decoder_start_id(loaded.model), pad_id=tok.pad_token_id,
                                mle_weight=0.5)
    assert set(parts) == {"mle"} and loss.item() == pytest.approx(parts["mle"])
    with torch.no_grad():
        ref = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["cand_labels"]).loss
    assert loss.item() == pytest.approx(ref.item(), abs=1e-4)  # the model's own likelihood loss


@pytest.mark.parametrize("name", [TINY, TINY_T5])
def test_cut_decoder_ranks_fast_as_naive_and_reloads(tmp_path, name):
    model, tok, _ = build_base(name)
    cut_decoder(model, 1)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    layers = loaded.model.decoder.block if name == TINY_T5 else loaded.model.decoder.bert.encoder.layer
    assert len(layers) == 1
    ranker = Ranker(loaded)
    fast, naive = ranker.score(SOURCES[0], CANDIDATES[0]), ranker.score(SOURCES[0], CANDIDATES[0], naive=True)
    assert fast.scores == pytest.approx(naive.scores, abs=1e-4)
    with pytest.raises(ValueError, match="cannot keep 5"):
        cut_decoder(build_base(name)[0], 5)


def test_prefix_lm_with_frozen_bottom_learns_above_it_only():
    loaded = load_model(TINY_PREFIX, device="cpu", dtype="float32")
    model = loaded.model
    freeze_bottom(model, 1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("bert.encoder.layer.0.") for n in frozen) and any("embeddings" in n for n in frozen)
    assert not any(n.startswith("bert.encoder.layer.1.") for n in frozen)
    first, parts0, loss, parts = _fit(loaded)
    # the output layer is the frozen word embeddings, so the likelihood falls slowly; the contrast does not
    assert loss.item() < first.item() and parts["listwise"] < 0.5 * parts0["listwise"] and parts["target_first"] == 1.0
    assert not model.bert.encoder.layer[0].training and model.bert.encoder.layer[1].training
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with pytest.raises(ValueError, match="cannot freeze 3"):
        freeze_bottom(model, 3)
