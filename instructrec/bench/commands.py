"""The ``instructrec bench`` subcommand, registered through the ``instructrec.commands`` entry
point (see :mod:`instructrec.cli`)."""

from instructrec.cli import Command

COMMANDS = (
    Command("bench", "instructrec.bench.cli", "benchmark the ranker variants and the /rerank service"),
)
