"""Full-catalogue evaluation of task form T2 (matching): the target among every item.

No candidates are sampled. Each method ranks the whole catalogue for a test user, minus the
items of the user's own history (as RecBole's full sort masks them), and the target's rank
gives HR@10, NDCG@10 and HR@20, as GenRec and RecBole measure next-item prediction:

* an instruction model writes its top ``k`` (20) items by constrained beam search over the
  catalogue (:class:`instructrec.generation.Generator`) from a matching (T2) instruction of the
  sequential need, the history only; a target outside its ``k`` is a miss;
* popularity ranks every item by its training-part frequency;
* SASRec (RecBole, in its own environment) ranks every item by ``full_sort_predict``.

Every method sees the same users (a seeded subsample of the test split). Each method's ranks
are saved under ``OUT/units/`` keyed by what decides them, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from instructrec import files
from instructrec.aspects import TaskForm
from instructrec.catalogue import build_catalogue
from instructrec.checkpoint import checkpoint_version
from instructrec.instruction import build as build_instruction
from instructrec.text import normalise_need

from ..baselines.recbole import read_full_ranks, run_recbole
from ..data.catalogue_items import catalogue_items
from ..data.types import Case, InteractionData
from ..metrics import bootstrap_intervals, metrics_from_ranks
from . import candidates as cand
from .report import RESULTS_JSON, RESULTS_MD, _f, _hours, _table, machine, replace_block
from .scenarios import SCENARIOS

log = logging.getLogger(__name__)

FULL = "full"  # the setting's name on the command line (--settings full)
KS = (10, 20)
SCHEMA = "instructrec-eval-full/1"


@dataclass
class FullRanks:
    """One method's full-catalogue ranks (0-based; ``miss`` when beyond what it ranked)."""

    method: str
    version: str
    user_ids: list[str]
    ranks: list[int]
    miss: int  # the rank recorded for a target the method did not place
    seconds: float
    notes: str = ""
    train_seconds: float | None = None
    reused: bool = False  # read back from an earlier run into the same folder

    def metrics(self) -> dict[str, float]:
        m = metrics_from_ranks(self.ranks, KS)
        m.pop("mrr", None)  # a rank beyond k is unknown for generation: no MRR
        return m


def history_mask(index: dict[str, int], case: Case, n: int) -> np.ndarray:
    """True for every catalogue item but the case's history."""
    allowed = np.ones(n, dtype=bool)
    allowed[[index[i] for i in case.history if i in index]] = False
    return allowed


def popularity_ranks(data: InteractionData, cases: Sequence[Case]) -> FullRanks:
    """Every item by training-part frequency (ties by item id), the history left out."""
    start = time.perf_counter()
    counts = Counter(x.item_id for seq in data.sequences.values() for x in seq[:-2])
    order = sorted(data.items, key=lambda i: (-counts.get(i, 0), i))
    position = {item: p for p, item in enumerate(order)}
    ranks = []
    for c in cases:
        if c.target in c.history:
            ranks.append(len(order))
            continue
        history = {position[i] for i in c.history if i in position}
        p = position[c.target]
        ranks.append(p - sum(1 for h in history if h < p))
    return FullRanks("popularity", f"popularity:{len(counts)}:{sum(counts.values())}", [c.user_id for c in cases],
                     ranks, len(order), round(time.perf_counter() - start, 3),
                     "item frequency in the training part (all users, last two interactions excluded)", 0.0)


class Generation:
    """An instruction model generating its top ``k`` over the dataset's catalogue."""

    def __init__(self, data: InteractionData, model: str, name: str | None, *, k: int, beams: int | None,
                 device: str, dtype: str):
        from instructrec.generation import Generator
        from instructrec.modeling import load_model
        from instructrec.ranker import Ranker

        self.data = data
        self.loaded = load_model(model, device=device, dtype=dtype)
        self.ranker = Ranker(self.loaded)
        items, _ = catalogue_items(data)
        self.catalogue = build_catalogue(items, self.loaded.tokenizer, eos=self.ranker.eos,
                                         max_target_tokens=self.ranker.max_target_tokens, model=str(model))
        self.index = {it.id: j for j, it in enumerate(items)}
        self.generator = Generator(self.ranker, self.catalogue)
        self.k, self.beams = k, max(k, beams or k)
        self.miss = len(items)  # a target outside the k generated: somewhere below every one of them
        meta = self.loaded.meta or {}
        self.max_history = (meta.get("preset") or {}).get("max_history", 20)
        path = Path(str(model))
        self.name = name or (path.parent.name if path.name == "model" else path.name)
        self.version = (f"{self.name}:{checkpoint_version(path) if path.is_dir() else model}:{self.loaded.precision}:"
                        f"{self.ranker.reduction}:k{self.k}:b{self.beams}:{self.catalogue.version}")
        self.train_seconds = meta.get("train_seconds_total") or meta.get("train_seconds_this_run")
        self.notes = (f"constrained beam search (beam {self.beams}) over all {len(items):,} titles, top {self.k}, "
                      f"{self.loaded.precision}")

    def source(self, case: Case) -> str:
        need = SCENARIOS["sequential"].need(self.data, case.user_id, case.history, case.target, {}, self.max_history)
        return build_instruction(normalise_need(need), self.loaded.tokenizer, self.ranker.max_source_tokens,
                                 task=TaskForm.MATCHING).source

    def ranks(self, cases: Sequence[Case], progress: bool) -> FullRanks:
        start = time.perf_counter()
        ranks = []
        for c in tqdm(cases, desc=f"{self.name} generate top {self.k}", unit="user", disable=not progress):
            got = self.generator.top_k(self.source(c), self.k, allowed=history_mask(self.index, c, len(self.catalogue)),
                                       beams=self.beams)
            items = [self.catalogue.items[r.item].id for r in got]
            ranks.append(items.index(c.target) if c.target in items else self.miss)
        return FullRanks(self.name, self.version, [c.user_id for c in cases], ranks, self.miss,
                         round(time.perf_counter() - start, 3), self.notes, self.train_seconds)


def sequential_ranks(data: InteractionData, cases: Sequence[Case], scorer) -> FullRanks:
    """The hybrid's own SASRec (plain torch): every item by its score, the history left out; the
    target's exact rank, ties against it."""
    start = time.perf_counter()
    ids = sorted(data.items)
    position = {item: i for i, item in enumerate(ids)}
    ranks = []
    for c in cases:
        scores = scorer.scores(list(c.history), ids)
        if c.target in c.history or scores is None:
            ranks.append(len(ids))
            continue
        allowed = history_mask(position, c, len(ids))
        ranks.append(int(((scores >= scores[position[c.target]]) & allowed).sum()) - 1)  # ties against the target
    info = scorer.header.get("info", {})
    return FullRanks("SASRec (plain torch)", f"sequential:{scorer.version}", [c.user_id for c in cases], ranks, len(ids),
                     round(time.perf_counter() - start, 3),
                     f"the hybrid's sequential signal, {info.get('epochs_run', '?')} epochs, full sort of {len(ids):,} items",
                     info.get("train_seconds"))


class HybridFull:
    """An instruction model as the fused ranker over what the signals retrieve: each of the
    sequential model, the behaviour index and the semantic encoder proposes its best
    ``per_source`` items (the history left out), the LM scores their union with the sequential
    need's rerank template, and the gate fuses; a target no source proposed is a miss."""

    def __init__(self, data: InteractionData, model: str, name: str | None, hybrid, *, per_source: int, device: str,
                 dtype: str):
        from instructrec.hybrid.retrieval import Retriever
        from instructrec.modeling import load_model
        from instructrec.ranker import Ranker

        self.data, self.hybrid, self.per_source = data, hybrid, per_source
        self.loaded = load_model(model, device=device, dtype=dtype)
        self.ranker = Ranker(self.loaded)
        items, _ = catalogue_items(data)
        self.items = items
        self.retriever = Retriever([it.id for it in items], [it.title for it in items], behaviour=hybrid.behaviour,
                                   sequential=hybrid.sequential, semantic=hybrid.semantic)
        self.index = {it.id: j for j, it in enumerate(items)}
        self.miss = len(items)
        meta = self.loaded.meta or {}
        self.max_history = (meta.get("preset") or {}).get("max_history", 20)
        path = Path(str(model))
        base = name or (path.parent.name if path.name == "model" else path.name)
        self.name = f"{base} + hybrid"
        self.version = (f"{base}:{checkpoint_version(path) if path.is_dir() else model}:{self.loaded.precision}:"
                        f"{self.ranker.reduction}:{hybrid.version}:p{per_source}")
        self.train_seconds = meta.get("train_seconds_total") or meta.get("train_seconds_this_run")
        self.notes = (f"the union of the sequential model's, the behaviour index's and the bi-encoder's best {per_source} "
                      f"items each, reranked by {base} and fused by its gate, {self.loaded.precision}")

    def ranks(self, cases: Sequence[Case], progress: bool) -> FullRanks:
        start = time.perf_counter()
        ranks = [self.rank_one(c) for c in tqdm(cases, desc=self.name, unit="user", disable=not progress)]
        return FullRanks(self.name, self.version, [c.user_id for c in cases], ranks, self.miss,
                         round(time.perf_counter() - start, 3), self.notes, self.train_seconds)

    def rank_one(self, case: Case) -> int:
        need = normalise_need(SCENARIOS["sequential"].need(self.data, case.user_id, case.history, case.target, {},
                                                           self.max_history))
        allowed = history_mask(self.index, case, len(self.items))
        got = self.retriever.retrieve(need, list(case.history), allowed=allowed, per_source=self.per_source)
        target = self.index.get(case.target)
        if target is None or target not in got.sources:
            return self.miss
        source = build_instruction(need, self.loaded.tokenizer, self.ranker.max_source_tokens).source
        fused = self.hybrid.fuse_retrieved(self.ranker, source, need, [self.items[i].id for i in got.items],
                                           [self.items[i].title for i in got.items], list(case.history))[0].scores
        p = fused[got.items.index(target)]
        return int((fused >= p).sum()) - 1  # ties count against the target


def sasrec_ranks(data: InteractionData, cases: Sequence[Case], out: Path, *, epochs: int, patience: int, seed: int,
                 threads: int, env: str | None) -> FullRanks:
    """SASRec trained with RecBole on the training part of every user, then the target's rank in
    its full sort of every item but the history (the runner's ``--full-rank``)."""
    work = out / "recbole" / "SASRec-full"
    file = cand.write(work / "full.jsonl", {"setting": FULL, "split": "test"},
                      [cand.CandidateCase(c.user_id, c.history, c.target, (c.target,)) for c in cases])
    stamp = {"epochs": epochs, "patience": patience, "seed": seed, "file": file.digest}
    stamp_path = work / "instructrec-stamp.json"
    scores = work / "full.scores.jsonl"
    reused = stamp_path.exists() and scores.exists() and json.loads(stamp_path.read_text()) == stamp
    if not reused:
        run_recbole(data, "SASRec", [file.path], work, epochs=epochs, patience=patience, seed=seed, threads=threads,
                    env=env, full_rank=True)
        stamp_path.write_text(json.dumps(stamp))
    summary = json.loads((work / "summary.json").read_text())
    by_user = read_full_ranks(scores)
    n = summary["n_items"] + 1  # RecBole's miss value is its item count with the padding id
    ranks = [min(by_user[c.user_id], n) for c in cases]
    return FullRanks("SASRec", f"sasrec:{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:12]}",
                     [c.user_id for c in cases], ranks, n, summary.get("score_seconds") or 0.0,  # its ranking time
                     f"RecBole {summary.get('recbole_version')}, {summary.get('epochs_run')} epochs (max {epochs}), "
                     f"best epoch {summary.get('best_epoch')}, full sort of {summary.get('n_items'):,} items",
                     summary.get("train_seconds"), reused)


def _saved(out: Path, key: dict, compute) -> FullRanks:
    path = out / "units" / f"full-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]}.json"
    if path.exists():
        return FullRanks(**{**json.loads(path.read_text())["ranks"], "reused": True})
    result = compute()
    files.write_json(path, {"key": key, "ranks": asdict(result)})
    return result


def evaluate_full(cfg, data: InteractionData, models: Sequence[tuple[str | None, str]], sasrec_epochs: int) -> dict:
    """Every method of ``cfg`` (an :class:`~instructrec.training.evaluate.run.EvalConfig`) on the
    full catalogue: the baselines it names, and ``models`` as (label, path); returns the results
    (``rows`` with metrics and 95% intervals)."""
    started = time.perf_counter()
    cases = cand.pick_users(cand.full_cases(data, "test"), cfg.users, cfg.seed)
    users = hashlib.sha256(" ".join(c.user_id for c in cases).encode()).hexdigest()[:16]
    log.info("%s: full-catalogue ranking of %d items for %d users", data.name, len(data.items), len(cases))
    methods: list[FullRanks] = []
    if "popularity" in cfg.baselines:
        methods.append(popularity_ranks(data, cases))
    if "sasrec" in cfg.baselines:
        methods.append(sasrec_ranks(data, cases, cfg.out, epochs=sasrec_epochs,
                                    patience=cfg.recbole_patience, seed=cfg.seed, threads=cfg.recbole_threads,
                                    env=cfg.recbole_env))
    sequential = None
    if cfg.sequential:
        from instructrec.hybrid.sequential import load_sequential

        sequential = load_sequential(cfg.sequential)
        methods.append(sequential_ranks(data, cases, sequential))
    for label, path in models:
        gen = Generation(data, path, label, k=cfg.full_k, beams=cfg.full_beams, device=cfg.device, dtype=cfg.dtype)
        methods.append(_saved(cfg.out, {"method": gen.version, "users": users},
                              lambda gen=gen: gen.ranks(cases, cfg.progress)))
    if cfg.hybrid:
        from instructrec.hybrid.semantic import SemanticEncoder

        from ..hybrid.behaviour_cli import build_for
        from ..hybrid.fit import model_hybrid

        index, semantic = build_for(data), SemanticEncoder()
        for label, path in (models[:-1] if cfg.base else models):  # not the untuned base (the last): it has no gate
            hybrid = model_hybrid(data, path, index, semantic, sequential)
            full = HybridFull(data, path, label, hybrid, per_source=cfg.full_per_source, device=cfg.device,
                              dtype=cfg.dtype)
            methods.append(_saved(cfg.out, {"method": full.version, "users": users},
                                  lambda full=full: full.ranks(cases, cfg.progress)))
    rows = []
    for m in methods:
        ci = bootstrap_intervals([min(r, max(KS)) for r in m.ranks], KS, resamples=cfg.resamples, seed=cfg.seed)
        rows.append({"method": m.method, "cases": len(m.ranks), "metrics": m.metrics(),
                     "ci95": {k: v for k, v in ci.items() if k != "mrr"}, "seconds": m.seconds, "notes": m.notes,
                     "train_seconds": m.train_seconds, "version": m.version, "reused": m.reused,
                     "targets_in_history": sum(c.target in c.history for c in cases)})

    return {"schema": SCHEMA, "command": cfg.command,
            "dataset": {"name": data.name, "users": len(data.sequences), "items": len(data.items)},
            "config": {"users": cfg.users, "seed": cfg.seed, "k": cfg.full_k, "beams": cfg.full_beams},
            "rows": rows, "seconds": round(time.perf_counter() - started, 1), "machine": machine()}


# --- report -----------------------------------------------------------------------------------


def table(results: dict) -> str:
    def ci(row, metric):
        lo, hi = row["ci95"][metric]
        return f"{_f(row['metrics'][metric])} ({lo:.3f}–{hi:.3f})"

    body = [[r["method"], str(r["cases"]), ci(r, "hr@10"), ci(r, "ndcg@10"), _f(r["metrics"]["hr@20"]),
             _hours(r["train_seconds"]), _per_user(r["seconds"] / max(1, r["cases"])), r["notes"]] for r in results["rows"]]
    return _table(["method", "users", "HR@10 (95% CI)", "NDCG@10 (95% CI)", "HR@20", "training on this CPU",
                   "ranking time per user", "what it is"], body)


def _per_user(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1000:.2g} ms"


def header(results: dict) -> list[str]:
    d, c, m = results["dataset"], results["config"], results["machine"]
    users = f"a seeded subsample of {c['users']} test users (seed {c['seed']})" if c.get("users") else "every test user"
    return [f"Dataset: {d['name']} ({d['users']:,} users, {d['items']:,} items); {users}. Each method ranks every item "
            f"but the user's own history; the target is the user's last item.",
            f"Command: `{results['command']}` on {m['cpu_model']}, {m['usable_cpus']} CPUs: "
            f"{results['seconds'] / 60:.1f} min{_reused(results)}."]


def _reused(results: dict) -> str:
    names = [r["method"] for r in results["rows"] if r.get("reused")]
    return (f", reusing the rankings of {', '.join(names)} saved by earlier runs into the same folder (their "
            f"training and ranking times are in the table)") if names else ""


def render(results: dict) -> str:
    return "\n".join(["# Full-catalogue evaluation (T2, matching)", "", *header(results), "", table(results), ""])


def write(out: Path, results: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=1) + "\n")
    (out / RESULTS_MD).write_text(render(results))
    return out / RESULTS_MD


def update_readme(readme: str | Path, results: dict, report_dir: str, name: str | None = None) -> Path:
    """The block between ``<!-- eval:NAME-full:start -->`` and ``<!-- eval:NAME-full:end -->``
    (NAME: the dataset's name by default)."""
    section = "\n".join([*header(results), "", table(results), "",
                         f"Report: `{report_dir}/results.md`.", ""])
    return replace_block(readme, f"{name or results['dataset']['name']}-full", section)
