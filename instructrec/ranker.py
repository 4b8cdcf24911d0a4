"""Likelihood ranking: score each candidate by log P(candidate title | instruction).

This is the paper's inference (Section 2.3): the candidates are fed to the decoder
and ranked by their likelihood, so the model never generates an item outside the
candidate set. The fast path runs the encoder once per instruction, computes the
cross-attention keys/values once and shares them across a batch of candidates
(without copying), buckets candidates by length, and evaluates the vocabulary
projection only at real target positions (gather minus logsumexp). ``naive=True``
runs one full forward per candidate: the reference the fast path must equal.

A decoder-only backend (GenRec-style) does the same with the instruction as a shared
prefix whose keys/values are computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .modeling import LoadedModel

REDUCTIONS = ("mean", "sum")
DEFAULT_TARGET_TOKENS = 48


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
    """Scores candidates for an instruction with a loaded model (seq2seq or causal)."""

    def __init__(self, loaded: LoadedModel, *, max_source_tokens: int | None = None, max_target_tokens: int = DEFAULT_TARGET_TOKENS,
                 batch_tokens: int = 4096, reduction: str = "mean", share_cross_kv: bool = True):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.kind = loaded.kind
        limit = _position_limit(self.model)
        if loaded.kind == "causal":
            limit -= max_target_tokens  # the prefix and the candidate share the positions
        self.max_source_tokens = min(max_source_tokens or limit, limit)  # instruction tokens actually kept
        self.max_target_tokens = max_target_tokens
        self.batch_tokens = batch_tokens
        self.reduction = reduction
        # False recomputes cross-attention K/V for every candidate row (the benchmark's baseline)
        self.share_cross_kv = share_cross_kv
        self.eos = eos_id(self.tokenizer, self.model)

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
        :class:`Encoded`); with a seq2seq model they share forward passes.

        All instructions go through the encoder as one padded batch; candidates of every
        request are bucketed by length together, so small requests fill one decoder pass.
        A bucket whose rows all belong to one request shares that request's cross-attention
        keys/values without copying them; a mixed bucket gathers them per row.
        """
        reduction = reduction or self.reduction
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")
        if not requests:
            return []
        encoded = [r if isinstance(r, Encoded) else self.encode(*r) for r in requests]
        if any(not e.targets for e in encoded):
            raise ValueError("no candidates to score")
        srcs = [e.source for e in encoded]
        ids = [e.targets for e in encoded]
        if self.kind == "causal":
            sums = [(self._causal_naive if naive else self._causal_fast)(s, i) for s, i in zip(srcs, ids)]
        elif naive:
            sums = [self._seq2seq_naive(s, i) for s, i in zip(srcs, ids)]
        else:
            sums = self._seq2seq_fast(srcs, ids)
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
        src, src_cut = self.source_ids(source, tokenizer=tok)
        tgts = targets_ids(tok, candidates, self.max_target_tokens, self.eos)
        return Encoded(src, src_cut, [t for t, _ in tgts], sum(cut for _, cut in tgts))

    # -- shared pieces --------------------------------------------------------------
    def source_ids(self, source: str, *, tokenizer=None) -> tuple[list[int], int]:
        """The instruction's token ids within ``max_source_tokens``, and how many were cut."""
        ids = (tokenizer or self.tokenizer)(source)["input_ids"]
        limit = self.max_source_tokens
        if len(ids) <= limit:
            return ids, 0
        # Keep the end: templates put the question last, history first; the caller should
        # already have fitted the history (instructrec.instruction.fit), this is a last resort.
        return ids[:1] + ids[len(ids) - limit + 1 :], len(ids) - limit

    def _chunks(self, ids: list[list[int]]) -> list[list[int]]:
        """Indices grouped by similar length, each group within the token budget."""
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
        chunks, cur, cur_max = [], [], 0
        for i in order:
            new_max = max(cur_max, len(ids[i]))
            if cur and new_max * (len(cur) + 1) > self.batch_tokens:
                chunks.append(cur)
                cur, new_max = [], len(ids[i])
            cur.append(i)
            cur_max = new_max
        if cur:
            chunks.append(cur)
        return chunks

    def _pad(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)

    @staticmethod
    def _token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(label) at each row: the label's logit minus the row's logsumexp (no softmax copy)."""
        logits = logits.float()
        return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    def _sum_by_row(self, hidden: torch.Tensor, labels: torch.Tensor, lengths: list[int], head) -> list[float]:
        """Sum of label log-probs per row, applying the vocabulary head only at real positions."""
        width = labels.shape[1]
        mask = torch.arange(width, device=labels.device)[None, :] < torch.tensor(lengths, device=labels.device)[:, None]
        lp = self._token_logprobs(head(hidden[mask]), labels[mask])
        rows = torch.arange(len(lengths), device=labels.device)[:, None].expand(-1, width)[mask]
        return torch.zeros(len(lengths), device=labels.device).index_add_(0, rows, lp).tolist()

    # -- seq2seq --------------------------------------------------------------------
    def _start_id(self) -> int:
        start = self.model.config.decoder_start_token_id
        if start is None:
            start = getattr(getattr(self.model.config, "decoder", None), "decoder_start_token_id", None)
        if start is None:
            raise ValueError("model config has no decoder_start_token_id")
        return start

    def _seq2seq_naive(self, src: list[int], ids: list[list[int]]) -> list[float]:
        start = self._start_id()
        inp = torch.tensor([src], device=self.device)
        out = []
        for t in ids:
            labels = torch.tensor([t], device=self.device)
            dec = torch.tensor([[start] + t[:-1]], device=self.device)
            logits = self.model(input_ids=inp, attention_mask=torch.ones_like(inp), decoder_input_ids=dec).logits
            out.append(float(torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).sum()))
        return out

    def _seq2seq_fast(self, srcs: list[list[int]], ids: list[list[list[int]]]) -> list[list[float]]:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        model = self.model
        start = self._start_id()
        lengths = torch.tensor([len(s) for s in srcs], device=self.device)
        inp = self._pad(srcs)
        mask = (torch.arange(inp.shape[1], device=self.device)[None, :] < lengths[:, None]).long()
        enc = model.get_encoder()(input_ids=inp, attention_mask=mask).last_hidden_state
        cross = []
        if self.share_cross_kv:
            # One decoder step per instruction fills the cross-attention cache: K/V of every layer.
            probe = EncoderDecoderCache(DynamicCache(), DynamicCache())
            model(encoder_outputs=(enc,), attention_mask=mask, past_key_values=probe, use_cache=True,
                  decoder_input_ids=torch.full((len(srcs), 1), start, device=self.device))
            cross = [(layer.keys, layer.values) for layer in probe.cross_attention_cache.layers]
        body, head = _decoder_parts(model)
        flat = [(r, j) for r, req in enumerate(ids) for j in range(len(req))]
        sums = [[0.0] * len(req) for req in ids]
        for chunk in self._chunks([ids[r][j] for r, j in flat]):
            rows = [ids[flat[i][0]][flat[i][1]] for i in chunk]
            owners = [flat[i][0] for i in chunk]
            b = len(rows)
            if len(set(owners)) == 1:  # one request: share its K/V and encoder states as views
                r = owners[0]
                pick = lambda x: x[r : r + 1].expand(b, *x.shape[1:])  # noqa: E731
            else:  # several requests in one pass: gather each row's own
                index = torch.tensor(owners, device=self.device)
                pick = lambda x: x.index_select(0, index)  # noqa: E731
            labels = self._pad(rows)
            dec = torch.cat([torch.full((b, 1), start, device=self.device), labels[:, :-1]], dim=1)
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache(ddp_cache_data=[(pick(k), pick(v)) for k, v in cross]))
            hidden = body(dec, pick(enc), pick(mask), cache)
            for i, value in zip(chunk, self._sum_by_row(hidden, labels, [len(r) for r in rows], head)):
                r, j = flat[i]
                sums[r][j] = value
        return sums

    # -- decoder-only ---------------------------------------------------------------
    def _causal_naive(self, src: list[int], ids: list[list[int]]) -> list[float]:
        out = []
        for t in ids:
            seq = torch.tensor([src + t], device=self.device)
            logits = self.model(input_ids=seq).logits[0, len(src) - 1 : -1]
            out.append(float(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(t, device=self.device)[:, None]).sum()))
        return out

    def _causal_fast(self, src: list[int], ids: list[list[int]]) -> list[float]:
        from transformers.cache_utils import DynamicCache

        prefix = DynamicCache()
        out = self.model(input_ids=torch.tensor([src], device=self.device), past_key_values=prefix, use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)  # predicts every candidate's first token
        kv = [(layer.keys, layer.values) for layer in prefix.layers]
        sums = [0.0] * len(ids)
        for chunk in self._chunks(ids):
            rows = [ids[i] for i in chunk]
            labels = self._pad(rows)
            totals = first[labels[:, 0]]
            if labels.shape[1] > 1:
                b = len(rows)
                cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in kv])
                logits = self.model(input_ids=labels[:, :-1], past_key_values=cache, use_cache=True).logits
                rest = [len(r) - 1 for r in rows]
                tail = self._sum_by_row(logits, labels[:, 1:], rest, lambda x: x)
                totals = totals + torch.tensor(tail, device=self.device)
            for i, s in zip(chunk, totals.tolist()):
                sums[i] = s
        return sums


def _position_limit(model) -> int:
    cfg = model.config
    enc_cfg = getattr(cfg, "encoder", cfg)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(enc_cfg, name, None)
        if isinstance(value, int):
            return value
    return 512  # T5's relative positions have no hard bound; 512 is what it was trained on


def _decoder_parts(model):
    """(body, head): the decoder stack returning hidden states, and the vocabulary head.

    Splitting them lets the ranker apply the head only at real target positions. Known
    architectures get a split; any other seq2seq model falls back to the full forward
    (identical scores, the head then runs on padding too).
    """
    from transformers import EncoderDecoderModel, T5ForConditionalGeneration

    if isinstance(model, EncoderDecoderModel) and hasattr(model.decoder, "bert") and hasattr(model.decoder, "cls"):
        if getattr(model, "enc_to_dec_proj", None) is not None:
            return _generic_parts(model)

        def body(dec, enc, mask, cache):
            return model.decoder.bert(input_ids=dec, encoder_hidden_states=enc, encoder_attention_mask=mask,
                                      past_key_values=cache, use_cache=True).last_hidden_state

        return body, model.decoder.cls
    if isinstance(model, T5ForConditionalGeneration):
        def body(dec, enc, mask, cache):
            return model.decoder(input_ids=dec, encoder_hidden_states=enc, encoder_attention_mask=mask,
                                 past_key_values=cache, use_cache=True).last_hidden_state

        scale = model.config.d_model ** -0.5 if model.config.tie_word_embeddings else 1.0

        def head(h):
            return model.lm_head(h * scale)

        return body, head
    return _generic_parts(model)


def _generic_parts(model):
    def body(dec, enc, mask, cache):
        return model(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec, past_key_values=cache,
                     use_cache=True).logits

    return body, lambda logits: logits


__all__ = ["Ranker", "Ranked", "Scored", "Encoded", "rank_order", "target_ids", "targets_ids", "eos_id", "token_limits", "REDUCTIONS"]
