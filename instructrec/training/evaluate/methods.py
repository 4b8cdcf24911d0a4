"""The rows of an evaluation: every method scores the same candidate files.

* :class:`Popularity` — item frequency in the training part of every user's sequence.
* :class:`BiEncoder` — zero-shot all-MiniLM-L6-v2 (sentence-transformers): the paper's
  DSSM-style matching baseline; it reads the need's text (history titles, preference,
  query) but was never trained on interactions.
* :class:`InstructionModel` — a checkpoint (tuned, or an untuned base) scored by the
  likelihood ranker through the same instruction path as the service.
* :class:`Precomputed` — scores another process wrote for the same candidate file
  (SASRec and BERT4Rec from RecBole, in their own environment).
* :class:`Behaviour` — item-to-item counts of the training part (the hybrid's behaviour
  signal alone, :mod:`instructrec.hybrid.behaviour`).
* :class:`HybridModel` — an instruction model's scores fused with the behaviour and semantic
  signals by its gate (:mod:`instructrec.hybrid`), as the service fuses them.

A method returns one list of scores per case, in the order of the case's candidates;
higher is better.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from instructrec.aspects import UserNeed
from instructrec.checkpoint import checkpoint_version
from instructrec.instruction import build as build_instruction
from instructrec.modeling import minilm_path
from instructrec.reranker import load_ranker
from instructrec.text import normalise, normalise_need

from ..data.types import MAX_HISTORY, InteractionData
from .candidates import CandidateCase

SENTENCE_TRANSFORMERS_PIN = "sentence-transformers==6.2.0"


class Method:
    name: str = ""
    family: str = ""  # "interaction" (reads ids only), "text" (reads text, untrained) or "instruction"
    reads_need = False  # False: the scenario's instruction is invisible to it (one score per case)
    history_only = False  # True: it reads nothing but the history's ids (no row for an anonymous request)
    train_seconds: float | None = None  # CPU training time of this method, when it was trained here
    notes: str = ""

    def version(self) -> str:
        """Changes whenever the method would score differently (the result cache's key)."""
        return self.name

    def templates(self, scenario) -> list[str | None]:
        return [None]

    def score(self, cases: Sequence[CandidateCase], needs: Sequence[UserNeed], template: str | None,
              candidate_file: str, progress: bool = False) -> list[list[float]]:
        raise NotImplementedError


class Popularity(Method):
    family = "interaction"

    def __init__(self, data: InteractionData, name: str = "popularity"):
        self.name = name
        # Training part only: every user's sequence without its validation and test items.
        self.counts = Counter(x.item_id for seq in data.sequences.values() for x in seq[:-2])
        self.train_seconds = 0.0
        self.notes = "item frequency in the training part (all users, last two interactions excluded)"

    def version(self) -> str:
        return f"{self.name}:{len(self.counts)}:{sum(self.counts.values())}"

    def score(self, cases, needs, template, candidate_file, progress=False):
        return [[float(self.counts.get(c, 0)) for c in case.candidates] for case in cases]


class BiEncoder(Method):
    family = "text"
    reads_need = True

    def __init__(self, data: InteractionData, model_path: str | Path | None = None, name: str = "minilm-bi-encoder",
                 device: str = "cpu", batch_size: int = 128, cache_dir: str | Path | None = None, progress: bool = False):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise RuntimeError(f"the bi-encoder baseline needs sentence-transformers: pip install '{SENTENCE_TRANSFORMERS_PIN}' "
                               "(or the 'eval' extra)") from exc
        self.name = name
        self.data = data
        self.model_path = str(model_path or minilm_path())
        self.model = SentenceTransformer(self.model_path, device=device)
        self.batch_size = batch_size
        self._cache: dict[str, np.ndarray] = {}
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.progress = progress
        self.train_seconds = 0.0
        self.notes = "all-MiniLM-L6-v2, zero-shot; query = mean of history title embeddings + preference + query text"

    def version(self) -> str:
        return f"{self.name}:{Path(self.model_path).name}:v1"

    def embed(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            vecs = self.model.encode(missing, batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=progress)
            self._cache.update(zip(missing, vecs))
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 384), dtype=np.float32)

    def query(self, need: UserNeed) -> np.ndarray:
        parts = []
        if need.history:
            h = self.embed(list(need.history)).mean(axis=0)
            parts.append(h / (np.linalg.norm(h) or 1.0))
        parts += [self.embed([t])[0] for t in (need.preference, need.intention) if t]
        q = np.sum(parts, axis=0)
        return q / (np.linalg.norm(q) or 1.0)

    def score(self, cases, needs, template, candidate_file, progress=False):
        titles = [self.data.title(c) for case in cases for c in case.candidates]
        self.embed(titles, progress=progress)
        out = []
        for case, need in zip(cases, needs):
            cand = self.embed([self.data.title(c) for c in case.candidates])
            out.append([float(x) for x in cand @ self.query(need)])
        return out

    def catalogue(self, ids: list[str]) -> np.ndarray:
        """Embeddings of every item title, kept on disk (the catalogue takes minutes on a CPU)."""
        titles = [self.data.title(i) for i in ids]
        path = None
        if self.cache_dir is not None:
            digest = hashlib.sha256("\n".join([self.version(), *titles]).encode()).hexdigest()[:16]
            path = self.cache_dir / f"titles-{digest}.npy"
            if path.exists():
                matrix = np.load(path)
                self._cache.update(zip(titles, matrix))
                return matrix
        matrix = self.embed(titles, progress=self.progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, matrix)
        return matrix

    def retrieve(self, cases, k: int) -> list[list[str]]:
        """The matching stage for hard negatives: items nearest to the user's recent history."""
        ids = sorted(self.data.items)
        matrix = self.catalogue(ids)
        out = []
        for case in cases:
            q = self.query(UserNeed(history=tuple(self.data.title(i) for i in case.history[-MAX_HISTORY:])))
            sims = matrix @ q
            top = np.argpartition(-sims, min(k, len(ids) - 1))[:k]
            out.append([ids[i] for i in top[np.argsort(-sims[top], kind="stable")]])
        return out


class InstructionModel(Method):
    """Scores exactly what the /rerank service scores for the same need: need texts and
    candidate titles are normalised like the service's request texts
    (:func:`instructrec.text.normalise`), and identical titles in one case are scored once
    (equal titles get equal scores, as the service's per-text scoring gives them)."""

    family = "instruction"
    reads_need = True
    TEXT = "svc-text-1"  # the text path above; part of version(), so units scored before it are recomputed

    def __init__(self, data: InteractionData, model: str | Path, name: str | None = None, *, device: str = "auto",
                 dtype: str = "auto", reduction: str = "mean", group: int = 8, batch_tokens: int = 4096):
        self.data = data
        # loaded as `instructrec rank` and Reranker.load load it: the tuned token limits
        self.ranker = load_ranker(model, device=device, dtype=dtype, reduction=reduction, batch_tokens=batch_tokens)
        self.loaded = self.ranker.loaded
        meta = self.loaded.meta
        self.name = name or (Path(str(model)).parent.name if Path(str(model)).name == "model" else Path(str(model)).name)
        self.group = group
        path = Path(str(model))
        self._version = checkpoint_version(path) if path.is_dir() else str(model)
        # a relay's model: every leg's training steps (the shipped default); else every resumed run's
        # when the checkpoint records them, else the last run's wall time
        relay = (meta or {}).get("relay") or {}
        self.train_seconds = (relay.get("train_seconds_total") or meta.get("train_seconds_total")
                              or meta.get("train_seconds_this_run")) if meta else 0.0
        self.max_history = (meta.get("preset") or {}).get("max_history", MAX_HISTORY) if meta else MAX_HISTORY
        data_meta = meta.get("data", {}) if meta else {}
        count = lambda key: f"{data_meta[key]:,}" if isinstance(data_meta.get(key), int) else "?"  # noqa: E731
        tuned = (f"by the training relay ({relay['examples_total']:,} examples)"
                 if isinstance(relay.get("examples_total"), int) else f"{meta.get('steps')} steps") if meta else ""
        self.notes = (f"{meta.get('base_model')} tuned {tuned} on {data_meta.get('name')} "
                      f"({count('users')} users, {count('examples')} generated instructions)"
                      if meta else f"{model}, untuned")
        # (candidate file, user id, instruction) -> scores, of every unit scored or read back in
        # this process: a hybrid row fuses these instead of scoring the LM again. The instruction
        # is the key, not the template: scenarios share templates (sequential and explicit
        # preference the pref-*, personalized search and vague intention the comb-*) with other needs
        self.memo: dict[tuple[str, str, str], list[float]] = {}

    def remember(self, candidate_file: str, user_ids: Sequence[str], sources: Sequence[str],
                 scores: Sequence[Sequence[float]]) -> None:
        for user, source, s in zip(user_ids, sources, scores, strict=True):
            self.memo[(str(candidate_file), user, source)] = s

    def version(self) -> str:
        r = self.ranker
        return (f"{self.name}:{self._version}:{self.loaded.precision}:{r.reduction}:{r.max_source_tokens}:"
                f"{r.max_target_tokens}:{self.TEXT}")

    def templates(self, scenario) -> list[str | None]:
        return [t.id for t in scenario.templates()]

    def sources(self, needs: Sequence[UserNeed], template: str | None) -> list[str]:
        tok = self.loaded.tokenizer
        return [build_instruction(normalise_need(n), tok, self.ranker.max_source_tokens, template_id=template).source
                for n in needs]

    def score(self, cases, needs, template, candidate_file, progress=False):
        sources = self.sources(needs, template)
        out: list[list[float]] = []
        bar = tqdm(total=len(cases), desc=f"{self.name} {template}", unit="case", disable=not progress, leave=False)
        for i in range(0, len(cases), self.group):
            titles = [[normalise(self.data.title(c)) for c in case.candidates] for case in cases[i:i + self.group]]
            distinct = [list(dict.fromkeys(t)) for t in titles]
            scored = self.ranker.score_many(list(zip(sources[i:i + self.group], distinct)))
            for t, d, s in zip(titles, distinct, scored):
                by_title = dict(zip(d, s.scores))
                out.append([by_title[x] for x in t])
            bar.update(len(titles))
        bar.close()
        self.remember(candidate_file, [c.user_id for c in cases], sources, out)
        return out


class Behaviour(Method):
    family = "interaction"
    history_only = True

    def __init__(self, data: InteractionData, index=None, name: str = "behaviour (item-to-item counts)"):
        from ..hybrid.behaviour_cli import build_for

        self.name = name
        self.index = index if index is not None else build_for(data)
        self.train_seconds = self.index.header.get("build_seconds")
        self.notes = (f"transitions within {self.index.header['transition_window']} items and co-occurrences within "
                      f"{self.index.header['cooccurrence_window']} of the training part, top {self.index.header['top_n']} "
                      "per item, decayed over the history; no training")

    def version(self) -> str:
        return f"{self.name}:{self.index.version}"

    def score(self, cases, needs, template, candidate_file, progress=False):
        out = []
        for case in cases:
            feats = self.index.features(list(case.history), list(case.candidates))
            out.append([float(x) for x in feats.score] if feats.score is not None else [0.0] * len(case.candidates))
        return out


class Sequential(Method):
    family = "interaction"
    history_only = True

    def __init__(self, scorer, name: str = "SASRec (plain torch)"):
        self.name = name
        self.scorer = scorer
        info = scorer.header.get("info", {})
        self.train_seconds = info.get("train_seconds")
        self.notes = (f"the hybrid's sequential signal (instructrec sequential train): {info.get('epochs_run', '?')} "
                      f"epochs, best epoch {info.get('epoch', '?')} on validation, {info.get('threads', '?')} thread(s)")

    def version(self) -> str:
        return f"{self.name}:{self.scorer.version}"

    def score(self, cases, needs, template, candidate_file, progress=False):
        out = []
        for case in cases:
            s = self.scorer.scores(list(case.history), list(case.candidates))
            out.append([float(x) for x in s] if s is not None else [0.0] * len(case.candidates))
        return out


class HybridModel(Method):
    """An instruction model fused with the behaviour and semantic signals by a gate: the LM
    scores are the instruction model's own (read from its units when it ran first), the
    signals are computed from the case's ids and the need's normalised texts as the service
    computes them."""

    family = "instruction"
    reads_need = True

    def __init__(self, data: InteractionData, lm: InstructionModel, hybrid, name: str | None = None):
        self.data, self.lm, self.hybrid = data, lm, hybrid
        self.name = name or f"{lm.name} + hybrid"
        self.max_history = lm.max_history
        self.train_seconds = lm.train_seconds
        info = hybrid.gate.info
        signals = [name for name, part in (("item-to-item counts", hybrid.behaviour), ("the MiniLM bi-encoder",
                   hybrid.semantic), ("the SASRec", hybrid.sequential)) if part is not None]
        self.notes = (f"{lm.name} fused with {', '.join(signals) or 'nothing'} by a gate fitted on "
                      f"{info.get('examples', '?')} validation requests of {info.get('users_fitted', '?')} users")

    # 2: a row fuses the LM's scores of its own needs (1 could fuse those of another scenario
    # sharing its template: the personalized searches fused the vague intentions' scores)
    REVISION = 2

    def version(self) -> str:
        return f"{self.lm.version()}+{self.hybrid.version}+r{self.REVISION}"

    def templates(self, scenario) -> list[str | None]:
        return self.lm.templates(scenario)

    def relevance(self, scores: Sequence[float]) -> np.ndarray:
        """The calibrated probabilities of one case's scores (:meth:`score`'s: the fused scores
        times the request's temperature, so the order is the fused one)."""
        from instructrec.hybrid.gate import softmax

        return softmax(np.asarray(scores, dtype=np.float64))

    def score(self, cases, needs, template, candidate_file, progress=False):
        from ..hybrid.fit import case_signals

        keys = [(str(candidate_file), c.user_id, source) for c, source in zip(cases, self.lm.sources(needs, template))]
        missing = [i for i, key in enumerate(keys) if key not in self.lm.memo]
        if missing:
            self.lm.score([cases[i] for i in missing], [needs[i] for i in missing], template, candidate_file, progress)
        out = []
        for case, need, key in zip(cases, needs, keys):
            signals = case_signals(self.hybrid, self.data, case, need)
            fused = self.hybrid.fuse_signals(self.lm.memo[key], normalise_need(need), signals)
            out.append([float(x) for x in fused.temperature * fused.scores])
        return out


class Precomputed(Method):
    """Scores written by another process, per candidate file and user (RecBole's, from the history)."""

    family = "interaction"
    history_only = True

    def __init__(self, name: str, scores: Mapping[str, Mapping[str, Sequence[float]]], version: str,
                 train_seconds: float | None = None, notes: str = ""):
        self.name = name
        self.scores = {str(Path(k).resolve()): v for k, v in scores.items()}
        self._version = version
        self.train_seconds = train_seconds
        self.notes = notes

    def version(self) -> str:
        return f"{self.name}:{self._version}"

    def score(self, cases, needs, template, candidate_file, progress=False):
        table = self.scores.get(str(Path(candidate_file).resolve()))
        if table is None:
            raise KeyError(f"{self.name} has no scores for {candidate_file}")
        out = []
        for case in cases:
            s = table.get(case.user_id)
            if s is None or len(s) != len(case.candidates):
                raise KeyError(f"{self.name}: no scores (or the wrong number) for user {case.user_id} in {candidate_file}")
            out.append([float(x) for x in s])
        return out


def timed_score(method: Method, *args, **kw) -> tuple[list[list[float]], float]:
    start = time.perf_counter()
    scores = method.score(*args, **kw)
    return scores, time.perf_counter() - start
