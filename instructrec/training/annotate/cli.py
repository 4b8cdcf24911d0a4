"""``instructrec annotate``: write fine-grained user needs (explicit preferences, vague
and specific intentions) for the cases of a split with a teacher, resumably.

Writes ``<out>/annotations.jsonl`` (the cache; rerunning resumes it) and
``<out>/stats.json``, and prints a table like the paper's Table 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from instructrec.training.annotate.offline import OfflineTeacher
from instructrec.training.annotate.phrasing import PHRASINGS
from instructrec.training.annotate.teachers import Kind, TeacherError
from instructrec.training.data.load import load_dataset
from instructrec.training.data.types import DataError

KEY_ENV = "INSTRUCTREC_TEACHER_API_KEY"


def _kinds(value: str) -> list[Kind]:
    out: list[Kind] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            kind = Kind(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"unknown kind {part!r} (choose from {', '.join(k.value for k in Kind)})"
            ) from None
        if kind not in out:
            out.append(kind)
    if not out:
        raise argparse.ArgumentTypeError("no kinds given")
    return out


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="games-sample", help="dataset path, or 'games-sample' (default)")
    parser.add_argument("--split", choices=["train", "valid", "test", "all"], default="all",
                        help="which cases to annotate (default: all)")
    parser.add_argument("--users", type=_positive, default=None, help="annotate a seeded sample of N users")
    parser.add_argument("--seed", type=int, default=0, help="seed for --users and the offline teacher (default 0)")
    parser.add_argument("--kinds", type=_kinds, default=list(Kind),
                        help="comma-separated: preference,vague_intention,specific_intention (default: all three)")
    parser.add_argument("--teacher", choices=["offline", "openai"], default="offline",
                        help="offline: rule-based, no network (default); openai: an OpenAI-compatible endpoint")
    parser.add_argument("--phrasing", choices=PHRASINGS, default="in-family",
                        help="the offline teacher's phrasing families: in-family (the training ones, default), held-out, "
                             "novel, v1 (what offline-v1 wrote), all")
    parser.add_argument("--teacher-url", default=None, help="base URL of the endpoint, e.g. http://localhost:8000/v1")
    parser.add_argument("--teacher-model", default=None, help="model name sent to the endpoint")
    parser.add_argument("--teacher-key", default=None, help=f"API key (default: ${KEY_ENV})")
    parser.add_argument("--concurrency", type=_positive, default=8, help="requests in flight (default 8)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: artifacts/annotations/<dataset name>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _teacher(args: argparse.Namespace):
    if args.teacher == "offline":
        return OfflineTeacher(seed=args.seed, phrasing=args.phrasing)
    from instructrec.training.annotate.openai_teacher import OpenAITeacher

    if not args.teacher_url or not args.teacher_model:
        raise TeacherError("--teacher openai needs --teacher-url and --teacher-model")
    key = args.teacher_key or os.environ.get(KEY_ENV) or None
    return OpenAITeacher(args.teacher_url, args.teacher_model, api_key=key, max_concurrency=args.concurrency)


def run(args: argparse.Namespace) -> int:
    from instructrec.training.annotate.pipeline import annotate_cases, annotation_stats, format_stats_table

    try:
        teacher = _teacher(args)
        data = load_dataset(args.data)
        if args.users:
            data = data.sample_users(args.users, seed=args.seed)
        split = data.split()
        cases = {"train": split.train, "valid": split.valid, "test": split.test}.get(args.split)
        if cases is None:
            cases = split.train + split.valid + split.test
        if not cases:
            raise DataError(args.data, None, f"no {args.split} cases (every user needs at least 3 interactions)")
        out_dir = args.out if args.out is not None else Path("artifacts") / "annotations" / data.name
        cache = out_dir / "annotations.jsonl"
        n_users = len({c.user_id for c in cases})
        print(f"{data.name}: {len(cases)} {args.split} cases of {n_users} users, kinds "
              f"{','.join(k.value for k in args.kinds)}, teacher {teacher.name} -> {cache}", file=sys.stderr)

        async def go():
            try:
                return await annotate_cases(data, cases, teacher, args.kinds, cache, progress=not args.no_progress)
            finally:
                close = getattr(teacher, "aclose", None)
                if close is not None:
                    await close()

        annotations = asyncio.run(go())
    except (DataError, TeacherError) as e:
        print(f"instructrec annotate: error: {e}", file=sys.stderr)
        return 2

    stats = annotation_stats(annotations, n_users)
    stats.update({"dataset": data.name, "split": args.split, "kinds": [k.value for k in args.kinds],
                  "cases": len(cases), "cache": str(cache)})
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(format_stats_table(stats))
    return 0
