"""Scoring the validation cases during training, batched.

Unsharded models (one process, DDP): the main process scores the cases with the serving
ranker, several cases per :meth:`Ranker.score_many` call; the other processes wait for its
metrics. Sharded models (FSDP, DeepSpeed ZeRO-3): no process holds a whole layer, so the
encoder cannot be run on its own (``get_encoder()`` on a sharded T5 fails); every process
scores its share of the cases with the model's full forward, the same number of passes on
each (each pass gathers the parameters), and the scores are gathered.
"""

from __future__ import annotations

import torch

from instructrec.ranker import Encoded, Ranker

from . import distributed

CASES_PER_CALL = 16  # validation cases per score_many call (160 candidates with 9 negatives)
ROWS_PER_PASS = 32  # (instruction, candidate) rows per forward of a sharded model


def score_cases(ranker: Ranker, encoded: list[Encoded]) -> list[list[float]]:
    """Scores per case, by the ranker's fast path (unsharded) or full forwards (sharded)."""
    if distributed.sharded(ranker.model):
        return _score_sharded(ranker, encoded)
    out = []
    for a in range(0, len(encoded), CASES_PER_CALL):
        out.extend(s.scores for s in ranker.score_many(encoded[a : a + CASES_PER_CALL]))
    return out


@torch.no_grad()
def _score_sharded(ranker: Ranker, encoded: list[Encoded]) -> list[list[float]]:
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed.active() else (0, 1)
    rows = [(c, j) for c in range(rank, len(encoded), world) for j in range(len(encoded[c].targets))]
    passes = max(distributed.gather([-(-len(rows) // ROWS_PER_PASS)]))
    start, pad = ranker.start_id(), ranker.tokenizer.pad_token_id or 0
    mine: dict[tuple[int, int], float] = {}
    for p in range(passes):
        chunk = rows[p * ROWS_PER_PASS : (p + 1) * ROWS_PER_PASS]
        real = len(chunk)
        chunk = chunk or [(0, 0)]  # a process out of rows still joins the pass (result dropped)
        srcs = [encoded[c].source for c, _ in chunk]
        tgts = [encoded[c].targets[j] for c, j in chunk]
        src_w, tgt_w = max(map(len, srcs)), max(map(len, tgts))
        dev = ranker.device
        inp = torch.tensor([s + [pad] * (src_w - len(s)) for s in srcs], device=dev)
        mask = torch.tensor([[1] * len(s) + [0] * (src_w - len(s)) for s in srcs], device=dev)
        labels = torch.tensor([t + [pad] * (tgt_w - len(t)) for t in tgts], device=dev)
        dec = torch.tensor([[start] + t[:-1] + [pad] * (tgt_w - len(t)) for t in tgts], device=dev)
        logits = ranker.model(input_ids=inp, attention_mask=mask, decoder_input_ids=dec).logits
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        keep = torch.arange(tgt_w, device=dev)[None, :] < torch.tensor([len(t) for t in tgts], device=dev)[:, None]
        for key, value in zip(chunk[:real], (lp * keep).sum(-1).tolist()):
            mine[key] = value
    found = dict(distributed.gather(list(mine.items())))
    scores = []
    for c, e in enumerate(encoded):
        sums = [found[c, j] for j in range(len(e.targets))]
        scores.append([x / len(t) if ranker.reduction == "mean" else x for x, t in zip(sums, e.targets)])
    return scores
