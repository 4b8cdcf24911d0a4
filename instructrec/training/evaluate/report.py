"""The evaluation report: ``results.json``, ``results.md`` and PNG plots in one folder, and
the README's results sections generated from them (one per dataset, between
``<!-- eval:NAME:start -->`` and ``<!-- eval:NAME:end -->``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from instructrec import blocks, files
from instructrec.records import machine_info

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
METRICS = ("hr@1", "hr@3", "hr@5", "ndcg@3", "ndcg@5")


def machine() -> dict[str, Any]:
    m = machine_info()
    return {k: m[k] for k in ("cpu_model", "usable_cpus", "torch", "transformers", "python", "time")}


def load(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / RESULTS_JSON).read_text())


def write(out_dir: str | Path, results: dict) -> dict[str, Path]:
    out = Path(out_dir)
    paths = {"json": out / RESULTS_JSON, "md": out / RESULTS_MD}
    files.write_json(paths["json"], results, indent=1)
    plots, note = {}, None
    try:
        plots = make_plots(results, out)
    except ImportError:
        note = "matplotlib is not installed: no plots (pip install 'instructrec[eval]')"
    paths.update(plots)
    paths["md"].write_text(render(results, {k: p.name for k, p in plots.items()}, note))
    return paths


# --- Markdown ----------------------------------------------------------------------------


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _with_ci(row: dict, metric: str) -> str:
    value = _f(row["metrics"].get(metric))
    ci = row.get("ci95", {}).get(metric)
    return f"{value} ({ci[0]:.2f}–{ci[1]:.2f})" if ci else value


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return "0" if seconds == 0 else f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def _scenario_titles(results: dict) -> dict[str, str]:
    return {s["name"]: f"{s['title']} {s['label']}" for s in results["scenarios"]}


def setting_table(results: dict, setting: str, scenario: str | None = None) -> str:
    titles = _scenario_titles(results)
    rows = [r for r in results["rows"] if r["setting"] == setting and (scenario is None or r["scenario"] == scenario)]
    body = [[titles.get(r["scenario"], r["scenario"]), r["method"], r["template"] or "–", str(r["cases"]),
             _with_ci(r, "hr@1"), _f(r["metrics"].get("hr@3")), _f(r["metrics"].get("hr@5")),
             _f(r["metrics"].get("ndcg@3")), _with_ci(r, "ndcg@5")] for r in rows]
    return _table(["scenario", "method", "template", "cases", "HR@1 (95% CI)", "HR@3", "HR@5", "NDCG@3",
                   "NDCG@5 (95% CI)"], body)


def methods_table(results: dict) -> str:
    return _table(["method", "kind", "training on this CPU", "what it is"],
                  [[m["name"], m["family"], _hours(m["train_seconds"]), m["notes"]] for m in results["methods"]])


def calibration_table(results: dict) -> str:
    """Expected calibration error of each hybrid row's relevance probabilities (test cases)."""
    titles = _scenario_titles(results)
    body = [[r["setting"], titles.get(r["scenario"], r["scenario"]), r["method"], str(r["cases"]), _f(r["ece"])]
            for r in results["rows"] if "ece" in r]
    return _table(["setting", "scenario", "method", "cases", "ECE (10 bins, every candidate)"], body) if body else ""


def spread_table(results: dict) -> str:
    titles = _scenario_titles(results)
    body = [[titles.get(r["scenario"], r["scenario"]), r["method"], r["template"] + (" ✓" if r.get("selected") else ""),
             str(r["cases"]), _f(r["metrics"].get("hr@1")), _f(r["metrics"].get("ndcg@5"))]
            for r in results["template_spread"]]
    return _table(["scenario", "method", "template (✓ chosen)", "cases", "HR@1", "NDCG@5"], body)


def _settings(results: dict) -> list[str]:
    return list(dict.fromkeys(r["setting"] for r in results["rows"]))


SETTING_TITLES = {"uniform-10": "1 positive + 9 uniformly sampled negatives (the paper's protocol)",
                  "hard-10": "1 positive + 9 hard negatives (drawn from the top 50 the MiniLM bi-encoder retrieves for the user's history)",
                  "uniform-100": "1 positive + 99 uniform negatives, ranked in one request"}


def header_lines(results: dict) -> list[str]:
    d, c = results["dataset"], results["config"]
    users = f"a seeded subsample of {c['users']} users (seed {c['seed']})" if c.get("users") else "all users"
    m = results["machine"]
    return [f"Dataset: {d['name']} ({d['users']:,} users, {d['items']:,} items), test split, {users}; "
            f"validation (the second-to-last item of {_select(c)}) picks each model's template.",
            f"Command: `{results['command']}` on {m['cpu_model']}, {m['usable_cpus']} CPUs: {_run_time(results)}."]


def _select(c: dict) -> str:
    n = c.get("select_users")
    return f"a seeded {n} of these users" if n and (not c.get("users") or n < c["users"]) else "the same users"


def _run_time(results: dict) -> str:
    units = results.get("units")
    took = f"{results['seconds'] / 60:.1f} min"
    if not units or not units["reused"]:
        return took
    return (f"{took} for this run, which reused {units['reused']} of its {units['total']} scoring units from earlier "
            f"runs into the same folder (scoring all units took {units['compute_seconds'] / 60:.1f} min)")


def render(results: dict, plots: dict[str, str] | None = None, note: str | None = None) -> str:
    parts = ["# Evaluation report", "", *header_lines(results), ""]
    for setting in _settings(results):
        parts += [f"## {SETTING_TITLES.get(setting, setting)}", "", setting_table(results, setting), ""]
    parts += ["## Methods", "", methods_table(results), ""]
    if calibration_table(results):
        parts += ["## Calibration of the hybrid's relevance", "", calibration_table(results), ""]
    if results["template_spread"]:
        parts += ["## Templates on validation", "", spread_table(results), ""]
    for key, title in (("bars", "HR@1 and NDCG@5 per scenario"), ("curves", "HR@k, sequential recommendation"),
                       ("cost", "Quality vs CPU training time"), ("reliability", "Reliability of the relevance")):
        if plots and key in plots:
            parts += [f"![{title}]({plots[key]})", ""]
    if note:
        parts += [note, ""]
    return "\n".join(parts)


def readme_section(results: dict, report_dir: str) -> str:
    parts = [*header_lines(results), "", setting_table(results, "uniform-10"), ""]
    for setting in _settings(results):
        if setting != "uniform-10":
            parts += [f"{SETTING_TITLES.get(setting, setting)}:", "", setting_table(results, setting), ""]
    if calibration_table(results):
        parts += ["Calibration of the hybrid's `relevance` (a probability of being the item taken among the "
                  "request's candidates):", "", calibration_table(results), ""]
    parts += ["Methods and their training budgets:", "", methods_table(results), "",
              f"Full report, template spread and plots: `{report_dir}/results.md`.", ""]
    return "\n".join(parts)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- eval:{name}:start -->", f"<!-- eval:{name}:end -->"


def update_readme(readme: str | Path, results: dict, report_dir: str, name: str | None = None) -> Path:
    """Replace the block between ``<!-- eval:NAME:start -->`` and ``<!-- eval:NAME:end -->``
    (NAME = the dataset's name by default) with :func:`readme_section`."""
    return replace_block(readme, name or results["dataset"]["name"], readme_section(results, report_dir))


def replace_block(readme: str | Path, name: str, section: str) -> Path:
    """Put ``section`` between the README's ``<!-- eval:NAME:start -->`` and ``<!-- eval:NAME:end -->``."""
    start, end = markers(name)
    return blocks.replace(readme, start, end, section)


# --- plots -------------------------------------------------------------------------------


def make_plots(results: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    paths = {"bars": out / "scenarios.png", "curves": out / "hr_curves.png", "cost": out / "quality_vs_training.png"}
    rows = [r for r in results["rows"] if r["setting"] == "uniform-10"]
    _plot_bars(plt, rows, paths["bars"])
    _plot_curves(plt, rows, paths["curves"])
    _plot_cost(plt, rows, results["methods"], paths["cost"])
    calibrated = [r for r in rows if r.get("reliability")]
    if calibrated:
        paths["reliability"] = out / "reliability.png"
        _plot_reliability(plt, calibrated, paths["reliability"])
    return paths


# One figure each; ``plt`` is passed in so matplotlib stays imported lazily, once, in make_plots.
def _plot_bars(plt, rows: list[dict], path: Path) -> None:
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    width = 0.8 / max(1, len(methods))
    for ax, metric in zip(axes, ("hr@1", "ndcg@5")):
        for j, method in enumerate(methods):
            xs, ys, err = [], [], [[], []]
            for i, s in enumerate(scenarios):
                r = next((r for r in rows if r["scenario"] == s and r["method"] == method), None)
                if r is None:
                    continue
                v = r["metrics"][metric]
                lo, hi = r.get("ci95", {}).get(metric, (v, v))
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(v)
                err[0].append(v - lo)
                err[1].append(hi - v)
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=method)
        ax.set_xticks(range(len(scenarios)), [s.replace("_", "\n") for s in scenarios], fontsize=8)
        ax.set_title(f"{metric.upper()} (95% bootstrap CI), 1 + 9 uniform")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(plt, rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        if r["scenario"] == "sequential":
            ax.plot(range(1, len(r["hr_curve"]) + 1), r["hr_curve"], marker="o", label=r["method"])
    ax.set_xlabel("k")
    ax.set_ylabel("HR@k")
    ax.set_title("Sequential recommendation, 1 + 9 uniform")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_cost(plt, rows: list[dict], methods: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    train = {m["name"]: m["train_seconds"] for m in methods}
    for r in rows:
        if r["scenario"] == "sequential" and train.get(r["method"]) is not None:
            hours = train[r["method"]] / 3600
            ax.scatter([hours], [r["metrics"]["hr@1"]], s=40)
            ax.annotate(r["method"], (hours, r["metrics"]["hr@1"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("CPU training time (hours, this machine)")
    ax.set_ylabel("HR@1, sequential, 1 + 9 uniform")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_reliability(plt, calibrated: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for r in calibrated:
        pts = r["reliability"]
        ax.plot([p["mean_probability"] for p in pts], [p["true_share"] for p in pts], marker="o",
                label=f"{r['method']}, {r['scenario']} (ECE {r['ece']:.3f})")
    ax.set_xlabel("predicted relevance (bin mean)")
    ax.set_ylabel("share that is the true item")
    ax.set_title("Reliability of the hybrid's relevance, 1 + 9 uniform")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
