"""The ``instructrec`` command. Each subcommand lives in the package that owns it and
is imported only when used, so ``instructrec templates`` never loads torch."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "templates": ("instructrec.templates_cli", "list the instruction templates"),
    "annotate": ("training.annotate.cli", "generate fine-grained instruction annotations with a teacher"),
    "train": ("training.tune_cli", "instruction-tune a seq2seq model"),
    "curve": ("training.curve", "the learning curve of a training run (table, PNG, README block)"),
    "evaluate": ("training.evaluate.cli", "evaluate models and baselines with the paper's protocol, write the report"),
    "eval-client": ("training.evaluate.client_cli", "evaluate a live /rerank service on a candidate file"),
    "rank": ("instructrec.rank_cli", "rerank candidates for one instruction with a checkpoint"),
    "serve": ("service.cli", "run the /rerank HTTP service (micro-batching, Redis cache, metrics)"),
    "bench": ("bench.cli", "benchmark the ranker variants and the /rerank service"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Arguments are added lazily below, only for the chosen command.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Find the subcommand first so only its module is imported.
    name = next((a for a in argv if not a.startswith("-")), None)
    if name in COMMANDS:
        module = importlib.import_module(COMMANDS[name][0])
        sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        module.add_arguments(sub_action.choices[name])
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
