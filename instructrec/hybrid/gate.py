"""The learned gate: how much each signal beside the LM counts, for this request.

    fused = (1 + w_lm(x)) * z(lm) + w_behaviour(x) * z(behaviour) + w_semantic(x) * z(semantic)
            + w_sequential(x) * z(sequential)
    relevance = softmax(temperature * fused) over the request's candidates

Every signal is z-scored within the request (scales differ: log-likelihoods, weighted
counts, cosines). The weights are linear in a few request features ``x`` (:data:`FEATURES`):
what the need carries (history, an explicit preference, a vague or a specific intention),
how long the history is, the share of candidates the behaviour index knows and the LM's
margin between its first two candidates, how many candidates there are (ten sampled ones
rank differently from a hundred that retrieval proposed), and how alike the candidates are
to the need (the mean and spread of their raw cosine similarity). Why the mix must depend on
the request: measured on Games, vague intentions wanted the semantic signal at weight 4,
sequential needs the counts at 1 and the semantic signal at 0.25-1; and when a matching
stage already picked candidates that all resemble the history, the LM and the semantic
signal prefer the closest look-alike, which is mostly not the item the user takes, so there
the LM's own weight has to fall too (its weight is 1 plus a gated term).

A signal a request lacks (no history the index knows, no text) is left out of the sum, so
the request ranks exactly as its remaining signals would. The gate is fitted with a
listwise loss (softmax cross-entropy of the true item among its candidates) on validation
cases; then the temperature, log-linear in the same features, so ``relevance`` is a
probability of being the item the user takes among these candidates (its calibration error is
measured on test). A request's temperature scales its fused scores and never reorders them,
so it may also be fitted on cases whose ranking the weights must not learn (the evaluation's
hard negatives: :func:`fit_gate`'s ``calibration``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import files
from ..aspects import Intention, UserNeed
from .behaviour import zscore

FORMAT = "instructrec-gate"
FORMAT_VERSION = 2
SIGNALS = ("behaviour", "semantic", "sequential")
FEATURES = ("bias", "history", "preference", "vague", "specific", "log_history", "known", "lm_margin", "log_candidates",
            "semantic_mean", "semantic_spread")


class GateError(ValueError):
    """A gate file cannot be read or does not fit; the message names the file."""


def request_features(need: UserNeed, known: float, lm_z: np.ndarray, semantic: np.ndarray | None = None) -> np.ndarray:
    """The gate's inputs for one request, in the order of :data:`FEATURES` (``semantic``: the
    candidates' raw cosine similarity to the need, None when that signal is absent)."""
    top = np.sort(lm_z)[::-1]
    margin = float(top[0] - top[1]) if top.size > 1 else 0.0
    kind = need.intention_kind if need.intention else None
    alike = (float(np.mean(semantic)), float(np.std(semantic))) if semantic is not None and len(semantic) else (0.0, 0.0)
    return np.array([1.0, float(bool(need.history)), float(bool(need.preference)), float(kind is Intention.VAGUE),
                     float(kind is Intention.SPECIFIC), math.log1p(len(need.history)) / 3.0, known, margin,
                     math.log(max(len(lm_z), 1)) / 5.0, *alike])


@dataclass(frozen=True)
class Fused:
    """One request's fused ranking and its parts (the "why" of a ranking)."""

    scores: np.ndarray  # fused score per candidate
    relevance: np.ndarray  # calibrated probability per candidate (sums to 1 over the request)
    components: dict[str, np.ndarray]  # z-scored signal per candidate, absent signals left out
    weights: dict[str, float]  # the gate's weight of each present signal, the LM's included
    temperature: float = 1.0  # relevance = softmax(temperature * scores)


@dataclass
class Gate:
    weights: np.ndarray  # (len(SIGNALS), len(FEATURES))
    temperature: float = 1.0
    info: dict = field(default_factory=dict)  # how it was fitted (data, users, loss, model)
    lm_weights: np.ndarray | None = None  # (len(FEATURES),): the LM's weight is 1 + lm_weights @ x; None: 0
    # (len(FEATURES),): a request's temperature is exp(temperature_weights @ x); None: ``temperature``
    temperature_weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.lm_weights is None:
            self.lm_weights = np.zeros(len(FEATURES))

    @classmethod
    def neutral(cls) -> "Gate":
        """Every present signal at weight 1 (what an unfitted hybrid does)."""
        w = np.zeros((len(SIGNALS), len(FEATURES)))
        w[:, 0] = 1.0
        return cls(w, 1.0, {"fitted": False})

    @property
    def version(self) -> str:
        parts = {"w": np.round(self.weights, 8).tolist(), "t": round(self.temperature, 8),
                 "lm": np.round(self.lm_weights, 8).tolist()}
        if self.temperature_weights is not None:
            parts["tw"] = np.round(self.temperature_weights, 8).tolist()
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]

    def temperature_at(self, x: np.ndarray) -> float:
        """The temperature of a request with features ``x``."""
        if self.temperature_weights is None:
            return self.temperature
        return math.exp(float(self.temperature_weights @ x))

    def signal_weights(self, x: np.ndarray) -> np.ndarray:
        return self.weights @ x

    def fuse(self, lm: Sequence[float], need: UserNeed, *, behaviour: np.ndarray | None = None,
             semantic: np.ndarray | None = None, sequential: np.ndarray | None = None, known: float = 0.0) -> Fused:
        z_lm = zscore(np.asarray(lm, dtype=np.float64))
        x = request_features(need, known if behaviour is not None else 0.0, z_lm, semantic)
        w = self.signal_weights(x)
        lm_weight = 1.0 + float(self.lm_weights @ x)
        components = {"lm": z_lm}
        weights = {"lm": lm_weight}
        scores = lm_weight * z_lm
        for name, values, weight in zip(SIGNALS, (behaviour, semantic, sequential), w):
            if values is None:
                continue
            z = zscore(values)
            components[name], weights[name] = z, float(weight)
            scores = scores + weight * z
        t = self.temperature_at(x)
        return Fused(scores, softmax(t * scores), components, weights, t)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "signals": list(SIGNALS), "features": list(FEATURES),
                "weights": self.weights.tolist(), "lm_weights": self.lm_weights.tolist(), "temperature": self.temperature,
                **({} if self.temperature_weights is None else {"temperature_weights": self.temperature_weights.tolist()}),
                "gate_version": self.version, "info": self.info}

    def save(self, path: str | Path) -> Path:
        return files.write_json(path, self.to_json(), indent=1)


def load_gate(path: str | Path) -> Gate:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise GateError(f"{path}: no such gate file (fit one with `instructrec gate fit`)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise GateError(f"{path}: not a readable gate file ({exc})") from None
    if doc.get("format") != FORMAT:
        raise GateError(f"{path}: not a gate file of format {FORMAT}")
    if doc.get("version") != FORMAT_VERSION:
        raise GateError(f"{path}: a gate of format v{doc.get('version')}, this code reads v{FORMAT_VERSION}: "
                        "refit it with `instructrec gate fit`")
    if doc.get("signals") != list(SIGNALS) or doc.get("features") != list(FEATURES):
        raise GateError(f"{path}: fitted for signals {doc.get('signals')} and features {doc.get('features')}, this code "
                        f"uses {list(SIGNALS)} and {list(FEATURES)}: refit it with `instructrec gate fit`")
    weights = np.asarray(doc["weights"], dtype=np.float64)
    if weights.shape != (len(SIGNALS), len(FEATURES)) or not np.isfinite(weights).all():
        raise GateError(f"{path}: weights must be a finite {len(SIGNALS)} x {len(FEATURES)} table")
    lm_weights = np.asarray(doc.get("lm_weights", np.zeros(len(FEATURES))), dtype=np.float64)
    if lm_weights.shape != (len(FEATURES),) or not np.isfinite(lm_weights).all():
        raise GateError(f"{path}: lm_weights must be {len(FEATURES)} finite numbers")
    temperature_weights = doc.get("temperature_weights")
    if temperature_weights is not None:
        temperature_weights = np.asarray(temperature_weights, dtype=np.float64)
        if temperature_weights.shape != (len(FEATURES),) or not np.isfinite(temperature_weights).all():
            raise GateError(f"{path}: temperature_weights must be {len(FEATURES)} finite numbers")
    return Gate(weights, float(doc.get("temperature", 1.0)), doc.get("info", {}), lm_weights, temperature_weights)


def softmax(x: np.ndarray) -> np.ndarray:
    if x.size == 0:
        return x
    e = np.exp(x - x.max())
    return e / e.sum()


def expected_calibration_error(relevance: Sequence[np.ndarray], positives: Sequence[int], bins: int = 10) -> float:
    """ECE of per-candidate probabilities against "is the item the user took": candidates are
    put in ``bins`` equal-width bins by probability, and each bin's gap between its mean
    probability and its share of true items is weighted by its size."""
    probs = np.concatenate([np.asarray(r, dtype=np.float64) for r in relevance]) if relevance else np.zeros(0)
    labels = np.concatenate([np.eye(len(r))[p] for r, p in zip(relevance, positives)]) if relevance else np.zeros(0)
    if probs.size == 0:
        return 0.0
    which = np.minimum((probs * bins).astype(int), bins - 1)
    gap = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            gap += mask.sum() * abs(probs[mask].mean() - labels[mask].mean())
    return float(gap / probs.size)


def reliability(relevance: Sequence[np.ndarray], positives: Sequence[int], bins: int = 10) -> list[dict]:
    """Per probability bin: candidates, mean probability, share of true items (the reliability
    diagram's points)."""
    probs = np.concatenate([np.asarray(r, dtype=np.float64) for r in relevance])
    labels = np.concatenate([np.eye(len(r))[p] for r, p in zip(relevance, positives)])
    which = np.minimum((probs * bins).astype(int), bins - 1)
    return [{"bin": [b / bins, (b + 1) / bins], "candidates": int((which == b).sum()),
             "mean_probability": float(probs[which == b].mean()), "true_share": float(labels[which == b].mean())}
            for b in range(bins) if (which == b).any()]


@dataclass(frozen=True)
class Example:
    """One validation request for fitting: its signals and which candidate the user took."""

    lm: np.ndarray
    need: UserNeed
    behaviour: np.ndarray | None
    semantic: np.ndarray | None
    known: float
    positive: int
    sequential: np.ndarray | None = None

    def signals(self) -> tuple[np.ndarray | None, ...]:
        """The signals in the order of :data:`SIGNALS`."""
        return self.behaviour, self.semantic, self.sequential


def _stacked(examples: Sequence[Example]):
    """Every example's z-scored signals (LM first), which are present, which candidate slots are
    real, the request features and the true item's slot, padded to the longest request."""
    import torch

    n, c = len(examples), max(len(e.lm) for e in examples)
    z = torch.zeros(n, 1 + len(SIGNALS), c, dtype=torch.float64)
    present = torch.zeros(n, len(SIGNALS), dtype=torch.float64)
    valid = torch.zeros(n, c, dtype=torch.bool)
    x = torch.zeros(n, len(FEATURES), dtype=torch.float64)
    for i, e in enumerate(examples):
        k = len(e.lm)
        z_lm = zscore(np.asarray(e.lm, dtype=np.float64))
        z[i, 0, :k] = torch.from_numpy(z_lm)
        for j, values in enumerate(e.signals()):
            if values is not None:
                z[i, 1 + j, :k] = torch.from_numpy(zscore(values))
                present[i, j] = 1.0
        valid[i, :k] = True
        x[i] = torch.from_numpy(request_features(e.need, e.known if e.behaviour is not None else 0.0, z_lm, e.semantic))
    return z, present, valid, x, torch.tensor([e.positive for e in examples])


def _minimise(params: list, loss_fn, iterations: int) -> float:
    import torch

    opt = torch.optim.LBFGS(params, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(loss_fn())


def _fused(z, present, x, w, w_lm):
    """The fused scores of stacked examples (:func:`_stacked`) under weights ``w`` and ``w_lm``."""
    sw = (x @ w.T) * present  # (n, signals)
    return (1 + x @ w_lm).unsqueeze(-1) * z[:, 0] + (sw.unsqueeze(-1) * z[:, 1:]).sum(1)


def fit_gate(examples: Sequence[Example], *, l2: float = 1e-5, iterations: int = 200, info: dict | None = None,
             calibration: Sequence[Example] = ()) -> Gate:
    """Weights minimising the listwise loss (softmax cross-entropy of the true item) over
    ``examples`` with an L2 penalty, then the temperature that calibrates them, log-linear in
    the request features, over ``examples`` and ``calibration`` (a handful of parameters,
    fitted by L-BFGS in seconds). Two steps, because the LM's weight is gated too: fitted
    together, the weights would shrink towards nothing under the penalty while the
    temperature grew to undo it. ``calibration`` cases set only the temperature, which scales
    a request's scores and never reorders them: cases such as the evaluation's hard negatives,
    whose sampling the ranking must not learn, but on which the probabilities should hold."""
    import torch

    if not examples:
        raise GateError("no examples to fit the gate on")
    z, present, valid, x, target = _stacked(examples)
    w = torch.zeros(len(SIGNALS), len(FEATURES), dtype=torch.float64)
    w[:, 0] = 1.0
    w.requires_grad_(True)
    w_lm = torch.zeros(len(FEATURES), dtype=torch.float64, requires_grad=True)

    def penalised():
        logits = _fused(z, present, x, w, w_lm).masked_fill(~valid, float("-inf"))
        return torch.nn.functional.cross_entropy(logits, target) + l2 * ((w[:, 1:] ** 2).sum() + (w_lm[1:] ** 2).sum())

    _minimise([w, w_lm], penalised, iterations)
    if calibration:  # the temperature's cases: the examples and these
        z, present, valid, x, target = _stacked([*examples, *calibration])
    with torch.no_grad():
        fused = _fused(z, present, x, w, w_lm)
    log_t = torch.zeros(len(FEATURES), dtype=torch.float64, requires_grad=True)

    def calibrated():
        logits = ((x @ log_t).exp().unsqueeze(-1) * fused).masked_fill(~valid, float("-inf"))
        return torch.nn.functional.cross_entropy(logits, target)

    loss = _minimise([log_t], calibrated, iterations)
    t = (x @ log_t).detach().exp().numpy()
    return Gate(w.detach().numpy().copy(), 1.0,
                {**(info or {}), "fitted": True, "examples": len(examples), "calibration_examples": len(calibration),
                 "loss": round(loss, 5), "l2": l2,
                 "temperature": {"min": round(float(t.min()), 4), "median": round(float(np.median(t)), 4),
                                 "max": round(float(t.max()), 4)}},
                w_lm.detach().numpy().copy(), log_t.detach().numpy().copy())
