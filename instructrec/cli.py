"""The ``instructrec`` command. Each subcommand lives in the package that owns it and is
imported only when used, so ``instructrec templates`` never loads torch.

The core names only its own commands. The packages above it (training, the service, the
benches) register theirs through the ``instructrec.commands`` entry-point group, each with a
light ``commands`` module listing :class:`Command` rows; a package that is not installed (the
serving image carries no training code) simply contributes none. Nothing here imports them
by name.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points

GROUP = "instructrec.commands"


@dataclass(frozen=True)
class Command:
    """A subcommand: ``module`` has ``add_arguments(parser)`` and ``run(args) -> int``."""

    name: str
    module: str
    help: str


CORE = (
    Command("templates", "instructrec.templates_cli", "list the instruction templates"),
    Command("rank", "instructrec.rank_cli", "rerank candidates for one instruction with a checkpoint"),
    Command("recommend", "instructrec.recommend_cli", "write the best k items of a catalogue for one need (T2)"),
)


def _package_missing(exc: ModuleNotFoundError, target: str) -> bool:
    """The registering package is not installed here (not a broken import inside it)."""
    return bool(exc.name) and target.split(":")[0].startswith(exc.name.split(".")[0])


def registered() -> dict[str, Command]:
    """The core's commands, then each installed package's (entry points in name order)."""
    commands = {c.name: c for c in CORE}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            table = ep.load()
        except ModuleNotFoundError as exc:
            if _package_missing(exc, ep.value):
                continue
            raise
        for command in table:
            commands.setdefault(command.name, command)
    return commands


def build_parser(commands: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    commands = registered() if commands is None else commands
    parser = argparse.ArgumentParser(prog="instructrec", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in commands.values():
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        p.set_defaults(_module=command.module)
        # Arguments are added lazily below, only for the chosen command.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = registered()
    if len(commands) == len(CORE):
        print("instructrec: only the core commands are registered; if training, serve or bench are missing, "
              "reinstall the package (pip install -e .) so its entry points are current", file=sys.stderr)
    parser = build_parser(commands)
    # Find the subcommand first so only its module is imported.
    name = next((a for a in argv if not a.startswith("-")), None)
    if name in commands:
        module = importlib.import_module(commands[name].module)
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
