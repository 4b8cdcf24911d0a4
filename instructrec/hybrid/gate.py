"""The learned gate: how much each signal beside the LM counts, for this request.

    fused = z(lm) + w_behaviour(x) * z(behaviour) + w_semantic(x) * z(semantic) + w_sequential(x) * z(sequential)
    relevance = softmax(temperature * fused) over the request's candidates

Every signal is z-scored within the request (scales differ: log-likelihoods, weighted
counts, cosines). The weights are linear in a few request features ``x`` (:data:`FEATURES`):
what the need carries (history, an explicit preference, a vague or a specific intention),
how long the history is, the share of candidates the behaviour index knows and the LM's
margin between its first two candidates and how many candidates there are (ten sampled ones
rank differently from a hundred that retrieval proposed). Why the mix must depend on the request: measured
on Games, vague intentions wanted the semantic signal at weight 4, sequential needs the
counts at 1 and the semantic signal at 0.25-1.

A signal a request lacks (no history the index knows, no text) is left out of the sum, so
the request ranks exactly as its remaining signals would. The gate is fitted with a
listwise loss (softmax cross-entropy of the true item among its candidates) on validation
cases; the temperature is fitted with it, so ``relevance`` is a probability of being the
item the user takes among these candidates (its calibration error is measured on test).
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
FORMAT_VERSION = 1
SIGNALS = ("behaviour", "semantic", "sequential")
FEATURES = ("bias", "history", "preference", "vague", "specific", "log_history", "known", "lm_margin", "log_candidates")


class GateError(ValueError):
    """A gate file cannot be read or does not fit; the message names the file."""


def request_features(need: UserNeed, known: float, lm_z: np.ndarray) -> np.ndarray:
    """The gate's inputs for one request, in the order of :data:`FEATURES`."""
    top = np.sort(lm_z)[::-1]
    margin = float(top[0] - top[1]) if top.size > 1 else 0.0
    kind = need.intention_kind if need.intention else None
    return np.array([1.0, float(bool(need.history)), float(bool(need.preference)), float(kind is Intention.VAGUE),
                     float(kind is Intention.SPECIFIC), math.log1p(len(need.history)) / 3.0, known, margin,
                     math.log(max(len(lm_z), 1)) / 5.0])


@dataclass(frozen=True)
class Fused:
    """One request's fused ranking and its parts (the "why" of a ranking)."""

    scores: np.ndarray  # fused score per candidate
    relevance: np.ndarray  # calibrated probability per candidate (sums to 1 over the request)
    components: dict[str, np.ndarray]  # z-scored signal per candidate, absent signals left out
    weights: dict[str, float]  # the gate's weight of each present signal (lm is 1)


@dataclass
class Gate:
    weights: np.ndarray  # (len(SIGNALS), len(FEATURES))
    temperature: float = 1.0
    info: dict = field(default_factory=dict)  # how it was fitted (data, users, loss, model)

    @classmethod
    def neutral(cls) -> "Gate":
        """Every present signal at weight 1 (what an unfitted hybrid does)."""
        w = np.zeros((len(SIGNALS), len(FEATURES)))
        w[:, 0] = 1.0
        return cls(w, 1.0, {"fitted": False})

    @property
    def version(self) -> str:
        blob = json.dumps({"w": np.round(self.weights, 8).tolist(), "t": round(self.temperature, 8)})
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def signal_weights(self, x: np.ndarray) -> np.ndarray:
        return self.weights @ x

    def fuse(self, lm: Sequence[float], need: UserNeed, *, behaviour: np.ndarray | None = None,
             semantic: np.ndarray | None = None, sequential: np.ndarray | None = None, known: float = 0.0) -> Fused:
        z_lm = zscore(np.asarray(lm, dtype=np.float64))
        w = self.signal_weights(request_features(need, known if behaviour is not None else 0.0, z_lm))
        components = {"lm": z_lm}
        weights = {"lm": 1.0}
        scores = z_lm.copy()
        for name, values, weight in zip(SIGNALS, (behaviour, semantic, sequential), w):
            if values is None:
                continue
            z = zscore(values)
            components[name], weights[name] = z, float(weight)
            scores = scores + weight * z
        return Fused(scores, softmax(self.temperature * scores), components, weights)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "signals": list(SIGNALS), "features": list(FEATURES),
                "weights": self.weights.tolist(), "temperature": self.temperature, "gate_version": self.version,
                "info": self.info}

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
    if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
        raise GateError(f"{path}: not a gate file of format {FORMAT} v{FORMAT_VERSION}")
    if doc.get("signals") != list(SIGNALS) or doc.get("features") != list(FEATURES):
        raise GateError(f"{path}: fitted for signals {doc.get('signals')} and features {doc.get('features')}, this code "
                        f"uses {list(SIGNALS)} and {list(FEATURES)}: refit it with `instructrec gate fit`")
    weights = np.asarray(doc["weights"], dtype=np.float64)
    if weights.shape != (len(SIGNALS), len(FEATURES)) or not np.isfinite(weights).all():
        raise GateError(f"{path}: weights must be a finite {len(SIGNALS)} x {len(FEATURES)} table")
    return Gate(weights, float(doc.get("temperature", 1.0)), doc.get("info", {}))


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


def fit_gate(examples: Sequence[Example], *, l2: float = 1e-3, iterations: int = 200, info: dict | None = None) -> Gate:
    """Weights and temperature minimising the listwise loss (softmax cross-entropy of the true
    item) over ``examples``, with an L2 penalty on the weights (a handful of parameters,
    fitted by L-BFGS in seconds)."""
    import torch

    if not examples:
        raise GateError("no examples to fit the gate on")
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
        x[i] = torch.from_numpy(request_features(e.need, e.known if e.behaviour is not None else 0.0, z_lm))
    target = torch.tensor([e.positive for e in examples])
    w = torch.zeros(len(SIGNALS), len(FEATURES), dtype=torch.float64)
    w[:, 0] = 1.0
    w.requires_grad_(True)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, log_t], max_iter=iterations, line_search_fn="strong_wolfe")

    def loss_fn():
        sw = (x @ w.T) * present  # (n, signals)
        fused = z[:, 0] + (sw.unsqueeze(-1) * z[:, 1:]).sum(1)
        logits = (log_t.exp() * fused).masked_fill(~valid, float("-inf"))
        return torch.nn.functional.cross_entropy(logits, target) + l2 * (w[:, 1:] ** 2).sum()

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        loss = float(loss_fn())
    return Gate(w.detach().numpy().copy(), float(log_t.detach().exp()), {**(info or {}), "fitted": True, "examples": n,
                                                                "loss": round(loss, 5), "l2": l2})
