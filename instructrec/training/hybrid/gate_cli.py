"""``instructrec gate fit``: fit the hybrid gate for a model and save it beside the model.

Builds the behaviour index from the dataset (or reads ``--behaviour``), scores validation
cases of every scenario with the model, the index and the semantic encoder, fits the gate
(:mod:`.fit`) and writes ``MODEL/gate.json`` (or ``--out``), with its held-out HR@1 and
calibration error in the file's ``info`` and on the screen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from instructrec.checkpoint import checkpoint_version
from instructrec.options import add_device_options
from instructrec.records import invoked_as, machine_info

from ..data.load import load_dataset
from ..data.types import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    fit = sub.add_parser("fit", help="fit the gate of a model on validation cases and save it")
    fit.add_argument("--model", required=True, help="the checkpoint directory the gate is for")
    fit.add_argument("--data", default="games", help="dataset directory or shipped name (default: games)")
    fit.add_argument("--behaviour", metavar="FILE", help="a behaviour index (default: built from --data, holdout 2)")
    fit.add_argument("--sequential", metavar="DIR", help="the sequential model (OUT/model of `instructrec sequential "
                     "train`; default: none)")
    fit.add_argument("--users", type=int, default=1000, help="validation users (default 1000; a fifth held out)")
    fit.add_argument("--retrieved-users", type=int, default=0,
                     help="also this many of the users' sequential needs with the candidates the signals retrieve from "
                          "the whole catalogue (what /recommend ranks); default 0")
    fit.add_argument("--retrieved-negatives", type=int, default=9,
                     help="also every history scenario's case with the true item and this many negatives drawn from "
                          "what the signals retrieve for it (a reranker's input behind a matching stage); 0: none "
                          "(default 9)")
    fit.add_argument("--alike-negatives", type=int, default=9,
                     help="also every history scenario's case with the true item and this many negatives drawn from the "
                          "need's --alike-pool nearest titles by the bi-encoder, where the true item is one of them (a "
                          "reranker's input behind an embedding retriever); 0: none (default 9)")
    fit.add_argument("--alike-pool", type=int, default=50, help="nearest titles those negatives come from (default 50)")
    fit.add_argument("--per-source", type=int, default=30, help="items each signal retrieves for those (default 30)")
    fit.add_argument("--folds", type=int, default=0,
                     help="also report every user's cases ranked by a gate fitted on the other folds' users (this many "
                          "seeded folds; 0: only the held-out fifth, default)")
    fit.add_argument("--hard-report", action="store_true",
                     help="with --folds, also report the users' cases with the evaluation's hard negatives (never fitted)")
    fit.add_argument("--calibrate-hard", action="store_true",
                     help="also fit the temperature (never the weights: the order stays) on the users' cases with the "
                          "evaluation's hard negatives, so relevance holds there too; reported like --hard-report")
    fit.add_argument("--scenarios", help="comma-separated scenarios (default: every one but the anonymous product search)")
    fit.add_argument("--out", help="the gate file (default: MODEL/gate.json)")
    fit.add_argument("--work", default="artifacts/gate", help="where the teacher's annotations and the LM's scores are cached "
                     "(a refit with other signals or another --l2 reuses them)")
    fit.add_argument("--l2", type=float, default=1e-5, help="L2 penalty on the gate's weights (default 1e-5)")
    add_device_options(fit)
    fit.add_argument("--no-progress", dest="progress", action="store_false")


def table(result: dict) -> str:
    from instructrec.hybrid.gate import SIGNALS

    lines = [f"| scenario | cases | LM | {' | '.join(SIGNALS)} | fused | ECE |", "|" + " --- |" * (len(SIGNALS) + 5)]
    for name, r in result.items():
        h = r["hr@1"]
        lines.append(f"| {name} | {r['cases']} | {h['lm']:.3f} | " + " | ".join(f"{h[s]:.3f}" for s in SIGNALS)
                     + f" | **{h['fused']:.3f}** | {r['ece']:.3f} |")
    return "\n".join(lines)


def cv_table(result: dict) -> str:
    lines = ["| scenario | cases | LM | fused | ECE |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {r['cases']} | {r['lm_hr@1']:.3f} | **{r['hr@1']:.3f}** | {r['ece']:.3f} |"
              for name, r in result.items()]
    return "\n".join(lines)


def hard_cases(args: argparse.Namespace, data, lm, hybrid, work: Path) -> list:
    """The users' validation cases with the evaluation's hard negatives (its bi-encoder's)."""
    from ..evaluate.methods import BiEncoder
    from .fit import hard_report_examples

    try:
        retrieve = BiEncoder(data, cache_dir=work / "bi-encoder").retrieve
    except RuntimeError as exc:  # sentence-transformers missing: the message says what to install
        flag = "--calibrate-hard" if args.calibrate_hard else "--hard-report"
        raise ValueError(f"{flag}: {exc}") from None
    return hard_report_examples(data, lm, hybrid, retrieve, users=args.users, work=work, scenarios=args.scenarios,
                                progress=args.progress)


def run(args: argparse.Namespace) -> int:
    from instructrec.hybrid import GATE_FILE, Hybrid
    from instructrec.hybrid.behaviour import BehaviourError, load_behaviour_index
    from instructrec.hybrid.gate import GateError
    from instructrec.hybrid.semantic import SemanticEncoder
    from instructrec.hybrid.sequential import SequentialError, load_sequential
    from instructrec.modeling import ModelNotFound

    from ..evaluate.methods import InstructionModel
    from .behaviour_cli import build_for
    from .fit import anonymous_copies, cross_validated, fit_and_report, fitting_examples

    started = time.perf_counter()
    try:
        if args.folds == 1 or args.folds < 0 or (args.hard_report and not args.folds):
            raise ValueError(f"--folds must be 0 or at least 2 (--hard-report needs it), not {args.folds}")
        if args.alike_negatives < 0 or (args.alike_negatives and args.alike_pool <= args.alike_negatives):
            raise ValueError(f"--alike-negatives must be 0 or more and below --alike-pool, not {args.alike_negatives} "
                             f"of {args.alike_pool}")
        data = load_dataset(args.data)
        index = load_behaviour_index(args.behaviour) if args.behaviour else build_for(data, source=args.data)
        lm = InstructionModel(data, args.model, device=args.device, dtype=args.dtype)
        sequential = load_sequential(args.sequential) if args.sequential else None
        hybrid = Hybrid(gate=None, behaviour=index, semantic=SemanticEncoder(), sequential=sequential)  # the gate is what we fit
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        examples = fitting_examples(data, lm, hybrid, users=args.users, work=work, scenarios=args.scenarios,
                                    retrieved_users=args.retrieved_users, per_source=args.per_source,
                                    retrieved_negatives=args.retrieved_negatives, alike_negatives=args.alike_negatives,
                                    alike_pool=args.alike_pool,
                                    progress=args.progress)
        model_dir = Path(args.model)
        info = {"model": str(model_dir), "checkpoint_version": checkpoint_version(model_dir) if model_dir.is_dir() else None,
                "precision": lm.loaded.precision, "data": data.name, "behaviour": index.version,
                "semantic": hybrid.semantic.version, "sequential": sequential.version if sequential else None,
                "users": args.users, "command": invoked_as()}
        hard = hard_cases(args, data, lm, hybrid, work) if args.calibrate_hard or args.hard_report else []
        calibration = hard if args.calibrate_hard else []
        anonymous = anonymous_copies(examples)  # reported only: what a request without history gets
        gate, result = fit_and_report(examples, info, l2=args.l2, calibration=calibration, report_only=anonymous)
        if args.folds:
            result["cross_validated"] = cross_validated(examples, args.folds, l2=args.l2, calibration=calibration,
                                                        report_only=[*([] if calibration else hard), *anonymous])
        gate.info.update({"report": result, "seconds": round(time.perf_counter() - started, 1), "machine": machine_info()})
        out = gate.save(Path(args.out) if args.out else model_dir / GATE_FILE)
    except (BehaviourError, GateError, SequentialError, DataError, ModelNotFound, FileNotFoundError, ValueError) as exc:
        print(f"instructrec gate: error: {exc}", file=sys.stderr)
        return 2
    print(f"held-out users ({gate.info['users_held_out']}), HR@1 of 1 + 9 candidates:")
    print(table(result["held_out"]))
    if "cross_validated" in result:
        print(f"every user, ranked by the gate of the other {args.folds - 1} folds (fused HR@1 of 1 + 9 candidates):")
        print(cv_table(result["cross_validated"]))
    print(json.dumps({"gate": str(out), "version": gate.version, "temperature": gate.info["temperature"],
                      "examples": gate.info["examples"], "seconds": gate.info["seconds"]}))
    return 0
