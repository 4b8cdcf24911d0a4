"""Generated blocks: what ``evaluate --readme``, ``bench readme`` and ``curve --readme`` write
between their markers. A block lives in the README or in one of the ``docs/`` pages beside it,
so ``--readme README.md`` keeps meaning "this project's documents" when a section moves to docs/.
"""

from __future__ import annotations

from pathlib import Path

from . import files


def holder(readme: str | Path, start: str, end: str) -> Path:
    """The file holding both markers: ``readme`` itself, else the first ``docs/*.md`` beside it."""
    path = Path(readme)
    for candidate in [path, *sorted((path.parent / "docs").glob("*.md"))]:
        if candidate.is_file():
            text = candidate.read_text(encoding="utf-8")
            if start in text and end in text:
                return candidate
    raise ValueError(f"{path}: no markers {start} ... {end} (nor in {path.parent / 'docs'}/*.md)")


def replace(readme: str | Path, start: str, end: str, body: str) -> Path:
    """Put ``body`` between the markers wherever they are (:func:`holder`); returns that file."""
    path = holder(readme, start, end)
    files.write_text(path, between(path.read_text(encoding="utf-8"), start, end, body))
    return path


def between(text: str, start: str, end: str, body: str) -> str:
    """``text`` with what lies between the markers replaced by ``body``."""
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + start + "\n" + body + end + tail
