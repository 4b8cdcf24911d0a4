"""Candidate files: the cases of one evaluation setting, written once and read by every method.

The paper's protocol ranks each ground truth among negatives the user never interacted
with. Writing the candidate sets to a file before any method runs is what makes the rows
of a report comparable: popularity, SASRec in its own environment, the bi-encoder, the
instruction-tuned model and the batch client against a live service all read the same
file. Format (JSONL)::

    {"format": "instructrec-candidates", "version": 1, "dataset": ..., "split": "test", ...}
    {"user_id": "u1", "history": ["i3", "i7"], "target": "i9", "candidates": ["i4", "i9", ...]}

``history`` is the full sequence before the target, oldest first (each method truncates
it to what it reads). The target sits at a random position among the candidates.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from instructrec import files

from ..data.types import Case, DataError, InteractionData
from ..metrics import candidate_set, case_rng

FORMAT = "instructrec-candidates"
VERSION = 1


@dataclass(frozen=True)
class CandidateCase:
    user_id: str
    history: tuple[str, ...]
    target: str
    candidates: tuple[str, ...]

    @property
    def positive(self) -> int:
        return self.candidates.index(self.target)

    def as_case(self) -> Case:
        return Case(self.user_id, self.history, self.target)


@dataclass
class CandidateFile:
    header: dict
    cases: list[CandidateCase]
    path: Path | None = None

    @property
    def digest(self) -> str:
        """A short content hash: results computed on one file are never mixed with another's."""
        return self._hash(json.dumps(self.header, sort_keys=True))

    @property
    def cases_digest(self) -> str:
        """A hash of the cases alone (not of the header, which names where the data lay): equal on
        every machine that draws the same cases, so a result kept in the repository finds them."""
        return self._hash("")

    def _hash(self, first: str) -> str:
        h = hashlib.sha256(first.encode())
        for c in self.cases:
            h.update(f"{c.user_id}\t{' '.join(c.history)}\t{c.target}\t{' '.join(c.candidates)}\n".encode())
        return h.hexdigest()[:16]


def full_cases(data: InteractionData, split: str) -> list[Case]:
    """Per user, the test case (last interaction) or the validation case (the one before),
    with the whole history before it (the paper's leave-one-out split)."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', not {split!r}")
    cut = 1 if split == "test" else 2
    out = []
    for user_id, seq in data.sequences.items():
        ids = [x.item_id for x in seq]
        if len(ids) < 3:
            continue
        t = len(ids) - cut
        out.append(Case(user_id, tuple(ids[:t]), ids[t], seq[t].review))
    return out


def pick_users(cases: list[Case], n: int | None, seed: int) -> list[Case]:
    """A seeded subsample of ``n`` cases (by user id, so valid and test pick the same users)."""
    cases = sorted(cases, key=lambda c: c.user_id)
    if n is None or n >= len(cases):
        return cases
    chosen = set(random.Random(seed).sample([c.user_id for c in cases], n))
    return [c for c in cases if c.user_id in chosen]


def uniform_candidates(data: InteractionData, cases: Iterable[Case], n_negatives: int, seed: int) -> list[CandidateCase]:
    items = sorted(data.items)
    return [CandidateCase(c.user_id, c.history, c.target, tuple(candidate_set(data, c, n_negatives, seed, items)))
            for c in cases]


def hard_candidates(data: InteractionData, cases: Sequence[Case], n_negatives: int, seed: int,
                    retrieve: Callable[[Sequence[Case], int], list[list[str]]], pool: int = 50) -> list[CandidateCase]:
    """Negatives drawn from what a matching model retrieves for the user: ``retrieve`` returns,
    per case, item ids best first; the first ``pool`` the user never interacted with (the
    target excluded) form the pool and ``n_negatives`` of them are drawn uniformly."""
    ranked = retrieve(cases, pool + 64)
    out = []
    for case, items in zip(cases, ranked):
        seen = {x.item_id for x in data.sequences.get(case.user_id, ())} | {case.target}
        fresh = [i for i in items if i not in seen][:pool]
        if len(fresh) < n_negatives:
            raise ValueError(f"user {case.user_id}: the retriever found only {len(fresh)} unseen items, {n_negatives} needed")
        rng = case_rng(seed, case)
        cands = [case.target, *rng.sample(fresh, n_negatives)]
        case_rng(seed + 1, case).shuffle(cands)
        out.append(CandidateCase(case.user_id, case.history, case.target, tuple(cands)))
    return out


def write(path: str | Path, header: dict, cases: Sequence[CandidateCase]) -> CandidateFile:
    path = Path(path)
    header = {"format": FORMAT, "version": VERSION, **header, "cases": len(cases)}
    with files.atomic_file(path) as f:
        f.write(json.dumps(header) + "\n")
        for c in cases:
            f.write(json.dumps({"user_id": c.user_id, "history": list(c.history), "target": c.target,
                                "candidates": list(c.candidates)}, ensure_ascii=False) + "\n")
    return CandidateFile(header, list(cases), path)


def read(path: str | Path, data: InteractionData | None = None) -> CandidateFile:
    """Read and check a candidate file; errors name the file and line. With ``data``, every
    item id must be one of its items."""
    path = Path(path)
    try:
        rows = list(files.jsonl_objects(path, DataError))
    except OSError as exc:
        raise DataError(path, None, f"cannot read candidate file: {exc.strerror or exc}") from None
    if not rows:
        raise DataError(path, None, "empty candidate file")
    first, header = rows[0]
    if first != 1 or header.get("format") != FORMAT:
        raise DataError(path, 1, f'not a candidate file: the first line must be a JSON object with "format": "{FORMAT}"')
    if header.get("version") != VERSION:
        raise DataError(path, 1, f"candidate file version {header.get('version')!r} is not supported (expected {VERSION})")
    cases = []
    for n, row in rows[1:]:
        for key, kind in (("user_id", str), ("target", str), ("history", list), ("candidates", list)):
            if not isinstance(row.get(key), kind):
                raise DataError(path, n, f'field "{key}" is missing or not a {kind.__name__}')
        cands = row["candidates"]
        if not all(isinstance(x, str) for x in cands + row["history"]):
            raise DataError(path, n, '"history" and "candidates" must hold item id strings')
        if row["target"] not in cands:
            raise DataError(path, n, f'the target {row["target"]!r} is not among the candidates')
        if len(set(cands)) != len(cands):
            raise DataError(path, n, "duplicate candidates")
        if data is not None:
            unknown = [x for x in [*cands, *row["history"]] if x not in data.items]
            if unknown:
                raise DataError(path, n, f"unknown item id {unknown[0]!r} (not in dataset {data.name})")
        cases.append(CandidateCase(row["user_id"], tuple(row["history"]), row["target"], tuple(cands)))
    if not cases:
        raise DataError(path, None, "the candidate file holds no cases")
    return CandidateFile(header, cases, path)
