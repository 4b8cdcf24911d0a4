"""``instructrec evaluate``: every method on the same candidate files, with the paper's protocol."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from instructrec.options import add_device_options
from instructrec.records import invoked_as

from ..data.types import DataError
from . import report
from .scenarios import EVAL_PHRASING


def _csv(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())


def _epochs(value: str) -> int | dict[str, int]:
    """``3`` or ``sasrec=3,bert4rec=1``."""
    try:
        if "=" not in value:
            return _positive(int(value))
        budget = {}
        for part in _csv(value):
            name, _, n = part.partition("=")
            if name.strip().lower() not in ("sasrec", "bert4rec"):
                raise ValueError(f"unknown RecBole model {name.strip()!r} (sasrec, bert4rec)")
            budget[name.strip().lower()] = _positive(int(n))
        return budget
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from None


def _positive(n: int) -> int:
    if n < 1:
        raise ValueError("epochs must be at least 1")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="games-sample", help="dataset directory or a shipped sample ('games-sample')")
    parser.add_argument("--out", required=True, help="report folder (results.json, results.md, plots, candidate files)")
    parser.add_argument("--model", action="append", default=[], metavar="[LABEL=]PATH",
                        help="an instruction-tuned checkpoint to evaluate (repeatable)")
    parser.add_argument("--base", default="minilm-prefixlm",
                        help="the untuned base model row (a built-in name, a directory or a hub id; 'none' for no row)")
    parser.add_argument("--baselines", type=_csv, default=("popularity", "bi-encoder", "sasrec", "bert4rec"),
                        help="comma-separated: popularity, bi-encoder, behaviour, sasrec, bert4rec ('' for none)")
    parser.add_argument("--sequential", metavar="DIR",
                        help="the hybrid's SASRec (OUT/model of `instructrec sequential train`): its own row, and a "
                             "signal of the hybrid rows")
    parser.add_argument("--hybrid", action="store_true",
                        help="also each --model fused with the behaviour and semantic signals by the gate saved beside "
                             "it (MODEL/gate.json, from `instructrec gate fit`)")
    parser.add_argument("--users", type=int, default=500, help="seeded subsample of test users (0 = all)")
    parser.add_argument("--select-users", type=int, default=200,
                        help="validation users (a seeded subset of --users) on which each model's template is chosen (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", type=_csv, default=("uniform-10", "hard-10", "uniform-100"),
                        help="uniform-10 (1+9 uniform, the paper's), hard-10 (1+9 from a matching model), uniform-100 "
                             "(1+99), full (T2: the target among every item; instruction models generate over the "
                             "catalogue; baselines popularity and sasrec)")
    parser.add_argument("--full-k", type=int, default=20, help="full setting: items each model generates (default 20)")
    parser.add_argument("--full-per-source", type=int, default=50,
                        help="full setting, --hybrid rows: items each signal proposes for the fused ranker (default 50)")
    parser.add_argument("--full-beams", type=int, help="full setting: beam width (default: --full-k)")
    parser.add_argument("--scenarios", type=_csv, default=None,
                        help="sequential, product_search, personalized_search, explicit_preference, vague_intention (default: all)")
    parser.add_argument("--extra-scenarios", type=_csv, default=("sequential", "personalized_search"),
                        help="scenarios also run in the hard-10 and uniform-100 settings")
    parser.add_argument("--annotations", help="annotations.jsonl from `instructrec annotate` (default: the offline teacher)")
    parser.add_argument("--phrasing", type=_csv, default=(EVAL_PHRASING,),
                        help="the offline teacher's phrasing families the needs are written in, each its own rows side by "
                             "side: v1 (offline-v1's, the default: every published table's), in-family (offline-v2's "
                             "training families), held-out, novel (held-out and new in offline-v2), all; 'both' = "
                             "v1,held-out")
    parser.add_argument("--recbole-epochs", type=_epochs, default=10, metavar="N|MODEL=N,...",
                        help="RecBole training epochs at most: one number, or per model, e.g. sasrec=3,bert4rec=1")
    parser.add_argument("--recbole-patience", type=int, default=3)
    parser.add_argument("--recbole-threads", type=int, default=2)
    parser.add_argument("--recbole-results", metavar="DIR",
                        help="keep each RecBole result in DIR/<dataset>-<model>.json.gz and reuse it when made for the same "
                             "candidates and budget (the README's converged SASRec: docs/baselines)")
    parser.add_argument("--recbole-env", help="RecBole virtualenv (default: artifacts/envs/recbole, see scripts/install_recbole.sh)")
    add_device_options(parser)
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--readme", help="also regenerate the results block between the eval markers, in this README or the docs/*.md page beside it that holds them")
    parser.add_argument("--readme-name", metavar="NAME",
                        help="the README block's name: <!-- eval:NAME:start --> (and NAME-full for the full setting); "
                             "default: the dataset's name")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from . import full_catalogue
    from .run import EvalConfig, evaluate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = EvalConfig(
            data=args.data, out=args.out, users=args.users or None, select_users=args.select_users or None, seed=args.seed, settings=args.settings,
            scenarios=args.scenarios, extra_scenarios=args.extra_scenarios, models=tuple(args.model),
            base=None if args.base.lower() == "none" else args.base, baselines=args.baselines, hybrid=args.hybrid,
            sequential=args.sequential,
            annotations=args.annotations, phrasing=args.phrasing, recbole_epochs=args.recbole_epochs, recbole_patience=args.recbole_patience,
            recbole_threads=args.recbole_threads, recbole_env=args.recbole_env, recbole_results=args.recbole_results, device=args.device, dtype=args.dtype,
            resamples=args.resamples, progress=args.progress, command=invoked_as(), full_k=args.full_k,
            full_beams=args.full_beams, full_per_source=args.full_per_source)
        results = evaluate(cfg)
        if args.readme and "rows" in results:
            report.update_readme(args.readme, results, args.out, name=args.readme_name)
        if args.readme and "full" in results:
            full_catalogue.update_readme(args.readme, results["full"], results["full_dir"], name=args.readme_name)
    except (DataError, FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        print(f"instructrec evaluate: {exc}", file=sys.stderr)
        return 2
    if "rows" in results:
        print(report.setting_table(results, "uniform-10"))
        print(json.dumps({"report": f"{args.out}/results.md", "rows": len(results["rows"]), "seconds": results["seconds"]}))
    if "full" in results:
        print(full_catalogue.table(results["full"]))
        print(json.dumps({"report": f"{results['full_dir']}/results.md", "seconds": results["full"]["seconds"]}))
    return 0
