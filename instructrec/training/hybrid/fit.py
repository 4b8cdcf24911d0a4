"""Fitting the gate on validation cases, as the service will meet them.

Cases: the validation split (each user's second-to-last item, the history before it) of a
seeded sample of users, with 1 + 9 uniformly drawn never-interacted candidates (the
evaluation's protocol). Every scenario of the evaluation (sequential, product search,
personalized search, explicit preference, vague intention) turns each case into the need a
user would bring, with the offline teacher's texts. The LM scores each need with the
template the service's selection function picks (no template forced), exactly as /rerank
would; the behaviour index is built without each user's last two items, so no validation or
test answer is in it. A seeded fifth of the users is held out: the report's HR@1 and
calibration error are measured there, and the saved gate is the one fitted on the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from instructrec import files
from instructrec.aspects import UserNeed
from instructrec.hybrid import Hybrid, Signals
from instructrec.hybrid.gate import SIGNALS, Example, Gate, expected_calibration_error, fit_gate
from instructrec.text import normalise, normalise_need

from ..annotate.offline import OfflineTeacher
from ..data.catalogue_items import catalogue_items
from ..data.types import MAX_HISTORY, Case, InteractionData
from ..evaluate import candidates as cand
from ..evaluate.scenarios import SCENARIOS, Scenario, get_scenarios, needs_of
from ..metrics import rank_of

FIT_SEED = 7  # not the evaluation's seed 0: other users, other negatives
HELD_OUT_SHARE = 0.2


def model_hybrid(data: InteractionData, model: str | Path, index, semantic, sequential) -> Hybrid:
    """The hybrid of a model directory: the gate saved beside it with the given signals; a gate
    fitted with a sequential model refuses to run without one."""
    from instructrec.hybrid import GATE_FILE
    from instructrec.hybrid.gate import load_gate

    gate_path = Path(str(model)) / GATE_FILE
    if not gate_path.is_file():
        raise FileNotFoundError(f"{gate_path}: no gate beside {model}; fit one with "
                                f"`instructrec gate fit --model {model} --data {data.name}`")
    gate = load_gate(gate_path)
    if gate.info.get("sequential") and sequential is None:
        raise ValueError(f"{gate_path} was fitted with a sequential model: give it with --sequential")
    return Hybrid(gate, index, semantic, sequential)


def case_signals(hybrid: Hybrid, data: InteractionData, case: cand.CandidateCase, need: UserNeed) -> Signals:
    """The signals of one case's need, from its ids and normalised texts, as the service
    computes them for a request."""
    titles = [normalise(data.title(c)) for c in case.candidates]
    return hybrid.signals(normalise_need(need), titles, list(case.candidates), list(case.history))


def annotations_for(data: InteractionData, cases: Sequence[Case], scenarios: Sequence[Scenario], path: Path,
                    progress: bool) -> dict:
    from ..annotate.pipeline import annotate_cases, load_annotations

    kinds = sorted({k for s in scenarios for k in s.kinds()}, key=str)
    if kinds:
        short = [Case(c.user_id, c.history[-MAX_HISTORY:], c.target, c.review) for c in cases]
        asyncio.run(annotate_cases(data, short, OfflineTeacher(), kinds, path, progress=progress))
    return load_annotations(path) if path.exists() else {}


@dataclass
class Labelled:
    scenario: str
    user_id: str
    example: Example


def lm_scores(lm, work: Path, label: str, cases: Sequence[cand.CandidateCase], needs: Sequence[UserNeed],
              progress: bool = False) -> list[list[float]]:
    """``lm.score`` of these cases (the service's template selection), kept in
    ``work/lm-scores``: the LM is most of a fit's time, and refitting with another L2 or other
    signals asks it the same questions. The key holds the model's version (checkpoint,
    precision, lengths) and every case's candidates and need, so a changed model or case misses."""
    key = json.dumps([lm.version(), label, [[c.user_id, list(c.candidates), repr(n)] for c, n in zip(cases, needs)]])
    path = work / "lm-scores" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    scores = [[float(v) for v in row] for row in lm.score(cases, needs, None, label, progress=progress)]
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, scores)
    return scores


def labelled(data: InteractionData, lm, hybrid: Hybrid, work: Path, label: str,
             used: Sequence[tuple[cand.CandidateCase, UserNeed]], progress: bool = False) -> list[Labelled]:
    """The (case, need) pairs ``used`` as examples of scenario ``label``: the LM's scores (kept in
    ``work`` under ``gate-fit:LABEL``) and every other signal of each case."""
    scored = lm_scores(lm, work, f"gate-fit:{label}", [c for c, _ in used], [n for _, n in used], progress)
    out = []
    for (case, need), scores in zip(used, scored):
        sig = case_signals(hybrid, data, case, need)
        out.append(Labelled(label, case.user_id, Example(np.asarray(scores), need, sig.behaviour, sig.semantic,
                                                         sig.known, case.positive, sig.sequential)))
    return out


def fitting_examples(data: InteractionData, lm, hybrid: Hybrid, *, users: int, work: Path, seed: int = FIT_SEED,
                     scenarios: str | None = None, retrieved_users: int = 0, per_source: int = 30,
                     retrieved_negatives: int = 9, alike_negatives: int = 9, alike_pool: int = 50,
                     progress: bool = True) -> list[Labelled]:
    """Every (scenario, validation case) of ``users`` seeded users as a gate example; the
    retrieved-candidates example of the first ``retrieved_users`` of them; with
    ``retrieved_negatives``, each history scenario's case again with that many negatives drawn
    from what the signals retrieve for it (:func:`retrieved_sample_examples`); with
    ``alike_negatives``, once more with negatives from the need's ``alike_pool`` nearest titles
    when the true item is one of them (:func:`alike_examples`). ``lm`` is an evaluation
    :class:`~instructrec.training.evaluate.methods.InstructionModel`.

    Not the evaluation's hard negatives: there the 9 negatives are the history's semantic
    neighbours and the true item mostly is not, so a gate fitted on them learns to rank by
    *least* similarity (measured: 0.897 HR@1 on held-out hard sequential cases, while the
    uniform cases fell from 0.710 to 0.670): an artefact of the sampling, useless to a user.
    The alike cases draw from the same neighbours but keep only true items among them, so
    similarity cannot tell the answer there either way.

    By default the signed-in scenarios only (the anonymous product searches are reported
    apart, :func:`anonymous_copies`)."""
    chosen = get_scenarios(scenarios) if scenarios else [s for s in get_scenarios(None) if s.signed_in]
    cases = cand.pick_users(cand.full_cases(data, "valid"), users, seed)
    annotations = annotations_for(data, cases, chosen, work / "annotations.jsonl", progress)
    rows = cand.uniform_candidates(data, cases, 9, seed)
    out = []
    for scenario in chosen:
        used = needs_of(data, rows, scenario, annotations, lm.max_history)
        if used:
            out += labelled(data, lm, hybrid, work, scenario.name, used, progress)
    alike = alike_negatives and hybrid.semantic is not None  # look-alikes need the bi-encoder
    retrieval = CatalogueRetrieval.of(data, hybrid, work) if retrieved_users or retrieved_negatives or alike else None
    if retrieved_users:
        out += retrieved_examples(data, lm, hybrid, cases[:retrieved_users], retrieval=retrieval, per_source=per_source,
                                  work=work, progress=progress)
    if retrieved_negatives:
        out += retrieved_sample_examples(data, lm, hybrid, cases, annotations, [s for s in chosen if s.history],
                                         retrieval=retrieval, negatives=retrieved_negatives, per_source=per_source,
                                         work=work, seed=seed)
    if alike:
        out += alike_examples(data, lm, hybrid, cases, annotations, [s for s in chosen if s.history], retrieval=retrieval,
                              negatives=alike_negatives, pool=alike_pool, work=work, seed=seed)
    return out


@dataclass
class CatalogueRetrieval:
    """The dataset's items (the catalogue's order) and a retriever over them with every signal of
    a hybrid, built once for all of a fit's retrieved cases."""

    items: list
    retriever: "Retriever"
    position: dict[str, int]

    @classmethod
    def of(cls, data: InteractionData, hybrid: Hybrid, work: Path) -> "CatalogueRetrieval":
        """Title vectors are kept in ``work``."""
        from instructrec.hybrid.retrieval import Retriever

        items, _ = catalogue_items(data)
        titles = [it.title for it in items]
        vectors = hybrid.semantic.catalogue_vectors(titles, work / "title-vectors") if hybrid.semantic else None
        retriever = Retriever([it.id for it in items], titles, behaviour=hybrid.behaviour, sequential=hybrid.sequential,
                              semantic=hybrid.semantic, title_vectors=vectors)
        return cls(items, retriever, {it.id: j for j, it in enumerate(items)})

    def allowed(self, case: Case) -> np.ndarray:
        """Every catalogue position but the case's history."""
        allowed = np.ones(len(self.items), dtype=bool)
        allowed[[self.position[i] for i in case.history if i in self.position]] = False
        return allowed

    def nearest(self, case: Case, need: UserNeed, k: int) -> list[int]:
        """The ``k`` catalogue positions nearest the need by the bi-encoder, the history left out."""
        return self.retriever.by_meaning(normalise_need(need), self.allowed(case), k)

    def retrieve(self, case: Case, need: UserNeed, per_source: int) -> tuple[list[int], int] | None:
        """The catalogue positions the signals retrieve for ``need`` (the history left out) and
        the target's position; None when no signal proposed the target."""
        target = self.position.get(case.target)
        if target is None:
            return None
        got = self.retriever.retrieve(normalise_need(need), list(case.history), allowed=self.allowed(case),
                                      per_source=per_source)
        return (got.items, target) if target in got.sources else None


def retrieved_examples(data: InteractionData, lm, hybrid: Hybrid, cases: Sequence[Case], *,
                       retrieval: CatalogueRetrieval, per_source: int, work: Path,
                       progress: bool = True) -> list[Labelled]:
    """Sequential needs whose candidates are what the signals retrieve from the whole catalogue
    (as ``/recommend`` ranks them): a case whose target no signal proposed is left out."""
    from tqdm import tqdm

    built = []
    for case in tqdm(cases, desc="retrieved candidates", unit="case", disable=not progress):
        need = SCENARIOS["sequential"].need(data, case.user_id, case.history, case.target, {}, lm.max_history)
        got = retrieval.retrieve(case, need, per_source) if need is not None else None
        if got is None:
            continue
        positions, _ = got
        cand_case = cand.CandidateCase(case.user_id, case.history, case.target,
                                       tuple(retrieval.items[i].id for i in positions))
        built.append((cand_case, need))
    return labelled(data, lm, hybrid, work, "retrieved", built, progress)


def retrieved_sample_examples(data: InteractionData, lm, hybrid: Hybrid, cases: Sequence[Case], annotations: dict,
                              scenarios: Sequence[Scenario], *, retrieval: CatalogueRetrieval, negatives: int,
                              per_source: int, work: Path, seed: int = FIT_SEED) -> list[Labelled]:
    """Cases whose candidates are the true item and ``negatives`` items drawn from what the
    signals retrieve for the need (scenario ``retrieved-N:NAME``): what a reranker meets behind
    a matching stage. Unlike the evaluation's hard negatives the true item comes from the same
    pool as the negatives (a case whose target no signal proposed is left out), so nothing but
    the signals tells them apart; these teach the gate what uniform candidates cannot: when
    every candidate resembles the history, the look-alike is not the answer."""
    return pooled_examples(data, lm, hybrid, cases, annotations, scenarios, items=retrieval.items, negatives=negatives,
                           work=work, name="retrieved", seed=seed,
                           pool_of=lambda case, need: retrieval.retrieve(case, need, per_source))


def alike_examples(data: InteractionData, lm, hybrid: Hybrid, cases: Sequence[Case], annotations: dict,
                   scenarios: Sequence[Scenario], *, retrieval: CatalogueRetrieval, negatives: int, pool: int,
                   work: Path, seed: int = FIT_SEED) -> list[Labelled]:
    """Cases whose candidates are the true item and ``negatives`` items drawn from the ``pool``
    titles nearest the need by the bi-encoder, kept only when the true item is among them
    (scenario ``alike-N:NAME``): what a reranker meets behind an embedding retriever, every
    candidate a look-alike of the need. Measured by `gate fit --folds 5 --hard-report` on the
    shipped model (docs/hybrid.md): on the gate-fit users' hard-10 cases drawn as the evaluation
    draws them (never fitted), sequential HR@1 0.245 -> 0.301, personalized search 0.276 ->
    0.280, the uniform cases level (0.716 -> 0.713 sequential)."""
    def pool_of(case: Case, need: UserNeed):
        target = retrieval.position.get(case.target)
        if target is None:
            return None
        positions = retrieval.nearest(case, need, pool)
        return (positions, target) if target in positions else None

    return pooled_examples(data, lm, hybrid, cases, annotations, scenarios, items=retrieval.items, negatives=negatives,
                           work=work, name="alike", pool_of=pool_of, seed=seed, suffix=":alike")


def pooled_examples(data: InteractionData, lm, hybrid: Hybrid, cases: Sequence[Case], annotations: dict,
                    scenarios: Sequence[Scenario], *, items: Sequence, negatives: int, work: Path, name: str, pool_of,
                    seed: int, suffix: str = "") -> list[Labelled]:
    """Each scenario's case with the true item and ``negatives`` drawn (seeded per user and
    scenario) from ``pool_of(case, need)``: (positions in ``items``, the target's), or None to
    leave the case out; scenario ``NAME-N:SCENARIO``."""
    out = []
    for scenario in scenarios:
        built = []
        for case in cases:
            need = scenario.need(data, case.user_id, case.history, case.target, annotations, lm.max_history)
            got = pool_of(case, need) if need is not None else None
            if got is None:
                continue
            positions, target = got
            pool = [items[i].id for i in positions if i != target]
            if len(pool) < negatives:
                continue
            rng = random.Random(f"{seed}:{case.user_id}:{scenario.name}{suffix}")
            candidates = [case.target, *rng.sample(pool, negatives)]
            rng.shuffle(candidates)
            built.append((cand.CandidateCase(case.user_id, case.history, case.target, tuple(candidates)), need))
        if built:
            out += labelled(data, lm, hybrid, work, f"{name}-{negatives + 1}:{scenario.name}", built)
    return out


def held_out_users(examples: Sequence[Labelled], seed: int = FIT_SEED) -> set[str]:
    users = sorted({e.user_id for e in examples})
    return set(random.Random(seed).sample(users, round(len(users) * HELD_OUT_SHARE)))


def report(gate: Gate, examples: Sequence[Labelled]) -> dict:
    """HR@1 of the LM alone, of each signal alone and fused, and the calibration error of the
    fused relevance, per scenario and over all of ``examples``."""
    by: dict[str, list[Labelled]] = {}
    for e in examples:
        by.setdefault(e.scenario, []).append(e)
    by["all"] = list(examples)
    out = {}
    for name, rows in by.items():
        fused = [gate.fuse(r.example.lm, r.example.need, behaviour=r.example.behaviour, semantic=r.example.semantic,
                           sequential=r.example.sequential, known=r.example.known) for r in rows]
        positives = [r.example.positive for r in rows]

        def hr1(scores: list) -> float:
            """Ties count against the true item; an absent signal (None) never hits."""
            return float(np.mean([s is not None and rank_of(list(s), p) == 0 for s, p in zip(scores, positives)]))

        alone = {name: hr1([getattr(r.example, name) for r in rows]) for name in SIGNALS}
        out[name] = {
            "cases": len(rows),
            "hr@1": {"lm": hr1([r.example.lm for r in rows]), **alone, "fused": hr1([f.scores for f in fused])},
            "ece": expected_calibration_error([f.relevance for f in fused], positives),
        }
    return out


def hard_report_examples(data: InteractionData, lm, hybrid: Hybrid, retrieve, *, users: int, work: Path,
                         seed: int = FIT_SEED, scenarios: str | None = None, progress: bool = True) -> list[Labelled]:
    """The gate-fit users' validation cases with the evaluation's hard negatives (9 of the 50
    unseen items ``retrieve`` finds nearest the history: the evaluation's bi-encoder's
    ``retrieve``, drawn as ``evaluate`` draws them), scenario ``hard-10:NAME``: for
    :func:`cross_validated`'s report, and as calibration cases of the temperature alone; never
    fitted on by the weights (a gate ranking by them learns the sampling, see
    :func:`fitting_examples`)."""
    chosen = [s for s in get_scenarios(scenarios) if s.name in ("sequential", "personalized_search")]
    cases = cand.pick_users(cand.full_cases(data, "valid"), users, seed)
    annotations = annotations_for(data, cases, chosen, work / "annotations.jsonl", progress)
    rows = cand.hard_candidates(data, cases, 9, 0, retrieve)
    out = []
    for scenario in chosen:
        used = needs_of(data, rows, scenario, annotations, lm.max_history)
        if used:
            out += labelled(data, lm, hybrid, work, f"hard-10:{scenario.name}", used, progress)
    return out


def cross_validated(examples: Sequence[Labelled], folds: int, *, l2: float = 1e-5, seed: int = FIT_SEED,
                    report_only: Sequence[Labelled] = (), calibration: Sequence[Labelled] = ()) -> dict:
    """HR@1 and calibration error of the fused ranking (and the LM's HR@1 alone) with every
    user's cases ranked by the gate fitted on the other folds' users (``folds`` seeded folds of
    users), per scenario: all the users measured, where the held-out report measures a fifth.
    ``report_only`` cases (their users among the examples') are ranked the same way and never
    fitted on; ``calibration`` cases are reported so too, and the other folds' ones set each
    gate's temperature (:func:`~instructrec.hybrid.gate.fit_gate`)."""
    users = sorted({e.user_id for e in examples})
    random.Random(seed).shuffle(users)
    fold_of = {u: i % folds for i, u in enumerate(users)}
    ranked: dict[str, list] = {}
    for k in range(folds):
        gate = fit_gate([e.example for e in examples if fold_of[e.user_id] != k], l2=l2,
                        calibration=[e.example for e in calibration if fold_of.get(e.user_id) != k])
        for fitted, group in ((True, examples), (False, [*report_only, *calibration])):
            for e in group:
                if fold_of.get(e.user_id) != k:
                    continue
                x = e.example
                fused = gate.fuse(x.lm, x.need, behaviour=x.behaviour, semantic=x.semantic, sequential=x.sequential,
                                  known=x.known)
                row = (rank_of(list(fused.scores), x.positive) == 0, fused.relevance, x.positive,
                       rank_of(list(x.lm), x.positive) == 0)
                for name in (e.scenario, "all") if fitted else (e.scenario,):
                    ranked.setdefault(name, []).append(row)
    return {name: {"cases": len(rows), "hr@1": float(np.mean([r[0] for r in rows])),
                   "lm_hr@1": float(np.mean([r[3] for r in rows])),
                   "ece": expected_calibration_error([r[1] for r in rows], [r[2] for r in rows])}
            for name, rows in ranked.items()}


def anonymous_copies(examples: Sequence[Labelled]) -> list[Labelled]:
    """Each signed-in product search again as a request without history comes (the
    evaluation's ``product_search_anonymous``): the same query, LM scores and semantic signal,
    no behaviour or sequential signal. Reported, never fitted on (fitted on too, the gate
    ranked them lower: 0.858 against 0.866 over five folds, 2026-12-06). None when
    ``--scenarios`` named the anonymous scenario: its cases are then fitted and reported as such."""
    if any(e.scenario == "product_search_anonymous" for e in examples):
        return []
    return [Labelled("product_search_anonymous", e.user_id,
                     replace(e.example, behaviour=None, sequential=None, known=0.0))
            for e in examples if e.scenario == "product_search"]


def fit_and_report(examples: Sequence[Labelled], info: dict, l2: float = 1e-5,
                   calibration: Sequence[Labelled] = (), report_only: Sequence[Labelled] = ()) -> tuple[Gate, dict]:
    """The gate fitted on the users but a held-out fifth, reported on both; the held-out
    users' ``calibration`` cases are reported with theirs, the others' set the temperature;
    the held-out users' ``report_only`` cases are reported in rows of their own."""
    held = held_out_users(examples)
    train = [e for e in examples if e.user_id not in held]
    test = [e for e in examples if e.user_id in held]
    gate = fit_gate([e.example for e in train], l2=l2, info={**info, "users_fitted": len({e.user_id for e in train}),
                                                             "users_held_out": len(held)},
                    calibration=[e.example for e in calibration if e.user_id not in held])
    held_out = report(gate, test)
    apart = [e for e in (*calibration, *report_only) if e.user_id in held]
    if apart:  # their own rows: "all" stays the fitted kinds of case
        held_out.update({k: v for k, v in report(gate, apart).items() if k != "all"})
    return gate, {"fitted": report(gate, train), "held_out": held_out}
