"""``instructrec soup``: one relay candidate from the weights of several legs, averaged.

Legs that start from the same shipped weights stay in one basin of the loss, and the average
of their weights (a "model soup", Wortsman et al. 2022; a checkpoint average within one leg
is the same idea) often ranks better than any one of them, at no training cost: two legs that
ran side by side on two lanes, or a leg's last checkpoints, or a leg and the shipped model
itself. The soup is a model directory that ``instructrec promote`` takes like any leg, under
the same rule; its relay record counts every member leg's examples and training seconds (and
names the members), so the card stays honest about what the weights cost.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from instructrec.checkpoint import checkpoint_version
from instructrec.shipped import ShippedError, is_shipped

from .promote import PromoteError, resolve


class SoupError(ValueError):
    pass


@dataclass(frozen=True)
class Member:
    path: Path  # the HF directory (or shipped model) whose weights join the soup
    weight: float
    meta: dict | None  # a leg's metadata with its relay position; None for the shipped model
    run: Path | None  # the leg's training directory, when known (checkpoints of one leg count its examples once)


def parse_member(arg: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:WEIGHT`` (a weight is a positive number; the weights are normalised)."""
    path, sep, tail = arg.rpartition(":")
    if not sep:
        return arg, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return arg, 1.0
    if not weight > 0:
        raise SoupError(f"{arg}: a member's weight must be a positive number")
    return path, weight


def members_of(args: list[tuple[str, float]]) -> list[Member]:
    """Resolve each member: a shipped model, or a leg (its best/ or model/, or a checkpoint)."""
    out = []
    for path, weight in args:
        if is_shipped(path):
            out.append(Member(Path(path), weight, None, None))
            continue
        try:
            candidate = resolve(path)
        except PromoteError as exc:
            raise SoupError(str(exc)) from None
        if not (candidate.meta.get("relay") or {}).get("init"):
            raise SoupError(f"{path}: not a relay leg (trained with `instructrec train --init`): a soup averages legs "
                            "that started from the same shipped weights")
        out.append(Member(candidate.weights, weight, candidate.meta, candidate.run or candidate.weights))
    legs = [m for m in out if m.meta is not None]
    if not legs:
        raise SoupError("a soup needs at least one relay leg among its members")
    starts = {m.meta["relay"]["init"]["checkpoint_version"] for m in legs}
    shipped = {checkpoint_version(m.path) for m in out if m.meta is None}
    if len(starts | shipped) > 1:
        raise SoupError(f"the members started from different weights (checkpoint versions {', '.join(sorted(starts | shipped))}): "
                        "a soup averages legs of one shipped model (and that model itself)")
    return out


def soup_relay(members: list[Member]) -> dict:
    """The soup's relay record: every member leg's examples and seconds (a leg's checkpoints once,
    at its furthest), the furthest position any member reached, and the members themselves."""
    legs = [m for m in members if m.meta is not None]
    first = legs[0].meta["relay"]
    furthest: dict[Path, dict] = {}
    for m in legs:
        r = m.meta["relay"]
        if m.run not in furthest or r["data_position"] > furthest[m.run]["data_position"]:
            furthest[m.run] = r
    consumed = sum(r["data_position"] - r["start"] for r in furthest.values())
    seconds = sum(r["train_seconds_total"] - r.get("seconds_before", 0.0) for r in furthest.values())
    total = sum(m.weight for m in members)
    return {**first, "start": min(r["start"] for r in furthest.values()),
            "data_position": max(r["data_position"] for r in furthest.values()),
            "steps": sum(r["steps"] for r in furthest.values()),
            "examples_total": first["examples_before"] + consumed,
            "train_seconds_total": round(first.get("seconds_before", 0.0) + seconds, 1),
            "soup": [{"member": str(m.path), "weight": round(m.weight / total, 6),
                      "data_position": None if m.meta is None else m.meta["relay"]["data_position"]} for m in members]}


def average(members: list[Member]):
    """(model, tokenizer) of the first leg, holding the weighted mean of every member's tensors
    (float32). A tensor every member has alike (what training froze) is kept bit for bit: a mean
    of equal numbers need not round back to them, and the shipped form keeps changed tensors only."""
    import torch

    from instructrec.modeling import build_base

    template = next(m for m in members if m.meta is not None)
    model, tokenizer, _ = build_base(str(template.path), torch.float32)
    first = {k: v.detach().clone() for k, v in model.state_dict().items()}
    total = sum(m.weight for m in members)
    acc = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in first.items()}
    alike = set(first)
    for m in members:
        state = first if m is template else build_base(str(m.path), torch.float32)[0].state_dict()
        missing = sorted(set(acc) - set(state))
        if missing:
            raise SoupError(f"{m.path}: another architecture than {template.path} (no tensor {missing[0]})")
        alike -= {k for k in alike if not torch.equal(state[k], first[k])}
        for k in acc:
            acc[k] += state[k].float() * (m.weight / total)
    model.load_state_dict({k: first[k] if k in alike else acc[k] for k in acc})
    return model, tokenizer


def soup(args: list[tuple[str, float]], out: str | Path) -> dict:
    """Write the soup of ``args`` ((path, weight) pairs) to ``out``; returns its metadata."""
    from .tune import _save_model_dir

    members = members_of(args)
    model, tokenizer = average(members)
    template = next(m for m in members if m.meta is not None).meta
    meta = {**template, "relay": soup_relay(members), "best_step": None, "validation": {}}
    _save_model_dir(model, tokenizer, Path(out), meta)
    return meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("members", metavar="MEMBER[:WEIGHT]", nargs="+",
                        help="relay legs (a training output, its model/ or best/, or OUT/checkpoints/checkpoint-N) "
                             "and optionally the shipped model they started from; weights default to 1")
    parser.add_argument("--out", required=True, help="the soup's model directory (then `instructrec promote OUT`)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        meta = soup([parse_member(a) for a in args.members], args.out)
    except (SoupError, ShippedError, FileNotFoundError, OSError) as exc:
        print(f"instructrec soup: {exc}", file=sys.stderr)
        return 2
    relay = meta["relay"]
    for m in relay["soup"]:
        print(f"{m['weight']:.3f}  {m['member']}")
    print(f"wrote {args.out}: {relay['examples_total']:,} examples and {relay['train_seconds_total']:,.0f} training seconds "
          f"in total; compare it with `instructrec promote {args.out} --dry-run`")
    return 0
