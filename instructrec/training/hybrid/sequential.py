"""``instructrec sequential train``: train the hybrid's SASRec (:mod:`instructrec.hybrid.sequential`).

Data: every user's sequence without its last two items (the evaluation's validation and test
items), cut into windows of ``max_length`` + 1; each window predicts every next item at once
(causal attention), with a softmax over all items. Validation after each epoch: each of a
seeded ``valid_users`` users' second-to-last item among 9 uniform never-interacted items
(the evaluation's protocol); the best epoch by NDCG@5 is kept, and training stops after
``patience`` epochs without a gain. Each epoch ends with a checkpoint (weights, optimizer,
RNG, epoch, curve), so a killed run continues from there with the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch

from instructrec import files
from instructrec.hybrid.sequential import SASRecConfig, SequentialScorer, left_pad, load_sequential, new_scorer, stamp

from ..data.load import load_dataset
from ..data.types import DataError, InteractionData
from ..evaluate import candidates as cand
from ..metrics import metrics_from_ranks, rank_of

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


def windows(seq: list[int], length: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, next items) windows covering ``seq``, the last window ending at its end."""
    out = []
    end = len(seq) - 1
    while end >= 1:
        start = max(0, end - length)
        out.append((seq[start:end], seq[start + 1:end + 1]))
        end -= length
    return out


def validation_cases(data: InteractionData, item_ids: list[str], users: int, seed: int):
    cases = cand.pick_users(cand.full_cases(data, "valid"), users, seed)
    return cand.uniform_candidates(data, cases, 9, seed)


def evaluate_scorer(scorer: SequentialScorer, cases) -> dict:
    ranks = []
    scorer.forget()  # the weights changed since the last evaluation: no state kept from then
    for c in cases:
        s = scorer.scores(list(c.history), list(c.candidates))
        ranks.append(rank_of(list(s) if s is not None else [0.0] * len(c.candidates), c.positive))
    m = metrics_from_ranks(ranks)
    return {"hr@1": round(m["hr@1"], 4), "ndcg@5": round(m["ndcg@5"], 4), "cases": len(ranks)}


def train_sequential(data: InteractionData, out: str | Path, *, epochs: int = 30, patience: int = 3,
                     batch_size: int = 256, learning_rate: float = 1e-3, config: dict | None = None,
                     valid_users: int = 2000, seed: int = 0, holdout: int = 2, progress: bool = True) -> dict:
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    item_ids = sorted(data.items)
    pos = {item: i + 1 for i, item in enumerate(item_ids)}
    cfg = SASRecConfig(items=len(item_ids), **(config or {}))
    train_rows = []
    for seq in data.sequences.values():
        ids = [pos[x.item_id] for x in seq]
        ids = ids[: len(ids) - holdout] if holdout else ids
        train_rows += windows(ids, cfg.max_length)
    valid = validation_cases(data, item_ids, valid_users, seed)
    torch.manual_seed(seed)
    scorer = new_scorer(cfg, item_ids, {"data": data.name, "holdout": holdout, "windows": len(train_rows)})
    model = scorer.model
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    state = {"epoch": 0, "best": None, "curve": [], "seconds": 0.0, "stale": 0}
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        log.info("resuming %s after epoch %d", out, state["epoch"])
    while state["epoch"] < epochs and state["stale"] < patience:
        started = time.perf_counter()
        model.train()
        order = list(range(len(train_rows)))
        random.Random(seed * 1000 + state["epoch"]).shuffle(order)
        total, count = 0.0, 0
        bar = tqdm(range(0, len(order), batch_size), desc=f"epoch {state['epoch'] + 1}", disable=not progress, leave=False)
        for b in bar:
            rows = [train_rows[i] for i in order[b:b + batch_size]]
            inputs = left_pad([r[0] for r in rows], cfg.max_length)
            targets = left_pad([r[1] for r in rows], cfg.max_length)
            states = model.states(inputs)
            keep = targets > 0
            logits = states[keep] @ model.items.weight[1:].T
            loss = torch.nn.functional.cross_entropy(logits, targets[keep] - 1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * int(keep.sum())
            count += int(keep.sum())
            bar.set_postfix(loss=f"{total / max(count, 1):.3f}")
        model.eval()
        metrics = evaluate_scorer(scorer, valid)
        state["epoch"] += 1
        state["seconds"] += time.perf_counter() - started
        state["curve"].append({"epoch": state["epoch"], "loss": round(total / max(count, 1), 4),
                               "seconds": round(state["seconds"], 1), **metrics})
        log.info("epoch %d: loss %.4f, validation HR@1 %.4f NDCG@5 %.4f (%.0f s so far)", state["epoch"],
                 total / max(count, 1), metrics["hr@1"], metrics["ndcg@5"], state["seconds"])
        if state["best"] is None or metrics["ndcg@5"] > state["best"]["ndcg@5"]:
            state["best"] = {"epoch": state["epoch"], **metrics}
            state["stale"] = 0
            stamp(scorer)
            scorer.header["info"].update({"epoch": state["epoch"], "validation": metrics})
            scorer.save(out / "best")
        else:
            state["stale"] += 1
        with files.atomic_file(ckpt, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "torch_rng": torch.get_rng_state(), "state": state}, f)
    best = load_sequential(out / "best")
    best.header["info"].update({"curve": state["curve"], "train_seconds": round(state["seconds"], 1),
                                "threads": torch.get_num_threads(), "epochs_run": state["epoch"]})
    best.save(out / "model")
    summary = {"model": str(out / "model"), "best": state["best"], "epochs_run": state["epoch"],
               "train_seconds": round(state["seconds"], 1), "curve": state["curve"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    train = sub.add_parser("train", help="train the hybrid's SASRec on a dataset (resumable, early stopping)")
    train.add_argument("--data", required=True, help="dataset directory or shipped name (games, games-sample)")
    train.add_argument("--out", required=True, help="output directory (the model lands in OUT/model)")
    train.add_argument("--epochs", type=int, default=30, help="epochs at most (default 30)")
    train.add_argument("--patience", type=int, default=3, help="stop after this many epochs without a validation gain")
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--hidden", type=int, default=64)
    train.add_argument("--layers", type=int, default=2)
    train.add_argument("--max-length", type=int, default=20)
    train.add_argument("--valid-users", type=int, default=2000)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("epochs", "patience", "batch_size", "hidden", "layers", "max_length", "valid_users"):
        if getattr(args, name) < 1:
            print(f"instructrec sequential: error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    try:
        summary = train_sequential(load_dataset(args.data), args.out, epochs=args.epochs, patience=args.patience,
                                   batch_size=args.batch_size, learning_rate=args.learning_rate,
                                   config={"hidden": args.hidden, "layers": args.layers, "max_length": args.max_length},
                                   valid_users=args.valid_users, seed=args.seed, progress=args.progress)
    except DataError as exc:
        print(f"instructrec sequential: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("model", "best", "epochs_run", "train_seconds")}))
    return 0
