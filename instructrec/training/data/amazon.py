"""Loader for raw Amazon Review Data 2018 (McAuley et al.) files.

* reviews: JSON lines (optionally gzip-compressed) with ``reviewerID``, ``asin``,
  ``overall``, ``unixReviewTime`` and optionally ``summary`` / ``reviewText``;
* metadata: JSON lines (optionally gzip-compressed) with ``asin``, ``title`` and optionally
  ``category`` (list), ``description`` (list or string) and ``brand``.

Items without a title are dropped, then users and items are k-core filtered (5 by
default, as in the InstructRec paper) and each user's reviews are ordered by time.
"""

from __future__ import annotations

import gzip
import html
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from instructrec.training.data.filters import describe_k_core, k_core
from instructrec.training.data.types import DataError, Interaction, InteractionData, Item

REQUIRED_REVIEW_KEYS = ("reviewerID", "asin", "overall", "unixReviewTime")
MAX_DESCRIPTION = 1000

_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def clean_text(value: Any) -> str:
    """Join lists, strip HTML tags, unescape entities and collapse whitespace."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(clean_text(v) for v in value)
    text = _TAG.sub(" ", str(value))
    text = html.unescape(text)
    text = _TAG.sub(" ", text)  # tags that were entity-escaped (&lt;b&gt;)
    return _SPACE.sub(" ", text).strip()


def _cap(text: str, limit: int = MAX_DESCRIPTION) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    if space > limit * 0.8:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "..."


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSON-lines file, gzip
    or plain (detected from the content). DataError (file + line) on non-UTF-8 bytes,
    invalid JSON, or a value that is not a JSON object; an empty file is an error too."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, None, "no such file")
    gz = False
    try:
        with p.open("rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        seen = False
        with opener(p, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(p, lineno, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(p, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(p, lineno, f"expected a JSON object, found {type(obj).__name__}")
                seen = True
                yield lineno, obj
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(p, None, f"cannot read {'gzip ' if gz else ''}file: {e}") from None
    if not seen:
        raise DataError(p, None, "empty file (no JSON lines)")


def load_meta(path: str | Path) -> tuple[dict[str, Item], list[str]]:
    """Items by asin (first record wins) and notes on what was dropped."""
    items: dict[str, Item] = {}
    untitled = duplicates = 0
    for lineno, obj in iter_json_lines(path):
        asin = obj.get("asin")
        if not isinstance(asin, str) or not asin.strip():
            raise DataError(path, lineno, "metadata record has no 'asin'" if asin is None else f"bad 'asin' value {asin!r}")
        asin = asin.strip()
        if asin in items:
            duplicates += 1
            continue
        title = clean_text(obj.get("title"))
        if not title:
            untitled += 1
            continue
        cats = obj.get("category") or obj.get("categories") or []
        if isinstance(cats, str):
            cats = [cats]
        categories: list[str] = []
        for c in cats:
            for part in c if isinstance(c, list) else [c]:  # 2014 files nest lists
                c2 = clean_text(part)
                if c2 and c2 not in categories:
                    categories.append(c2)
        description = clean_text(obj.get("description"))
        brand = clean_text(obj.get("brand"))
        if brand:
            description = f"Brand: {brand}." + (f" {description}" if description else "")
        items[asin] = Item(asin, title, tuple(categories), _cap(description))
    notes = [f"metadata {Path(path).name}: {len(items)} items with a title"]
    if untitled:
        notes.append(f"dropped {untitled} metadata records without a title")
    if duplicates:
        notes.append(f"ignored {duplicates} repeated metadata records (first kept)")
    return items, notes


def review_text(summary: Any, text: Any) -> str:
    """``summary + ". " + reviewText`` (no extra period when the summary already ends one)."""
    s = clean_text(summary)
    t = clean_text(text)
    if s and t:
        return s + (" " if s[-1] in ".!?" else ". ") + t
    return s or t


def load_amazon(
    reviews_path: str | Path, meta_path: str | Path, name: str | None = None, min_core: int | None = 5
) -> InteractionData:
    """Load Amazon 2018 reviews + metadata; k-core filter (``min_core``, default 5; None or
    <= 1 disables) and order each user's interactions by ``unixReviewTime`` (stable)."""
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    items, notes = load_meta(meta_path)

    seqs: dict[str, list[Interaction]] = {}
    seen: set[tuple[str, str]] = set()
    n_reviews = unknown = dupes = 0
    for lineno, obj in iter_json_lines(reviews_path):
        n_reviews += 1
        for key in REQUIRED_REVIEW_KEYS:
            if obj.get(key) is None:
                raise DataError(reviews_path, lineno, f"review record has no '{key}'")
        user, asin = str(obj["reviewerID"]).strip(), str(obj["asin"]).strip()
        try:
            rating = float(obj["overall"])
            ts = float(obj["unixReviewTime"])
        except (TypeError, ValueError):
            raise DataError(
                reviews_path, lineno, f"'overall' ({obj['overall']!r}) and 'unixReviewTime' "
                f"({obj['unixReviewTime']!r}) must be numbers"
            ) from None
        if asin not in items:
            unknown += 1
            continue
        if (user, asin) in seen:
            dupes += 1
            continue
        seen.add((user, asin))
        seqs.setdefault(user, []).append(
            Interaction(asin, ts, rating, review_text(obj.get("summary"), obj.get("reviewText")))
        )
    n = sum(len(s) for s in seqs.values())
    notes.append(f"reviews {reviews_path.name}: {n_reviews} records, {n} interactions of {len(seqs)} users")
    if unknown:
        notes.append(f"dropped {unknown} reviews of items missing from the metadata or without a title")
    if dupes:
        notes.append(f"dropped {dupes} repeated (user, item) reviews (first kept)")

    if min_core and min_core > 1:
        kept = k_core(seqs, min_core)
        notes.append(describe_k_core(seqs, kept, min_core))
        seqs = kept
    for s in seqs.values():
        s.sort(key=lambda x: x.timestamp)
    used = {x.item_id for s in seqs.values() for x in s}
    items = {i: it for i, it in items.items() if i in used}
    notes.append("ordered each user's reviews by unixReviewTime")
    if name is None:
        stem = meta_path.name.split(".")[0]
        name = stem[len("meta_"):] if stem.startswith("meta_") and len(stem) > 5 else stem
    return InteractionData(name, items, seqs, f"{reviews_path} + {meta_path}", notes)
