"""``instructrec promote``: ship a relay leg's model only when it beats the shipped one.

The repository carries one model (``models/minilm-games``, :mod:`instructrec.shipped`), and
every leg of the training relay (``instructrec train --init``) proposes a successor. Both are
ranked on the same fixed validation users (1 positive + 9 never-interacted items, the
validation protocol; the target is each user's second-to-last item), the candidate as it
would ship (its changed tensors rounded to bfloat16), both in one dtype. The shipped weights
are replaced only when HR@1 gains at least 0.01 and the paired bootstrap interval of the gain
lies above 0: one weights commit per real gain, so git grows slowly and noise never ships.
Either way the leg is appended to ``docs/relay/legs.csv`` and ``docs/relay/curve.png`` redrawn.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

from instructrec.checkpoint import checkpoint_version, read_meta
from instructrec.options import add_device_options
from instructrec.records import code_commit, cpu_model
from instructrec.shipped import DEFAULT_SHIPPED, ShippedError, is_shipped, read_card

from .curve import read_curve
from .data.load import load_dataset
from .data.types import DataError

# Fixed so every session compares on the same users: 500 validation users drawn with this seed
# (the full preset validates on 500 drawn with seed 0; the two sets share about 5 users).
RELAY_USERS = 500
RELAY_SEED = 25
CHOICE_USERS = 1000  # where several candidates are compared before the rule (other validation users)
CHOICE_SEED = 26
NEGATIVES = 9
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 2505
MIN_GAIN = 0.01
LEGS_CSV = Path("docs") / "relay" / "legs.csv"
CURVE_PNG = Path("docs") / "relay" / "curve.png"
LEG_FIELDS = ["date", "cpu", "dtype", "steps", "examples", "train_seconds", "examples_total", "train_seconds_total",
              "data_position", "hr1_candidate", "hr1_shipped", "gain", "ci_low", "ci_high", "promoted", "commit",
              "candidate", "eval_dtype", "users"]


class PromoteError(ValueError):
    pass


@dataclass
class Candidate:
    weights: Path  # the HF directory whose weights would ship
    meta: dict  # its instructrec.json (for a Trainer checkpoint: its run's, with this step's relay)
    run: Path | None  # the training output directory, when known (for its learning curve)


def _trainer_state(directory: Path) -> dict:
    return json.loads((directory / "trainer_state.json").read_text(encoding="utf-8"))


def _legacy_relay(meta: dict, step: int, seconds: float | None) -> dict:
    """The relay position of a model trained before runs recorded it (a plain run: the stream's start)."""
    preset = meta.get("preset") or {}
    per_step = int(preset.get("batch_size", 1)) * int(preset.get("grad_accum", 1))
    return {"data_position": step * per_step, "examples_total": step * per_step, "train_seconds_total": seconds or 0.0,
            "start": 0, "steps": step, "examples_before": 0, "seconds_before": 0.0, "init": None,
            "stream": {"preset": preset.get("name"), "seed": preset.get("seed"), "examples": (meta.get("data") or {}).get("examples"),
                       "per_step": per_step}}


def resolve(path: str | Path) -> Candidate:
    """A training output directory (its best/, else model/), OUT/model, OUT/best, or a Trainer
    checkpoint (OUT/checkpoints/checkpoint-N), with the relay position of its weights."""
    p = Path(path)
    if not p.is_dir():
        raise PromoteError(f"candidate {p} is not a directory (a training output, its model/ or best/, or a checkpoint)")
    for sub in ("best", "model"):
        if (p / sub / "instructrec.json").is_file():
            return resolve(p / sub)
    if (p / "trainer_state.json").is_file():  # a Trainer checkpoint: its run's metadata, this step's position
        run = p.parent.parent
        meta = next((read_meta(run / s) for s in ("best", "model") if (run / s / "instructrec.json").is_file()), None)
        if meta is None:
            raise PromoteError(f"{p}: a Trainer checkpoint, but {run} has no best/ or model/ whose instructrec.json "
                               "says how it was trained; promote after the run's first validation")
        state = _trainer_state(p)
        step = int(state["global_step"])
        seconds = next((h["train_seconds_total"] for h in reversed(state["log_history"]) if "train_seconds_total" in h), None)
        meta = {**meta, "steps": step, "train_seconds_total": seconds, "best_step": None,
                "validation": next(({k.removeprefix("eval_"): v for k, v in h.items() if k.startswith("eval_")}
                                    for h in reversed(state["log_history"]) if h.get("step") == step and "eval_hr@1" in h), {})}
        relay = meta.get("relay") or {}
        if relay:  # the run's start, moved to this checkpoint's step
            consumed = step * relay["stream"]["per_step"]
            meta["relay"] = {**relay, "data_position": relay["start"] + consumed, "steps": step,
                             "examples_total": relay["examples_before"] + consumed,
                             "train_seconds_total": round(relay["seconds_before"] + (seconds or 0.0), 1)}
        else:
            meta["relay"] = _legacy_relay(meta, step, seconds)
        return Candidate(p, meta, run)
    meta = read_meta(p)
    if not meta or not (p / "config.json").is_file():
        raise PromoteError(f"{p}: not a model written by `instructrec train` (config.json and instructrec.json)")
    if not meta.get("relay"):  # written before runs recorded their relay position
        step = meta.get("best_step") or meta.get("steps") or 0
        meta = {**meta, "relay": _legacy_relay(meta, int(step), meta.get("train_seconds_total"))}
    run = p.parent if p.name in ("model", "best") else None
    return Candidate(p, meta, run)


def preset_of(meta: dict):
    from .presets import Preset

    known = {f.name for f in fields(Preset)}
    raw = meta.get("preset") or {}
    if "name" not in raw or "base" not in raw:
        raise PromoteError("the candidate's instructrec.json records no preset; promote a model written by `instructrec train`")
    return Preset(**{k: v for k, v in raw.items() if k in known})


def relay_cases(preset, data_path: str | None = None, users: int = RELAY_USERS, choice_users: int = 0):
    """The data, the fixed relay validation cases of the preset's data, and ``choice_users``
    other validation cases (none of the relay users'): where several candidates are compared
    first, so that choosing among them leaves the relay users to the rule alone."""
    from .tune import _seeded_subset

    data = load_dataset(data_path or preset.data)
    if preset.users:
        data = data.sample_users(preset.users, seed=preset.seed)
    valid = data.split(preset.max_history).valid
    relay = _seeded_subset(valid, users, RELAY_SEED, key=lambda c: c.user_id)
    taken = {c.user_id for c in relay}
    rest = [c for c in valid if c.user_id not in taken]
    return data, relay, _seeded_subset(rest, choice_users, CHOICE_SEED, key=lambda c: c.user_id) if choice_users else []


def hits_at_1(model_dir: Path, data, cases, preset, dtype: str, device: str = "cpu") -> list[int]:
    """1 where the model ranks the case's positive first among the 10, else 0."""
    import torch

    from instructrec.modeling import load_model

    from .tune import validation_ranks

    loaded = load_model(model_dir, device=device, dtype=dtype)
    with torch.inference_mode():
        ranks = validation_ranks(loaded.model, loaded.tokenizer, data, cases, preset, loaded.device, NEGATIVES, loaded.kind)
    return [int(r == 0) for r in ranks]


def rounded_hits(candidate: Candidate, data, cases, preset, dtype: str, device: str = "cpu") -> list[int]:
    """:func:`hits_at_1` of the candidate as it would ship (its changed tensors rounded to bfloat16)."""
    from instructrec.modeling import ship

    with tempfile.TemporaryDirectory(prefix="promote-") as tmp:
        rounded = ship(candidate.weights, Path(tmp) / "candidate", meta=candidate.meta)
        return hits_at_1(rounded, data, cases, preset, dtype, device)


def choose(candidates: list[Candidate], data, cases, preset, dtype: str, device: str = "cpu",
           shipped: Path | None = None) -> tuple[Candidate, dict]:
    """The candidate with the highest HR@1 on ``cases`` (the first of equals), and the comparison
    (with the shipped model's HR@1 on the same cases, for reference, when there is one)."""
    rates = [sum(h) / len(h) for h in (rounded_hits(c, data, cases, preset, dtype, device) for c in candidates)]
    best = max(range(len(candidates)), key=lambda i: (rates[i], -i))
    reference = hits_at_1(shipped, data, cases, preset, dtype, device) if shipped else None
    return candidates[best], {"users": len(cases), "seed": CHOICE_SEED, "chosen": str(candidates[best].weights),
                              "candidates": [{"candidate": str(c.weights), "hr@1": round(r, 4)}
                                             for c, r in zip(candidates, rates)],
                              "shipped": None if reference is None else round(sum(reference) / len(reference), 4)}


def paired_bootstrap(a: list[int], b: list[int], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """Mean of a - b and its 95% percentile interval, resampling cases (both models on the same ones)."""
    import numpy as np

    if len(a) != len(b) or not a:
        raise PromoteError("paired bootstrap needs the same, non-empty cases for both models")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(samples, len(diff)))
    means = diff[idx].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def decide(hr_candidate: float, hr_shipped: float | None, low: float | None) -> tuple[bool, str]:
    """The relay's rule: the first model ships; afterwards a gain of at least MIN_GAIN whose paired interval is above 0."""
    if hr_shipped is None:
        return True, "no shipped model yet: the first promotion ships it"
    gain = hr_candidate - hr_shipped
    if gain < MIN_GAIN:
        return False, f"gain {gain:+.3f} < {MIN_GAIN}"
    if low is None or low <= 0:
        return False, f"gain {gain:+.3f}, but the paired 95% interval reaches {low:+.3f} (not above 0)"
    return True, f"gain {gain:+.3f} >= {MIN_GAIN} with the paired 95% interval above 0 (from {low:+.3f})"


def _leg_curve(candidate: Candidate, before: int) -> list[dict]:
    """This leg's training-time validations as (examples in total, HR@1), up to the weights' step."""
    if candidate.run is None:
        return []
    try:
        rows = read_curve(candidate.run)
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return []
    last = candidate.meta["relay"].get("steps")
    return [{"examples_total": before + r["examples"], "hr@1": r["hr@1"]} for r in rows if last is None or r["step"] <= last]


def _leg_row(candidate: Candidate, evaluation: dict, promoted: bool, eval_dtype: str) -> dict:
    meta, relay = candidate.meta, candidate.meta["relay"]
    leg_seconds = relay["train_seconds_total"] - relay.get("seconds_before", 0.0)
    return {"date": datetime.date.today().isoformat(), "cpu": cpu_model(),
            "dtype": "bf16" if meta.get("bf16") else "float32", "steps": relay.get("steps"),
            # what the leg (a soup: its legs) read, which need not be one window of the stream
            "examples": relay["examples_total"] - relay.get("examples_before", 0), "train_seconds": round(leg_seconds, 1),
            "examples_total": relay["examples_total"], "train_seconds_total": relay["train_seconds_total"],
            "data_position": relay["data_position"], "hr1_candidate": evaluation["hr@1_candidate"],
            "hr1_shipped": evaluation["hr@1_shipped"], "gain": evaluation["gain"], "ci_low": evaluation["ci_low"],
            "ci_high": evaluation["ci_high"], "promoted": "yes" if promoted else "no",
            "commit": meta.get("commit") or code_commit(), "candidate": str(candidate.weights), "eval_dtype": eval_dtype,
            "users": evaluation["users"]}


def _card(shipped: Path, candidate: Candidate, previous: dict, row: dict, evaluation: dict) -> dict:
    meta, relay = candidate.meta, candidate.meta["relay"]
    before = relay.get("examples_before", 0)
    data = meta.get("data") or {}
    leg = {"date": row["date"], "cpu": row["cpu"], "dtype": row["dtype"], "steps": row["steps"], "examples": row["examples"],
           "train_seconds": row["train_seconds"], "hr@1": row["hr1_candidate"], "data_position": row["data_position"],
           "commit": row["commit"], **({"soup": relay["soup"]} if relay.get("soup") else {})}
    return {
        "name": shipped.name,
        "preset": (meta.get("preset") or {}).get("name"),
        "objective": (meta.get("preset") or {}).get("objective"),
        "recipe": meta.get("preset"),
        "data": {"name": data.get("name"), "train_cases": data.get("train_cases"), "examples": data.get("examples")},
        "stream": relay.get("stream"),
        "data_position": relay["data_position"],
        "examples_total": relay["examples_total"],
        "train_seconds_total": relay["train_seconds_total"],
        "validation": {"hr@1": evaluation["hr@1_candidate"], "users": evaluation["users"], "seed": RELAY_SEED,
                       "negatives": NEGATIVES, "dtype": evaluation["dtype"]},
        "validation_curve": (previous.get("validation_curve") or []) + _leg_curve(candidate, before),
        "legs": (previous.get("legs") or []) + [leg],
        "commit": row["commit"],
    }


def append_leg(csv_path: Path, row: dict) -> None:
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists()
    with csv_path.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=LEG_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def draw_curve(csv_path: Path, png: Path) -> bool:
    """Each leg in the order run: its candidate's HR@1 with the paired interval of its gain (drawn
    around the candidate), and the shipped model it was compared with (a step where a leg was
    promoted); each tick names the leg and the examples seen in total."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install 'instructrec[eval]'): {png} not drawn", file=sys.stderr)
        return False
    with csv_path.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    legs = list(range(1, len(rows) + 1))
    fig, ax = plt.subplots(figsize=(7, 4))
    shipped = [(leg, float(r["hr1_shipped"])) for leg, r in zip(legs, rows) if r["hr1_shipped"] not in ("", "None")]
    if shipped:
        ax.step(*zip(*shipped), "--", where="mid", color="tab:orange", label="shipped model it was compared with")
    for leg, r in zip(legs, rows):
        hr = float(r["hr1_candidate"])
        has_ci = r.get("ci_low") not in (None, "", "None") and r.get("gain") not in (None, "", "None")
        err = [[float(r["gain"]) - float(r["ci_low"])], [float(r["ci_high"]) - float(r["gain"])]] if has_ci else None
        promoted = r["promoted"] == "yes"
        ax.errorbar([leg], [hr], yerr=err, fmt="o", color="tab:green" if promoted else "tab:blue", capsize=3)
        if promoted:
            ax.annotate("promoted", (leg, hr), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    ax.plot([], [], "o", color="tab:blue", label="leg's candidate (95% interval of its gain)")
    ax.plot([], [], "o", color="tab:green", label="promoted")
    ax.set_xticks(legs, [f"{leg}\n{int(r['examples_total']) // 1000}k" for leg, r in zip(legs, rows)], fontsize=7)
    ax.set_xlabel("leg, and the examples seen in total")
    ax.set_ylabel(f"HR@1 ({RELAY_USERS} relay validation users, 1 + 9)")
    ax.set_title("The training relay")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


def promote(candidate_path: str | Path | Sequence[str | Path], shipped: str | Path = DEFAULT_SHIPPED, *, dry_run: bool = False,
            dtype: str = "float32", device: str = "cpu", users: int = RELAY_USERS, data_path: str | None = None,
            legs_csv: Path = LEGS_CSV, curve_png: Path = CURVE_PNG, choice_users: int = CHOICE_USERS) -> dict:
    """Evaluate, decide, and (unless ``dry_run``) ship and log. Returns the verdict. Several
    candidates: the one with the best HR@1 on ``choice_users`` other validation users faces the rule."""
    from instructrec.modeling import ship

    paths = [candidate_path] if isinstance(candidate_path, (str, Path)) else list(candidate_path)
    candidates = [resolve(p) for p in paths]
    shipped = Path(shipped)
    have_shipped = is_shipped(shipped)
    if shipped.exists() and not have_shipped:
        raise PromoteError(f"{shipped} exists but is not a shipped model (no {shipped}/weights.safetensors)")
    preset = preset_of(candidates[0].meta)
    previous = read_card(shipped) if have_shipped else {}
    data, cases, others = relay_cases(preset, data_path, users, choice_users if len(candidates) > 1 else 0)
    candidate, choice = (choose(candidates, data, others, preset, dtype, device, shipped if have_shipped else None)
                         if len(candidates) > 1 else (candidates[0], None))
    hits_c = rounded_hits(candidate, data, cases, preset, dtype, device)
    hits_s = hits_at_1(shipped, data, cases, preset, dtype, device) if have_shipped else None
    hr_c = sum(hits_c) / len(hits_c)
    hr_s = sum(hits_s) / len(hits_s) if hits_s else None
    gain, low, high = paired_bootstrap(hits_c, hits_s) if hits_s else (None, None, None)
    promoted, reason = decide(hr_c, hr_s, low)
    evaluation = {"hr@1_candidate": round(hr_c, 4), "hr@1_shipped": None if hr_s is None else round(hr_s, 4),
                  "gain": None if gain is None else round(gain, 4), "ci_low": None if low is None else round(low, 4),
                  "ci_high": None if high is None else round(high, 4), "users": len(cases), "dtype": dtype}
    row = _leg_row(candidate, evaluation, promoted, dtype)
    verdict = {"candidate": str(candidate.weights), "shipped": str(shipped), **evaluation, "promoted": promoted,
               "reason": reason, "rule": f"gain >= {MIN_GAIN} and paired 95% interval above 0",
               "data_position": candidate.meta["relay"]["data_position"], "dry_run": dry_run, "leg": row,
               **({"choice": choice} if choice else {})}
    started = candidate.meta["relay"].get("init")
    if have_shipped and (started or {}).get("checkpoint_version") != checkpoint_version(shipped):
        verdict["note"] = (f"this leg started from {started['from']} at version {started['checkpoint_version']}; "
                           f"{shipped} is now {checkpoint_version(shipped)}" if started else
                           f"this leg started from the base, not from {shipped}")
    if dry_run:
        return verdict
    if promoted:
        card = _card(shipped, candidate, previous, row, evaluation)
        ship(candidate.weights, shipped, card, meta=candidate.meta)
    append_leg(Path(legs_csv), row)
    draw_curve(Path(legs_csv), Path(curve_png))
    return verdict


def table(verdict: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"| model | HR@1 on {verdict['users']} relay users |", "| --- | --- |",
             f"| candidate `{verdict['candidate']}` (bf16 as shipped) | {fmt(verdict['hr@1_candidate'])} |",
             f"| shipped `{verdict['shipped']}` | {fmt(verdict['hr@1_shipped'])} |"]
    if verdict["gain"] is not None:
        lines.append(f"| gain (paired 95% interval) | {verdict['gain']:+.3f} ({verdict['ci_low']:+.3f}, {verdict['ci_high']:+.3f}) |")
    if verdict.get("choice"):
        choice = verdict["choice"]
        lines[2:2] = [f"| `{c['candidate']}`, on {choice['users']} other validation users (the choice) | {fmt(c['hr@1'])} |"
                      for c in choice["candidates"]] + ([f"| shipped, on the same {choice['users']} | {fmt(choice['shipped'])} |"]
                                                        if choice["shipped"] is not None else [])
    action = "would promote" if verdict["dry_run"] and verdict["promoted"] else "promoted" if verdict["promoted"] else "not promoted"
    lines.append(f"\n{action}: {verdict['reason']}")
    if verdict.get("note"):
        lines.append(f"note: {verdict['note']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("candidate", metavar="CANDIDATE", nargs="+",
                        help="a training output directory (its best/), OUT/model, OUT/best, OUT/checkpoints/checkpoint-N "
                             "or a soup; several: the best on --choice-users other validation users faces the rule")
    parser.add_argument("--choice-users", type=int, default=CHOICE_USERS,
                        help=f"with several candidates, the validation users (none of the relay's) they are compared on "
                             f"(default {CHOICE_USERS})")
    parser.add_argument("--shipped", default=str(DEFAULT_SHIPPED), help=f"the shipped model directory (default: {DEFAULT_SHIPPED})")
    parser.add_argument("--dry-run", action="store_true", help="evaluate and report only: ship nothing, log nothing")
    # float32 on the CPU by default: the same numbers on every machine, so legs compare across machines
    add_device_options(parser, default="cpu", dtype_default="float32")
    parser.add_argument("--users", type=int, default=RELAY_USERS,
                        help=f"validation users (default {RELAY_USERS}, the relay's rule; fewer only for tests)")
    parser.add_argument("--data", help="the dataset (default: the candidate's preset's)")
    parser.add_argument("--legs-csv", default=str(LEGS_CSV), help=f"the relay's log (default {LEGS_CSV})")
    parser.add_argument("--curve", default=str(CURVE_PNG), help=f"its picture (default {CURVE_PNG})")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        verdict = promote(args.candidate, args.shipped, dry_run=args.dry_run, dtype=args.dtype, device=args.device, users=args.users,
                          data_path=args.data, legs_csv=Path(args.legs_csv), curve_png=Path(args.curve),
                          choice_users=args.choice_users)
    except (PromoteError, ShippedError, DataError, FileNotFoundError, OSError) as exc:
        print(f"instructrec promote: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(verdict, indent=2))
    print(table(verdict))
    if verdict["promoted"] and not verdict["dry_run"]:
        shipped = verdict["shipped"]
        sequential = Path(shipped) / "sequential"
        print(f"\nThe hybrid gate was fitted to the previous weights: fit it again for these:\n"
              f"  instructrec gate fit --model {shipped} --data games"
              + (f" --sequential {sequential}" if sequential.is_dir() else "") + " --retrieved-users 300 --calibrate-hard")
    return 0
