"""Train a RecBole sequential baseline (SASRec or BERT4Rec) and score fixed candidate files.

A standalone script for the RecBole environment (``bash scripts/install_recbole.sh``):
it imports only the standard library, torch, numpy and recbole, never ``instructrec`` or
``training``. The main environment drives it through
:func:`instructrec.training.baselines.recbole.run_recbole`::

    artifacts/envs/recbole/bin/python instructrec/training/baselines/recbole_runner.py \\
        --inter data.inter --model SASRec --epochs 10 --patience 3 \\
        --candidates test.jsonl --out out/

What it does:

1. trains ``--model`` with RecBole 1.2.1 on ``--inter`` (a RecBole atomic file with the
   header ``user_id:token  item_id:token  timestamp:float``), leave-one-out split
   (``LS: valid_and_test``, order ``TO``), early stopping on RecBole's full-sort
   validation NDCG@10 with ``--patience`` epochs, keeping the best epoch;
2. loads the best checkpoint and scores every case of every ``--candidates`` file from
   the case's own ``history`` (unknown items dropped, then the last ``--max-seq-len``
   kept) with ``model.full_sort_predict``, writing
   ``OUT/<file name without .jsonl>.scores.jsonl`` (one ``{"user_id", "scores"}`` line per
   case, scores in the order of the case's ``candidates``; a candidate RecBole does not
   know scores ``-Infinity``; a case with no known history item scores 0.0 for every
   known candidate; with ``--full-rank`` also ``"full_rank"``, the target's rank among every
   item but the case's history) and ``OUT/summary.json``.

RecBole's own files (the copied data, checkpoints, log, tensorboard events) go to
``OUT/recbole/``, which each run replaces; nothing is written to the current directory.
After every epoch the state a resumed run needs is saved there too: ``--resume`` continues
a run that was killed or stopped by ``--stop-after`` (same data and settings) with the same
batches in the same order, and a finished run only scores again.
Bad input (a missing file, a malformed line, a missing field) exits with status 2 and a
message naming the file and line, without a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

CANDIDATES_FORMAT = "instructrec-candidates"
CANDIDATES_VERSION = 1
INTER_HEADER = ("user_id:token", "item_id:token", "timestamp:float")
MODELS = ("SASRec", "BERT4Rec")
SCORE_BATCH = 256

# RecBole's settings: the model-independent part. Each model's own defaults (dropout,
# BERT4Rec's mask ratio and its mask_itemseq transform) come from RecBole's model files.
BASE_CONFIG = {
    "USER_ID_FIELD": "user_id",
    "ITEM_ID_FIELD": "item_id",
    "TIME_FIELD": "timestamp",
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "hidden_size": 64,
    "inner_size": 256,
    "n_layers": 2,
    "n_heads": 2,
    "loss_type": "CE",
    "train_neg_sample_args": None,  # CE over all items: no sampled negatives
    "train_batch_size": 2048,
    "eval_batch_size": 4096,
    "learning_rate": 1e-3,
    "eval_step": 1,
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
    "metrics": ["Hit", "NDCG", "MRR"],
    "topk": [10],
    "valid_metric": "NDCG@10",
    "valid_metric_bigger": True,
    "reproducibility": True,
    "worker": 0,
    "state": "INFO",
    "log_wandb": False,
    "save_dataset": False,
    "save_dataloaders": False,
    "normalize_all": False,  # timestamps only order a user's interactions
    "normalize_field": None,
}
DATASET_NAME = "instructrec"

# Run as a script, this file's directory is sys.path[0], and its neighbour recbole.py (the
# main-environment side) would shadow the recbole package: drop that directory.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

ANSI = re.compile(r"\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])")


class InputError(Exception):
    """Bad input: printed as ``error: <message>`` and exit status 2, no traceback."""


def where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


# ---------------------------------------------------------------- inputs


def check_inter(path: Path) -> tuple[int, int]:
    """Check the atomic interaction file; returns (lines, users)."""
    if not path.is_file():
        raise InputError(f"{path}: no such interaction file")
    users: set[str] = set()
    n = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if lineno == 1:
                if tuple(fields) != INTER_HEADER:
                    raise InputError(
                        f"{where(path, 1)}: header must be {chr(9).join(INTER_HEADER)!r} (tab-separated), got {line.rstrip()!r}"
                    )
                continue
            if not line.strip():
                continue
            if len(fields) != 3:
                raise InputError(f"{where(path, lineno)}: expected 3 tab-separated fields, got {len(fields)}")
            try:
                float(fields[2])
            except ValueError:
                raise InputError(f"{where(path, lineno)}: timestamp {fields[2]!r} is not a number") from None
            users.add(fields[0])
            n += 1
    if n == 0:
        raise InputError(f"{path}: no interactions")
    return n, len(users)


def _ids(value, path: Path, lineno: int, name: str, *, allow_empty: bool) -> list[str]:
    if not isinstance(value, list):
        raise InputError(f"{where(path, lineno)}: field {name!r} must be a list of item ids")
    out = []
    for x in value:
        if isinstance(x, bool) or not isinstance(x, (str, int)):
            raise InputError(f"{where(path, lineno)}: field {name!r} holds {x!r}, not an item id (string)")
        out.append(str(x))
    if not out and not allow_empty:
        raise InputError(f"{where(path, lineno)}: field {name!r} is empty")
    return out


def read_candidates(path: Path) -> list[dict]:
    """Cases of one candidates file: ``[{"user_id", "history", "target", "candidates"}]``."""
    if not path.is_file():
        raise InputError(f"{path}: no such candidates file")
    cases = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                if lineno == 1:
                    raise InputError(f"{where(path, 1)}: empty first line; expected the header object")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where(path, lineno)}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{where(path, lineno)}: expected a JSON object")
            if lineno == 1:
                if obj.get("format") != CANDIDATES_FORMAT or obj.get("version") != CANDIDATES_VERSION:
                    raise InputError(
                        f"{where(path, 1)}: expected the header "
                        f'{{"format": "{CANDIDATES_FORMAT}", "version": {CANDIDATES_VERSION}, ...}}, '
                        f"got format={obj.get('format')!r} version={obj.get('version')!r}"
                    )
                continue
            for key in ("user_id", "history", "target", "candidates"):
                if key not in obj:
                    raise InputError(f"{where(path, lineno)}: missing field {key!r}")
            uid, target = obj["user_id"], obj["target"]
            for name, v in (("user_id", uid), ("target", target)):
                if isinstance(v, bool) or not isinstance(v, (str, int)):
                    raise InputError(f"{where(path, lineno)}: field {name!r} must be a string, got {v!r}")
            cases.append(
                {
                    "user_id": str(uid),
                    "history": _ids(obj["history"], path, lineno, "history", allow_empty=True),
                    "target": str(target),
                    "candidates": _ids(obj["candidates"], path, lineno, "candidates", allow_empty=False),
                }
            )
    if not cases and not path.read_text(encoding="utf-8").strip():
        raise InputError(f"{path}: empty file; expected a header line")
    return cases


def scores_name(path: Path) -> str:
    name = path.name
    return (name[: -len(".jsonl")] if name.endswith(".jsonl") else name) + ".scores.jsonl"


# ---------------------------------------------------------------- logging


class _StripColor(logging.Filter):
    def filter(self, record):
        record.msg = ANSI.sub("", str(record.msg))
        return True


def setup_logging(log_file: Path, color: bool) -> logging.Logger:
    """RecBole logs through the root logger: one stream handler on stderr (colour only on a
    terminal) and one file handler, instead of recbole.utils.init_logger (which writes ./log/)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    fh = logging.FileHandler(log_file, encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    fh.addFilter(_StripColor())
    if not color:
        sh.addFilter(_StripColor())
    root.addHandler(sh)
    root.addHandler(fh)
    root.setLevel(logging.INFO)
    for noisy in ("tensorboard", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger("recbole_runner")


# ---------------------------------------------------------------- scoring


def score_cases(model, dataset, cases: list[dict], max_len: int, device, torch, Interaction,
                full_rank: bool = False) -> tuple[list[list[float]], dict]:
    """Scores of every case's candidates from the case's own history; see the module doc.
    With ``full_rank``, ``counts["full_ranks"]`` holds each case's full-catalogue rank."""
    iid = dataset.iid_field
    uid = dataset.uid_field
    item2id = dataset.field2token_id[iid]
    user2id = dataset.field2token_id[uid]
    counts = {
        "cases": len(cases),
        "candidates": 0,
        "unknown_candidates": 0,
        "unknown_history_items": 0,
        "unknown_users": 0,
        "empty_history_cases": 0,
        "truncated_histories": 0,
    }
    out: list[list[float] | None] = [None] * len(cases)
    todo: list[tuple[int, list[int]]] = []
    for i, case in enumerate(cases):
        counts["candidates"] += len(case["candidates"])
        if case["user_id"] not in user2id:
            counts["unknown_users"] += 1
        known = [item2id[x] for x in case["history"] if x in item2id and item2id[x] != 0]
        counts["unknown_history_items"] += len(case["history"]) - len(known)
        if len(known) > max_len:
            counts["truncated_histories"] += 1
            known = known[-max_len:]
        cand = [item2id.get(x, 0) for x in case["candidates"]]
        counts["unknown_candidates"] += sum(1 for c in cand if c == 0)
        if not known:
            counts["empty_history_cases"] += 1
            out[i] = [0.0 if c else -math.inf for c in cand]
        else:
            todo.append((i, known))
    ranks: list[int] = [dataset.item_num] * len(cases)  # a case without a known history: a miss

    model.eval()
    with torch.no_grad():
        for start in range(0, len(todo), SCORE_BATCH):
            batch = todo[start : start + SCORE_BATCH]
            seq = torch.zeros((len(batch), max_len), dtype=torch.long)
            length = torch.zeros(len(batch), dtype=torch.long)
            for row, (_, known) in enumerate(batch):
                seq[row, : len(known)] = torch.tensor(known, dtype=torch.long)  # left-aligned, like RecBole
                length[row] = len(known)
            inter = Interaction({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: length}).to(device)
            full = model.full_sort_predict(inter).detach().to("cpu", torch.float64)  # [B, n_items]
            for row, (i, _) in enumerate(batch):
                cand = [item2id.get(x, 0) for x in cases[i]["candidates"]]
                idx = torch.tensor(cand, dtype=torch.long)
                vals = full[row].index_select(0, idx).tolist()
                out[i] = [v if c else -math.inf for v, c in zip(vals, cand)]
                if full_rank:
                    ranks[i] = _full_rank(full[row], cases[i], item2id, dataset.item_num, torch)
    if full_rank:
        counts["full_ranks"] = ranks
    return out, counts  # type: ignore[return-value]


def _full_rank(scores, case: dict, item2id: dict, n_items: int, torch) -> int:
    """0-based rank of the case's target among every item but its own history (and RecBole's
    padding id 0), ties counted against it, as RecBole's full sort masks a user's history; an
    unknown target, or one inside the history, is a miss (``n_items``)."""
    target = item2id.get(case["target"], 0)
    history = [item2id[x] for x in case["history"] if x in item2id and item2id[x] != 0]
    if target == 0 or target in history:
        return n_items
    row = scores.clone()
    row[0] = -math.inf
    if history:
        row[torch.tensor(history, dtype=torch.long)] = -math.inf
    return int((row >= row[target]).sum().item()) - 1


# ---------------------------------------------------------------- main


RUN_KEY_FILE = "run.json"
RESUME_FILE = "resume.pth"


def run_key(args: argparse.Namespace, inter: Path) -> dict:
    """What a run's result depends on: a saved state is resumed only under the same key. The
    budget (``--epochs``, ``--patience``) is not part of it: a run may resume with a larger one to
    train on, or a smaller one to stop at its best epoch so far."""
    h = hashlib.sha256()
    with inter.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"inter_sha256": h.hexdigest(), "model": args.model, "seed": args.seed, "max_seq_len": args.max_seq_len, "device": args.device,
            "base_config": _jsonable(BASE_CONFIG)}


def load_resume_state(work: Path, key: dict, torch) -> dict | None:
    """The state saved after the last finished epoch of the run in ``work``, or None when
    there is none or it belongs to another run (other data or settings)."""
    key_file, state_file = work / RUN_KEY_FILE, work / RESUME_FILE
    try:
        kept = json.loads(key_file.read_text(encoding="utf-8"))
        if {k: kept.get(k) for k in key} != key:  # fields the key no longer has (the budget, once) do not count
            print("resume: the run in OUT had other data or settings: starting over", file=sys.stderr)
            return None
        # our own file (optimizer state, RNG states, RecBole's loss dict): not weights-only
        return torch.load(state_file, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        print(f"resume: cannot read {state_file} ({e}): starting over", file=sys.stderr)
        return None


PAUSED = 3  # exit status of a run stopped by --stop-after with its state saved


class Paused(Exception):
    """--stop-after epochs were trained; the state is saved."""


class TrainingProgress:
    """Saves what resuming needs after every validated epoch (RecBole keeps only the best
    epoch's weights), and puts it back: weights, optimizer, early-stopping counters, the
    training loader's shuffling generator and the global RNGs, so a resumed run sees the same
    batches in the same order as one that was never stopped."""

    def __init__(self, trainer, train_data, path: Path, torch, stop_after: int | None = None):
        self.trainer, self.train_data, self.path, self.torch = trainer, train_data, path, torch
        self.stop_after = stop_after
        self._trained = 0  # epochs this process trained
        self.epochs: list[dict] = []
        self.resumed_after: list[int] = []
        self.finished = False
        self._before = 0.0  # seconds of earlier processes of this run
        self._own = 0.0  # seconds of the epochs this process finished
        self._epoch_started = time.perf_counter()

    def train_seconds(self) -> float:
        """Seconds of training and validation, over every process of the run."""
        return self._before + self._own

    def epoch_done(self, epoch_idx: int, valid_score: float) -> None:
        import numpy as np

        now = time.perf_counter()
        t = self.trainer
        self.epochs.append({"epoch": epoch_idx + 1, "train_loss": float(t.train_loss_dict[epoch_idx]),
                            "valid_score": float(valid_score), "seconds": round(now - self._epoch_started, 3)})
        self._own += now - self._epoch_started
        self._epoch_started = now
        self.finished = self._done(epoch_idx)
        state = {
            "epoch": epoch_idx, "cur_step": t.cur_step, "best_valid_score": t.best_valid_score,
            "best_valid_result": t.best_valid_result, "train_loss_dict": dict(t.train_loss_dict),
            "saved_model_file": t.saved_model_file, "state_dict": t.model.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "epochs_log": self.epochs, "resumed_after": self.resumed_after, "train_seconds": self.train_seconds(),
            "rng": {"torch": self.torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "loader": self.train_data.generator.get_state()},
        }
        tmp = self.path.with_suffix(".tmp")
        self.torch.save(state, tmp)
        os.replace(tmp, self.path)  # whole or nothing: a kill mid-save keeps the previous epoch's state
        self._trained += 1
        if self.stop_after is not None and self._trained >= self.stop_after and not self.finished:
            raise Paused()

    def _done(self, epoch_idx: int) -> bool:
        """Early stopping's patience ran out, or the epoch budget (of this process) is spent."""
        t = self.trainer
        return t.cur_step > t.stopping_step or epoch_idx + 1 >= t.epochs

    def restore(self, state: dict) -> None:
        import numpy as np

        t = self.trainer
        t.model.load_state_dict(state["state_dict"])
        t.optimizer.load_state_dict(state["optimizer"])
        t.start_epoch = state["epoch"] + 1
        t.cur_step = state["cur_step"]
        t.best_valid_score = state["best_valid_score"]
        t.best_valid_result = state["best_valid_result"]
        t.train_loss_dict = dict(state["train_loss_dict"])
        t.saved_model_file = state["saved_model_file"]
        rng = state["rng"]
        self.torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.train_data.generator.set_state(rng["loader"])
        self.epochs = list(state["epochs_log"])
        self.resumed_after = [*state["resumed_after"], state["epoch"] + 1]
        self._before = state["train_seconds"]
        self.finished = self._done(state["epoch"])  # under this process's budget


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inter", required=True, type=Path, help="RecBole atomic interaction file")
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--epochs", type=int, default=50, help="maximum epochs (default 50)")
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs (default 5)")
    p.add_argument("--seed", type=int, default=2020)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    # 20, not RecBole's usual 50: on Games (6.7 training items per user on average, 4% above 20)
    # 50 made an epoch 4.3x slower (10.1 against 2.33 s per batch of 2048, one thread, 2026-12-04).
    p.add_argument("--max-seq-len", type=int, default=20, help="items of history the model reads (default 20)")
    p.add_argument("--candidates", type=Path, nargs="+", required=True, metavar="FILE")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from the state saved after its last finished epoch, when that run "
                        "had the same interactions and settings (else start over); a finished run only scores again")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="train at most N epochs in this process, then save the state and exit with status 3 "
                        "(continue with --resume): a long run split over time-boxed sessions")
    p.add_argument("--full-rank", action="store_true",
                   help="also write each case's \"full_rank\": the target's 0-based rank among all items but the "
                        "case's history (full-catalogue evaluation)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="per-batch progress bars (default: only when stderr is a terminal)",
    )
    a = p.parse_args(argv)
    for name in ("epochs", "threads", "max_seq_len"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.stop_after is not None and a.stop_after < 1:
        p.error("--stop-after must be >= 1")
    if a.patience < 0:
        p.error("--patience must be >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    inter = args.inter.resolve()
    out = args.out.resolve()
    cand_files = [c.resolve() for c in args.candidates]
    try:
        n_lines, _ = check_inter(inter)
        names = {}
        for c in cand_files:
            n = scores_name(c)
            if n in names:
                raise InputError(f"{c}: same output name {n} as {names[n]}: rename one of the candidates files")
            names[n] = c
        all_cases = {c: read_candidates(c) for c in cand_files}
        # fail before training if the output directory cannot be used
        out.mkdir(parents=True, exist_ok=True)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # RecBole 1.2.1 under pandas 2.2 / torch 2.13: chained-assignment fillna and
    # torch.cuda.amp.GradScaler deprecations, harmless here and printed once per run.
    warnings.filterwarnings("ignore", category=FutureWarning)
    import numpy as np  # noqa: F401  (RecBole's own dependency; imported here to fail early)
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.data.interaction import Interaction
    from recbole.utils import get_model, get_trainer, init_seed

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device (a CPU build of torch?)", file=sys.stderr)
        return 2

    work = out / "recbole"
    key = run_key(args, inter)
    state = load_resume_state(work, key, torch) if args.resume else None
    if state is None and work.exists():
        shutil.rmtree(work)
    # A fixed dataset name: RecBole merges properties/dataset/<name>.yaml when it exists, and
    # its ml-100k.yaml (normalize_all, its own load_col) reorders ml-100k's same-second ties.
    ds_name = DATASET_NAME
    if state is None:
        (work / "data" / ds_name).mkdir(parents=True)
        shutil.copyfile(inter, work / "data" / ds_name / f"{ds_name}.inter")
        (work / RUN_KEY_FILE).write_text(json.dumps(key, indent=1) + "\n", encoding="utf-8")
    os.chdir(work)  # RecBole's trainer writes log_tensorboard/ into the current directory
    show_progress = sys.stderr.isatty() if args.progress is None else args.progress
    log = setup_logging(work / "recbole.log", color=sys.stderr.isatty())

    config_dict = dict(BASE_CONFIG)
    config_dict.update(
        {
            "data_path": str(work / "data"),
            "checkpoint_dir": str(work / "saved"),
            "MAX_ITEM_LIST_LENGTH": args.max_seq_len,
            "epochs": args.epochs,
            "stopping_step": args.patience,
            "seed": args.seed,
            "show_progress": show_progress,
            "use_gpu": args.device == "cuda",
            # RecBole sets CUDA_VISIBLE_DEVICES to gpu_id: keep the caller's choice
            "gpu_id": os.environ.get("CUDA_VISIBLE_DEVICES", "0") if args.device == "cuda" else "",
        }
    )
    sys.argv = sys.argv[:1]  # RecBole's Config also parses --key=value from the command line
    config = Config(model=args.model, dataset=ds_name, config_dict=config_dict)
    device = config["device"]
    if torch.device(device).type != args.device:
        print(f"error: RecBole chose device {device} for --device {args.device}", file=sys.stderr)
        return 2
    init_seed(config["seed"], config["reproducibility"])
    log.info(f"RecBole {recbole.__version__}, torch {torch.__version__}, {args.model} on {inter} ({n_lines} interactions), device {device}, {args.threads} thread(s)")

    dataset = create_dataset(config)
    log.info(f"dataset: {dataset.user_num - 1} users, {dataset.item_num - 1} items, {dataset.inter_num} interactions")
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train_data._dataset).to(device)
    # RecBole 1.2.1's sine.py turns on autograd anomaly detection for the whole process at import
    # (its package imports every sequential model): every op then records a stack trace and
    # every backward function checks its outputs for NaN. It only checks, it changes no value;
    # off, a SASRec batch on Games took 2.2-2.5 s instead of 3.5-4.2 s on one thread (AMD EPYC,
    # AVX2, a training run on the other core, 2026-12-05).
    anomaly_was_on = torch.is_anomaly_enabled()
    torch.autograd.set_detect_anomaly(False)
    if anomaly_was_on:
        log.info("autograd anomaly detection switched off (RecBole's sine.py turns it on at import)")
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    progress = TrainingProgress(trainer, train_data, work / RESUME_FILE, torch, args.stop_after)
    if state is not None:
        progress.restore(state)
        log.info(f"resumed after epoch {state['epoch'] + 1} (best valid {config['valid_metric']} "
                 f"{state['best_valid_score']:.4f}, {state['train_seconds']:.0f} s of training so far)")
    if progress.finished:
        best_valid_score, best_valid = trainer.best_valid_score, trainer.best_valid_result
    else:
        try:
            best_valid_score, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=show_progress,
                                                       callback_fn=progress.epoch_done)
        except Paused:
            log.info(f"paused after epoch {len(trainer.train_loss_dict)} (--stop-after {args.stop_after}): "
                     f"continue with --resume")
            trainer.tensorboard.close()
            return PAUSED
    train_seconds = progress.train_seconds()
    epochs_run = len(trainer.train_loss_dict)

    # RecBole's checkpoints pickle its Config: they need weights_only=False (our own file).
    checkpoint = torch.load(trainer.saved_model_file, map_location=device, weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    best_epoch = int(checkpoint["epoch"]) + 1
    log.info(f"best epoch {best_epoch} of {epochs_run} (valid {config['valid_metric']} {best_valid_score:.4f}) in {train_seconds:.1f} s")
    test_result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)

    t0 = time.perf_counter()
    files = {}
    for path, cases in all_cases.items():
        scores, counts = score_cases(model, dataset, cases, args.max_seq_len, device, torch, Interaction,
                                     full_rank=args.full_rank)
        ranks = counts.pop("full_ranks", None)
        dest = out / scores_name(path)
        with dest.open("w", encoding="utf-8") as f:
            for j, (case, s) in enumerate(zip(cases, scores)):
                line = {"user_id": case["user_id"], "scores": s}
                if ranks is not None:
                    line["full_rank"] = ranks[j]
                f.write(json.dumps(line) + "\n")
        files[str(path)] = {"scores_file": str(dest), **counts}
        log.info(f"scored {path.name}: {counts}")
    score_seconds = time.perf_counter() - t0

    summary = {
        "model": args.model,
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,  # counted from 1 (RecBole's log counts from 0)
        "max_epochs": args.epochs,
        "patience": args.patience,
        "stopped_early": epochs_run < args.epochs,
        # early stopping's verdict: validation did not improve for more than --patience epochs
        # (false: the epoch budget ended the run, so it may not have converged)
        "converged": trainer.cur_step > trainer.stopping_step,
        "valid_metric": config["valid_metric"],
        "best_valid_score": float(best_valid_score),
        "best_valid": {k: float(v) for k, v in (best_valid or {}).items()},
        "recbole_test": {k: float(v) for k, v in (test_result or {}).items()},  # RecBole's own full-sort test split
        "train_seconds": round(train_seconds, 3),
        "epoch_log": progress.epochs,  # per epoch: train loss, validation score, seconds
        "resumed_after_epochs": progress.resumed_after,
        "score_seconds": round(score_seconds, 3),
        "n_users": dataset.user_num - 1,  # without RecBole's padding id
        "n_items": dataset.item_num - 1,
        "n_interactions": n_lines,
        "recbole_version": recbole.__version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "threads": args.threads,
        "seed": args.seed,
        "max_seq_len": args.max_seq_len,
        "inter": str(inter),
        "checkpoint": str(trainer.saved_model_file),
        "log": str(work / "recbole.log"),
        "config": {k: _jsonable(config[k]) for k in _config_keys(config)},
        "files": files,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    log.info(f"wrote {out / 'summary.json'}")
    trainer.tensorboard.close()
    return 0


def _config_keys(config) -> list[str]:
    keys = set(BASE_CONFIG) | {"MAX_ITEM_LIST_LENGTH", "epochs", "stopping_step", "seed", "model"}
    keys |= {
        "hidden_dropout_prob",
        "attn_dropout_prob",
        "hidden_act",
        "layer_norm_eps",
        "initializer_range",
        "mask_ratio",
        "ft_ratio",
        "transform",
        "weight_decay",
        "learner",
    }
    return sorted(k for k in keys if config[k] is not None or k in BASE_CONFIG)


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
