"""``instructrec rank``: rerank candidates for one instruction with a model.

The user's need (history, explicit preference, intention) becomes an instruction through
the same selection and fitting as serving (:func:`instructrec.instruction.build`); the
candidates are then scored by their likelihood under that instruction and, with a gate
(``--gate``, default gate.json in the model directory; ``--fusion lm-only`` turns it off),
ranked by the LM fused with the behaviour (``--behaviour``) and semantic signals, as the
service's /rerank does: history and candidates are matched to the index's items by title.
The work is :meth:`instructrec.reranker.Reranker.rank`'s; this module reads the flags and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .modeling import DEFAULT_MODEL_DIR as DEFAULT_MODEL
from .options import add_device_options
from .reranker import Reranker, RerankerError, RerankerWarning, check_template, default_gate, resolve_model


class UsageError(Exception):
    """A problem with the request: reported as one line on stderr, exit code 2."""


def add_need_arguments(parser: argparse.ArgumentParser, task: str) -> None:
    """The model and the user's need: what ``rank`` and ``recommend`` both take."""
    parser.add_argument("--model", help=f"checkpoint directory or built-in model name (default: {DEFAULT_MODEL} if it exists)")
    parser.add_argument("--history", action="append", default=[], metavar="TITLE",
                        help="a past item title, oldest first (repeatable)")
    parser.add_argument("--history-file", metavar="FILE", help="past item titles, one per line, oldest first")
    parser.add_argument("--preference", metavar="TEXT", help="the user's explicit preference, in their words (P2)")
    parser.add_argument("--intention", metavar="TEXT", help="what the user is looking for now (I1/I2)")
    parser.add_argument("--intention-kind", choices=("vague", "specific"), default="specific",
                        help="whether --intention is vague (I1) or specific (I2); default specific")
    parser.add_argument("--template", metavar="ID", help=f"use this template (default: the best fitting {task} template)")
    parser.add_argument("--reduction", choices=("mean", "sum"), default="mean",
                        help="score = mean (default) or sum of the title's token log-probabilities")
    add_device_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_need_arguments(parser, "rerank")
    parser.add_argument("--candidate", action="append", default=[], metavar="TITLE",
                        help="a candidate item title (repeatable)")
    parser.add_argument("--candidates-file", metavar="FILE", help="candidate titles, one per line")
    parser.add_argument("--top-n", type=int, metavar="N", help="print only the N best candidates")
    parser.add_argument("--fusion", choices=("auto", "lm-only"), default="auto",
                        help="auto (default): fuse the LM with the behaviour and semantic signals when there is a "
                        "gate, else the LM alone; lm-only: the LM alone")
    parser.add_argument("--gate", metavar="GATE", help="gate.json (or a directory holding one) that fuses the signals "
                        "(default: gate.json in the model directory if it exists)")
    parser.add_argument("--behaviour", metavar="INDEX", help="behaviour index (.npz): the behaviour signal, items "
                        "matched by exact title (needs a gate)")
    parser.add_argument("--sequential", metavar="DIR", help="sequential model (SASRec): the sequential signal "
                        "(default: sequential/ beside the model when it exists)")
    parser.add_argument("--no-semantic", action="store_true", help="leave out the MiniLM semantic signal")


def read_lines(path: str, what: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def history_of(args: argparse.Namespace) -> list[str]:
    """``--history-file``'s titles, then each ``--history``: oldest first."""
    history = list(args.history)
    if args.history_file:
        history = read_lines(args.history_file, "history") + history
    return history


def _candidates(args: argparse.Namespace) -> list[str]:
    candidates = [c.strip() for c in args.candidate if c.strip()]
    if args.candidates_file:
        candidates += read_lines(args.candidates_file, "candidates")
    if not candidates:
        raise UsageError("no candidates: give --candidate TITLE (repeatable) or --candidates-file FILE")
    return candidates


def load_reranker(args: argparse.Namespace, **hybrid):
    """The ``--model`` as a :class:`~instructrec.reranker.Reranker`; its warnings (a model tuned
    on another template table) are one line each on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RerankerWarning)
        reranker = Reranker.load(args.model, device=args.device, dtype=args.dtype, reduction=args.reduction, **hybrid)
    for w in caught:
        if issubclass(w.category, RerankerWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:  # not ours: shown as it would have been
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return reranker


def _rank(args: argparse.Namespace) -> dict:
    if args.top_n is not None and args.top_n < 1:
        raise UsageError("--top-n must be at least 1")
    history = history_of(args)
    candidates = _candidates(args)
    check_template(args.template)
    if args.behaviour and args.gate is None and default_gate(resolve_model(args.model)) is None:
        raise UsageError(f"--behaviour {args.behaviour} needs a gate to fuse it with: give --gate GATE")
    reranker = load_reranker(args, gate=args.gate, behaviour=args.behaviour, sequential=args.sequential,
                             semantic=not args.no_semantic, fusion=args.fusion)
    return reranker.rank(candidates, history=history, preference=args.preference, intention=args.intention,
                         intention_kind=args.intention_kind, template=args.template, top_n=args.top_n).to_dict()


def print_header(result: dict) -> None:
    """The template, the model and the instruction an answer was made with."""
    print(f"template {result['template']} {result['instantiation']}  model {result['model']}")
    if result["history_dropped"]:
        print(f"({result['history_dropped']} oldest history item(s) left out to fit the model's input)")
    print(f"instruction: {result['instruction']}")


def _print_table(result: dict) -> None:
    print_header(result)
    rows = result["ranked"]
    shown = f"top {len(rows)} of {result['candidates']}" if len(rows) < result["candidates"] else f"{len(rows)}"
    width = len(str(len(rows)))
    fusion = result["fusion"]
    if fusion["mode"] == "lm-only":
        print(f"{shown} candidates by {result['reduction']} log-likelihood:")
        for pos, r in enumerate(rows, 1):
            print(f"{pos:>{width}}. {r['score']:10.4f}  [{r['index']}] {r['title']}")
        return
    weights = "  ".join(f"{k} {v:.3f}" for k, v in fusion["weights"].items())
    print(f"{shown} candidates by fused score (gate {fusion['gate_version']}; weights {weights}):")
    print(f"{'':>{width + 1}} {'score':>8} {'relev.':>7} {'z(lm)':>7} {'z(beh)':>7} {'z(sem)':>7} {'z(seq)':>7} "
          f"{'loglik':>8}")
    for pos, r in enumerate(rows, 1):
        c = r["components"]
        parts = [f"{c[k]:7.3f}" if k in c else f"{'-':>7}" for k in ("lm", "behaviour", "semantic", "sequential")]
        print(f"{pos:>{width}}. {r['score']:8.3f} {r['relevance']:7.3f} {' '.join(parts)} {c['lm_loglik']:8.4f}  "
              f"[{r['index']}] {r['title']}")
    if fusion["without_behaviour"]:
        print(f"without behaviour signal: {len(fusion['without_behaviour'])} of {result['candidates']} candidates")


def respond(command: str, compute, show, args: argparse.Namespace) -> int:
    """``compute(args)`` printed as JSON (``--json``) or by ``show``; a usage error is one line on
    stderr and exit code 2."""
    try:
        result = compute(args)
    except (UsageError, RerankerError) as exc:
        print(f"instructrec {command}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        show(result)
    return 0


def run(args: argparse.Namespace) -> int:
    return respond("rank", _rank, _print_table, args)
