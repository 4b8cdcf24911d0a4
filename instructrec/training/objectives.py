"""Rank-aware training: the target against sampled negatives, under one instruction pass.

Plain likelihood on titles (``mle``, paper Eq. 1) teaches the decoder how likely a title
is at all; nothing in it compares the target with another item, so a ranker trained that
way mostly sorts by title prior. The ``listwise`` objective scores the target and K
sampled negatives exactly as :class:`instructrec.ranker.Ranker` will (mean token
log-likelihood of the title given the instruction), takes a softmax cross-entropy over
them, and keeps ``mle_weight`` x the target's likelihood loss so the decoder still models
titles. The instruction is encoded once; its K+1 candidates are decoder rows reading it.

Negatives mix popularity-weighted draws (hard for a prior: they look like targets) with
uniform ones (what the paper's protocol ranks against), and never include an item the
user interacted with. They are drawn once per example from a seeded generator, so a
resumed run sees the same data.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

import torch
import torch.nn.functional as F

from instructrec.backends import backend_class
from instructrec.modeling import kind_of
from instructrec.ranker import targets_ids
from instructrec.templates import Target

from .data.types import Case, InteractionData
from .hard_negatives import POOL as HARD_POOL

OBJECTIVES = ("mle", "listwise")


class NegativeSampler:
    """Items a user never touched: ``hard`` drawn from a pool a matching stage retrieved for the
    example (:mod:`.hard_negatives`), ``popular`` drawn by training popularity, ``uniform`` uniformly."""

    def __init__(self, data: InteractionData, cases: Sequence[Case], *, popular: int, uniform: int, hard: int = 0,
                 pool: int = HARD_POOL):
        if popular < 0 or uniform < 0 or hard < 0 or popular + uniform + hard < 1:
            raise ValueError(f"need at least one negative (hard={hard}, popular={popular}, uniform={uniform})")
        self.data = data
        self.popular, self.uniform, self.hard, self.pool = popular, uniform, hard, pool
        self.items = sorted(data.items)
        counts = Counter(c.target for c in cases)
        # +1: an item never seen as a training target can still be drawn, rarely
        self._cum = list(accumulate(counts.get(i, 0) + 1 for i in self.items))
        self._seen: dict[str, frozenset[str]] = {}

    def seen(self, user_id: str) -> frozenset[str]:
        got = self._seen.get(user_id)
        if got is None:
            got = self._seen[user_id] = frozenset(x.item_id for x in self.data.sequences.get(user_id, ()))
        return got

    def _draw(self, rng: random.Random, weighted: bool) -> str:
        if weighted:
            return self.items[bisect.bisect_right(self._cum, rng.random() * self._cum[-1])]
        return self.items[rng.randrange(len(self.items))]

    def sample(self, user_id: str, rng: random.Random, retrieved: Sequence[str] = ()) -> list[str]:
        """``hard + popular + uniform`` distinct negatives for ``user_id``: the hard ones drawn
        uniformly from the first ``pool`` items of ``retrieved`` the user never touched (uniform
        ones make up for a pool too small), then the popular ones, then the uniform ones."""
        seen, out = self.seen(user_id), []
        if self.hard:
            fresh = [i for i in retrieved if i not in seen][: self.pool]
            out += rng.sample(fresh, min(self.hard, len(fresh)))
        for weighted, n in ((True, self.popular), (False, self.uniform + self.hard - len(out))):
            for _ in range(n):
                for _attempt in range(1000):
                    item = self._draw(rng, weighted)
                    if item not in seen and item not in out:
                        out.append(item)
                        break
                else:
                    raise ValueError(f"could not draw a negative for user {user_id}: too few unseen items")
        return out


def freeze_bottom(model, layers: int) -> None:
    """Freeze a prefix-LM's embeddings and its first ``layers`` layers: they keep their
    pretrained weights, cost no backward pass, and run without dropout."""
    bert = model.bert
    if not 0 <= layers <= len(bert.encoder.layer):
        raise ValueError(f"the model has {len(bert.encoder.layer)} layers; cannot freeze {layers}")
    for part in (bert.embeddings, *bert.encoder.layer[:layers]):
        for p in part.parameters():
            p.requires_grad_(False)
    # the output layer is tied to the (frozen) word embeddings; its bias and the transform still learn


def rankable(example, data: InteractionData) -> bool:
    """Whether the example's answer is its item's title (T2/T3 item targets): only then do
    negatives' titles make a meaningful contrast."""
    return example.target_form == Target.ITEM.value and example.item_id in data.items \
        and example.target == data.title(example.item_id)


def attach_negatives(features: list[dict], examples: Sequence, data: InteractionData, sampler: NegativeSampler,
                     tokenizer, max_target_tokens: int, eos: int, seed: int, pools=None) -> int:
    """Add ``negatives`` (token ids of each negative title, as the ranker tokenises them) to
    every rankable example's features, in place; returns how many got them. ``pools[k]``: the
    items retrieved for example k that its hard negatives are drawn from."""
    rng = random.Random(seed)
    n = 0
    for k, (feat, ex) in enumerate(zip(features, examples)):
        if rankable(ex, data):
            titles = [data.title(i) for i in sampler.sample(ex.user_id, rng, pools[k] if pools is not None else ())]
            feat["negatives"] = [ids for ids, _ in targets_ids(tokenizer, titles, max_target_tokens, eos)]
            n += 1
        else:
            feat["negatives"] = []
    return n


@dataclass
class ListwiseCollator:
    """Pads instructions, and lays out every example's candidate rows (target first, then its
    negatives) for one decoder pass: ``cand_labels`` (padded with -100), ``cand_owner`` (the
    instruction each row reads) and ``cand_group`` (the example whose list it belongs to, -1
    for an example trained on likelihood only)."""

    pad_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        rows, owner, group = [], [], []
        for i, f in enumerate(features):
            input_ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
            cands = [f["labels"], *f.get("negatives", ())]
            rows += cands
            owner += [i] * len(cands)
            group += [i if len(cands) > 1 else -1] * len(cands)
        labels = torch.full((len(rows), max(len(r) for r in rows)), -100, dtype=torch.long)
        for r, ids in enumerate(rows):
            labels[r, : len(ids)] = torch.tensor(ids)
        return {"input_ids": input_ids, "attention_mask": mask, "cand_labels": labels,
                "cand_owner": torch.tensor(owner), "cand_group": torch.tensor(group)}


def candidate_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cand_labels: torch.Tensor,
                       cand_owner: torch.Tensor, start_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log p of each candidate row given its instruction, tokens per row), with
    gradients. The instruction is read once (a seq2seq encoder under ``no_grad`` and in eval
    mode when it is frozen; a prefix-LM's keys/values per layer); rows read their
    instruction's states; the vocabulary head runs only at real target positions. The same
    arithmetic as the ranker's, so the scores trained are the scores served."""
    if hasattr(model, "get_base_model"):  # peft: the LoRA layers live inside the base model
        model = model.get_base_model()
    real = cand_labels != -100
    labels = cand_labels.masked_fill(~real, pad_id)
    dec = torch.cat([torch.full_like(labels[:, :1], start_id), labels[:, :-1]], dim=1)
    backend = backend_class(kind_of(model.config))  # the kind's own scoring, as the ranker runs it
    hidden, head = backend.candidate_states(model, input_ids, attention_mask, dec, cand_owner)
    return _summed(head(hidden[real]), labels, real)


def _summed(logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed log p(label) from the logits at the real positions, and tokens per row."""
    token_lp = -F.cross_entropy(logits.float(), labels[real], reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[real]
    sums = torch.zeros(labels.shape[0], device=labels.device, dtype=token_lp.dtype).index_add(0, rows, token_lp)
    return sums, real.sum(dim=1)


def listwise_loss(model, batch: dict[str, torch.Tensor], *, start_id: int, pad_id: int,
                  mle_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Softmax cross-entropy of the target (row 0 of each list) over its candidates' mean
    token log-likelihoods, plus ``mle_weight`` x the targets' token-mean negative
    log-likelihood. Examples without negatives contribute the likelihood term only."""
    sums, lengths = candidate_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["cand_labels"],
                                       batch["cand_owner"], start_id, pad_id)
    owner, group = batch["cand_owner"], batch["cand_group"]
    first = torch.ones_like(owner, dtype=torch.bool)
    first[1:] = owner[1:] != owner[:-1]  # each example's target row
    mle = -sums[first].sum() / lengths[first].sum()
    listed = group >= 0
    parts = {"mle": float(mle.detach())}
    if not listed.any():
        return mle, parts
    k = int((group[listed] == group[listed][0]).sum())  # candidates per list (the same for every list)
    scores = (sums[listed] / lengths[listed]).view(-1, k)
    contrast = F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))
    parts["listwise"] = float(contrast.detach())
    parts["target_first"] = float((scores.argmax(dim=1) == 0).float().mean())
    return contrast + mle_weight * mle, parts
