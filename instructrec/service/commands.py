"""The ``instructrec serve`` subcommand, registered through the ``instructrec.commands`` entry
point (see :mod:`instructrec.cli`)."""

from instructrec.cli import Command

COMMANDS = (
    Command("serve", "instructrec.service.cli", "run the /rerank HTTP service (micro-batching, Redis cache, metrics)"),
)
