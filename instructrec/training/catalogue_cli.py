"""``instructrec catalogue``: build (and describe) the catalogue that ``/recommend`` generates from.

``build`` reads the items of a dataset (``--data``: a directory or a shipped name such as
``games``) or of a JSON-lines file (``--items``: ``{"id", "title", ...}`` per line, other
fields kept as metadata), tokenises every title as the model ``--model`` scores candidates,
and writes the prefix tree (:mod:`instructrec.catalogue`); then it keeps the titles' vectors
of the hybrid's semantic signal beside it, in batches on every core (a service serving the
catalogue without them computes them in the background at its first start, each title alone,
about twice as long on one thread, while it answers /rerank). ``show`` prints a catalogue's header.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from instructrec.catalogue import CatalogueError, CatalogueItem, build_catalogue, load_catalogue, load_text_side, read_items_jsonl
from instructrec.training.data.catalogue_items import catalogue_items
from instructrec.training.data.load import load_dataset
from instructrec.training.data.types import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    build = sub.add_parser("build", help="tokenise a catalogue's titles for a model and write its prefix tree")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DIR", help="a dataset directory or shipped name (games, games-sample)")
    source.add_argument("--items", metavar="FILE.jsonl", help="one JSON object per line: {\"id\", \"title\", ...}")
    build.add_argument("--model", help="the checkpoint (or built-in) that will generate from it (default: the "
                       "quick-start model)")
    build.add_argument("--max-target-tokens", type=int, metavar="N",
                       help="cut titles to N tokens with end-of-sequence (default: what the model was tuned with)")
    build.add_argument("--out", required=True, metavar="CAT", help="the catalogue file to write (.npz)")
    build.add_argument("--title-vectors", action=argparse.BooleanOptionalAction, default=True,
                       help="also keep the titles' MiniLM vectors beside the catalogue (CAT.vectors-*.npy), which "
                       "the hybrid's semantic signal and /recommend's retrieval read (default: yes; a service "
                       "computes missing ones in the background at its start, /rerank answering meanwhile)")
    show = sub.add_parser("show", help="print a catalogue's header")
    show.add_argument("catalogue", metavar="CAT")


def _dataset_items(path: str) -> list[CatalogueItem]:
    items, untitled = catalogue_items(load_dataset(path))
    if untitled:
        print(f"{untitled} item(s) of {path} have no title and were left out", file=sys.stderr)
    return items


def _build(args: argparse.Namespace) -> int:
    from instructrec.modeling import ModelNotFound, resolve_model_name
    from instructrec.ranker import token_limits

    try:
        name = resolve_model_name(args.model)
    except ModelNotFound as exc:
        print(f"instructrec catalogue: error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    items = _dataset_items(args.data) if args.data else list(read_items_jsonl(args.items))
    text = load_text_side(name)
    limit = args.max_target_tokens or token_limits(text.meta)[1]
    catalogue = build_catalogue(items, text.tokenizer, eos=text.eos, max_target_tokens=limit, model=name,
                                source=args.data or args.items, progress=True)
    path = catalogue.save(args.out)
    h = catalogue.header
    print(f"wrote {path}: {h['items']} items, {h['leaves']} distinct titles as {name} tokenises them "
          f"(at most {limit} tokens), {path.stat().st_size / 2**20:.1f} MB, {time.perf_counter() - start:.1f} s")
    if args.title_vectors:
        _keep_title_vectors(path)
    return 0


def _keep_title_vectors(path) -> None:
    """The semantic signal's vectors of the catalogue's titles, in the file the service reads
    (the titles as the service lists them: the saved catalogue's items, in order)."""
    from instructrec.hybrid.semantic import SemanticEncoder, catalogue_keep

    start = time.perf_counter()
    titles = [it.title for it in load_catalogue(path).items]
    encoder = SemanticEncoder()
    kept = encoder.kept_vectors_path(titles, catalogue_keep(path))
    existed = kept.is_file()
    vectors = encoder.catalogue_vectors(titles, catalogue_keep(path), progress=True)
    how = "already there" if existed else f"{time.perf_counter() - start:.1f} s"
    print(f"kept {len(vectors)} title vectors of the semantic signal in {kept} ({how})")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "show":
            start = time.perf_counter()
            catalogue = load_catalogue(args.catalogue)
            print(json.dumps({**catalogue.header, "load_seconds": round(time.perf_counter() - start, 3)}, indent=2))
            return 0
        return _build(args)
    except (CatalogueError, DataError) as exc:
        print(f"instructrec catalogue: error: {exc}", file=sys.stderr)
        return 2
