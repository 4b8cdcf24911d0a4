"""Files written whole or not at all, and JSON-lines files read with their line numbers.

Every report, index, catalogue and checkpoint header is written through a temporary file
renamed into place, so a reader (or a killed run's rerun) never sees half a file. Every
``.jsonl`` the project reads (candidate files, annotations, instruction data, service
responses, catalogue items) is read by :func:`jsonl_objects`, whose errors name the file and
line, and which can tell a torn last line (a run killed mid-write) from a corrupt file.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: Literal["w", "wb"] = "w") -> Iterator:
    """An open temporary file beside ``path`` that replaces it on a clean exit (and is removed
    on an error). Text mode writes UTF-8."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open(mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """``path`` holds ``text`` afterwards, or what it held before."""
    with atomic_file(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, value: Any, **dumps: Any) -> Path:
    """``value`` as JSON (``dumps``: json.dumps options, e.g. indent), one trailing newline."""
    return write_text(path, json.dumps(value, **dumps) + "\n")


def jsonl_objects(path: str | Path, error: Callable[[Path, int, str], Exception], *,
                  torn_tail: Literal["error", "skip", "repair"] = "error") -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON-lines file. A line that is not a
    JSON object raises ``error(path, number, message)`` (each caller's own error type), except a
    last line with no newline after it, which a killed writer leaves behind: ``skip`` ignores it;
    ``repair`` (for a file the caller appends to) also cuts it off the file, and ends a complete
    last line with its missing newline, so appending resumes on a fresh line."""
    path = Path(path)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete = raw.endswith(b"\n") or not raw
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.decode("utf-8"))
            if not isinstance(value, dict):
                raise ValueError(f"expected a JSON object, got {type(value).__name__}")
        except (ValueError, UnicodeDecodeError) as exc:
            if number == len(lines) and not complete and torn_tail != "error":
                log.warning("%s:%d: ignoring a truncated last line (an interrupted run?)", path, number)
                if torn_tail == "repair":
                    with path.open("r+b") as f:
                        f.truncate(len(raw) - len(line))
                return
            message = f"not valid JSON ({exc.msg} at column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise error(path, number, message) from None
        yield number, value
    if torn_tail == "repair" and not complete:  # every line was whole; the last lacks its newline
        with path.open("ab") as f:
            f.write(b"\n")
