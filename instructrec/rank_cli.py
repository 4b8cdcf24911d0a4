"""``instructrec rank``: rerank candidates for one instruction with a model.

The user's need (history, explicit preference, intention) becomes an instruction through
the same selection and fitting as serving (:func:`instructrec.instruction.build`); the
candidates are then scored by their likelihood under that instruction and, with a gate
(``--gate``, default gate.json in the model directory; ``--fusion lm-only`` turns it off),
ranked by the LM fused with the behaviour (``--behaviour``) and semantic signals, as the
service's /rerank does: history and candidates are matched to the index's items by title.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .modeling import DEFAULT_MODEL_DIR as DEFAULT_MODEL
from .options import add_device_options


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


def load_hybrid_of(args: argparse.Namespace, model_name: str):
    """The hybrid ``--fusion``, ``--gate`` and ``--behaviour`` ask for (None: LM-only)."""
    from .hybrid import GATE_FILE, load_hybrid
    from .hybrid.behaviour import BehaviourError
    from .hybrid.gate import GateError
    from .hybrid.sequential import SequentialError

    gate = getattr(args, "gate", None)
    behaviour = getattr(args, "behaviour", None)
    if gate is None and (Path(model_name) / GATE_FILE).is_file():
        gate = str(Path(model_name) / GATE_FILE)
    if gate is None and behaviour:
        raise UsageError(f"--behaviour {behaviour} needs a gate to fuse it with: give --gate GATE")
    if gate is None or getattr(args, "fusion", "auto") == "lm-only":
        return None
    sequential = getattr(args, "sequential", None)
    if sequential is None and (Path(model_name) / "sequential" / "sequential.json").is_file():
        sequential = str(Path(model_name) / "sequential")
    try:
        return load_hybrid(gate, behaviour, sequential=sequential, semantic=not getattr(args, "no_semantic", False))
    except (GateError, BehaviourError, SequentialError) as exc:
        raise UsageError(str(exc)) from None


def fusion_info(hybrid, fused, without_behaviour, requested: str) -> dict:
    """How an answer was scored: the service's ``fusion`` object."""
    return {"mode": "fused" if fused is not None else "lm-only", "requested": requested,
            "gate_version": hybrid.gate.version if hybrid else None, "hybrid_version": hybrid.version if hybrid else None,
            "signals": list(fused.components) if fused is not None else ["lm"],
            "weights": fused.weights if fused is not None else None,
            "without_behaviour": without_behaviour if fused is not None else None}


def _rank(args: argparse.Namespace) -> dict:
    from .aspects import TaskForm
    from .ranker import rank_order

    if args.top_n is not None and args.top_n < 1:
        raise UsageError("--top-n must be at least 1")
    need = need_of(args)
    candidates = _candidates(args)
    check_template(args.template)
    name = _model_name(args.model)
    hybrid = load_hybrid_of(args, name)  # its files fail before the model loads
    name, ranker = load_ranker(args)
    inst = instruction(need, ranker, args.template, TaskForm.RERANK)
    lm = ranker.score(inst.source, candidates).scores
    fused, without = None, None
    if hybrid is not None:
        candidate_ids = hybrid.resolve([None] * len(candidates), candidates)
        history_ids = hybrid.resolve([None] * len(need.history), list(need.history))
        fused = hybrid.fuse(lm, need, candidates, candidate_ids, history_ids)
        known = "behaviour" in fused.components
        without = [i for i, c in enumerate(candidate_ids) if c is None or not known]
    ranking = fused.scores.tolist() if fused is not None else lm
    rows = []
    for i in rank_order(ranking)[: args.top_n]:
        row = {"index": i, "title": candidates[i], "score": ranking[i]}
        if fused is not None:
            row["relevance"] = float(fused.relevance[i])
            row["components"] = {**{k: float(v[i]) for k, v in fused.components.items()}, "lm_loglik": lm[i]}
        rows.append(row)
    return {
        "model": name,
        "template": inst.template.id,
        "instantiation": inst.rendered.instantiation.label(),
        "history_dropped": inst.history_dropped,
        "reduction": args.reduction,
        "instruction": inst.source,
        "candidates": len(candidates),
        "ranked": rows,
        "fusion": fusion_info(hybrid, fused, without, args.fusion),
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
