"""The learned sequential signal: SASRec (Kang & McAuley 2018) in plain torch.

Counting neighbours (:mod:`.behaviour`) sees pairs; a self-attentive model over the whole
history sees order and context, and it is what the project's strongest baseline is (RecBole's
SASRec, 0.67-0.68 HR@1 on Games with enough epochs). The same architecture is written here
with torch's own layers so the service runs it without RecBole: item and position embeddings,
``layers`` causal transformer blocks, and a candidate's score is the last position's state
dotted with the candidate's item embedding (the output layer is tied to the input one).
Training is offline (:mod:`instructrec.training.hybrid.sequential`); this module holds the
model, its file format (safetensors + a JSON header naming the items) and request scoring.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .behaviour import Stamped

FORMAT = "instructrec-sequential"
FORMAT_VERSION = 1
WEIGHTS = "sequential.safetensors"
HEADER = "sequential.json"


class SequentialError(ValueError):
    """A sequential model cannot be read; the message names the file."""


@dataclass(frozen=True)
class SASRecConfig:
    items: int  # item ids 1..items; 0 is padding
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    inner: int = 256
    dropout: float = 0.5
    max_length: int = 20


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.items = nn.Embedding(config.items + 1, config.hidden, padding_idx=0)
        self.positions = nn.Embedding(config.max_length, config.hidden)
        self.norm = nn.LayerNorm(config.hidden)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(config.hidden, config.heads, config.inner, config.dropout,
                                           activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        nn.init.normal_(self.items.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def states(self, seqs: torch.Tensor) -> torch.Tensor:
        """Hidden state at every position of right-aligned, left-padded ``seqs`` (B, L <= max_length)."""
        length = seqs.shape[1]
        pos = torch.arange(length, device=seqs.device)
        x = self.dropout(self.norm(self.items(seqs) + self.positions(pos)))
        # True = may not attend: later positions and padding; every position may attend to itself,
        # so no row is all masked (a padded position's output is never read)
        blocked = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seqs.device), diagonal=1)
        blocked = blocked | (seqs == 0).unsqueeze(1)
        blocked = blocked & ~torch.eye(length, dtype=torch.bool, device=seqs.device)
        mask = blocked.repeat_interleave(self.config.heads, dim=0)  # (B * heads, L, L)
        return self.encoder(x, mask=mask)

    def last_state(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.states(seqs)[:, -1]

    def history_state(self, ids: Sequence[int]) -> torch.Tensor:
        """``last_state`` of one history (item rows, oldest first) without padding: the same
        positions as its right-aligned row, attention over its own items only. What padding
        would add is masked anyway, so this is the padded answer at a serving request's cost."""
        ids = list(ids)[-self.config.max_length:]
        n = len(ids)
        pos = torch.arange(self.config.max_length - n, self.config.max_length)
        x = self.norm(self.items(torch.tensor([ids])) + self.positions(pos))
        return self.encoder(x, mask=_causal_mask(n))[0, -1]


@functools.lru_cache(maxsize=64)
def _causal_mask(n: int) -> torch.Tensor:
    """True above the diagonal: a position may not attend to later ones."""
    return torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)


def left_pad(rows: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """Right-aligned rows of at most ``length`` ids (the most recent kept), zeros before."""
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        row = list(row)[-length:]
        if row:
            out[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
    return out


@dataclass(frozen=True)
class SequenceQuery:
    """One request as the sequential model sees it: its history's item rows (the most recent
    ``max_length``, oldest first) and each candidate's row (0: an item the model does not know)."""

    history: tuple[int, ...]
    candidates: tuple[int, ...]


class SequentialScorer(Stamped):
    """A trained SASRec with its item ids: scores a request's candidates from its history.

    A request's scores are its history's state (torch, the one costly part) dotted with each
    candidate's item row, in float64 numpy one row at a time, so a score does not depend on
    which other candidates came with it. The last ``STATES`` histories' states are kept: a
    repeated history (the same user's next request, a cached answer's replay) is scored from
    numpy alone, on any thread, identically to the first time."""

    STATES = 4096

    def __init__(self, model: SASRec, item_ids: list[str], header: dict):
        self.model = model.eval()
        self.item_ids = item_ids
        self.position = {item: i + 1 for i, item in enumerate(item_ids)}  # 0 is padding
        self.header = header
        self._rows: np.ndarray | None = None  # the item table as float64, made at first use
        self._states: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def query(self, history: Sequence[str | None], candidates: Sequence[str | None]) -> SequenceQuery | None:
        """The request's rows, or None when the model knows none of the history or none of the
        candidates (no signal). Dictionary lookups only."""
        hist = [self.position[h] for h in history if h is not None and h in self.position]
        cand = tuple(self.position.get(c, 0) if c is not None else 0 for c in candidates)
        if not hist or not any(cand):
            return None
        return SequenceQuery(tuple(hist[-self.model.config.max_length:]), cand)

    def kept_scores(self, query: SequenceQuery) -> np.ndarray | None:
        """The scores from a kept state (numpy only), or None when the state is not kept."""
        with self._lock:
            state = self._states.get(query.history)
            if state is not None:
                self._states.move_to_end(query.history)
        return None if state is None else self._dot(state, query.candidates)

    def scores_of(self, query: SequenceQuery) -> np.ndarray:
        """The scores, computing (and keeping) the history's state if it is not kept."""
        kept = self.kept_scores(query)
        if kept is not None:
            return kept
        with torch.inference_mode():
            state = self.model.history_state(query.history).double().numpy()
        with self._lock:
            self._states[query.history] = state
            while len(self._states) > self.STATES:
                self._states.popitem(last=False)
        return self._dot(state, query.candidates)

    def scores(self, history: Sequence[str | None], candidates: Sequence[str | None]) -> np.ndarray | None:
        """Score per candidate (unknown candidates get the lowest known score), or None when
        the model knows none of the history or none of the candidates."""
        query = self.query(history, candidates)
        return None if query is None else self.scores_of(query)

    def forget(self) -> None:
        """Drop the kept states and item table: call when the weights changed (training)."""
        with self._lock:
            self._states.clear()
            self._rows = None

    def _dot(self, state: np.ndarray, candidates: tuple[int, ...]) -> np.ndarray:
        if self._rows is None:
            self._rows = self.model.items.weight.detach().double().numpy()
        cand = np.asarray(candidates)
        out = (self._rows[cand] * state).sum(axis=1)  # row by row: independent of the other candidates
        known = cand > 0
        out[~known] = out[known].min()
        return out

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(directory / WEIGHTS))
        (directory / HEADER).write_text(json.dumps({**self.header, "item_ids": self.item_ids}) + "\n")
        return directory


def new_scorer(config: SASRecConfig, item_ids: Sequence[str], info: dict | None = None) -> SequentialScorer:
    from .behaviour import items_digest

    if len(item_ids) != config.items:
        raise SequentialError(f"{len(item_ids)} item ids for a model of {config.items} items")
    header = {"format": FORMAT, "version": FORMAT_VERSION, "config": asdict(config),
              "items_digest": items_digest(item_ids), "info": info or {}}
    scorer = SequentialScorer(SASRec(config), list(item_ids), header)
    stamp(scorer)
    return scorer


def stamp(scorer: SequentialScorer) -> None:
    """Set the scorer's version from its weights (call after training changed them)."""
    h = hashlib.sha256(json.dumps(scorer.header["config"], sort_keys=True).encode())
    for name, tensor in sorted(scorer.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().numpy().tobytes())
    scorer.header["digest"] = h.hexdigest()[:12]
    scorer.forget()


def load_sequential(directory: str | Path) -> SequentialScorer:
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        doc = json.loads((directory / HEADER).read_text())
    except FileNotFoundError:
        raise SequentialError(f"{directory}: no {HEADER} (train one with `instructrec sequential train`)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SequentialError(f"{directory / HEADER}: not readable ({exc})") from None
    if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
        raise SequentialError(f"{directory / HEADER}: not a sequential model of format {FORMAT} v{FORMAT_VERSION}")
    item_ids = doc.pop("item_ids")
    model = SASRec(SASRecConfig(**doc["config"]))
    try:
        model.load_state_dict(load_file(str(directory / WEIGHTS)))
    except (OSError, RuntimeError) as exc:
        raise SequentialError(f"{directory / WEIGHTS}: cannot be loaded ({exc})") from None
    return SequentialScorer(model, item_ids, doc)
