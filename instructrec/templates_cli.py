"""``instructrec templates``: list the instruction template table (never imports torch)."""

from __future__ import annotations

import argparse
import json

from instructrec.aspects import TaskForm
from instructrec.templates import TEMPLATE_VERSION, TEMPLATES

GROUPS = ("preference", "intention", "combined")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the table as one JSON object")
    parser.add_argument("--group", choices=GROUPS, help="only templates of this group")
    parser.add_argument("--task", choices=[t.value for t in TaskForm], help="only templates of this task form")


def _first_words(text: str, n: int = 9) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def run(args: argparse.Namespace) -> int:
    rows = [
        t for t in TEMPLATES
        if (args.group is None or t.group == args.group) and (args.task is None or t.task.value == args.task)
    ]
    if args.json:
        print(json.dumps({"version": TEMPLATE_VERSION, "count": len(rows), "templates": [t.to_dict() for t in rows]},
                         indent=2, ensure_ascii=False))
        return 0
    print(f"template table {TEMPLATE_VERSION}: {len(rows)} of {len(TEMPLATES)} templates")
    header = ("id", "<P,I,T>", "strategy", "target", "text")
    table = [(t.id, t.label, t.strategy.value, t.target.value + ("*" if t.rankable else ""), _first_words(t.text))
             for t in rows]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(4)]
    for r in [header, *table]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    print("(* = rankable: candidates scored by the likelihood of their title)")
    return 0
