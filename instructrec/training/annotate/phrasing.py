"""Phrasing families of the offline teacher and their fixed split into training and held-out.

Why: a model tuned on one teacher's sentences can learn the sentences rather than the need.
Training data is written only with the *training* families; evaluation can ask for needs
written with the *held-out* families, which no training run of this version saw.

A family is a sentence frame (:mod:`instructrec.training.annotate.frames`) or a modifier
applied to a frame's sentence: platform aliases (``alias.short``: "PlayStation 4" -> "PS4";
``alias.long``: "NES" -> "Nintendo Entertainment System") and seeded misspellings
(``typos.swap``: two neighbouring letters swapped; ``typos.drop``: a letter dropped or
doubled), one word per answer. The split (version ``SPLIT_VERSION``) is drawn once per group with a seeded RNG:
of the frames ``offline-v1`` already had, ceil(n/4) per group of at least two; of the new
ones, ceil(n/2) per group. Every group with two or more frames keeps phrasings on both sides.

Phrasings a teacher can be asked for (``PHRASINGS``):

* ``in-family``: the training families (what ``instructrec train`` uses);
* ``held-out``: the held-out families;
* ``novel``: the held-out families that are new in ``offline-v2`` (unseen even by models
  trained on ``offline-v1``, which wrote with every old frame);
* ``v1``: the old frames, no modifiers: exactly what ``offline-v1`` wrote;
* ``all``: every family.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import defaultdict
from functools import lru_cache

from .frames import ALL_FRAMES

SPLIT_VERSION = "families-v1"
PHRASINGS = ("in-family", "held-out", "novel", "v1", "all")

# modifier family -> canonical platform name -> the alias it writes instead
ALIASES: dict[str, dict[str, str]] = {
    "alias.short": {
        "PlayStation": "PS1", "PlayStation 2": "PS2", "PlayStation 3": "PS3", "PlayStation 4": "PS4",
        "PlayStation 5": "PS5", "PlayStation Vita": "Vita", "Xbox 360": "360", "Xbox One": "XB1",
        "Nintendo DS": "DS", "Nintendo 3DS": "3DS", "Nintendo Wii": "Wii", "Nintendo Wii U": "Wii U",
        "Nintendo Switch": "Switch", "GameCube": "GCN", "Nintendo 64": "N64", "Super NES": "SNES",
        "Game Boy Advance": "GBA", "Game Boy Color": "GBC", "Sega Genesis": "Genesis",
        "Sega Dreamcast": "Dreamcast", "Sega Saturn": "Saturn",
    },
    "alias.long": {
        "NES": "Nintendo Entertainment System", "Super NES": "Super Nintendo Entertainment System",
        "PSP": "PlayStation Portable", "PC": "Windows PC", "Mac": "Macintosh", "GameCube": "Nintendo GameCube",
        "PlayStation 2": "Sony PlayStation 2", "PlayStation 3": "Sony PlayStation 3",
        "PlayStation 4": "Sony PlayStation 4", "Xbox": "original Xbox", "Xbox 360": "Microsoft Xbox 360",
        "Xbox One": "Microsoft Xbox One", "Game Boy Advance": "Nintendo Game Boy Advance",
        "Sega Genesis": "Sega Mega Drive", "Nintendo 64": "Nintendo Sixty-Four",
    },
}
TYPOS = ("typos.swap", "typos.drop")
MODIFIERS: tuple[str, ...] = (*ALIASES, *TYPOS)
_NEW_MODIFIERS = frozenset(MODIFIERS)  # every modifier came with offline-v2


def families() -> dict[str, bool]:
    """Every family name -> whether it is new in offline-v2."""
    out = {f.family: f.new for f in ALL_FRAMES}
    out.update({m: True for m in MODIFIERS})
    return out


def _group(family: str) -> str:
    return family.split(".", 1)[0]


@lru_cache(maxsize=1)
def held_out() -> frozenset[str]:
    """The held-out families of ``SPLIT_VERSION`` (seeded; the same on every machine and run)."""
    groups: dict[tuple[str, bool], list[str]] = defaultdict(list)
    for family, new in families().items():
        groups[(_group(family), new)].append(family)
    out: set[str] = set()
    for (group, new), names in sorted(groups.items()):
        names = sorted(names)
        k = math.ceil(len(names) / 2) if new else (math.ceil(len(names) / 4) if len(names) >= 2 else 0)
        out.update(random.Random(f"{SPLIT_VERSION}|{group}|{int(new)}").sample(names, k))
    return frozenset(out)


def allowed(phrasing: str) -> frozenset[str]:
    """The families a teacher asked for ``phrasing`` writes with."""
    every = families()
    if phrasing == "in-family":
        return frozenset(every) - held_out()
    if phrasing == "held-out":
        return held_out()
    if phrasing == "novel":
        return frozenset(f for f in held_out() if every[f])
    if phrasing == "v1":
        return frozenset(f for f, new in every.items() if not new)
    if phrasing == "all":
        return frozenset(every)
    raise ValueError(f"unknown phrasing {phrasing!r}; choose from {', '.join(PHRASINGS)}")


def _digest(seed: int, key: str, salt: str) -> int:
    return int(hashlib.sha256(f"{seed}|{key}|{salt}".encode()).hexdigest()[:12], 16)


def alias(text: str, family: str) -> str:
    """``text`` with each canonical platform name the alias family knows replaced (one pass, so
    "PlayStation 4" never becomes "Sony Sony PlayStation 4")."""
    table = ALIASES[family]
    names = sorted(table, key=len, reverse=True)
    rx = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(re.escape(n) for n in names) + r")(?![A-Za-z0-9])")
    return rx.sub(lambda m: table[m.group(1)], text)


def misspell(text: str, family: str, key: str, seed: int = 0) -> str:
    """Seeded character noise: one lower-case word of five letters or more gets a typo.
    Capitalised words (names, platforms) are kept; a text without such a word is returned as is."""
    if family not in TYPOS:
        raise ValueError(f"unknown typo family {family!r}; choose from {', '.join(TYPOS)}")
    parts = re.split(r"(\s+)", text)
    spots = [i for i, w in enumerate(parts) if re.fullmatch(r"[a-z]{5,}[,.;:!?]?", w)]
    if not spots:
        return text
    i = spots[_digest(seed, key, "typo-word") % len(spots)]
    word = parts[i]
    core, tail = (word[:-1], word[-1]) if not word[-1].isalpha() else (word, "")
    room = len(core) - 3 if family == "typos.swap" else len(core) - 2
    at = 1 + _digest(seed, key, "typo-at") % room  # the first and last letters stay
    if family == "typos.swap":
        core = core[:at] + core[at + 1] + core[at] + core[at + 2:]
    elif _digest(seed, key, "typo-kind") % 2:
        core = core[:at] + core[at + 1:]
    else:
        core = core[:at] + core[at] + core[at:]
    parts[i] = core + tail
    return "".join(parts)
