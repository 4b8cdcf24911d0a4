"""What every model kind gives the ranker and the generator, and the pieces they share.

A :class:`Backend` knows one model shape: how its instruction is read, how a candidate's tokens
are scored after it (a fast path and the one-forward-per-candidate reference), and how
constrained generation steps one token at a time. The ranker owns the shape-free machinery
(tokenising, length buckets, the vocabulary head in blocks) and hands each backend itself, so a
backend says only what differs between shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Head:
    """A vocabulary head as what runs before its last linear layer (``pre``) and that layer, so
    log-probabilities can be computed a block of the vocabulary at a time."""

    pre: Callable[[torch.Tensor], torch.Tensor]
    final: torch.nn.Module  # hidden -> logits

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.final(self.pre(hidden))


@dataclass(frozen=True)
class PassShapes:
    """How the ranker pads a decoder pass: its width to a multiple of ``width``, its rows to
    :meth:`padded_rows`, the head's rows to a multiple of ``head_rows``. On a CPU every new
    matmul shape costs oneDNN a new kernel (profiled: about 7.5 ms of a new 10-candidate
    request on a Xeon with AMX, where the request's arithmetic takes 4): padded to few shapes,
    requests reuse kernels that earlier ones made. The padding is never read (positions past a
    row's length, rows of padding only, zero head rows), and a request's shapes depend on it
    alone."""

    width: int = 1
    rows: int = 1  # passes of more than 2 rows: to a multiple of this, of twice this past 8 times it
    head_rows: int = 1

    def padded_rows(self, n: int) -> int:
        if n <= 2 or self.rows == 1:
            return n
        step = self.rows if n <= 8 * self.rows else 2 * self.rows
        return -(-n // step) * step


EXACT = PassShapes()  # no padding


def cached(groups) -> list[torch.Tensor]:
    """Every key and value tensor of groups of per-layer (keys, values) pairs."""
    return [t for kv in groups for pair in kv for t in pair]


def row_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes a row's own copy of its request's slice of these per-request tensors takes (encoder
    states, mask, cached keys/values)."""
    return sum(t[:1].numel() * t.element_size() for t in tensors)


def view_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    """A DynamicCache holding the given per-layer keys/values as they are. Filling one the
    documented way (``ddp_cache_data``) concatenates each pair onto an empty tensor, which
    turns an ``expand``-ed view shared by every row into a full copy per decoder pass."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(None, None)] * len(pairs))
    for layer, (keys, values) in zip(cache.layers, pairs):
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return cache


def step_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """A generation step's log-probabilities: float32 on the CPU, where the search reads them."""
    return torch.log_softmax(logits.float(), dim=-1).cpu()


class Steps:
    """``first()`` gives the log-probs [1, vocab] of the first title token; ``advance(parents,
    tokens)`` continues row ``parents[i]`` of the previous step with ``tokens[i]`` and gives the
    new rows' log-probs [rows, vocab] (float32, on the CPU)."""

    count = 0  # decoding steps run

    def first(self) -> torch.Tensor:
        raise NotImplementedError

    def advance(self, parents: list[int], tokens: list[int]) -> torch.Tensor:
        raise NotImplementedError


class CachedSteps(Steps):
    """Steps that feed the start token first and keep each beam's own keys/values per layer
    (``own``), reordered to follow the beams: ``_step(tokens, own)`` runs one position."""

    start: int
    device: torch.device
    own: list | None = None

    def _step(self, tokens: torch.Tensor, own) -> torch.Tensor:
        raise NotImplementedError

    def first(self) -> torch.Tensor:
        return self._step(torch.tensor([[self.start]], device=self.device), None)

    def advance(self, parents: list[int], tokens: list[int]) -> torch.Tensor:
        idx = torch.tensor(parents, device=self.device)
        own = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.own]
        return self._step(torch.tensor(tokens, device=self.device)[:, None], own)


class Backend:
    """One model kind's steps, bound to the ranker that uses them (the generator reaches them
    through that ranker, so both score with the same code)."""

    kind: str  # the LoadedModel.kind this backend runs
    # the instruction and its candidate share the model's positions (one sequence), so the
    # instruction may take only what the longest candidate leaves
    shares_positions = False
    # the decoder reads the instruction through cross-attention (``Ranker.share_cross_kv`` applies)
    cross_attention = False

    def __init__(self, ranker):
        self.ranker = ranker  # an instructrec.ranker.Ranker (not imported: it imports this)
        self.model = ranker.model
        self.device = ranker.device

    def sums(self, srcs: list[list[int]], ids: list[list[list[int]]], naive: bool) -> list[list[float]]:
        """Summed target log-probs per request and candidate, the given requests in shared passes
        (``naive``: one full forward per candidate, the reference)."""
        if naive:
            return [self.naive(s, i) for s, i in zip(srcs, ids)]
        return self.fast(srcs, ids)

    def naive(self, src: list[int], ids: list[list[int]]) -> list[float]:
        """One request's candidates, one full forward each: the reference the fast path must equal."""
        raise NotImplementedError

    def fast(self, srcs: list[list[int]], ids):
        """The requests' candidates in shared passes (the kind's own signature where it differs)."""
        raise NotImplementedError

    @classmethod
    def candidate_states(cls, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, dec: torch.Tensor,
                         owner: torch.Tensor):
        """Training's scoring, with gradients: (hidden states of the candidate rows ``dec``, the
        head that turns them into logits). Row i is the start token then candidate i but its last
        token, and reads instruction ``owner[i]`` of the padded batch ``input_ids``."""
        raise NotImplementedError(f"instruction tuning does not train {cls.kind} models")

    def steps(self, src: list[int]) -> Steps:
        """Constrained generation's one-token steps after the instruction ``src``."""
        raise NotImplementedError

    def shares_passes(self) -> bool:
        """Whether requests scored together share decoder passes whose rows copy their request's
        keys/values (what the service's mixed warm-up prepares)."""
        return False

    def warm_instruction_lengths(self) -> list[int]:
        """Instruction lengths whose kernels are worth creating before the first real request
        (the ranker scores a small request at each)."""
        return []

    def pass_shapes(self) -> PassShapes:
        """How the ranker pads this kind's decoder passes (default: not at all)."""
        return EXACT

    def kv_row_bytes(self, source_tokens: int) -> int:
        """Bytes one row of a mixed-request pass copies for an instruction of ``source_tokens``."""
        return 0

    def encoder(self) -> torch.nn.Module | None:
        """The module that reads the instruction on its own, when the model has one (timed apart)."""
        return None
