"""Generative recommendation over a catalogue (task form T2, GenRec): the model writes the item.

The paper ranks given candidates because free generation can write an item that does not
exist. Constrained beam search removes that risk: at every step a beam may only continue
with a token that the catalogue's prefix tree (:mod:`instructrec.catalogue`) allows after
its tokens, so every finished beam is a whole catalogue title. A beam's log-likelihood is
then what the ranker computes for that title as a candidate of the same instruction, so the
score reported is the ranker's score (the mean or sum of the title's token log-probabilities,
end of sequence included): equal within float32 rounding, and within bf16 rounding in bf16,
where the two run kernels of other shapes.

The search keeps ``beams`` unfinished prefixes, all of one length at each step, so ordering
them by their summed log-probability is also ordering them by their mean. A prefix that
reaches end-of-sequence is a finished title and leaves the beam (it costs nothing more); the
answer is the best ``k`` finished titles by the ranker's reduction. With ``beams`` at least
the number of allowed titles the search is exhaustive, i.e. the ranker's full sort.

The steps come from the ranker's backend (:mod:`instructrec.backends`), one token at a time
with its own keys/values cache, reordered to follow the surviving beams: the prefix-LM reads
the instruction once and decodes after it (:func:`instructrec.prefixlm.decode_step`), a seq2seq
model encodes once and keeps the cross-attention keys/values as views, a decoder-only model
keeps the instruction's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .backends import Steps
from .catalogue import Catalogue, Node
from .ranker import Ranker

MAX_K = 100  # the most items one request may ask for (the service's and the evaluation's bound)


@dataclass(frozen=True)
class Recommended:
    item: int  # index into the catalogue's items
    title: str
    score: float  # as the ranker scores the title: mean (or sum) of its token log-probs
    total: float  # summed log-prob of the title's tokens, end-of-sequence included
    tokens: int  # the title's tokens, end-of-sequence included


@dataclass(frozen=True)
class _Beam:
    node: Node
    total: float


class Generator:
    """Top-k catalogue items for an instruction, by constrained beam search with a ranker's model."""

    def __init__(self, ranker: Ranker, catalogue: Catalogue, *, beams: int | None = None, where=None):
        catalogue.check_compatible(ranker.tokenizer, ranker.eos, ranker.max_target_tokens, where=where)
        self.ranker = ranker
        self.backend = ranker.backend  # the ranker's own: a title is generated as it is scored
        self.catalogue = catalogue
        self.beams = beams  # None: k

    def top_k(self, source: str | Sequence[int], k: int, **kw) -> list[Recommended]:
        """The ``k`` best catalogue items for the instruction ``source`` (see :meth:`generate`)."""
        return self.generate(source, k, **kw).items

    @torch.inference_mode()
    def generate(self, source: str | Sequence[int], k: int, *, allowed: np.ndarray | None = None,
                 beams: int | None = None, reduction: str | None = None, distinct: bool = False) -> "Generation":
        """The ``k`` best catalogue items for the instruction ``source`` (text, or token ids as
        :meth:`Ranker.source_ids` gives them), only items where ``allowed`` (a bool per item) is
        true, best first; items sharing a title share its score and come in catalogue order.
        ``distinct``: one item per title (the first allowed one in catalogue order), so a user
        never sees the same title twice (Games has two items titled "Final Fantasy III").
        ``beams``: the beam width (at least ``k``; default the generator's, else ``k``)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        reduction = reduction or self.ranker.reduction
        src = self.ranker.source_ids(source)[0] if isinstance(source, str) else list(source)
        width = max(k, beams or self.beams or k)
        steps = self.backend.steps(src)
        leaves = search(steps, self.catalogue, width, k, self.ranker.eos, reduction,
                        self.catalogue.allowed_counts(allowed))
        out: list[Recommended] = []
        for node, total in leaves:
            length = node.depth  # the leaf's tokens, end-of-sequence included
            score = total / length if reduction == "mean" else total
            for item in self.catalogue.leaf_items(node, allowed)[: 1 if distinct else None]:
                if len(out) < k:
                    out.append(Recommended(item, self.catalogue.items[item].title, score, total, length))
        return Generation(out, steps.count)


@dataclass(frozen=True)
class Generation:
    items: list[Recommended]
    steps: int  # decoding steps the search ran (model passes after the instruction's)


def search(steps: Steps, catalogue: Catalogue, width: int, k: int, eos: int, reduction: str,
           counts: np.ndarray | None) -> list[tuple[Node, float]]:
    """Constrained beam search: the finished leaves (a leaf node, the title's summed log-prob)
    in the order of the ranker's reduction, best first, at most enough to hold ``k`` items."""
    beams = [_Beam(catalogue.root(), 0.0)]
    if counts is not None and counts[-1] == 0:
        return []
    logprobs = steps.first()
    steps.count = 1
    finished: list[tuple[float, int, Node, float]] = []  # (-score, order found, leaf, total)
    while beams:
        lp = logprobs.numpy()
        grown = []  # (total, beam, token, child) of every allowed continuation
        for b, beam in enumerate(beams):
            tokens, los, his = catalogue.children(beam.node, counts)
            totals = beam.total + lp[b, tokens].astype(np.float64)
            depth = beam.node.depth + 1
            ends = np.flatnonzero(tokens == eos)  # at most one: a whole title, finished whatever its rank
            for j in ends.tolist():
                total = float(totals[j])
                score = total / depth if reduction == "mean" else total
                finished.append((-score, len(finished), Node(int(los[j]), int(his[j]), depth), total))
            if len(ends):
                totals[ends] = -np.inf
            # only a beam's own best `width` continuations can be among the best `width` of all
            keep = np.flatnonzero(totals > -np.inf)
            if len(keep) > width:
                keep = keep[np.argpartition(-totals[keep], width - 1)[:width]]
            for j in keep.tolist():
                grown.append((float(totals[j]), b, int(tokens[j]), Node(int(los[j]), int(his[j]), depth)))
        grown.sort(key=lambda g: (-g[0], g[1], g[2]))
        grown = grown[:width]
        if not grown or _settled(finished, grown, k, reduction, counts):
            break
        beams = [_Beam(child, total) for total, _, _, child in grown]
        logprobs = steps.advance([b for _, b, _, _ in grown], [t for _, _, t, _ in grown])
        steps.count += 1
    finished.sort(key=lambda f: (f[0], f[1]))
    out, items = [], 0
    for _, _, leaf, total in finished:
        out.append((leaf, total))
        items += _allowed_in(leaf, counts)
        if items >= k:
            break
    return out


def _allowed_in(node: Node, counts: np.ndarray | None) -> int:
    return node.hi - node.lo if counts is None else int(counts[node.hi] - counts[node.lo])


def _settled(finished, grown, k: int, reduction: str, counts) -> bool:
    """With summed scores no unfinished beam can beat the k-th finished item any more (a
    log-prob is never positive, so a sum only falls). A mean can still rise: search on."""
    if reduction != "sum" or not finished:
        return False
    best_open = grown[0][0]
    items = 0
    for neg_score, _, leaf, _ in sorted(finished, key=lambda f: (f[0], f[1])):
        items += _allowed_in(leaf, counts)
        if items >= k:
            return -neg_score >= best_open
    return False


__all__ = ["Generator", "Generation", "Recommended", "search", "MAX_K"]
