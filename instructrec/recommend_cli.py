"""``instructrec recommend``: the model writes the best k items of a catalogue for one need (T2).

The need becomes a matching instruction through the same selection and fitting as the
service's ``/recommend``, and constrained beam search over the catalogue
(:mod:`instructrec.generation`) writes the items; the history's titles are left out unless
``--keep-history``.
"""

from __future__ import annotations

import argparse

from .generation import MAX_K
from .rank_cli import UsageError, add_need_arguments, history_of, load_reranker, print_header, respond
from .reranker import check_template, open_catalogue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_need_arguments(parser, "matching")
    parser.add_argument("--catalogue", required=True, metavar="CAT",
                        help="catalogue file for this model (`instructrec catalogue build`)")
    parser.add_argument("--top-n", "--k", dest="k", type=int, default=10, metavar="N",
                        help=f"items to write, 1 to {MAX_K} (default 10; --k is the earlier name)")
    parser.add_argument("--beams", type=int, help="beam width (default: --top-n; never below it)")
    parser.add_argument("--keep-history", action="store_true", help="the history's own items may be recommended")


def _recommend(args: argparse.Namespace) -> dict:
    if not 1 <= args.k <= MAX_K or (args.beams is not None and args.beams < 1):
        raise UsageError(f"--top-n must be 1 to {MAX_K} and --beams at least 1")
    history = history_of(args)
    check_template(args.template)
    catalogue = open_catalogue(args.catalogue)  # a wrong file fails before the model loads
    reranker = load_reranker(args, fusion="lm-only")  # generation is the LM's alone: no gate to load
    return reranker.recommend(catalogue, history=history, preference=args.preference, intention=args.intention,
                              intention_kind=args.intention_kind, top_n=args.k, beams=args.beams,
                              keep_history=args.keep_history, template=args.template).to_dict()


def _print_table(result: dict) -> None:
    print_header(result)
    rows = result["recommended"]
    print(f"{len(rows)} of {result['catalogue']['items']:,} catalogue items by {result['reduction']} "
          f"log-likelihood ({result['steps']} decoding steps):")
    width = len(str(len(rows)))
    for pos, r in enumerate(rows, 1):
        print(f"{pos:>{width}}. {r['score']:10.4f}  [{r['id']}] {r['title']}")


def run(args: argparse.Namespace) -> int:
    return respond("recommend", _recommend, _print_table, args)
