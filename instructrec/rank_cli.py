"""``instructrec rank``: rerank candidates for one instruction with a model.

The user's need (history, explicit preference, intention) becomes an instruction through
the same selection and fitting as serving (:func:`instructrec.instruction.build`); the
candidates are then ranked by their likelihood under that instruction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .modeling import DEFAULT_MODEL_DIR as DEFAULT_MODEL


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
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (refused for T5-family models: they overflow), int8 (CPU only) or auto (default: bf16 where native)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_need_arguments(parser, "rerank")
    parser.add_argument("--candidate", action="append", default=[], metavar="TITLE",
                        help="a candidate item title (repeatable)")
    parser.add_argument("--candidates-file", metavar="FILE", help="candidate titles, one per line")
    parser.add_argument("--top-n", type=int, metavar="N", help="print only the N best candidates")


def read_lines(path: str, what: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _model_name(arg: str | None) -> str:
    from .modeling import ModelNotFound, resolve_model_name

    try:
        return resolve_model_name(arg)
    except ModelNotFound as exc:
        raise UsageError(str(exc)) from None


def need_of(args: argparse.Namespace):
    from .aspects import Intention, UserNeed

    history = list(args.history)
    if args.history_file:
        history = read_lines(args.history_file, "history") + history
    kind = None
    if args.intention and args.intention.strip():
        kind = Intention.VAGUE if args.intention_kind == "vague" else Intention.SPECIFIC
    return UserNeed(history=tuple(h.strip() for h in history if h.strip()), preference=args.preference,
                    intention=args.intention, intention_kind=kind)


def _candidates(args: argparse.Namespace) -> list[str]:
    candidates = [c.strip() for c in args.candidate if c.strip()]
    if args.candidates_file:
        candidates += read_lines(args.candidates_file, "candidates")
    if not candidates:
        raise UsageError("no candidates: give --candidate TITLE (repeatable) or --candidates-file FILE")
    return candidates


def check_template(template_id: str | None) -> None:
    """Unknown template ids fail before the model is loaded."""
    from .templates import TemplateError, get_template

    if template_id is not None:
        try:
            get_template(template_id)
        except TemplateError as exc:
            raise UsageError(str(exc)) from None


def load_ranker(args: argparse.Namespace):
    """The ``--model`` as a ranker with the token limits it was tuned with; a model tuned on
    another template table is loaded with a warning."""
    from .modeling import load_model
    from .ranker import Ranker
    from .templates import TEMPLATE_VERSION

    name = _model_name(args.model)
    try:
        loaded = load_model(name, device=args.device, dtype=args.dtype)
    except (OSError, ValueError, RuntimeError) as exc:  # missing/broken checkpoint, bad device or dtype
        raise UsageError(f"cannot load model {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    tuned = loaded.meta.get("template_version")
    if tuned and tuned != TEMPLATE_VERSION:
        print(f"warning: {name} was tuned on template table {tuned}, this is {TEMPLATE_VERSION}", file=sys.stderr)
    return name, Ranker(loaded, reduction=args.reduction)


def instruction(need, ranker, template_id: str | None, task):
    from .instruction import build
    from .templates import TemplateError

    try:
        return build(need, ranker.tokenizer, max_tokens=ranker.max_source_tokens, task=task, template_id=template_id)
    except TemplateError as exc:
        raise UsageError(str(exc)) from None


def _rank(args: argparse.Namespace) -> dict:
    from .aspects import TaskForm

    if args.top_n is not None and args.top_n < 1:
        raise UsageError("--top-n must be at least 1")
    need = need_of(args)
    candidates = _candidates(args)
    check_template(args.template)
    name, ranker = load_ranker(args)
    inst = instruction(need, ranker, args.template, TaskForm.RERANK)
    ranked = ranker.rank(inst.source, candidates, top_n=args.top_n)
    return {
        "model": name,
        "template": inst.template.id,
        "instantiation": inst.rendered.instantiation.label(),
        "history_dropped": inst.history_dropped,
        "reduction": args.reduction,
        "instruction": inst.source,
        "candidates": len(candidates),
        "ranked": [{"index": r.index, "title": r.text, "score": r.score} for r in ranked],
    }


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
    print(f"{shown} candidates by {result['reduction']} log-likelihood:")
    width = len(str(len(rows)))
    for pos, r in enumerate(rows, 1):
        print(f"{pos:>{width}}. {r['score']:10.4f}  [{r['index']}] {r['title']}")


def respond(command: str, compute, show, args: argparse.Namespace) -> int:
    """``compute(args)`` printed as JSON (``--json``) or by ``show``; a usage error is one line on
    stderr and exit code 2."""
    try:
        result = compute(args)
    except UsageError as exc:
        print(f"instructrec {command}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        show(result)
    return 0


def run(args: argparse.Namespace) -> int:
    return respond("rank", _rank, _print_table, args)
