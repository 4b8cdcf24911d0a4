"""A catalogue of items as the model would write their titles: the prefix tree generation walks.

Constrained generation (task form T2, :mod:`instructrec.generation`) may only write a title
the catalogue holds. Each item's title is tokenised exactly as the ranker scores a candidate
(:func:`instructrec.ranker.targets_ids`: the title's tokens cut to ``max_target_tokens - 1``,
then end-of-sequence), and the token sequences are stored sorted, row by row. That sorted
table *is* the prefix tree: every node (the titles starting with some tokens) is a range of
consecutive rows, and its children are the runs of equal tokens in the next column. Nothing
but the table is stored, so 100k items load as a few arrays, and a request's filter (the
items it may receive) is a mask with running counts, which tells in O(1) whether a node
still leads to an allowed item.

Titles that tokenise the same (equal titles, or long titles equal up to the cut) are one
leaf holding all their items. The file is one ``.npz`` (numpy's zip of arrays, read without
pickle) with a JSON header naming its format version and the tokenizer it was built with.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import numpy as np

from . import files
from .checkpoint import read_meta
from .text import normalise

FORMAT = "instructrec-catalogue"
FORMAT_VERSION = 1
PAD = -1  # after end-of-sequence in the token table


class CatalogueError(ValueError):
    """A catalogue or its input cannot be used; the message names the file (and line)."""

    def __init__(self, path: str | Path | None, line: int | None, message: str):
        where = "" if path is None else (f"{path}:{line}: " if line is not None else f"{path}: ")
        super().__init__(where + message)


@dataclass(frozen=True)
class CatalogueItem:
    id: str
    title: str  # normalised (instructrec.text.normalise), as the service normalises candidates
    meta: dict[str, Any] | None = None


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids of a title: the tokenizer's class, its vocabulary and its
    normalisation. A catalogue built with another tokenizer would constrain generation to
    other words, so loading checks it."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(json.dumps(json.loads(backend.to_str()).get("normalizer"), sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Node:
    """A node of the prefix tree: the rows ``lo:hi`` of the sorted table share their first
    ``depth`` tokens."""

    lo: int
    hi: int
    depth: int


@dataclass
class Catalogue:
    items: list[CatalogueItem]
    tokens: np.ndarray  # int32 [rows, width]: one row per item, sorted; PAD after end-of-sequence
    lengths: np.ndarray  # int32 [rows]: tokens of each row, end-of-sequence included
    item_of_row: np.ndarray  # int32 [rows]: the item each sorted row belongs to
    header: dict[str, Any]
    _by_id: dict[str, int] | None = field(default=None, repr=False)
    _by_title: dict[str, list[int]] | None = field(default=None, repr=False)
    _by_meta: dict[str, dict[str, list[int]]] = field(default_factory=dict, repr=False)
    path: str | None = field(default=None, compare=False)  # the file it was read from, as it was named

    # -- what it was built for ----------------------------------------------------------
    @property
    def eos(self) -> int:
        return int(self.header["eos"])

    @property
    def max_target_tokens(self) -> int:
        return int(self.header["max_target_tokens"])

    @property
    def version(self) -> str:
        """A digest of the content (items and their token rows): part of a cache key."""
        return self.header["content"]

    def __len__(self) -> int:
        return len(self.items)

    def check_compatible(self, tokenizer, eos: int, max_target_tokens: int, *, where: str | Path | None = None) -> None:
        """Refuse to serve a model whose tokenizer or candidate limits differ from the build's."""
        problems = []
        if self.header["tokenizer"] != tokenizer_fingerprint(tokenizer):
            problems.append(f"it was built with another tokenizer ({self.header.get('model') or 'unknown model'})")
        if self.eos != eos:
            problems.append(f"its end-of-sequence id is {self.eos}, the model's is {eos}")
        if self.max_target_tokens != max_target_tokens:
            problems.append(f"its titles are cut to {self.max_target_tokens} tokens, the model scores "
                            f"{max_target_tokens}")
        if problems:
            raise CatalogueError(where, None, "does not fit this model: " + "; ".join(problems)
                                 + "; rebuild it with `instructrec catalogue build --model` naming this model")

    # -- lookups --------------------------------------------------------------------------
    def index_of_id(self, item_id: str) -> int | None:
        if self._by_id is None:
            self._by_id = {it.id: i for i, it in enumerate(self.items)}
        return self._by_id.get(str(item_id))

    def indices_of_title(self, title: str) -> list[int]:
        if self._by_title is None:
            by: dict[str, list[int]] = {}
            for i, it in enumerate(self.items):
                by.setdefault(it.title, []).append(i)
            self._by_title = by
        return self._by_title.get(normalise(title), [])

    def indices_where(self, key: str, values: Sequence[Any]) -> list[int]:
        """Items whose metadata ``key`` equals one of ``values`` (or, for a list, holds one of
        them); an item without the key matches nothing. The index of a key is built on first use."""
        index = self._by_meta.get(key)
        if index is None:
            index = {}
            for i, it in enumerate(self.items):
                value = (it.meta or {}).get(key, _MISSING)
                if value is _MISSING:
                    continue
                for v in value if isinstance(value, list) else [value]:
                    index.setdefault(_meta_key(v), []).append(i)
            self._by_meta[key] = index
        return sorted({i for v in values for i in index.get(_meta_key(v), ())})

    def row_tokens(self, row: int) -> list[int]:
        return self.tokens[row, : self.lengths[row]].tolist()

    # -- the prefix tree ----------------------------------------------------------------
    def root(self) -> Node:
        return Node(0, len(self.items), 0)

    def allowed_counts(self, allowed: np.ndarray | None) -> np.ndarray | None:
        """Running counts of allowed rows (``allowed``: a bool per item, None for all), so that
        ``counts[hi] - counts[lo]`` is how many allowed items lie under a node."""
        if allowed is None:
            return None
        return np.concatenate([[0], np.cumsum(allowed[self.item_of_row], dtype=np.int64)])

    def children(self, node: Node, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token, lo, hi) of each child of ``node`` that leads to an allowed item, in token
        order. A child whose token is end-of-sequence is a leaf: a whole title."""
        column = self.tokens[node.lo : node.hi, node.depth]
        cuts = np.flatnonzero(column[1:] != column[:-1]) + 1
        starts = np.concatenate([[0], cuts]) + node.lo
        ends = np.concatenate([cuts, [len(column)]]) + node.lo
        tokens = column[starts - node.lo]
        if counts is not None:
            keep = counts[ends] > counts[starts]
            return tokens[keep], starts[keep], ends[keep]
        return tokens, starts, ends

    def leaf_items(self, node: Node, allowed: np.ndarray | None = None) -> list[int]:
        """The items (allowed ones, in item order) whose whole title is the leaf ``node``."""
        items = sorted(int(i) for i in self.item_of_row[node.lo : node.hi])
        return [i for i in items if allowed is None or allowed[i]]

    # -- storage ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the catalogue to exactly ``path`` (no suffix added: ``serve --catalogue`` names
        the file ``catalogue build --out`` was given)."""
        path = Path(path)
        with files.atomic_file(path, "wb") as f:  # a file object: numpy appends .npz only to names
            np.savez_compressed(f, header=_json_bytes(self.header), tokens=self.tokens, lengths=self.lengths,
                                item_of_row=self.item_of_row, ids=_json_bytes([it.id for it in self.items]),
                                titles=_json_bytes([it.title for it in self.items]),
                                meta=_json_bytes([it.meta for it in self.items]))
        return path


_MISSING = object()


def _meta_key(value: Any) -> str:
    """A metadata value as a dictionary key: its JSON text, so the string "1" and the number 1 stay apart."""
    return json.dumps(value, sort_keys=True)


def _json_bytes(value: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(value, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)


def _json_of(array: np.ndarray) -> Any:
    return json.loads(array.tobytes().decode("utf-8"))


def build_catalogue(items: Sequence[CatalogueItem], tokenizer, *, eos: int, max_target_tokens: int,
                    model: str = "", source: str = "", progress: bool = False) -> Catalogue:
    """The catalogue of ``items``, their titles tokenised as the ranker tokenises candidates."""
    from tqdm import tqdm

    from .ranker import targets_ids

    if not items:
        raise CatalogueError(source or None, None, "no items")
    rows = []
    batch = 4096
    with tqdm(total=len(items), desc="tokenise titles", unit="item", disable=not progress) as bar:
        for a in range(0, len(items), batch):
            rows.extend(ids for ids, _ in targets_ids(tokenizer, [it.title for it in items[a : a + batch]],
                                                      max_target_tokens, eos))
            bar.update(min(batch, len(items) - a))
    for i, ids in enumerate(rows):
        if eos in ids[:-1]:
            raise CatalogueError(source or None, None, f"item {items[i].id!r}: its title {items[i].title!r} "
                                 "tokenises to the end-of-sequence token before its end")
    width = max(len(r) for r in rows)
    table = np.full((len(rows), width), PAD, dtype=np.int32)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    order = np.lexsort(table.T[::-1])  # by the first column, then the second, ...
    table = np.ascontiguousarray(table[order])
    lengths = np.array([len(rows[i]) for i in order], dtype=np.int32)
    content = hashlib.sha256(table.tobytes())
    for it in items:
        content.update(f"{it.id}\x1f{it.title}\x1e".encode("utf-8", "surrogatepass"))
    header = {"format": FORMAT, "version": FORMAT_VERSION, "items": len(items), "leaves": _leaves(table),
              "eos": int(eos), "max_target_tokens": int(max_target_tokens), "tokenizer": tokenizer_fingerprint(tokenizer),
              "model": model, "source": source, "content": content.hexdigest()[:16],
              "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return Catalogue(list(items), table, lengths, order.astype(np.int32), header)


@dataclass(frozen=True)
class TextSide:
    """What decides how a model's titles are tokenised, without its weights: enough to build a
    catalogue for a checkpoint too large to load just for that."""

    tokenizer: object
    eos: int
    meta: dict


def load_text_side(name_or_path: str | Path) -> TextSide:
    """The tokenizer, end-of-sequence id and ``instructrec.json`` of a checkpoint directory
    (weights not read), or of a built-in (built: they are small)."""
    from .modeling import BUILDERS, load_model
    from .ranker import eos_id
    from .shipped import is_shipped

    name = str(name_or_path)
    if name in BUILDERS or not Path(name).is_dir() or is_shipped(name):  # a shipped model's text side is its base's
        loaded = load_model(name, device="cpu", dtype="float32")
        return TextSide(loaded.tokenizer, eos_id(loaded.tokenizer, loaded.model), loaded.meta)

    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if not config.is_encoder_decoder and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as loading it for ranking does
    return TextSide(tokenizer, eos_id(tokenizer, SimpleNamespace(config=config)), read_meta(name))


def _leaves(table: np.ndarray) -> int:
    """Distinct token sequences (titles that tokenise the same share one)."""
    if len(table) < 2:
        return len(table)
    return int(1 + np.count_nonzero(np.any(table[1:] != table[:-1], axis=1)))


def load_catalogue(path: str | Path) -> Catalogue:
    named = str(path)
    path = Path(path)
    if not path.is_file():
        raise CatalogueError(path, None, "no such catalogue file (make one with `instructrec catalogue build`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            header = _json_of(z["header"])
            if header.get("format") != FORMAT:
                raise CatalogueError(path, None, f"is not an instructrec catalogue (format {header.get('format')!r})")
            if header.get("version") != FORMAT_VERSION:
                raise CatalogueError(path, None, f"is catalogue format version {header.get('version')}; this "
                                     f"instructrec reads version {FORMAT_VERSION}: rebuild it")
            ids, titles, meta = _json_of(z["ids"]), _json_of(z["titles"]), _json_of(z["meta"])
            items = [CatalogueItem(i, t, m) for i, t, m in zip(ids, titles, meta)]
            return Catalogue(items, z["tokens"], z["lengths"], z["item_of_row"], header, path=named)
    except CatalogueError:
        raise
    except (OSError, ValueError, KeyError) as exc:  # not a zip, a missing array, broken JSON
        raise CatalogueError(path, None, f"cannot be read as a catalogue: {exc}") from None


# -- items from a JSON-lines file ---------------------------------------------------------

ID_KEYS = ("id", "item_id")


def read_items_jsonl(path: str | Path) -> Iterator[CatalogueItem]:
    """Items from JSON lines ``{"id": ..., "title": ..., ...}`` (``item_id`` is taken for
    ``id``; every other field is kept as the item's metadata). A bad line stops with its
    file and line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise CatalogueError(path, None, "no such file")
    first_seen: dict[str, int] = {}
    with path.open("r", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = _item_of(json_line(path, number, line), path, number)
            if item.id in first_seen:  # a filter by id would be ambiguous
                raise CatalogueError(path, number, f"item id {item.id!r} was already given on line {first_seen[item.id]}")
            first_seen[item.id] = number
            yield item


def json_line(path: Path, number: int, line: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CatalogueError(path, number, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise CatalogueError(path, number, f"expected a JSON object, got {type(value).__name__}")
    return value


def _item_of(row: dict, path: Path, number: int) -> CatalogueItem:
    key = next((k for k in ID_KEYS if k in row), None)
    if key is None:
        raise CatalogueError(path, number, "no \"id\" field")
    item_id = row[key]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id) == "":
        raise CatalogueError(path, number, f"\"{key}\" must be a non-empty string or an integer, not {item_id!r}")
    title = row.get("title")
    if not isinstance(title, str) or not normalise(title):
        raise CatalogueError(path, number, f"\"title\" must be a non-empty string, not {title!r}")
    meta = {k: v for k, v in row.items() if k not in (key, "title")}
    return CatalogueItem(str(item_id), normalise(title), meta or None)


__all__ = ["Catalogue", "CatalogueItem", "CatalogueError", "Node", "build_catalogue", "load_catalogue",
           "read_items_jsonl", "load_text_side", "TextSide", "tokenizer_fingerprint", "FORMAT_VERSION"]
