"""``instructrec recommend``: the model writes the best k items of a catalogue for one need (T2).

The need becomes a matching instruction through the same selection and fitting as the
service's ``/recommend``, and constrained beam search over the catalogue
(:mod:`instructrec.generation`) writes the items; the history's titles are left out unless
``--keep-history``.
"""

from __future__ import annotations

import argparse

from .generation import MAX_K
from .rank_cli import (UsageError, add_need_arguments, check_template, instruction, load_ranker, need_of, print_header,
                       respond)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_need_arguments(parser, "matching")
    parser.add_argument("--catalogue", required=True, metavar="CAT",
                        help="catalogue file for this model (`instructrec catalogue build`)")
    parser.add_argument("--top-n", "--k", dest="k", type=int, default=10, metavar="N",
                        help=f"items to write, 1 to {MAX_K} (default 10; --k is the earlier name)")
    parser.add_argument("--beams", type=int, help="beam width (default: --top-n; never below it)")
    parser.add_argument("--keep-history", action="store_true", help="the history's own items may be recommended")


def _recommend(args: argparse.Namespace) -> dict:
    import numpy as np

    from .aspects import TaskForm
    from .catalogue import CatalogueError, load_catalogue
    from .generation import Generator

    if not 1 <= args.k <= MAX_K or (args.beams is not None and args.beams < 1):
        raise UsageError(f"--top-n must be 1 to {MAX_K} and --beams at least 1")
    need = need_of(args)
    check_template(args.template)
    try:
        catalogue = load_catalogue(args.catalogue)
    except CatalogueError as exc:
        raise UsageError(str(exc)) from None
    name, ranker = load_ranker(args)
    try:
        generator = Generator(ranker, catalogue, where=args.catalogue)
    except CatalogueError as exc:
        raise UsageError(str(exc)) from None
    inst = instruction(need, ranker, args.template, TaskForm.MATCHING)
    allowed = None
    if not args.keep_history and need.history:
        allowed = np.ones(len(catalogue), dtype=bool)
        allowed[[i for title in need.history for i in catalogue.indices_of_title(title)]] = False
    out = generator.generate(inst.source, args.k, allowed=allowed, beams=args.beams)
    return {
        "model": name,
        "catalogue": {"path": args.catalogue, "version": catalogue.version, "items": len(catalogue)},
        "template": inst.template.id,
        "instantiation": inst.rendered.instantiation.label(),
        "history_dropped": inst.history_dropped,
        "reduction": args.reduction,
        "instruction": inst.source,
        "steps": out.steps,
        "recommended": [{"id": catalogue.items[r.item].id, "title": r.title, "score": r.score} for r in out.items],
    }


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
