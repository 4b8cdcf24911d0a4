"""``instructrec serve``: run the /rerank (and, with a catalogue, /recommend) service with uvicorn.

Configuration comes from ``INSTRUCTREC_*`` environment variables (see
:class:`instructrec.service.settings.Settings`); the flags given here override them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing

from instructrec.options import add_device_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or built-in model name "
                        "(env INSTRUCTREC_MODEL; default artifacts/quickstart/model if it exists, else models/minilm-games)")
    add_device_options(parser, default=None)
    parser.add_argument("--catalogue", metavar="CAT", help="catalogue file for /recommend, made by `instructrec "
                        "catalogue build` (env INSTRUCTREC_CATALOGUE; default none: /recommend answers 409)")
    parser.add_argument("--gate", metavar="GATE", help="gate.json fusing the LM with the behaviour and semantic "
                        "signals (env INSTRUCTREC_GATE; default gate.json in the model directory if it exists; "
                        "'none': LM-only answers)")
    parser.add_argument("--behaviour", metavar="INDEX", help="behaviour index (.npz) for the behaviour signal; needs "
                        "a gate (env INSTRUCTREC_BEHAVIOUR; default none)")
    parser.add_argument("--sequential", metavar="DIR", help="sequential model (SASRec) for the sequential signal; "
                        "needs a gate (env INSTRUCTREC_SEQUENTIAL; default sequential/ in the model directory if it "
                        "exists; 'none': no such signal)")
    parser.add_argument("--host", help="address to listen on (env INSTRUCTREC_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (env INSTRUCTREC_PORT; default 8000)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        help="log level (env INSTRUCTREC_LOG_LEVEL; default info)")
    _add_setting_flags(parser)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--name`` per remaining setting, so every ``INSTRUCTREC_NAME`` is also a flag spelled
    the same way. Secrets stay environment-only: a command line is visible to every user of the machine."""
    from pydantic import SecretStr

    from .settings import Settings

    taken = {action.dest for action in parser._actions}
    group = parser.add_argument_group("other settings (each also read from INSTRUCTREC_<NAME>)")
    for name, field in Settings.model_fields.items():
        if name in taken or SecretStr in typing.get_args(field.annotation) or field.annotation is SecretStr:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or name} (default {field.default!r})".replace("%", "%%")
        kinds = {a for a in typing.get_args(field.annotation) if a is not type(None)} or {field.annotation}
        if kinds == {bool}:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(field.annotation) is typing.Literal:
            group.add_argument(flag, dest=name, choices=typing.get_args(field.annotation), default=None, help=help_text)
        else:
            kind = next(iter(kinds)) if len(kinds) == 1 and next(iter(kinds)) in (int, float) else str
            group.add_argument(flag, dest=name, type=kind, default=None, metavar=name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace):
    """Settings from the environment, with the given flags taking priority."""
    from .settings import Settings

    overrides = {name: getattr(args, name, None) for name in Settings.model_fields}
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        print(f"instructrec serve: error: setting {field}: {err['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from .app import ConfigError, create_app

    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"instructrec serve: error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("instructrec.service").info("serving on http://%s:%d", settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
                timeout_keep_alive=settings.keep_alive_seconds)
    return 0
