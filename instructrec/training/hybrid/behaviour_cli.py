"""``instructrec behaviour``: build (and describe) the behaviour index hybrid scoring reads.

``build`` counts item-to-item transitions and co-occurrences in a dataset's sequences
(:mod:`instructrec.hybrid.behaviour`). By default each user's last two interactions are left
out (``--holdout 2``: the validation and test items of the paper's split, so an evaluation on
this data sees no answer in the index); for a production index give ``--holdout 0``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from instructrec.hybrid.behaviour import TOP_N, BehaviourError, build_behaviour_index, load_behaviour_index

from ..data.catalogue_items import catalogue_items
from ..data.load import load_dataset
from ..data.types import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    build = sub.add_parser("build", help="count item-to-item neighbours in a dataset and write the index")
    build.add_argument("--data", required=True, metavar="DIR", help="a dataset directory or shipped name (games, games-sample)")
    build.add_argument("--out", required=True, metavar="FILE", help="the index file to write (.npz)")
    build.add_argument("--top-n", type=int, default=TOP_N, help=f"neighbours kept per item by each weight (default {TOP_N})")
    build.add_argument("--holdout", type=int, default=2,
                       help="interactions left out at the end of every sequence (default 2: the evaluation's "
                            "validation and test items; 0 for a production index)")
    show = sub.add_parser("show", help="print an index's header")
    show.add_argument("index", metavar="FILE")


def training_sequences(data, holdout: int = 2):
    """Every user's item ids without the last ``holdout`` (oldest first)."""
    for seq in data.sequences.values():
        ids = [x.item_id for x in seq]
        yield ids[: len(ids) - holdout] if holdout else ids


def build_for(data, *, holdout: int = 2, top_n: int = TOP_N, source: str = ""):
    """The index of a loaded dataset over its items in id order (the catalogue's order)."""
    items, _ = catalogue_items(data)
    return build_behaviour_index(training_sequences(data, holdout), [(i.id, i.title) for i in items], top_n=top_n,
                                 source=f"{source or data.name} (holdout {holdout})")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "show":
            index = load_behaviour_index(args.index)
            print(json.dumps(index.header, indent=2))
            return 0
        if args.holdout < 0:
            raise BehaviourError(f"--holdout must be 0 or more, not {args.holdout}")
        start = time.perf_counter()
        index = build_for(load_dataset(args.data), holdout=args.holdout, top_n=args.top_n, source=args.data)
        path = index.save(args.out)
    except (BehaviourError, DataError) as exc:
        print(f"instructrec behaviour: error: {exc}", file=sys.stderr)
        return 2
    h = index.header
    print(f"wrote {path}: {h['items']} items, {h['edges']:,} neighbour pairs from {h['users']:,} users, "
          f"{path.stat().st_size / 2**20:.1f} MB, {time.perf_counter() - start:.1f} s (counting {h['build_seconds']} s)")
    return 0
