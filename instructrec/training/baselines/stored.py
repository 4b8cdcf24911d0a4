"""A RecBole baseline's result kept in the repository, so the README's tables reuse it.

A converged SASRec takes hours of a CPU thread, longer than anyone wants to wait for a table
and longer than the machine that ran it lives. Its result is small: the run's summary
(settings, epochs, times, the code commit) and one score per candidate of each candidate file
it ranked. ``instructrec evaluate --recbole-results DIR`` reads ``DIR/<dataset>-<model>.json.gz``
when it was made for the same candidate files and budget, and writes it after training when
it is not there yet::

    {"format": "instructrec-recbole-result", "version": 1, "stamp": {...}, "commit": "...",
     "summary": {...}, "scores": {"<candidate file digest>": {"<user id>": [score, ...]}}}

Scores are kept at float32's shortest exact text (RecBole computes in float32), so every
candidate ranks as it did in the run.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

from instructrec.files import atomic_file
from instructrec.training.data.types import DataError

from .recbole import _safe_name

FORMAT = "instructrec-recbole-result"
VERSION = 1
# machine-specific entries of the runner's summary (absolute paths): not kept
_LOCAL_KEYS = ("inter", "checkpoint", "log", "files")


def result_path(directory: str | os.PathLike, dataset: str, model: str) -> Path:
    return Path(directory) / f"{_safe_name(dataset)}-{model.lower()}.json.gz"


def _float32_text(x: float) -> float:
    """x as float32's shortest text that reads back to the same float32 (json keeps it as a number)."""
    if x != x or x in (float("inf"), float("-inf")):
        return x
    f32 = struct.unpack("f", struct.pack("f", x))[0]
    for digits in range(6, 10):
        text = f"{f32:.{digits}g}"
        if struct.unpack("f", struct.pack("f", float(text)))[0] == f32:
            return float(text)
    return f32


def save_result(path: str | os.PathLike, stamp: dict, summary: dict, scores_by_digest: dict, commit: str | None) -> Path:
    """Write the result whole or not at all (``scores_by_digest``: candidate file digest →
    user id → scores)."""
    doc = {
        "format": FORMAT, "version": VERSION, "stamp": stamp, "commit": commit,
        "summary": {k: v for k, v in summary.items() if k not in _LOCAL_KEYS},
        "scores": {digest: {user: [_float32_text(float(s)) for s in row] for user, row in table.items()}
                   for digest, table in scores_by_digest.items()},
    }
    path = Path(path)
    data = gzip.compress(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(), mtime=0)
    with atomic_file(path, "wb") as f:
        f.write(data)
    return path


def load_result(path: str | os.PathLike, stamp: dict) -> dict | None:
    """The stored result when ``path`` exists: ``{"summary", "commit", "scores"}``; None when
    there is no file; DataError naming the file when it was made with another budget or holds no
    scores for one of the stamp's candidate files (what differs is in the message). A result
    kept for more candidate files than asked for serves the ones asked for."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        doc = json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, EOFError, ValueError) as e:
        raise DataError(path, None, f"not a readable RecBole result ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise DataError(path, None, f"expected format {FORMAT!r} version {VERSION}")
    kept = doc.get("stamp") or {}
    differ = sorted(k for k in (set(kept) | set(stamp)) - {"candidate_files"} if kept.get(k) != stamp.get(k))
    have = set(kept.get("candidate_files", ()))
    missing = sorted(set(stamp.get("candidate_files", ())) - have)
    if differ or missing:
        why = [f"made for other settings (differ: {', '.join(differ)})"] if differ else []
        if missing:
            why.append(f"holds no scores for the candidate file(s) {', '.join(missing)} (it keeps {', '.join(sorted(have))}; "
                       "a hard-10 file is drawn by the bi-encoder's float32 similarities, which can differ from one "
                       "CPU to another, so --settings uniform-10,uniform-100 reuses a result made elsewhere)")
        raise DataError(path, None, "; ".join(why) + "; give another --recbole-results directory to train again, or "
                        "the settings it was made with")
    return {"summary": doc["summary"], "commit": doc.get("commit"), "scores": doc["scores"]}
