"""Annotate training cases with a teacher, resumably.

The cache is a JSONL file, one line per answered request::

    {"key": "<sha256>", "kind": "preference", "user_id": "u1", "target": "i9",
     "teacher": "offline-v1", "text": "I mostly play on PC ..."}   # text may be null

Each answer is appended and flushed as soon as it arrives, so an interrupted run
loses at most the requests in flight. On start the file is read; requests whose
(teacher, key) is already answered are not asked again (a case sharing the key
of an answered one gets its own line with the cached text). A truncated last line
(the process was killed mid-write) is cut off with a warning.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from instructrec import files
from instructrec.training.annotate.teachers import AnnotationRequest, Kind, Teacher
from instructrec.training.data.types import Case, DataError, InteractionData

log = logging.getLogger(__name__)


@dataclass
class Annotation:
    user_id: str
    target: str
    kind: Kind
    text: str | None
    teacher: str
    key: str

    def to_json(self) -> str:
        d = asdict(self)
        d["kind"] = Kind(self.kind).value
        return json.dumps(
            {k: d[k] for k in ("key", "kind", "user_id", "target", "teacher", "text")}, ensure_ascii=False
        )


def build_request(data: InteractionData, case: Case, kind: Kind) -> AnnotationRequest:
    def item(item_id: str):
        try:
            return data.items[item_id]
        except KeyError:
            raise DataError(data.source or data.name, None, f"user {case.user_id}: unknown item id {item_id!r}") from None

    history = [item(i) for i in case.history]
    target = item(case.target)
    return AnnotationRequest(
        kind=Kind(kind),
        user_id=case.user_id,
        target=case.target,
        history_titles=tuple(it.title for it in history),
        target_title=target.title,
        target_categories=tuple(target.categories),
        target_review=case.review or "",
        target_description=target.description or "",
        history_categories=tuple(tuple(it.categories) for it in history) if any(it.categories for it in history) else (),
    )


def _read_cache(path: Path) -> list[Annotation]:
    """Lines of the cache; a truncated last line is cut off (with a warning), any other bad line is a DataError."""
    if not path.exists():
        return []
    out: list[Annotation] = []
    for number, d in files.jsonl_objects(path, DataError, torn_tail="skip"):
        try:
            ann = Annotation(
                user_id=str(d["user_id"]),
                target=str(d["target"]),
                kind=Kind(d["kind"]),
                text=d.get("text"),
                teacher=str(d["teacher"]),
                key=str(d["key"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(path, number, f"not an annotation record ({type(e).__name__}: {e})") from None
        out.append(ann)
    return out


def _repair_tail(path: Path) -> None:
    """Make the file end at a complete line so appends start on a fresh line."""
    if not path.exists():
        return
    raw = path.read_bytes()
    if not raw or raw.endswith(b"\n"):
        return
    cut = raw.rfind(b"\n") + 1
    tail = raw[cut:]
    try:
        json.loads(tail.decode("utf-8"))
        with path.open("ab") as f:  # a complete record that just lacks its newline
            f.write(b"\n")
    except (ValueError, UnicodeDecodeError):
        with path.open("r+b") as f:
            f.truncate(cut)


def read_annotations_file(path: str | Path) -> dict[tuple[str, str, Kind], Annotation]:
    """:func:`load_annotations` of a file the user named (``--annotations``): a missing file is
    an error, not an empty cache."""
    if not Path(path).is_file():
        what = "is a directory, not an annotations file" if Path(path).is_dir() else "no such annotations file"
        raise DataError(path, None, f"{what} (make one with `instructrec annotate`)")
    return load_annotations(path)


def load_annotations(path: str | Path, teacher: str | None = None, include_none: bool = False) -> dict[tuple[str, str, Kind], Annotation]:
    """The cache as ``{(user_id, target, kind): Annotation}`` (the last line wins), for
    the instruction builder. Only answers with text unless ``include_none``; only
    those of ``teacher`` when given."""
    result: dict[tuple[str, str, Kind], Annotation] = {}
    for ann in _read_cache(Path(path)):
        if teacher is not None and ann.teacher != teacher:
            continue
        if ann.text is None and not include_none:
            continue
        result[(ann.user_id, ann.target, Kind(ann.kind))] = ann
    return result


async def annotate_cases(
    data: InteractionData,
    cases: list[Case],
    teacher: Teacher,
    kinds: Iterable[Kind],
    cache_path: Path,
    progress: bool = True,
) -> list[Annotation]:
    """Annotate ``cases`` x ``kinds`` with ``teacher``, resuming from ``cache_path``.

    Returns one :class:`Annotation` per (case, kind), in that order (``text`` is None
    where the teacher could not annotate). If the teacher fails, requests already in
    flight are allowed to finish and be recorded, then the error is raised; rerunning
    resumes from there.
    """
    cache_path = Path(cache_path)
    kinds = [Kind(k) for k in kinds]
    requests = [build_request(data, case, kind) for case in cases for kind in kinds]

    cached = _read_cache(cache_path)
    answered: dict[str, str | None] = {}  # key -> text, for this teacher
    recorded: set[tuple[str, str, str, Kind]] = set()  # (key, user, target, kind) already on a line
    for ann in cached:
        if ann.teacher == teacher.name:
            answered[ann.key] = ann.text
            recorded.add((ann.key, ann.user_id, ann.target, Kind(ann.kind)))

    keys = [r.key() for r in requests]
    pending: dict[str, list[AnnotationRequest]] = {}
    for req, key in zip(requests, keys):
        if key not in answered:
            pending.setdefault(key, []).append(req)
    reused = [(r, k) for r, k in zip(requests, keys)
              if k in answered and (k, r.user_id, r.target, r.kind) not in recorded]

    cache_path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(cache_path)
    if cached or pending:
        log.info("%s: %d answers cached, %d requests to ask %s", cache_path, len(answered), len(pending), teacher.name)

    with cache_path.open("a", encoding="utf-8") as out:

        def record(req: AnnotationRequest, key: str, text: str | None) -> None:
            line = Annotation(req.user_id, req.target, req.kind, text, teacher.name, key).to_json()
            out.write(line + "\n")
            recorded.add((key, req.user_id, req.target, req.kind))

        for req, key in reused:
            if (key, req.user_id, req.target, req.kind) not in recorded:
                record(req, key, answered[key])
        out.flush()

        queue = iter(list(pending.items()))
        errors: list[BaseException] = []
        bar = tqdm(total=len(pending), desc=f"annotate [{teacher.name}]", unit="req", disable=not progress or not pending)

        async def worker() -> None:
            for key, reqs in queue:  # a shared iterator: each key goes to exactly one worker
                if errors:
                    return
                try:
                    text = await teacher.annotate(reqs[0])
                except Exception as e:  # stop handing out work; let the others finish what they hold
                    errors.append(e)
                    return
                answered[key] = text
                for req in reqs:
                    record(req, key, text)
                out.flush()
                bar.update(1)

        n_workers = max(1, min(len(pending), int(getattr(teacher, "max_concurrency", 1) or 1)))
        try:
            await asyncio.gather(*(worker() for _ in range(n_workers)))
        finally:
            bar.close()
            out.flush()
            try:
                os.fsync(out.fileno())
            except OSError:
                pass
        if errors:
            raise errors[0]

    return [Annotation(r.user_id, r.target, r.kind, answered.get(k), teacher.name, k) for r, k in zip(requests, keys)]


# ---------------------------------------------------------------------------
# Table-2-style statistics

_LABELS = {Kind.PREFERENCE: "preferences", Kind.VAGUE: "vague_intentions", Kind.SPECIFIC: "specific_intentions"}


def annotation_stats(annotations: Iterable[Annotation], n_users: int) -> dict:
    anns = list(annotations)
    texts = [a for a in anns if a.text]
    counts = Counter(Kind(a.kind) for a in texts)
    words: dict[Kind, list[int]] = {k: [] for k in Kind}
    for a in texts:
        words[Kind(a.kind)].append(len(a.text.split()))

    def avg(xs: list[int]) -> float:
        return round(sum(xs) / len(xs), 2) if xs else 0.0

    all_words = [n for xs in words.values() for n in xs]
    stats = {
        "teacher": ", ".join(sorted({a.teacher for a in anns})) or "-",
        "users": int(n_users),
        "annotated_users": len({a.user_id for a in texts}),
        "requests": len(anns),
        "unanswered": len(anns) - len(texts),
        "fine_grained": len(texts),
        "preferences": counts[Kind.PREFERENCE],
        "intentions": counts[Kind.VAGUE] + counts[Kind.SPECIFIC],
        "vague_intentions": counts[Kind.VAGUE],
        "specific_intentions": counts[Kind.SPECIFIC],
        "avg_words": avg(all_words),
        "avg_words_preferences": avg(words[Kind.PREFERENCE]),
        "avg_words_vague_intentions": avg(words[Kind.VAGUE]),
        "avg_words_specific_intentions": avg(words[Kind.SPECIFIC]),
    }
    return stats


def format_stats_table(stats: dict) -> str:
    rows = [
        ("# of users", f"{stats['users']:,}"),
        ("  - with at least one annotation", f"{stats['annotated_users']:,}"),
        ("# of fine-grained instructions", f"{stats['fine_grained']:,}"),
        ("  - # of user-described preferences", f"{stats['preferences']:,}"),
        ("  - # of user intentions in decision making", f"{stats['intentions']:,}"),
        ("      - vague intentions", f"{stats['vague_intentions']:,}"),
        ("      - specific intentions", f"{stats['specific_intentions']:,}"),
        ("# of requests the teacher could not annotate", f"{stats['unanswered']:,}"),
        ("ave. instruction length (in words)", f"{stats['avg_words']:.1f}"),
        ("  - preferences", f"{stats['avg_words_preferences']:.1f}"),
        ("  - vague intentions", f"{stats['avg_words_vague_intentions']:.1f}"),
        ("  - specific intentions", f"{stats['avg_words_specific_intentions']:.1f}"),
        ("teacher", str(stats["teacher"])),
    ]
    width = max(len(label) for label, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    header = f"{'Statistic':<{width}}  {'Value':>{vwidth}}"
    lines = [header, "-" * len(header)]
    lines += [f"{label:<{width}}  {value:>{vwidth}}" for label, value in rows]
    return "\n".join(lines)
