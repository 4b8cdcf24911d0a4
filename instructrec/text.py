"""Text normalisation shared by every path that builds an instruction for scoring.

The service normalises each text of a request (Unicode NFC, whitespace runs collapsed to
one space, trimmed) before the instruction is built, so the model and the cache key both
see the normalised text. The offline evaluation applies the same functions to the needs
it builds and to the candidate titles, so an item whose title carries decomposed accents
or doubled spaces yields the same instruction and the same score on both paths.
"""

from __future__ import annotations

import unicodedata
from dataclasses import replace

from .aspects import Intention, UserNeed


def normalise(text: str) -> str:
    """Unicode NFC, whitespace runs (any Unicode whitespace) collapsed to one space, trimmed."""
    if text.isascii():  # NFC leaves ASCII as it is; most titles are ASCII
        return " ".join(text.split())
    return " ".join(unicodedata.normalize("NFC", text).split())


def normalise_need(need: UserNeed) -> UserNeed:
    """The need as the service sees it: every text normalised, empty history titles dropped,
    empty preference / intention / context texts absent."""
    history = tuple(t for t in (normalise(h) for h in need.history) if t)
    preference = normalise(need.preference) if need.preference else None
    intention = normalise(need.intention) if need.intention else None
    context = normalise(need.context) if need.context else None
    kind = need.intention_kind if intention else None
    if kind is Intention.NONE:
        kind = None
    return replace(need, history=history, preference=preference or None, intention=intention or None,
                   intention_kind=kind, context=context or None)


__all__ = ["normalise", "normalise_need"]
