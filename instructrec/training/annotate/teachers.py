"""The teacher interface for annotating fine-grained user needs (paper Section 2.2.1).

A teacher answers one :class:`AnnotationRequest` at a time: an explicit preference
(P2) written from the user's history, a vague intention (I1) written from the target
item's review or description, or a specific intention (I2) written from the target's
platform or categories. ``None`` means "nothing to go on for this one".

Also here: the platform heuristic for Amazon Games titles (about half of them end in
" - PC", " - Xbox 360", "- Nintendo DS", " - PlayStation 4 Standard Edition", ...),
which stands in for the category labels the paper builds specific intentions from.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable


class Kind(str, Enum):
    PREFERENCE = "preference"
    VAGUE = "vague_intention"
    SPECIFIC = "specific_intention"

    def __str__(self) -> str:  # "preference", not "Kind.PREFERENCE"
        return self.value


class TeacherError(RuntimeError):
    """A teacher failed in a way that retrying this request will not fix (or retries ran out)."""

    def __init__(self, message: str, status: int | None = None, body: str = ""):
        self.status = status
        self.body = body
        super().__init__(message)


@dataclass(frozen=True)
class AnnotationRequest:
    kind: Kind
    user_id: str
    target: str  # target item id
    history_titles: tuple[str, ...]  # oldest first
    target_title: str
    target_categories: tuple[str, ...] = ()
    target_review: str = ""
    target_description: str = ""
    # Categories of each history item, aligned with history_titles (empty when the data has none).
    history_categories: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        object.__setattr__(self, "history_titles", tuple(self.history_titles))
        object.__setattr__(self, "target_categories", tuple(self.target_categories))
        object.__setattr__(self, "history_categories", tuple(tuple(c) for c in self.history_categories))

    def key(self) -> str:
        """Stable sha256 over what determines the answer -- the cache key.

        User and target ids are not part of it: two cases with the same history (for a
        preference) or the same target text (for an intention) get the same answer. A
        preference depends on the history only; intentions on the target only.
        """
        if self.kind is Kind.PREFERENCE:
            payload: dict = {"history_titles": list(self.history_titles)}
            if any(self.history_categories):
                payload["history_categories"] = [list(c) for c in self.history_categories]
        elif self.kind is Kind.VAGUE:
            payload = {
                "target_title": self.target_title,
                "target_categories": list(self.target_categories),
                "target_review": self.target_review,
                "target_description": self.target_description,
            }
        else:
            payload = {"target_title": self.target_title, "target_categories": list(self.target_categories)}
        payload["kind"] = self.kind.value
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@runtime_checkable
class Teacher(Protocol):
    name: str

    async def annotate(self, request: AnnotationRequest) -> str | None:
        """The annotation text, or None when this request cannot be annotated."""
        ...


# ---------------------------------------------------------------------------
# Platforms in Games titles

# canonical name -> aliases (matched case-insensitively, longest alias first)
_PLATFORMS: dict[str, tuple[str, ...]] = {
    "PC": ("pc", "windows", "windows 10", "pc/mac", "pc mac", "pc download"),
    "Mac": ("mac", "macintosh", "mac os x", "mac download"),
    "Linux": ("linux",),
    "Xbox": ("xbox",),
    "Xbox 360": ("xbox 360", "xbox360", "x360"),
    "Xbox One": ("xbox one", "xbox 1", "xbox one s", "xbox one x"),
    "Xbox Series X": ("xbox series x", "xbox series x|s", "xbox series s"),
    "PlayStation": ("playstation", "playstation 1", "ps1", "psx", "psone", "ps one"),
    "PlayStation 2": ("playstation 2", "playstation2", "ps2"),
    "PlayStation 3": ("playstation 3", "playstation3", "ps3"),
    "PlayStation 4": ("playstation 4", "playstation4", "ps4", "ps4 pro"),
    "PlayStation 5": ("playstation 5", "playstation5", "ps5"),
    "PlayStation Vita": ("playstation vita", "ps vita", "psvita", "vita", "sony ps vita"),
    "PlayStation VR": ("playstation vr", "psvr", "ps vr"),
    "PSP": ("psp", "sony psp", "playstation portable"),
    "Nintendo DS": ("nintendo ds", "ds", "nds", "nintendo dsi", "dsi"),
    "Nintendo 3DS": ("nintendo 3ds", "3ds", "new nintendo 3ds", "nintendo 3ds xl", "3ds xl"),
    "Nintendo 2DS": ("nintendo 2ds", "2ds"),
    "Nintendo Wii": ("nintendo wii", "wii"),
    "Nintendo Wii U": ("nintendo wii u", "wii u", "wiiu"),
    "Nintendo Switch": ("nintendo switch", "switch"),
    "GameCube": ("gamecube", "nintendo gamecube", "game cube", "ngc"),
    "Nintendo 64": ("nintendo 64", "n64"),
    "NES": ("nes", "nintendo nes", "nintendo entertainment system"),
    "Super NES": ("super nes", "snes", "nintendo super nes", "super nintendo"),
    "Game Boy": ("game boy", "gameboy", "nintendo game boy"),
    "Game Boy Color": ("game boy color", "gameboy color", "gbc"),
    "Game Boy Advance": ("game boy advance", "gameboy advance", "gba", "game boy advance sp"),
    "Sega Genesis": ("sega genesis", "genesis", "sega mega drive", "mega drive"),
    "Sega Saturn": ("sega saturn", "saturn"),
    "Sega Dreamcast": ("sega dreamcast", "dreamcast"),
    "Sega Game Gear": ("sega game gear", "game gear"),
    "Sega Master System": ("sega master system", "master system"),
    "Sega CD": ("sega cd",),
    "Atari 2600": ("atari 2600",),
    "TurboGrafx-16": ("turbografx 16", "turbografx-16", "turbografx"),
    "Neo Geo": ("neo geo", "neogeo"),
}
_ALIASES: list[tuple[str, str]] = sorted(
    ((alias, canon) for canon, aliases in _PLATFORMS.items() for alias in (canon.lower(), *aliases)),
    key=lambda ac: -len(ac[0]),
)
# Words that may follow the platform in the last title segment without making it something else
# ("PlayStation 4 Standard Edition", "Xbox One Digital Code", "PC Mac Linux", "Xbox 360 Game only").
_QUALIFIERS = {
    "standard", "edition", "digital", "code", "download", "game", "games", "only", "limited", "collector's",
    "collectors", "special", "platinum", "hits", "greatest", "bundle", "jewel", "case", "import", "online",
    "select", "version", "physical", "disc", "deluxe", "gold", "complete", "ultimate", "premium", "day",
    "one", "launch", "pre-load", "preload", "classic", "the", "for", "and", "&", "/", "+", "mac", "linux",
    "windows", "10", "pc", "uk", "us", "na", "eu", "japan", "japanese", "european", "version)", "dvd", "cd",
    "rom", "cd-rom", "dvd-rom", "key", "steam", "instant", "access", "card", "of", "year", "goty", "new",
}
# A dash counts as a separator when it has whitespace on at least one side: " - PC", "-Xbox 360",
# "Foo- Nintendo DS"; "Spider-Man" and "X-Men" are not split.
_SEPARATOR = re.compile(r"\s+[-\u2013\u2014]+\s*|\s*[-\u2013\u2014]+\s+")
_BRACKETED = re.compile(r"\[[^\]]*\]?|\([^)]*\)?")


def _match_platform(segment: str) -> str | None:
    text = re.sub(r"\s+", " ", _BRACKETED.sub(" ", segment)).strip().lower()
    # "Xbox One/Windows 10", "Playstation 2/Playstation 3", "Collector's Edition, Xbox 360":
    # the first part that is a platform wins.
    for part in re.split(r"\s*[/,]\s*", text):
        part = re.sub(r"^(microsoft|sony) ", "", part)
        for alias, canon in _ALIASES:
            if part == alias or part.startswith(alias + " "):
                rest = part[len(alias):].split()
                if all(w in _QUALIFIERS for w in rest):
                    return canon
    return None


def split_platform(title: str) -> tuple[str, str | None]:
    """``(title without the platform suffix, platform)``; ``(title, None)`` when there is none."""
    title = title.strip()
    parts = _SEPARATOR.split(title)
    if len(parts) < 2:
        return title, None
    platform = _match_platform(parts[-1])
    if platform is None:
        return title, None
    # Cut at the last separator.
    last = list(_SEPARATOR.finditer(title))[-1]
    return title[: last.start()].strip(), platform


def platform_of(title: str) -> str | None:
    """The platform a Games title ends in ("Halo 3 - Xbox 360" -> "Xbox 360"), canonicalised
    ("Playstation 3", "PS3" -> "PlayStation 3"), or None. Colour and edition suffixes
    (" - Black", " - Standard Edition") and in-name dashes ("Spider-Man") are not platforms."""
    return split_platform(title)[1]


def facets(title: str, categories: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """What a specific intention is built from: the platform (if the title names one)
    followed by the item's categories, without duplicates (case-insensitive)."""
    out: list[str] = []
    seen: set[str] = set()
    platform = platform_of(title)
    for value in ([platform] if platform else []) + [c.strip() for c in categories]:
        if value and value.lower() not in seen:
            seen.add(value.lower())
            out.append(value)
    return tuple(out)


def specific_facets(item) -> tuple[str, ...]:
    """Facets of an :class:`~instructrec.training.data.types.Item` (or anything with ``title`` and
    ``categories``): its platform for Games-like titles, then its categories."""
    return facets(item.title, tuple(getattr(item, "categories", ()) or ()))
