"""``instructrec evaluate``: the paper's protocol, every method on the same candidate files.

Steps: pick the users (a seeded subsample, the same users for validation and test);
annotate their targets with the teacher (the scenarios' preferences and queries); write
the candidate files once per setting; score every (setting, scenario, method, template)
unit; pick each instruction model's template per scenario on validation; write the
report. Every unit's ranks are saved under ``OUT/units/`` as soon as it finishes, keyed by
what determines them (method version, candidate file digest, scenario, template, needs),
so an interrupted run resumes where it stopped and a rerun with one more method only
computes that method.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from instructrec import files
from instructrec.aspects import UserNeed
from instructrec.generation import MAX_K
from instructrec.records import code_commit

from ..annotate.offline import OfflineTeacher
from ..annotate.phrasing import PHRASINGS
from ..baselines.recbole import _read_scores, run_recbole
from ..baselines.stored import load_result, result_path, save_result
from ..data.load import load_dataset
from ..data.types import MAX_HISTORY, Case, InteractionData
from ..metrics import bootstrap_intervals, metrics_from_ranks, rank_of
from . import candidates as cand
from . import report
from .full_catalogue import FULL
from .methods import Behaviour, BiEncoder, HybridModel, InstructionModel, Method, Popularity, Precomputed, Sequential, timed_score
from .scenarios import EVAL_PHRASING, Scenario, get_scenarios, needs_of, with_phrasings

log = logging.getLogger(__name__)

# setting name -> (negative sampler, negatives per case)
SETTINGS = {"uniform-10": ("uniform", 9), "hard-10": ("hard", 9), "uniform-100": ("uniform", 99)}
SELECTION_SETTING = "uniform-10"  # templates are chosen on its validation split
SCHEMA = "instructrec-eval/1"
BASELINES = ("popularity", "bi-encoder", "behaviour", "sasrec", "bert4rec")


@dataclass
class EvalConfig:
    data: str | InteractionData  # a dataset directory, a shipped sample name, or loaded data
    out: Path
    users: int | None = 500
    select_users: int | None = 200  # validation users for template selection (a seeded subset of ``users``; None: all)
    seed: int = 0
    settings: tuple[str, ...] = ("uniform-10", "hard-10", "uniform-100")
    scenarios: tuple[str, ...] | None = None  # None: all
    extra_scenarios: tuple[str, ...] = ("sequential", "personalized_search")  # scenarios of the non-default settings
    models: tuple[str, ...] = ()  # "label=path" or a path / built-in name
    base: str | None = "minilm-bert2bert"  # the untuned base row (None: none)
    baselines: tuple[str, ...] = ("popularity", "bi-encoder", "sasrec", "bert4rec")
    hybrid: bool = False  # also each tuned model fused with behaviour and semantic signals by its gate.json
    sequential: str | None = None  # the hybrid's SASRec (OUT/model of `instructrec sequential train`): a row, and a signal
    annotations: str | None = None  # a teacher's annotations.jsonl; default: the offline teacher
    phrasing: tuple[str, ...] = (EVAL_PHRASING,)  # the offline teacher's phrasings the scenarios' needs are written in
    recbole_epochs: int | dict[str, int] = 10  # one budget, or per model: {"sasrec": 3, "bert4rec": 1}
    recbole_patience: int = 3
    recbole_threads: int = 2
    recbole_env: str | None = None
    recbole_results: str | Path | None = None  # where RecBole results are kept and reused (baselines/stored.py)
    device: str = "auto"
    dtype: str = "auto"
    resamples: int = 1000
    progress: bool = True
    command: str = ""
    full_k: int = 20  # full-catalogue setting: items each instruction model generates
    full_beams: int | None = None  # its beam width (None: full_k)
    full_per_source: int = 50  # full setting, hybrid rows: items each signal proposes

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        unknown = [s for s in self.settings if s not in SETTINGS and s != FULL]
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r}; choose from {', '.join([*SETTINGS, FULL])}")
        if not 1 <= self.full_k <= MAX_K or (self.full_beams is not None and self.full_beams < 1):
            raise ValueError(f"full_k must be 1 to {MAX_K} and full_beams at least 1 (got {self.full_k}, "
                             f"{self.full_beams})")
        self.full = FULL in self.settings
        self.settings = tuple(s for s in self.settings if s != FULL)
        if self.settings and SELECTION_SETTING not in self.settings:
            self.settings = (SELECTION_SETTING, *self.settings)
        if isinstance(self.phrasing, str):
            self.phrasing = tuple(p.strip() for p in self.phrasing.split(",") if p.strip())
        expanded = [q for p in self.phrasing for q in ((EVAL_PHRASING, "held-out") if p == "both" else (p,))]
        self.phrasing = tuple(dict.fromkeys(expanded))
        wrong = [p for p in self.phrasing if p not in PHRASINGS]
        if wrong or not self.phrasing:
            raise ValueError(f"unknown phrasing {wrong[0] if wrong else ''!r}; choose from {', '.join(PHRASINGS)} or both")
        if self.annotations and self.phrasing != (EVAL_PHRASING,):
            raise ValueError("--annotations gives one teacher's phrasing; --phrasing other than the default (v1) needs "
                             "the offline teacher (leave --annotations out)")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"unknown baseline {bad[0]!r}; choose from {', '.join(BASELINES)}")


@dataclass
class Unit:
    """The ranks of one method on one scenario's cases of one candidate file, with one template."""

    setting: str
    split: str
    scenario: str
    method: str
    template: str | None
    user_ids: list[str]
    ranks: list[int]
    scores: list[list[float]]
    seconds: float
    candidates: int
    skipped: int = 0  # cases of the file the scenario could not use (no annotation)

    def metrics(self) -> dict[str, float]:
        return metrics_from_ranks(self.ranks)


@dataclass
class Evaluation:
    config: EvalConfig
    data: InteractionData
    files: dict[tuple[str, str], cand.CandidateFile] = field(default_factory=dict)  # (setting, split) -> file
    methods: list[Method] = field(default_factory=list)
    units: list[Unit] = field(default_factory=list)
    selected: dict[tuple[str, str], str | None] = field(default_factory=dict)  # (method, scenario) -> template
    reused: int = 0  # units read back from OUT/units (computed by an earlier run)


# --- cases, annotations, candidate files --------------------------------------------------


def _cases(data: InteractionData, cfg: EvalConfig) -> dict[str, list[Case]]:
    test = cand.pick_users(cand.full_cases(data, "test"), cfg.users, cfg.seed)
    users = {c.user_id for c in test}
    valid = [c for c in cand.full_cases(data, "valid") if c.user_id in users]
    return {"valid": cand.pick_users(valid, cfg.select_users, cfg.seed), "test": test}


def annotate(data: InteractionData, cases: Sequence[Case], scenarios: Sequence[Scenario], cfg: EvalConfig,
             phrasing: str = EVAL_PHRASING) -> dict:
    """The scenarios' annotations of ``cases``: the file ``cfg.annotations`` names, else the offline
    teacher's in ``phrasing``, cached in ``OUT/annotations.jsonl`` (one file for every phrasing,
    each read back by its teacher's name)."""
    from ..annotate.pipeline import annotate_cases, load_annotations, read_annotations_file

    if cfg.annotations:
        return read_annotations_file(cfg.annotations)

    kinds = sorted({k for s in scenarios for k in s.kinds()}, key=str)
    path = cfg.out / "annotations.jsonl"
    teacher = OfflineTeacher(phrasing=phrasing)
    if kinds:
        short = [Case(c.user_id, c.history[-MAX_HISTORY:], c.target, c.review) for c in cases]
        asyncio.run(annotate_cases(data, short, teacher, kinds, path, progress=cfg.progress))
    return load_annotations(path, teacher=teacher.name) if path.exists() else {}


def candidate_files(data: InteractionData, cases: dict[str, list[Case]], cfg: EvalConfig,
                    retriever: BiEncoder | None) -> dict[tuple[str, str], cand.CandidateFile]:
    """Write (or reuse, when written by the same configuration) one file per setting and split."""
    files = {}
    for setting in cfg.settings:
        sampler, n_neg = SETTINGS[setting]
        for split in ("valid", "test") if setting == SELECTION_SETTING else ("test",):
            header = {"dataset": data.name, "source": data.source, "split": split, "setting": setting,
                      "negatives": sampler, "n_negatives": n_neg, "seed": cfg.seed, "users": cfg.users,
                      **({"select_users": cfg.select_users} if split == "valid" else {}),
                      "retriever": retriever.version() if sampler == "hard" and retriever else None}
            path = cfg.out / "candidates" / f"{split}-{setting}.jsonl"
            if path.exists():
                existing = cand.read(path, data)
                if all(existing.header.get(k) == v for k, v in header.items()):
                    files[(setting, split)] = existing
                    continue
                log.info("%s was written by another configuration: rewriting it", path)
            if sampler == "uniform":
                rows = cand.uniform_candidates(data, cases[split], n_neg, cfg.seed)
            else:
                if retriever is None:
                    raise ValueError("hard negatives need the bi-encoder (sentence-transformers) as the matching model")
                rows = cand.hard_candidates(data, cases[split], n_neg, cfg.seed, retriever.retrieve)
            files[(setting, split)] = cand.write(path, header, rows)
            log.info("wrote %s (%d cases)", path, len(rows))
    return files


# --- methods -------------------------------------------------------------------------------


def _model_specs(cfg: EvalConfig) -> list[tuple[str | None, str]]:
    specs = []
    for spec in cfg.models:
        label, _, path = spec.partition("=") if "=" in spec else (None, "", spec)
        specs.append((label or None, path))
    if cfg.base:
        specs.append((f"{cfg.base} (untuned)", cfg.base))
    return specs


def recbole_epochs(cfg: EvalConfig, model: str) -> int:
    """The epoch budget of one RecBole model (``cfg.recbole_epochs`` may name models)."""
    if isinstance(cfg.recbole_epochs, int):
        return cfg.recbole_epochs
    try:
        return cfg.recbole_epochs[model.lower()]
    except KeyError:
        raise ValueError(f"--recbole-epochs names no budget for {model} (give e.g. 'sasrec=3,bert4rec=1' or one number)") from None


def _recbole(data: InteractionData, model: str, files: list[cand.CandidateFile], cfg: EvalConfig) -> dict:
    """Train and score with RecBole, or reuse the result of an earlier run with the same
    budget on the same candidate files: the one kept in ``cfg.recbole_results`` (written there
    after training when it is not there yet), else the one in OUT (the digests are stamped
    beside RecBole's output). A run that was stopped resumes from its last finished epoch."""
    out = cfg.out / "recbole" / model
    stamp_path = out / "instructrec-stamp.json"
    epochs = recbole_epochs(cfg, model)
    kept = None
    if cfg.recbole_results:
        kept = result_path(cfg.recbole_results, data.name, model)
        kept_stamp = {"model": model, "epochs": epochs, "patience": cfg.recbole_patience, "seed": cfg.seed,
                      "dataset": data.name, "users": len(data.sequences), "interactions": sum(len(s) for s in data.sequences.values()),
                      "candidate_files": sorted(f.cases_digest for f in files)}
        stored = load_result(kept, kept_stamp)
        if stored is not None:
            log.info("%s: the result kept in %s (code %s)", model, kept, stored["commit"])
            return {"summary": stored["summary"],
                    "scores": {str(f.path): stored["scores"][f.cases_digest] for f in files}}
    stamp = {"epochs": epochs, "patience": cfg.recbole_patience, "seed": cfg.seed,
             "dataset": data.name, "users": len(data.sequences),
             "files": {str(f.path.resolve()): f.digest for f in files}}
    result = _recbole_in_out(data, model, files, cfg, out, stamp_path, stamp, epochs)
    if kept is not None:
        save_result(kept, kept_stamp, result["summary"],
                    {f.cases_digest: result["scores"][str(f.path)] for f in files}, code_commit())
        log.info("%s: result kept in %s", model, kept)
    return result


def _recbole_in_out(data: InteractionData, model: str, files: list[cand.CandidateFile], cfg: EvalConfig,
                    out: Path, stamp_path: Path, stamp: dict, epochs: int) -> dict:
    if stamp_path.exists() and (out / "summary.json").exists() and json.loads(stamp_path.read_text()) == stamp:
        summary = json.loads((out / "summary.json").read_text())
        try:
            scores = {str(f.path): _read_scores(Path(summary["files"][str(f.path.resolve())]["scores_file"])) for f in files}
        except (KeyError, OSError):
            scores = None
        if scores is not None:
            log.info("%s: reusing the RecBole run in %s", model, out)
            return {"summary": summary, "scores": scores}
    result = run_recbole(data, model, [f.path for f in files], out, epochs=epochs,
                         patience=cfg.recbole_patience, seed=cfg.seed, threads=cfg.recbole_threads, env=cfg.recbole_env,
                         resume=True)
    stamp_path.write_text(json.dumps(stamp, indent=1))
    return result


def recbole_methods(data: InteractionData, files: dict, cfg: EvalConfig) -> list[Method]:
    out = []
    test_files = [f for (setting, split), f in files.items() if split == "test"]
    for name, model in (("sasrec", "SASRec"), ("bert4rec", "BERT4Rec")):
        if name not in cfg.baselines:
            continue
        result = _recbole(data, model, test_files, cfg)
        summary = result["summary"]
        version = hashlib.sha256(json.dumps(summary, sort_keys=True, default=str).encode()).hexdigest()[:12]
        out.append(Precomputed(model, result["scores"], version, train_seconds=summary.get("train_seconds"),
                               notes=f"RecBole {summary.get('recbole_version', '')}, trained on the training part of all "
                                     f"{summary.get('n_users', '?')} users, {summary.get('epochs_run')} epochs "
                                     f"(max {summary.get('max_epochs')}, patience {summary.get('patience')}), "
                                     f"best epoch {summary.get('best_epoch')}, {summary.get('threads')} thread(s)"
                                     + _convergence(summary)))
    return out


def _convergence(summary: dict) -> str:
    """Whether early stopping ended the run (what 'converged' means here). A summary from before
    the runner said so: a run that stopped before its epoch budget was stopped by early stopping."""
    converged = summary.get("converged", summary.get("stopped_early"))
    if converged is None:
        return ""
    return (": converged (early stopping)" if converged else
            ": not converged (the epoch budget ended it before early stopping)")


# --- units ---------------------------------------------------------------------------------


def _unit_path(cfg: EvalConfig, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cfg.out / "units" / f"{digest}.json"


def scenario_needs(data: InteractionData, file: cand.CandidateFile, scenario: Scenario, annotations: dict,
                   max_history: int = MAX_HISTORY) -> list[tuple[cand.CandidateCase, UserNeed]]:
    """The cases of ``file`` this scenario can use, each with the need a user would bring
    (the batch client sends exactly these needs to a live service)."""
    return needs_of(data, file.cases, scenario, annotations, max_history)


def run_unit(ev: Evaluation, method: Method, scenario: Scenario, setting: str, split: str, template: str | None,
             annotations: dict) -> Unit:
    cfg, data = ev.config, ev.data
    file = ev.files[(setting, split)]
    used = scenario_needs(data, file, scenario, annotations, getattr(method, "max_history", MAX_HISTORY))
    key = {"method": method.version(), "file": file.digest, "scenario": scenario.name, "label": scenario.label,
           "template": template, "needs": hashlib.sha256(repr([n for _, n in used]).encode()).hexdigest()[:16]}
    path = _unit_path(cfg, key)
    if path.exists():
        saved = json.loads(path.read_text())
        ev.reused += 1
        unit = Unit(**saved["unit"])
        _remember(method, file, unit, [n for _, n in used])
        return unit
    cases = [c for c, _ in used]
    scores, seconds = timed_score(method, cases, [n for _, n in used], template, str(file.path), progress=cfg.progress)
    unit = Unit(setting, split, scenario.name, method.name, template, [c.user_id for c in cases],
                [rank_of(s, c.positive) for s, c in zip(scores, cases)], scores, round(seconds, 3),
                len(file.cases[0].candidates), len(file.cases) - len(used))
    files.write_json(path, {"key": key, "unit": asdict(unit)})
    m = unit.metrics()
    log.info("%-12s %-20s %-28s %-8s %s: HR@1 %.3f NDCG@5 %.3f (%d cases, %.1f s)", setting, scenario.name, method.name,
             template or "-", split, m.get("hr@1", 0), m.get("ndcg@5", 0), len(cases), seconds)
    return unit


def _remember(method: Method, file: cand.CandidateFile, unit: Unit, needs: Sequence[UserNeed]) -> None:
    """An instruction model's unit read back from the cache: its scores kept for the hybrid row
    that fuses them (a unit it scores now it keeps itself)."""
    if isinstance(method, InstructionModel):
        method.remember(str(file.path), unit.user_ids, method.sources(needs, unit.template), unit.scores)


def hybrid_methods(data: InteractionData, lms: list[tuple[str | None, InstructionModel]], index,
                   sequential=None) -> list[Method]:
    """One hybrid row per tuned model, with the gate saved beside it (``instructrec gate fit``)."""
    from instructrec.hybrid.semantic import SemanticEncoder

    from ..hybrid.fit import model_hybrid

    semantic = SemanticEncoder()
    return [HybridModel(data, lm, model_hybrid(data, path, index, semantic, sequential)) for path, lm in lms]


def _best(units: list[Unit]) -> Unit:
    return max(units, key=lambda u: (u.metrics().get("hr@1", 0), u.metrics().get("ndcg@5", 0)))


def evaluate(cfg: EvalConfig) -> dict:
    """Run the whole evaluation and write the report; returns the results dict. With the
    ``full`` setting the full-catalogue (T2) evaluation runs too, into ``OUT/full/`` (or into
    ``OUT`` when it is the only setting), and its results are under ``"full"``."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    data = cfg.data if isinstance(cfg.data, InteractionData) else load_dataset(cfg.data)
    full = None
    if cfg.full:
        from . import full_catalogue

        where = cfg.out if not cfg.settings else cfg.out / "full"
        epochs = recbole_epochs(cfg, "SASRec") if "sasrec" in cfg.baselines else 0
        full = full_catalogue.evaluate_full(cfg if where == cfg.out else _moved(cfg, where), data, _model_specs(cfg),
                                            epochs)
        full_catalogue.write(where, full)
        if not cfg.settings:
            return {"full": full, "full_dir": str(where)}
    results = _evaluate_candidates(cfg, data)
    if full is not None:
        results["full"], results["full_dir"] = full, str(cfg.out / "full")
    return results


def _moved(cfg: EvalConfig, out: Path) -> EvalConfig:
    return replace(cfg, out=out, settings=(FULL,))


def _evaluate_candidates(cfg: EvalConfig, data: InteractionData) -> dict:
    """The candidate settings (uniform-10, hard-10, uniform-100) and their report."""
    started = time.perf_counter()
    scenarios = with_phrasings(get_scenarios(cfg.scenarios), cfg.phrasing)
    cases = _cases(data, cfg)
    log.info("%s: %d users (%s), %d scenarios, settings %s", data.name, len(cases["test"]),
             f"seeded subsample of {cfg.users}" if cfg.users else "all", len(scenarios), ", ".join(cfg.settings))
    phrasings = dict.fromkeys(s.phrasing for s in scenarios)
    annotations = {p: annotate(data, [*cases["valid"], *cases["test"]], [s for s in scenarios if s.phrasing == p], cfg, p)
                   for p in phrasings}

    ev = Evaluation(cfg, data)
    bi = BiEncoder(data, cache_dir=cfg.out / "embeddings", progress=cfg.progress) if ("bi-encoder" in cfg.baselines or "hard-10" in cfg.settings) else None
    ev.files = candidate_files(data, cases, cfg, bi)
    if "popularity" in cfg.baselines:
        ev.methods.append(Popularity(data))
    if bi is not None and "bi-encoder" in cfg.baselines:
        ev.methods.append(bi)
    behaviour = Behaviour(data) if ("behaviour" in cfg.baselines or cfg.hybrid) else None
    if behaviour is not None and "behaviour" in cfg.baselines:
        ev.methods.append(behaviour)
    sequential = None
    if cfg.sequential:
        from instructrec.hybrid.sequential import load_sequential

        sequential = load_sequential(cfg.sequential)
        ev.methods.append(Sequential(sequential))
    ev.methods += recbole_methods(data, ev.files, cfg)
    specs = _model_specs(cfg)
    lms = [(path, InstructionModel(data, path, label, device=cfg.device, dtype=cfg.dtype)) for label, path in specs]
    ev.methods += [lm for _, lm in lms]
    untuned = specs[-1][0] if cfg.base else None  # the base row (last spec); its label is its method name
    if cfg.hybrid:  # after the models: their units fill the scores the hybrid rows fuse
        ev.methods += hybrid_methods(data, [(p, lm) for p, lm in lms if lm.name != untuned], behaviour.index, sequential)

    for method in ev.methods:
        for scenario in scenarios:
            if method.history_only and not scenario.signed_in:
                continue  # an anonymous request gives it nothing to read
            templates = method.templates(scenario)
            if not templates:
                log.warning("%s: no template has the instantiation %s; skipped", scenario.name, scenario.label)
                continue
            if len(templates) > 1:
                valid = [run_unit(ev, method, scenario, SELECTION_SETTING, "valid", t, annotations[scenario.phrasing])
                         for t in templates]
                ev.units += valid
                chosen = _best(valid).template
            else:
                chosen = templates[0]
            ev.selected[(method.name, scenario.name)] = chosen
            for setting in cfg.settings:
                # The untuned base is the zero-shot reference on the paper's protocol only.
                if setting != SELECTION_SETTING and (scenario.name not in cfg.extra_scenarios or method.name == untuned):
                    continue
                ev.units.append(run_unit(ev, method, scenario, setting, "test", chosen, annotations[scenario.phrasing]))

    results = summarise(ev, scenarios, time.perf_counter() - started)
    report.write(cfg.out, results)
    return results


def calibration(method: HybridModel, unit: Unit, file: cand.CandidateFile) -> dict:
    """The expected calibration error of a hybrid row's relevance probabilities on its test cases,
    and the reliability diagram's points."""
    from instructrec.hybrid.gate import expected_calibration_error, reliability

    positives = {c.user_id: c.positive for c in file.cases}
    probs = [method.relevance(s) for s in unit.scores]
    pos = [positives[u] for u in unit.user_ids]
    return {"ece": round(expected_calibration_error(probs, pos), 4), "reliability": reliability(probs, pos)}


def summarise(ev: Evaluation, scenarios: Sequence[Scenario], seconds: float) -> dict:
    cfg = ev.config
    rows, spread = [], []
    for u in ev.units:
        m = u.metrics()
        entry = {"setting": u.setting, "split": u.split, "scenario": u.scenario, "method": u.method, "template": u.template,
                 "cases": len(u.ranks), "skipped": u.skipped, "candidates": u.candidates, "metrics": m,
                 "seconds": u.seconds, "cases_per_second": round(len(u.ranks) / u.seconds, 2) if u.seconds else None}
        if u.split == "test":
            entry["ci95"] = bootstrap_intervals(u.ranks, resamples=cfg.resamples, seed=cfg.seed)
            entry["hr_curve"] = [sum(r < k for r in u.ranks) / len(u.ranks) if u.ranks else 0.0
                                 for k in range(1, u.candidates + 1)]
            method = next((m for m in ev.methods if m.name == u.method), None)
            if isinstance(method, HybridModel) and u.ranks:
                entry.update(calibration(method, u, ev.files[(u.setting, u.split)]))
            rows.append(entry)
        else:
            entry["selected"] = ev.selected.get((u.method, u.scenario)) == u.template
            spread.append(entry)
    files = {f"{s}/{sp}": {"path": str(f.path), "digest": f.digest, "cases": len(f.cases), **f.header}
             for (s, sp), f in ev.files.items()}

    return {
        "schema": SCHEMA,
        "command": cfg.command,
        "dataset": {"name": ev.data.name, "source": ev.data.source, "users": len(ev.data.sequences),
                    "items": len(ev.data.items)},
        "config": {k: (v.name if isinstance(v, InteractionData) else str(v) if isinstance(v, Path) else v)
                   for k, v in vars(cfg).items()},
        "scenarios": [{"name": s.name, "label": s.label, "title": s.title,
                       "templates": [t.id for t in s.templates()]} for s in scenarios],
        "methods": [{"name": m.name, "family": m.family, "reads_need": m.reads_need, "train_seconds": m.train_seconds,
                     "notes": m.notes, "version": m.version()} for m in ev.methods],
        "candidate_files": files,
        "rows": rows,
        "template_spread": spread,
        "seconds": round(seconds, 1),
        "units": {"total": len(ev.units), "reused": ev.reused,
                  "compute_seconds": round(sum(u.seconds for u in ev.units), 1)},
        "machine": report.machine(),
    }
