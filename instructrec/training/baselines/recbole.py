"""Main-environment side of the RecBole baselines (SASRec, BERT4Rec).

RecBole 1.2.1 needs numpy < 2 and so lives in its own virtual environment
(``bash scripts/install_recbole.sh``, by default at ``artifacts/envs/recbole``, or
``$INSTRUCTREC_RECBOLE_ENV``). This module writes the interactions as a RecBole atomic
file, runs ``recbole_runner.py`` with that environment's python and reads back the
scores of each candidates file::

    result = run_recbole(data, "SASRec", ["cands/test.jsonl"], "out/sasrec", epochs=10, patience=3, seed=0, threads=1)
    result["summary"]["best_epoch"], result["scores"]["cands/test.jsonl"]["u1"]  # -> [score per candidate]

Only the standard library and :mod:`instructrec.training.data.types` are imported here: nothing
from RecBole's side crosses the process boundary but files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Iterable

from instructrec.training.data.types import DataError, InteractionData

ENV_VAR = "INSTRUCTREC_RECBOLE_ENV"
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_ENV = REPO_ROOT / "artifacts" / "envs" / "recbole"
RUNNER = Path(__file__).resolve().parent / "recbole_runner.py"
INSTALL_HINT = "bash scripts/install_recbole.sh"
MODELS = ("SASRec", "BERT4Rec")
PAUSED = 3  # the runner's exit status after --stop-after (recbole_runner.PAUSED)
INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
# strings pandas.read_csv (RecBole's reader) turns into NaN, and characters that break the format
_NA_STRINGS = {
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
}  # fmt: skip


class RecBoleError(RuntimeError):
    """The RecBole environment is missing or the runner failed (the message carries its stderr tail)."""


class RecBolePaused(RecBoleError):
    """The runner trained its ``stop_after`` epochs and saved its state (resume to go on)."""


def env_dir(env: str | os.PathLike | None = None) -> Path:
    """The RecBole environment: ``env``, else ``$INSTRUCTREC_RECBOLE_ENV``, else
    ``artifacts/envs/recbole``; a relative path is taken from the repository root, as
    ``scripts/install_recbole.sh`` does."""
    p = Path(env if env is not None else os.environ.get(ENV_VAR) or DEFAULT_ENV)
    return p if p.is_absolute() else REPO_ROOT / p


def recbole_python(env: str | os.PathLike | None = None) -> Path:
    """``<env>/bin/python`` of the RecBole environment; RecBoleError if it is not there."""
    d = env_dir(env)
    py = d / "bin" / "python"
    if not py.exists():
        raise RecBoleError(f"RecBole environment not found at {d}: run `{INSTALL_HINT}`")
    return py


def _timestamps(seq) -> list[float]:
    """Real timestamps when every interaction has one and they never decrease (the order of
    ``seq`` is the truth: RecBole re-sorts by timestamp, stably); else positions 0, 1, 2, ..."""
    ts = [x.timestamp for x in seq]
    if all(t is not None for t in ts) and all(a <= b for a, b in zip(ts, ts[1:])):
        return [float(t) for t in ts]
    return [float(i) for i in range(len(seq))]


def _check_token(path: Path, kind: str, value: str) -> str:
    if value in _NA_STRINGS or any(c in value for c in "\t\n\r") or value.startswith('"'):
        raise DataError(path, None, f"{kind} {value!r} cannot be written to a RecBole atomic file (empty, NA-like, quoted or with tab/newline)")
    return value


def write_inter(data: InteractionData, path: str | os.PathLike) -> Path:
    """Write ``data.sequences`` as a RecBole atomic interaction file
    (``user_id:token  item_id:token  timestamp:float``), users in sorted order, each user's
    interactions oldest first. The timestamp is the interaction's own when every
    interaction of the data has one (and a user's never decrease), else its position."""
    path = Path(path)
    all_timed = all(x.timestamp is not None for seq in data.sequences.values() for x in seq)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.write(INTER_HEADER + "\n")
        for user in sorted(data.sequences):
            seq = data.sequences[user]
            u = _check_token(path, "user id", str(user))
            ts = _timestamps(seq) if all_timed else [float(i) for i in range(len(seq))]
            for x, t in zip(seq, ts):
                f.write(f"{u}\t{_check_token(path, 'item id', str(x.item_id))}\t{t:.17g}\n")
    return path


def _check_candidate_users(path: Path) -> None:
    """The result maps user id -> scores, so a file must hold one case per user."""
    seen: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(path, None, f"cannot read: {e.strerror or e}") from None
    for lineno, line in enumerate(lines, 1):
        if lineno == 1 or not line.strip():
            continue
        try:
            uid = json.loads(line).get("user_id")
        except (json.JSONDecodeError, AttributeError):
            continue  # the runner reports malformed lines with their line numbers
        if uid is None:
            continue
        uid = str(uid)
        if uid in seen:
            raise DataError(path, lineno, f"user {uid!r} already has a case on line {seen[uid]}: run_recbole returns one score list per user")
        seen[uid] = lineno


def _pump(stream, sink, tail: deque | None) -> None:
    """Copy a child's stream to ``sink`` as it comes (progress bars included), keeping a tail."""
    for chunk in iter(lambda: stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096), b""):
        text = chunk.decode("utf-8", "replace")
        if tail is not None:
            tail.append(text)
        try:
            sink.write(text)
            sink.flush()
        except (OSError, ValueError):
            pass


def read_full_ranks(path: Path) -> dict[str, int]:
    """user id -> the target's full-catalogue rank, from a scores file written with ``--full-rank``."""
    out: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                out[obj["user_id"]] = int(obj["full_rank"])
    return out


def _read_scores(path: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)  # accepts the -Infinity of unknown candidates
                out[obj["user_id"]] = [float(s) for s in obj["scores"]]
    return out


def run_recbole(
    data: InteractionData,
    model: str,
    candidate_files: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    epochs: int,
    patience: int,
    seed: int,
    threads: int = 1,
    env: str | os.PathLike | None = None,
    device: str = "cpu",
    max_seq_len: int = 20,  # the runner's default; why: recbole_runner.py
    full_rank: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict:
    """Train ``model`` (SASRec or BERT4Rec) with RecBole on ``data`` and score every
    candidates file. Returns ``{"summary": <OUT/summary.json>, "scores": {str(candidate
    file): {user_id: [score per candidate, in the file's order]}}}``; unknown candidates
    score ``-inf``; with ``full_rank`` the scores files also carry each case's full-catalogue rank
    (:func:`read_full_ranks`). ``resume`` continues the run in ``out_dir`` from its last finished
    epoch when it had the same data and settings (a finished run only scores again); ``stop_after``
    trains at most that many epochs, saves the state and raises :class:`RecBolePaused`. The
    runner's output is streamed to this process's stderr; on failure RecBoleError carries the
    tail of the runner's stderr."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    py = recbole_python(env)
    files = [Path(c) for c in candidate_files]
    if not files:
        raise ValueError("no candidate files")
    for c in files:
        if not c.is_file():
            raise DataError(c, None, "no such candidates file")
        _check_candidate_users(c)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inter = write_inter(data, out / f"{_safe_name(data.name)}.inter")

    cmd = [
        str(py), str(RUNNER),
        "--inter", str(inter.resolve()), "--model", model,
        "--epochs", str(epochs), "--patience", str(patience), "--seed", str(seed),
        "--threads", str(threads), "--max-seq-len", str(max_seq_len), "--device", device,
        "--out", str(out.resolve()),
        "--candidates", *[str(c.resolve()) for c in files],
    ]  # fmt: skip
    if _isatty(sys.stderr):
        cmd.append("--progress")
    if full_rank:
        cmd.append("--full-rank")
    if resume:
        cmd.append("--resume")
    if stop_after is not None:
        cmd += ["--stop-after", str(stop_after)]
    child_env = dict(os.environ)
    child_env["OMP_NUM_THREADS"] = str(threads)
    child_env.pop("PYTHONPATH", None)  # the runner must not see the main environment's packages
    child_env["PYTHONNOUSERSITE"] = "1"
    tail: deque[str] = deque(maxlen=200)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=child_env, cwd=str(out.resolve()))
    t = threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, None), daemon=True)
    t.start()
    try:
        _pump(proc.stderr, sys.stderr, tail)
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    t.join()
    if rc == PAUSED:
        raise RecBolePaused(f"RecBole {model} in {out}: stopped after {stop_after} epoch(s) with its state saved; "
                            "run again with resume to continue")
    if rc != 0:
        text = "".join(tail).replace("\r", "\n")
        last = "\n".join(line for line in text.splitlines() if line.strip())[-4000:]
        raise RecBoleError(f"RecBole runner ({model}) failed with exit status {rc}:\n{last}")

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    scores = {}
    for c in files:
        entry = summary["files"][str(c.resolve())]
        scores[str(c)] = _read_scores(Path(entry["scores_file"]))
    return {"summary": summary, "scores": scores}


def _safe_name(name: str) -> str:
    s = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
    return s or "data"


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
