"""Loaders for RecBole's tab-separated "atomic" files.

Two layouts are supported:

* :func:`load_recbole_sequences` — the leave-one-out *sequence* files used by the
  InstructRec/LLMRank Games data (``<Name>.item``, ``<Name>.test.inter`` and optionally
  ``<Name>.valid.inter``, where each row is a user's history and one target);
* :func:`load_recbole_atomic` — plain interaction files (``<Name>.inter`` with one row per
  interaction, e.g. MovieLens ``ml-100k``) plus ``<Name>.item``.

Every file starts with a typed header (``item_id:token<TAB>title:token_seq``); columns are
found by name (the part before the colon), never by position. Bad input raises
:class:`~instructrec.training.data.types.DataError` naming the file and the 1-based line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from instructrec.training.data.filters import describe_k_core, k_core
from instructrec.training.data.types import DataError, Interaction, InteractionData, Item

TITLE_PREFIXES = ("title", "movie_title")
CATEGORY_COLUMNS = ("class", "categories", "category", "genre", "genres")
DESCRIPTION_COLUMNS = ("description", "desc")
YEAR_COLUMNS = ("release_year", "year")
REVIEW_COLUMNS = ("review", "review_text", "text")
_SPLIT_SUFFIXES = (".test.inter", ".valid.inter", ".train.inter")


# ---------------------------------------------------------------------------- reading


@dataclass
class Table:
    """A parsed tab-separated file: column names (types dropped) and numbered rows."""

    path: Path
    columns: list[str]
    rows: list[tuple[int, list[str]]]  # (1-based line number, fields)

    def index(self, name: str) -> int | None:
        return self.columns.index(name) if name in self.columns else None

    def first(self, names: tuple[str, ...] = (), prefixes: tuple[str, ...] = ()) -> int | None:
        """Index of the first column named one of ``names`` or starting with one of ``prefixes``."""
        for i, c in enumerate(self.columns):
            if c in names or any(c.startswith(p) for p in prefixes):
                return i
        return None

    def require(self, *names: str, title: bool = False) -> None:
        """Raise a DataError naming every missing column and listing the ones found."""
        missing = [n for n in names if n not in self.columns]
        if title and self.first(prefixes=TITLE_PREFIXES) is None:
            missing.append("title (or movie_title)")
        if missing:
            raise DataError(
                self.path,
                1,
                f"missing required column(s): {', '.join(missing)}; "
                f"found columns: {', '.join(self.columns) or '(none)'}",
            )


def read_lines(path: Path) -> list[str]:
    """The file's lines (``\\n``-separated, ``\\r`` stripped), strictly decoded as UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(path, None, f"cannot read file: {e.strerror or e}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(path, line, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {col})") from None
    return [line.rstrip("\r") for line in text.split("\n")]


def read_table(path: Path) -> Table:
    """Parse a RecBole atomic file: typed header, then tab-separated rows of the same width."""
    lines = read_lines(path)
    if not any(line.strip() for line in lines):
        raise DataError(path, 1, "empty file (expected a tab-separated header such as 'item_id:token<TAB>...')")
    header = lines[0]
    if not header.strip():
        raise DataError(path, 1, "first line is blank; expected the tab-separated typed header")
    columns = [c.split(":", 1)[0].strip() for c in header.split("\t")]
    if any(not c for c in columns):
        raise DataError(path, 1, f"header has an empty column name: {header!r}")
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise DataError(path, 1, f"duplicate column name(s) in header: {', '.join(dupes)}")
    rows: list[tuple[int, list[str]]] = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise DataError(
                path,
                lineno,
                f"expected {len(columns)} tab-separated fields ({', '.join(columns)}), found {len(fields)}",
            )
        rows.append((lineno, fields))
    if not rows:
        raise DataError(path, None, "no data rows after the header")
    return Table(path, columns, rows)


# ---------------------------------------------------------------------------- files


def contents(directory: Path, limit: int = 20) -> str:
    """A short listing of a directory's entries for error messages."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    except OSError:
        return "(unreadable)"
    if not names:
        return "(empty directory)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def as_directory(directory: str | Path) -> Path:
    d = Path(directory)
    if not d.exists():
        raise DataError(d, None, "no such directory")
    if not d.is_dir():
        raise DataError(d, None, "is a file, expected a directory of RecBole files")
    return d


def one_file(
    directory: Path, pattern: str, candidates: list[Path] | None = None, prefer: tuple[str, ...] = ()
) -> Path:
    """The single file matching ``pattern`` (or among ``candidates``); DataError if none or ambiguous."""
    found = sorted(candidates if candidates is not None else directory.glob(pattern))
    found = [p for p in found if p.is_file()]
    for stem in prefer if len(found) > 1 else ():
        same = [p for p in found if p.name.split(".")[0] == stem]
        if len(same) == 1:
            return same[0]
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(directory, None, f"no {pattern} file; found: {contents(directory)}")
    raise DataError(directory, None, f"more than one {pattern} file: {', '.join(p.name for p in found)}")


# ---------------------------------------------------------------------------- items


def split_categories(value: str) -> tuple[str, ...]:
    """``"Animation Children's Comedy"`` -> three categories; comma lists split on commas."""
    parts = value.split(",") if "," in value else value.split()
    out: list[str] = []
    for p in parts:
        p = p.strip().strip("'\"[]").strip()
        if p and p.lower() != "unknown" and p not in out:
            out.append(p)
    return tuple(out)


def load_items(path: Path) -> dict[str, Item]:
    """Parse a ``.item`` file: ``item_id`` plus a ``title``/``movie_title`` column, optional
    categories (``class``/``categories``/``genre``), description and release year."""
    table = read_table(path)
    table.require("item_id", title=True)
    id_i = table.index("item_id")
    title_i = table.first(prefixes=TITLE_PREFIXES)
    cat_i = table.first(names=CATEGORY_COLUMNS)
    desc_i = table.first(names=DESCRIPTION_COLUMNS)
    year_i = table.first(names=YEAR_COLUMNS)
    items: dict[str, Item] = {}
    first_line: dict[str, int] = {}
    for lineno, f in table.rows:
        item_id = f[id_i].strip()
        if not item_id:
            raise DataError(path, lineno, "empty item_id")
        if item_id in items:
            raise DataError(path, lineno, f"duplicate item id {item_id!r} (first on line {first_line[item_id]})")
        title = " ".join(f[title_i].split())
        if not title:
            raise DataError(path, lineno, f"empty title for item {item_id!r}")
        description = " ".join(f[desc_i].split()) if desc_i is not None else ""
        if year_i is not None and re.fullmatch(r"\d{4}", f[year_i].strip()):
            description = (description + " " if description else "") + f"Released in {f[year_i].strip()}."
        categories = split_categories(f[cat_i]) if cat_i is not None else ()
        items[item_id] = Item(item_id, title, categories, description)
        first_line[item_id] = lineno
    return items


def _check_item(items: dict[str, Item], item_id: str, path: Path, lineno: int, item_file: Path) -> None:
    if item_id not in items:
        raise DataError(path, lineno, f"item id {item_id!r} is not in {item_file.name}")


def _apply_min_core(
    seqs: dict[str, list[Interaction]], items: dict[str, Item], min_core: int | None, notes: list[str]
) -> tuple[dict[str, list[Interaction]], dict[str, Item]]:
    if not min_core or min_core <= 1:
        return seqs, items
    kept = k_core(seqs, min_core)
    notes.append(describe_k_core(seqs, kept, min_core))
    used = {x.item_id for s in kept.values() for x in s}
    return kept, {i: it for i, it in items.items() if i in used}


# ---------------------------------------------------------------------------- loaders


def load_recbole_sequences(directory: str | Path, name: str | None = None, min_core: int | None = None) -> InteractionData:
    """Load leave-one-out sequence files: one ``*.test.inter`` (full history + test target per
    user), one ``*.item`` and optionally the matching ``*.valid.inter`` (checked for consistency).

    Each user's sequence is the test history followed by the test target, oldest first;
    interactions carry no timestamps or ratings.
    """
    d = as_directory(directory)
    test_path = one_file(d, "*.test.inter")
    prefix = test_path.name[: -len(".test.inter")]
    item_path = one_file(d, "*.item", prefer=(prefix, prefix.rsplit("-", 1)[0]))
    valid_path: Path | None = d / f"{prefix}.valid.inter"
    if not valid_path.is_file():
        others = sorted(p for p in d.glob("*.valid.inter") if p.is_file())
        if len(others) > 1:
            raise DataError(d, None, f"more than one *.valid.inter file and none named {prefix}.valid.inter: "
                            f"{', '.join(p.name for p in others)}")
        valid_path = others[0] if others else None

    items = load_items(item_path)

    table = read_table(test_path)
    table.require("user_id", "item_id_list", "item_id")
    u_i, h_i, t_i = table.index("user_id"), table.index("item_id_list"), table.index("item_id")
    full: dict[str, list[str]] = {}
    line_of: dict[str, int] = {}
    for lineno, f in table.rows:
        user = f[u_i].strip()
        target = f[t_i].strip()
        if not user:
            raise DataError(test_path, lineno, "empty user_id")
        if not target:
            raise DataError(test_path, lineno, f"empty target item_id for user {user!r}")
        if user in full:
            raise DataError(test_path, lineno, f"duplicate user {user!r} (first on line {line_of[user]})")
        ids = f[h_i].split() + [target]
        for x in ids:
            _check_item(items, x, test_path, lineno, item_path)
        full[user] = ids
        line_of[user] = lineno

    notes = [f"RecBole sequences: {len(full)} users, {len(items)} items from {test_path.name} + {item_path.name}"]
    if valid_path is not None:
        vt = read_table(valid_path)
        vt.require("user_id", "item_id_list", "item_id")
        vu, vh, vtg = vt.index("user_id"), vt.index("item_id_list"), vt.index("item_id")
        seen: dict[str, int] = {}
        for lineno, f in vt.rows:
            user = f[vu].strip()
            if user in seen:
                raise DataError(valid_path, lineno, f"duplicate user {user!r} (first on line {seen[user]})")
            seen[user] = lineno
            if user not in full:
                raise DataError(valid_path, lineno, f"user {user!r} is not in {test_path.name}")
            got = f[vh].split() + [f[vtg].strip()]
            want = full[user][:-1]
            if got != want:
                pos = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                raise DataError(
                    valid_path,
                    lineno,
                    f"user {user!r}: history + validation target ({len(got)} items) does not equal the test "
                    f"history in {test_path.name} line {line_of[user]} ({len(want)} items); first difference "
                    f"at position {pos + 1}",
                )
        missing = len(full) - len(seen)
        notes.append(
            f"checked {valid_path.name}: consistent with {test_path.name}"
            + (f" ({missing} users have no validation row)" if missing else "")
        )

    seqs = {u: [Interaction(x) for x in ids] for u, ids in full.items()}
    seqs, items = _apply_min_core(seqs, items, min_core, notes)
    return InteractionData(name or item_path.name.split(".")[0], items, seqs, str(d), notes)


def load_recbole_atomic(directory: str | Path, name: str | None = None, min_core: int | None = None) -> InteractionData:
    """Load a plain RecBole dataset: ``<Name>.inter`` (``user_id``, ``item_id``, optional
    ``rating``, ``timestamp``, ``review``) and ``<Name>.item``. Each user's interactions are
    ordered by timestamp (stable; file order without a timestamp column). ``min_core``
    applies a k-core filter (none by default)."""
    d = as_directory(directory)
    item_path = one_file(d, "*.item")
    inters = [p for p in d.glob("*.inter") if not p.name.endswith(_SPLIT_SUFFIXES)]
    inter_path = one_file(d, "*.inter", candidates=inters, prefer=(item_path.name.split(".")[0],))

    items = load_items(item_path)
    table = read_table(inter_path)
    table.require("user_id", "item_id")
    u_i, it_i = table.index("user_id"), table.index("item_id")
    r_i, ts_i = table.index("rating"), table.index("timestamp")
    rev_i = table.first(names=REVIEW_COLUMNS)

    def number(value: str, column: str, lineno: int) -> float:
        try:
            return float(value)
        except ValueError:
            raise DataError(inter_path, lineno, f"{column} {value!r} is not a number") from None

    seqs: dict[str, list[Interaction]] = {}
    for lineno, f in table.rows:
        user, item_id = f[u_i].strip(), f[it_i].strip()
        if not user:
            raise DataError(inter_path, lineno, "empty user_id")
        _check_item(items, item_id, inter_path, lineno, item_path)
        rating = number(f[r_i], "rating", lineno) if r_i is not None and f[r_i].strip() else None
        ts = number(f[ts_i], "timestamp", lineno) if ts_i is not None else None
        review = " ".join(f[rev_i].split()) if rev_i is not None else ""
        seqs.setdefault(user, []).append(Interaction(item_id, ts, rating, review))
    if ts_i is not None:
        for s in seqs.values():
            s.sort(key=lambda x: x.timestamp)
    n = sum(len(s) for s in seqs.values())
    notes = [
        f"RecBole atomic: {n} interactions, {len(seqs)} users, {len(items)} items from "
        f"{inter_path.name} + {item_path.name}; "
        + ("ordered by timestamp" if ts_i is not None else "no timestamp column, file order kept")
    ]
    seqs, items = _apply_min_core(seqs, items, min_core, notes)
    return InteractionData(name or item_path.name.split(".")[0], items, seqs, str(d), notes)
