"""``instructrec eval-client``: evaluate a live /rerank service on a candidate file, with the
offline evaluation's protocol (same needs, same ranks rule, same metrics)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from instructrec.records import invoked_as

from ..data.types import MAX_HISTORY, DataError
from .client import ClientConfig, ClientError, evaluate_service, table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="the service's base URL, e.g. http://localhost:8000")
    parser.add_argument("--api-key", default=os.environ.get("INSTRUCTREC_API_KEY") or None,
                        help="bearer key of the service (default: $INSTRUCTREC_API_KEY)")
    parser.add_argument("--data", default="games-sample", help="dataset directory or 'games-sample' (for the titles)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--candidates", metavar="FILE",
                        help="a candidate file written by `instructrec evaluate` (e.g. OUT/candidates/test-uniform-10.jsonl)")
    source.add_argument("--users", type=int, metavar="N",
                        help="write a uniform 1+9 test candidate file for a seeded subsample of N users (0 = all) into --out")
    parser.add_argument("--seed", type=int, default=None,
                        help="user sample / negatives seed with --users (default 0); also the bootstrap seed "
                             "(default: the candidate file's)")
    parser.add_argument("--scenario", default="sequential",
                        help="sequential, product_search, personalized_search, explicit_preference or vague_intention")
    parser.add_argument("--template", default=None,
                        help="template id to request (default: the service's own selection); pass the template "
                             "`instructrec evaluate` selected for the scenario to reproduce its numbers")
    parser.add_argument("--fusion", choices=("auto", "lm-only"), default="auto",
                        help="auto (default): the service fuses the LM with its behaviour, semantic and sequential "
                             "signals when it has a gate; lm-only: the LM alone, as `instructrec evaluate` without --hybrid")
    parser.add_argument("--annotations", help="annotations.jsonl from `instructrec annotate` "
                        "(default: the offline teacher, cached in OUT/annotations.jsonl)")
    parser.add_argument("--max-history", type=int, default=MAX_HISTORY,
                        help=f"history titles sent per case (default {MAX_HISTORY}, the offline default)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at most (default 8)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    parser.add_argument("--retries", type=int, default=5,
                        help="retries on 429/502/503/504, timeouts and connection errors (default 5); Retry-After "
                             "is honoured, else exponential back-off with jitter")
    parser.add_argument("--backoff", type=float, default=0.5, help="first back-off step in seconds (default 0.5)")
    parser.add_argument("--limit", type=int, default=None, help="request at most N new cases (a rerun continues)")
    parser.add_argument("--fresh", action="store_true", help="discard OUT/responses.jsonl instead of resuming")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--out", required=True, help="folder for responses.jsonl and results.json")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = ClientConfig(
            url=args.url, out=args.out, data=args.data, candidates=args.candidates,
            users=args.users if args.candidates is None else None, seed=args.seed,
            scenario=args.scenario, template=args.template, fusion=args.fusion, annotations=args.annotations,
            max_history=args.max_history, api_key=args.api_key, concurrency=args.concurrency, timeout=args.timeout,
            retries=args.retries, backoff=args.backoff, limit=args.limit, fresh=args.fresh,
            resamples=args.resamples, progress=args.progress, command=invoked_as())
        results = evaluate_service(cfg)
    except (ClientError, DataError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"instructrec eval-client: {exc}", file=sys.stderr)
        return 2
    print(table(results))
    counts = results["counts"]
    print(json.dumps({"results": f"{args.out}/results.json", "answered": counts["answered"],
                      "errors": counts["errors"], "seconds": results["seconds"]}))
    if not results["template_table"]["same"]:
        print(f"warning: the service uses template table {results['template_table']['service']}, this code "
              f"{results['template_table']['local']}: its instructions may differ from the offline evaluation's",
              file=sys.stderr)
    versions = results["checkpoint_versions_answered"]
    if len(versions) > 1:
        print(f"warning: answers came from {len(versions)} model versions ({', '.join(map(str, versions))}): "
              "the service was redeployed during the run; rerun with --fresh", file=sys.stderr)
    if counts["answered"] == 0 and counts["errors"]:
        first = results["errors"][0]
        print(f"instructrec eval-client: no case was answered; first error (user {first.get('user_id')}): "
              f"HTTP {first.get('status')} {first.get('type')} (field {first.get('field')}): {first.get('message')}",
              file=sys.stderr)
        return 2
    if counts["errors"]:
        print(f"instructrec eval-client: {counts['errors']} case(s) failed (see {args.out}/results.json); "
              "rerun to retry them", file=sys.stderr)
        return 1
    if counts["not_requested"]:
        print(f"{counts['not_requested']} case(s) not requested yet (--limit): rerun to continue", file=sys.stderr)
    return 0
