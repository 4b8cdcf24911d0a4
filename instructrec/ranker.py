"""Likelihood ranking: score each candidate by log P(candidate title | instruction).

This is the paper's inference (Section 2.3): the candidates are fed to the decoder
and ranked by their likelihood, so the model never generates an item outside the
candidate set. The fast path runs the encoder once per instruction; one decoder step
from the start token, shared by all of its candidates, fills the cross-attention
keys/values and scores every candidate's first token; the rest of each candidate runs
in length buckets chosen to waste little padding, reading the shared keys/values as
views (no copy), and the vocabulary projection runs only at real target positions, in
blocks (of the vocabulary on CPU, of rows elsewhere). ``naive=True`` runs one full forward per candidate: the reference the
fast path must equal.

What differs between model kinds (encoder-decoder, prefix-LM, decoder-only) lives in one
backend class per kind (:mod:`instructrec.backends`), chosen once from the loaded model; the
ranker keeps what they share: tokenising, length buckets, passes of mixed requests, the head.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from .backends import Backend, backend_class
from .backends.base import Head
from .instruction import source_token_ids
from .lanes import LanePool, alone
from .modeling import LoadedModel

REDUCTIONS = ("mean", "sum")
DEFAULT_TARGET_TOKENS = 48
# What one more decoder pass costs, in padded target tokens: the fixed per-pass work (Python,
# the cache set-up) and smaller, slower matmuls. Swept on 2 cores (8 to 64): 16 to 32 were
# fastest at 10 and 100 candidates, within the noise of each other.
PASS_COST_TOKENS = 32
# Rows of vocabulary logits computed at a time: 256 x 30k float32 logits are 31 MB, where all
# 1,000 target tokens of a 100-candidate request at once were 120 MB of fresh pages; on 2 cores
# 256 rows gave the fastest head matmul (100 GFLOP/s, 84 with 128 rows, 92 with 512).
HEAD_BLOCK_ROWS = 256
# With the vocabulary head's last linear layer at hand (CPU, float weights), log p(label) is
# computed over column blocks of the vocabulary instead (label logit by a gather, logsumexp
# per block, then combined): 1,000 rows x 2,048 columns stay in cache. On 2 cores this ran the
# head at 122 GFLOP/s against 74 for full rows plus log_softmax.
VOCAB_BLOCK_ROWS, VOCAB_BLOCK_COLUMNS = 1024, 2048
# A model whose vocabulary head the ranker cannot run apart from the model (a decoder-only model,
# a seq2seq architecture without a split in `decoder_parts`) returns float logits at every padded
# position of a pass: such passes hold at most this many bytes of them, and each pass is reduced
# to its targets' log-probs before the next runs (a pass peaks at two to three times this: its
# logits, those at real positions, a block of their float32 log-softmax; 146-172 MB measured). mT5's 250k vocabulary takes
# 1 MB a token: with the logits of all 1,185 target tokens of 200 candidates kept for one reduction
# at the end, scoring peaked at 2.3 GB.
LOGITS_PASS_BYTES = 64 * 2**20
# Profiler range around the blocked vocabulary work, so `instructrec bench ranker` can tell it
# from the decoder's own matmuls (costs about a microsecond when nothing profiles).
HEAD_PROFILE_LABEL = "instructrec: vocabulary head"
# A decoder pass whose rows belong to several requests gives each row its own copy of its
# request's cross-attention keys/values (every decoder layer, the whole instruction): 63 MB a
# row for Flan-T5-XL at 320 instruction tokens in bf16. Such a pass mixes requests only while
# those copies stay within this many bytes; beyond it the rows go in per-request passes that
# share the keys/values as views. Peak memory of a pass: its batch_tokens activations plus this.
MIXED_KV_BYTES = 256 * 2**20
GATHER_PROFILE_LABEL = "instructrec: per-row gather"  # profiler range around those copies


def token_limits(meta: dict) -> tuple[int | None, int]:
    """(max_source_tokens, max_target_tokens) a checkpoint was tuned with (from its
    ``instructrec.json``); ``None`` source means the model's own position limit."""
    preset = meta.get("preset") or {}
    return preset.get("max_source_tokens"), preset.get("max_target_tokens") or DEFAULT_TARGET_TOKENS


@dataclass(frozen=True)
class Ranked:
    index: int  # position of the candidate in the request
    text: str
    score: float


@dataclass(frozen=True)
class Scored:
    scores: list[float]
    source_tokens: int  # instruction tokens actually used
    source_truncated: int  # instruction tokens cut (0 when it fit)
    target_tokens: int  # candidate tokens scored, over all candidates
    targets_truncated: int  # candidates whose text was cut to max_target_tokens


def eos_id(tokenizer, model=None) -> int:
    for source in (getattr(getattr(model, "config", None), "eos_token_id", None), tokenizer.eos_token_id,
                   tokenizer.sep_token_id):
        if isinstance(source, int):
            return source
    raise ValueError("the tokenizer has no end-of-sequence token")


def decoder_start_id(model) -> int:
    """The token a seq2seq decoder starts from (BERT2BERT keeps it in its decoder config)."""
    start = model.config.decoder_start_token_id
    if start is None:
        start = getattr(getattr(model.config, "decoder", None), "decoder_start_token_id", None)
    if start is None:
        raise ValueError("model config has no decoder_start_token_id")
    return start


def target_ids(tokenizer, text: str, max_tokens: int, eos: int) -> tuple[list[int], bool]:
    """Token ids a model is trained to emit for ``text``: its tokens then end-of-sequence.

    Training and ranking both use this, so a candidate is scored exactly as targets were
    learned. Returns the ids and whether the text was cut.
    """
    return targets_ids(tokenizer, [text], max_tokens, eos)[0]


def targets_ids(tokenizer, texts: Sequence[str], max_tokens: int, eos: int) -> list[tuple[list[int], bool]]:
    """:func:`target_ids` of many texts in one tokenizer call (one call per text costs
    several times more on short titles)."""
    if not texts:
        return []
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        out.append((ids[: max_tokens - 1] + [eos], len(ids) > max_tokens - 1))
    return out


@dataclass(frozen=True)
class Encoded:
    """One instruction and its candidates as the token ids the model consumes, already cut
    to the ranker's limits (:meth:`Ranker.encode`). ``score_many`` takes it in place of
    text, so a caller that tokenised once (the service's preparation thread) is not made
    to tokenise again where the model runs."""

    source: list[int]
    source_cut: int  # instruction tokens cut
    targets: list[list[int]]  # per candidate, ending with end-of-sequence
    targets_cut: int  # candidates whose text was cut


def rank_order(scores: Sequence[float]) -> list[int]:
    """Indices by descending score; equal scores keep request order (deterministic ties)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


class Ranker:
    """Scores candidates for an instruction with a loaded model, through its kind's backend."""

    def __init__(self, loaded: LoadedModel, *, max_source_tokens: int | None = None, max_target_tokens: int | None = None,
                 batch_tokens: int = 4096, reduction: str = "mean", share_cross_kv: bool = True,
                 mixed_kv_bytes: int = MIXED_KV_BYTES, batch_invariant: bool = True):
        """Token limits not given are the ones the checkpoint was tuned with (:func:`token_limits`
        of its metadata), so every caller scores a checkpoint the way it was trained."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")
        tuned_source, tuned_target = token_limits(loaded.meta or {})
        max_source_tokens = max_source_tokens or tuned_source
        max_target_tokens = max_target_tokens or tuned_target
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        # Several threads may score with one ranker (the service's lanes): its own Rust tokenizer
        # is not thread-safe, so text is tokenised under this lock, and the pad id is read once.
        self._tokenizer_lock = threading.Lock()
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.device = loaded.device
        backend = backend_class(loaded.kind)
        limit = _position_limit(self.model)
        if backend.shares_positions:
            limit -= max_target_tokens  # the instruction and the candidate share the positions
        self.max_source_tokens = min(max_source_tokens or limit, limit)  # instruction tokens actually kept
        self.max_target_tokens = max_target_tokens
        self.batch_tokens = batch_tokens
        self.reduction = reduction
        # False recomputes cross-attention K/V for every candidate row (the benchmark's baseline)
        self.share_cross_kv = share_cross_kv
        if mixed_kv_bytes < 0:
            raise ValueError(f"mixed_kv_bytes must be >= 0, not {mixed_kv_bytes}")
        self.mixed_kv_bytes = mixed_kv_bytes  # per-row key/value copies a mixed-request pass may make
        # True: each request of a score_many call runs in forward passes of its own, so its
        # scores are bit for bit those of scoring it alone, whatever it is batched with
        self.batch_invariant = batch_invariant
        self.eos = eos_id(self.tokenizer, self.model)
        self.backend: Backend = backend(self)  # the generator steps through the same one
        # idle lanes that may compute some of a request's passes and head blocks (the service's);
        # None: all on the calling thread. Either way the same parts give the same bits.
        self.pool: LanePool | None = None

    def map_parts(self, fn, items):
        """``[fn(x) for x in items]``: independent parts of one request, on idle lanes too when
        the ranker has a pool (:mod:`instructrec.lanes`)."""
        return alone(fn, items) if self.pool is None else self.pool.map(fn, items)

    @property
    def kind(self) -> str:
        """The loaded model's kind (``LoadedModel.kind``), the key its backend was chosen by."""
        return self.backend.kind

    # -- public API -----------------------------------------------------------------
    def rank(self, source: str, candidates: Sequence[str], top_n: int | None = None, **kw) -> list[Ranked]:
        scores = self.score(source, candidates, **kw).scores
        order = rank_order(scores)[: top_n if top_n is not None else None]
        return [Ranked(i, candidates[i], scores[i]) for i in order]

    @torch.inference_mode()
    def score(self, source: str, candidates: Sequence[str], *, reduction: str | None = None,
              naive: bool = False) -> Scored:
        return self.score_many([(source, candidates)], reduction=reduction, naive=naive)[0]

    @torch.inference_mode()
    def score_many(self, requests: Sequence[tuple[str, Sequence[str]] | Encoded], *, reduction: str | None = None,
                   naive: bool = False) -> list[Scored]:
        """Score several instructions' candidates (each as ``(source, candidates)`` or
        :class:`Encoded`).

        With ``batch_invariant`` (the default) every request runs in passes of its own: a
        request's scores are then bit for bit those of scoring it alone, in any precision. Matmul
        kernels pick their blocking by the shapes they get, so rows of one request inside a
        bigger pass are summed in another order; in bfloat16 that moved scores by up to 0.02 and
        reordered near-ties (measured on MiniLM; float32 moved them by 4e-6).

        Without it, requests share forward passes (worth it on GPUs): all instructions go
        through the encoder as one padded batch; candidates of every request are bucketed by
        length together, so small requests fill one decoder pass. A bucket whose rows all belong
        to one request shares that request's cross-attention keys/values without copying them; a
        mixed bucket gathers them per row while those copies fit ``mixed_kv_bytes``, else it is
        split into per-request passes.
        """
        reduction = reduction or self.reduction
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")
        if not requests:
            return []
        encoded = [r if isinstance(r, Encoded) else self.encode(*r) for r in requests]
        if any(not e.targets for e in encoded):
            raise ValueError("no candidates to score")
        if self.batch_invariant or naive:
            sums = [self.backend.sums([e.source], [e.targets], naive)[0] for e in encoded]
        else:
            sums = self.backend.sums([e.source for e in encoded], [e.targets for e in encoded], naive)
        out = []
        for e, req_sums in zip(encoded, sums):
            scores = [x / len(t) if reduction == "mean" else x for x, t in zip(req_sums, e.targets)]
            out.append(Scored(scores, len(e.source), e.source_cut, sum(len(t) for t in e.targets), e.targets_cut))
        return out

    def encode(self, source: str, candidates: Sequence[str], *, tokenizer=None) -> Encoded:
        """Tokenise an instruction and its candidates within this ranker's limits. ``tokenizer``
        replaces the ranker's own (a copy for another thread: Rust tokenizers are not
        thread-safe)."""
        if not candidates:
            raise ValueError("no candidates to score")
        tok = tokenizer or self.tokenizer
        with self._tokenising(tokenizer):
            src, src_cut = self.source_ids(source, tokenizer=tok)
            tgts = targets_ids(tok, candidates, self.max_target_tokens, self.eos)
        return Encoded(src, src_cut, [t for t, _ in tgts], sum(cut for _, cut in tgts))

    # -- shared pieces --------------------------------------------------------------
    def source_ids(self, source: str, *, tokenizer=None) -> tuple[list[int], int]:
        """The instruction's token ids within ``max_source_tokens``, and how many were cut: cut as
        training cuts it (:func:`instructrec.instruction.source_token_ids`, which keeps the end).
        The caller should already have fitted the history (:func:`instructrec.instruction.fit`)."""
        with self._tokenising(tokenizer):
            return source_token_ids(tokenizer or self.tokenizer, [source], self.max_source_tokens)[0]

    def _tokenising(self, tokenizer):
        """The lock on the ranker's own tokenizer (``tokenizer`` None), else nothing: a caller's
        copy is that caller's."""
        return self._tokenizer_lock if tokenizer is None else contextlib.nullcontext()

    def chunks(self, ids: list[list[int]], batch_tokens: int | None = None, multiple: int = 1) -> list[list[int]]:
        """Indices grouped into decoder passes of similar length, each within the token budget
        (``batch_tokens``, default the ranker's); ``multiple``: passes are padded to widths that
        are multiples of it, so lengths are rounded up to it first.

        Rows sorted by length are cut where padding would cost more than another pass: a
        dynamic programme over the distinct lengths minimises padded tokens plus
        ``PASS_COST_TOKENS`` per pass (one bucket of 100 titles from 3 to 22 tokens would
        pad 970 real tokens to 2,200).
        """
        budget = batch_tokens or self.batch_tokens

        def width(i: int) -> int:
            return -(-len(ids[i]) // multiple) * multiple

        order = sorted(range(len(ids)), key=lambda i: (width(i), i))
        if not order:
            return []
        widths = sorted({width(i) for i in order})
        counts = [0] * len(widths)
        position = {w: k for k, w in enumerate(widths)}
        for i in order:
            counts[position[width(i)]] += 1

        def passes(rows: int, width: int) -> int:
            per_pass = max(1, budget // width)
            return -(-rows // per_pass)

        # best[k]: least cost of the rows of the k shortest widths; cut[k]: where its last group starts
        best, cut = [0.0] + [float("inf")] * len(widths), [0] * (len(widths) + 1)
        for k in range(1, len(widths) + 1):
            rows = 0
            for j in range(k - 1, -1, -1):  # the last group holds widths j .. k-1, padded to widths[k-1]
                rows += counts[j]
                cost = best[j] + rows * widths[k - 1] + PASS_COST_TOKENS * passes(rows, widths[k - 1])
                if cost < best[k]:
                    best[k], cut[k] = cost, j
        bounds, k = [], len(widths)
        while k:
            bounds.append((cut[k], k))
            k = cut[k]
        chunks, start = [], 0
        for j, k in reversed(bounds):
            rows = sum(counts[j:k])
            group = order[start : start + rows]
            start += rows
            per_pass = max(1, budget // widths[k - 1])
            n = passes(rows, widths[k - 1])  # equal shares rather than full passes and a small rest
            size = -(-rows // n)
            assert size <= per_pass
            chunks.extend(group[a : a + size] for a in range(0, rows, size))
        return chunks

    def pad_rows(self, rows: list[list[int]], multiple: int = 1) -> torch.Tensor:
        """Token rows right-padded to one width (rounded up to ``multiple``), on the model's device:
        how every pass of the ranker and the generator is shaped, so both run the same kernels."""
        width = -(-max(len(r) for r in rows) // multiple) * multiple
        pad = self.pad_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)

    @staticmethod
    def _token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(label) at each row. A fused ``log_softmax`` then a gather: on CPU it ran twice as
        fast as the label's logit minus ``logsumexp``, whose several passes each write a copy."""
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def real_positions(hidden: torch.Tensor, labels: torch.Tensor, lengths: list[int]):
        """(hidden states, labels, row of each) at the real (unpadded) target positions of a pass."""
        width = labels.shape[1]
        mask = torch.arange(width, device=labels.device)[None, :] < torch.tensor(lengths, device=labels.device)[:, None]
        rows = torch.arange(len(lengths), device=labels.device)[:, None].expand(-1, width)[mask]
        return hidden[mask], labels[mask], rows

    def head_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, head) -> torch.Tensor:
        """log p(label) for each row of ``hidden``: by vocabulary blocks where the head's last
        layer is a float ``nn.Linear`` on CPU, else the head applied ``HEAD_BLOCK_ROWS`` rows at
        a time. Either way never more than one block of logits is in memory."""
        if isinstance(head, Head) and type(head.final) is torch.nn.Linear and hidden.device.type == "cpu":
            return torch.cat([_blocked_logprobs(head, hidden[a : a + VOCAB_BLOCK_ROWS], labels[a : a + VOCAB_BLOCK_ROWS],
                                                self.map_parts)
                              for a in range(0, hidden.shape[0], VOCAB_BLOCK_ROWS)])
        return torch.cat([self._token_logprobs(head(hidden[a : a + HEAD_BLOCK_ROWS]), labels[a : a + HEAD_BLOCK_ROWS])
                          for a in range(0, hidden.shape[0], HEAD_BLOCK_ROWS)])

    def logits_pass_tokens(self) -> int:
        """Padded target tokens a pass may hold when the model returns full logits (``LOGITS_PASS_BYTES``)."""
        return max(1, min(self.batch_tokens, LOGITS_PASS_BYTES // (4 * _vocab_size(self.model))))

    def start_id(self) -> int:
        """The first input token of a candidate (a seq2seq decoder's, a prefix-LM's)."""
        return decoder_start_id(self.model)

    def with_start(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs of padded target rows: the start token, then each target but its last token."""
        return torch.cat([torch.full((labels.shape[0], 1), self.start_id(), device=self.device), labels[:, :-1]], dim=1)

    def bucketed(self, targets: list[list[int]], owners: list[int], row_bytes: int, skip: int, run, head) -> list[float]:
        """Summed log-probs of ``targets`` (rows of the requests ``owners``), ``skip`` leading
        tokens already scored: rows go in length buckets (split where mixed requests' key/value
        copies of ``row_bytes`` a row would pass the allowance); ``run(rows, pick, labels)`` gives a
        pass's hidden states; the hidden states at real positions of every pass are collected so
        the head runs on full blocks at the end. A ``head`` that is no :class:`Head` means ``run``
        gives the model's full logits: then passes stay within ``LOGITS_PASS_BYTES`` and each is
        reduced to log-probs at once (every candidate token's logits together do not fit: 7.5 GB at
        1,000 candidates for mT5's vocabulary)."""
        full_logits = not isinstance(head, Head)
        budget = self.logits_pass_tokens() if full_logits else self.batch_tokens
        shapes = self.backend.pass_shapes()
        passes = [part for chunk in self.chunks([t[skip:] for t in targets], budget, shapes.width)
                  for part in self.split_mixed(chunk, owners, row_bytes)]

        def one_pass(chunk: list[int]):
            rows = [targets[i] for i in chunk]
            filler = shapes.padded_rows(len(rows)) - len(rows)  # rows of padding only, read by nobody
            labels = self.pad_rows([t[skip:] for t in rows] + [[]] * filler, shapes.width)
            hidden = run(rows, self._picker([owners[i] for i in chunk] + [owners[chunk[0]]] * filler), labels)
            h, lab, row = self.real_positions(hidden, labels, [len(t) - skip for t in rows] + [0] * filler)
            del hidden  # a pass's logits, when full_logits: freed before they are reduced
            return (self.head_logprobs(h, lab, head) if full_logits else h), lab, torch.tensor(chunk, device=self.device)[row]

        done = self.map_parts(one_pass, passes)
        if not done:
            return []
        states, labels_at, rows_at = (list(x) for x in zip(*done))
        if full_logits:
            lp = torch.cat(states)
        else:
            hidden, labels = torch.cat(states), torch.cat(labels_at)
            real = hidden.shape[0]
            filler = -real % shapes.head_rows  # zero rows, so the head's matmuls take few shapes
            if filler:
                hidden = torch.cat([hidden, hidden.new_zeros(filler, hidden.shape[1])])
                labels = torch.cat([labels, labels.new_zeros(filler)])
            lp = self.head_logprobs(hidden, labels, head)[:real]
        return torch.zeros(len(targets), device=self.device).index_add_(0, torch.cat(rows_at), lp).tolist()

    def split_mixed(self, chunk: list[int], owners: list[int], row_bytes: int) -> list[list[int]]:
        """``chunk`` as passes whose per-row copies of keys/values (``row_bytes`` a row) stay within
        ``mixed_kv_bytes``: a request's rows are kept together, a pass holds either one request's rows
        (shared as views, no copy, however many) or several requests' rows within the allowance."""
        if not row_bytes or len({owners[i] for i in chunk}) == 1 or len(chunk) * row_bytes <= self.mixed_kv_bytes:
            return [chunk]
        by_owner: dict[int, list[int]] = {}
        for i in chunk:
            by_owner.setdefault(owners[i], []).append(i)
        parts, current = [], []
        for rows in by_owner.values():
            if current and (len(current) + len(rows)) * row_bytes > self.mixed_kv_bytes:
                parts.append(current)
                current = []
            current = current + rows
        parts.append(current)
        return parts

    def warm_instruction_lengths(self) -> list[int]:
        """Score a small request at each instruction length the backend names (a prefix-LM's
        padded lengths), so the kernels of every length exist before the first real request (a
        new length otherwise costs its first request about 10 ms here). Returns the lengths.
        A length past ``max_source_tokens`` (the last bucket of a limit that is no multiple of
        it) is warmed with the longest instruction kept, which pads to it: more real tokens would
        leave the candidate no positions."""
        lengths = self.backend.warm_instruction_lengths()
        for n in lengths:
            self.score_many([Encoded([self.eos] * min(n, self.max_source_tokens), 0, [[self.eos, self.eos]] * 2, 0)])
        return lengths

    def kv_row_bytes(self, source_tokens: int) -> int:
        """Bytes one row of a mixed-request pass copies (every layer's cross-attention keys/values,
        the encoder states and mask; a prefix-LM's per-layer instruction keys/values) for an
        instruction of ``source_tokens``, measured on the model (0 where rows copy nothing)."""
        return self.backend.kv_row_bytes(source_tokens)

    def _picker(self, owners: list[int]) -> "_Pick":
        return _Pick(owners, self.device)


class _Pick:
    """Selects each row's own per-request tensor (encoder states, K/V, mask). Rows of one
    request share it as a view (``expand``, no copy; ``shared`` is then that request); rows of
    several requests gather theirs."""

    def __init__(self, owners: list[int], device):
        self.rows = len(owners)
        self.shared = owners[0] if len(set(owners)) == 1 else None
        self._index = None if self.shared is not None else torch.tensor(owners, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            r = self.shared
            return x[r : r + 1].expand(self.rows, *x.shape[1:])
        with torch.profiler.record_function(GATHER_PROFILE_LABEL):
            return x.index_select(0, self._index)


def _blocked_logprobs(head: Head, hidden: torch.Tensor, labels: torch.Tensor, map_parts=alone) -> torch.Tensor:
    """log p(label) = label logit - logsumexp over the vocabulary, the logsumexp taken per block
    of ``VOCAB_BLOCK_COLUMNS`` (independent parts: ``map_parts`` may hand them to idle lanes) and
    combined in the vocabulary's order, the label logit from the label's weight row."""
    x = head.pre(hidden)
    weight, bias = head.final.weight, head.final.bias
    with torch.profiler.record_function(HEAD_PROFILE_LABEL):
        picked = (x.float() * weight[labels].float()).sum(-1)  # float32 like the log-softmax below
        if bias is not None:
            picked = picked + bias[labels].float()
        # out= has no grad, and autocast (training's bf16) does not cast for it: the buffers are for
        # inference in the model's own dtype
        reuse = x.dtype == weight.dtype and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))

        def block(a: int) -> torch.Tensor:
            w = weight[a : a + VOCAB_BLOCK_COLUMNS].t()
            b = None if bias is None else bias[a : a + VOCAB_BLOCK_COLUMNS]
            if not reuse:
                work = (x @ w if b is None else torch.addmm(b, x, w)).float()  # a fresh tensor: worked on in place
            else:
                logits, work = _head_buffers(x.shape[0], w.shape[1], x.dtype, x.device)
                torch.mm(x, w, out=logits) if b is None else torch.addmm(b, x, w, out=logits)
                work = logits if work is None else work.copy_(logits)
            top = work.amax(dim=-1, keepdim=True)
            return work.sub_(top).exp_().sum(dim=-1).log_() + top.squeeze(-1)

        blocks = map_parts(block, range(0, weight.shape[0], VOCAB_BLOCK_COLUMNS))
        return picked.float() - torch.logsumexp(torch.stack(blocks, dim=-1), dim=-1)


_BUFFERS = threading.local()


def _head_buffers(rows: int, columns: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This thread's buffers for one block of logits (and their float32 copy when ``dtype`` is not
    float32), grown as needed and kept: a fresh multi-MB tensor per block is fresh pages for the
    kernel to fault in and zero, which made up two thirds of the head's time in bf16 (1,024 rows:
    65 ms, of which 28 ms copies into new float32 tensors and 12 ms matmuls into new ones). Kept
    per thread (a lane lending a hand has its own) and per inference mode (an inference tensor
    cannot be written outside it)."""
    key = (dtype, str(device), torch.is_inference_mode_enabled())
    kept = getattr(_BUFFERS, "kept", None)
    if kept is None:
        kept = _BUFFERS.kept = {}
    size = rows * columns
    have = kept.get(key)
    if have is None or have[0].numel() < size:
        logits = torch.empty(size, dtype=dtype, device=device)
        have = kept[key] = (logits, None if dtype == torch.float32 else torch.empty(size, dtype=torch.float32, device=device))
    logits = have[0][:size].view(rows, columns)
    return logits, None if have[1] is None else have[1][:size].view(rows, columns)


def _position_limit(model) -> int:
    cfg = model.config
    enc_cfg = getattr(cfg, "encoder", cfg)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(enc_cfg, name, None)
        if isinstance(value, int):
            return value
    return 512  # T5's relative positions have no hard bound; 512 is what it was trained on


def _vocab_size(model) -> int:
    """Entries of the model's vocabulary head (an int8-quantised head has no ``weight`` tensor)."""
    head = model.get_output_embeddings()
    size = getattr(head, "out_features", None)
    if isinstance(size, int):
        return size
    config = model.config
    return getattr(getattr(config, "decoder", config), "vocab_size", None) or config.vocab_size


__all__ = ["Ranker", "Ranked", "Scored", "Encoded", "rank_order", "target_ids", "targets_ids", "eos_id", "token_limits", "REDUCTIONS"]
