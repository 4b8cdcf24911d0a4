"""``instructrec curve``: the learning curve of a training run (validation HR@1 and NDCG@5
against examples seen and training time), from the Trainer state its checkpoints keep, so
it survives any number of resumes. Writes ``OUT/curve.md`` and ``OUT/curve.png`` and, with
``--readme``, the README block between ``<!-- curve:NAME:start -->`` and ``<!-- curve:NAME:end -->``
(the picture copied to ``docs/curves/NAME.png`` beside it)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from instructrec import blocks

from .checkpoints import last_good_checkpoint


def read_curve(run: Path) -> list[dict]:
    """One row per validation of the run: step, examples seen, training seconds, HR@1, NDCG@5."""
    ckpt = last_good_checkpoint(run / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run}/checkpoints holds no complete checkpoint: nothing to plot yet")
    history = json.loads((Path(ckpt) / "trainer_state.json").read_text())["log_history"]
    rows, seconds, seen = [], 0.0, 0
    for entry in history:
        seconds = entry.get("train_seconds_total", seconds)
        seen = entry.get("examples_seen", seen)
        if "eval_hr@1" in entry:
            rows.append({"step": entry["step"], "examples": seen, "train_minutes": round(seconds / 60, 1),
                         "hr@1": entry["eval_hr@1"], "ndcg@5": entry["eval_ndcg@5"], "cases": entry.get("eval_cases")})
    return rows


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"Learning curve of `{title}` (validation: 1 positive + 9 never-interacted negatives).", "",
             "| step | examples seen | training minutes | validation cases | HR@1 | NDCG@5 |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['step']} | {r['examples']:,} | {r['train_minutes']} | {r['cases']} | {r['hr@1']:.3f} | {r['ndcg@5']:.3f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str, baselines: dict[str, float]) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["examples"] for r in rows]
    ax.plot(xs, [r["hr@1"] for r in rows], marker="o", label="HR@1")
    ax.plot(xs, [r["ndcg@5"] for r in rows], marker="s", label="NDCG@5")
    for (name, value), style in zip(baselines.items(), ("--", ":", "-.")):
        ax.axhline(value, linestyle=style, color="grey", label=name)
    ax.set_xlabel("training examples seen")
    ax.set_ylabel("validation metric")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="the OUT folder of `instructrec train`")
    parser.add_argument("--name", help="label in the table, plot and README markers (default: the folder's name)")
    parser.add_argument("--baseline", action="append", default=[], metavar="LABEL=HR@1",
                        help="a horizontal reference line (e.g. popularity=0.447)")
    parser.add_argument("--readme", help="also replace the block between <!-- curve:NAME:start/end --> (in this README or the docs/*.md page beside it)")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    name = args.name or run_dir.name
    try:
        baselines = {k: float(v) for k, v in (b.split("=", 1) for b in args.baseline)}
    except ValueError:
        print(f"instructrec curve: --baseline takes LABEL=VALUE, not {args.baseline}", file=sys.stderr)
        return 2
    try:
        rows = read_curve(run_dir)
    except FileNotFoundError as exc:
        print(f"instructrec curve: {exc}", file=sys.stderr)
        return 2
    table = markdown(rows, name)
    (run_dir / "curve.md").write_text(table)
    (run_dir / "curve.json").write_text(json.dumps(rows, indent=1) + "\n")
    has_png = plot(rows, run_dir / "curve.png", name, baselines)
    if args.readme:
        readme = Path(args.readme)
        start, end = f"<!-- curve:{name}:start -->", f"<!-- curve:{name}:end -->"
        try:
            page = blocks.holder(readme, start, end)
        except ValueError as exc:
            print(f"instructrec curve: {exc}", file=sys.stderr)
            return 2
        block = table
        if has_png:  # the picture goes into docs/ (run folders are not in git), linked from the page
            picture = readme.parent / "docs" / "curves" / f"{name}.png"
            picture.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / "curve.png", picture)
            block += f"\n![learning curve of {name}]({os.path.relpath(picture, page.parent)})\n"
        blocks.replace(page, start, end, block)
    print(table)
    return 0
