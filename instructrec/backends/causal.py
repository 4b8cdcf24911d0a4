"""Decoder-only models (GPT-2 style, GenRec): the instruction is a shared prefix whose
keys/values are computed once, and each candidate continues it."""

from __future__ import annotations

import torch

from instructrec.modeling import CAUSAL

from .base import Backend, Steps, step_logprobs, view_cache


class CausalBackend(Backend):
    kind = CAUSAL
    shares_positions = True

    def sums(self, srcs: list[list[int]], ids: list[list[list[int]]], naive: bool) -> list[list[float]]:
        score = self.naive if naive else self.fast
        return [score(s, i) for s, i in zip(srcs, ids)]

    def naive(self, src: list[int], ids: list[list[int]]) -> list[float]:
        """One forward of instruction + candidate per candidate: the reference."""
        out = []
        for t in ids:
            seq = torch.tensor([src + t], device=self.device)
            logits = self.model(input_ids=seq).logits[0, len(src) - 1 : -1]
            out.append(float(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(t, device=self.device)[:, None]).sum()))
        return out

    def fast(self, src: list[int], ids: list[list[int]]) -> list[float]:
        """The instruction once; its last position scores every candidate's first token; the rest
        of the candidates continue its keys/values in passes of bounded logits."""
        from transformers.cache_utils import DynamicCache

        ranker = self.ranker
        prefix = DynamicCache()
        out = self.model(input_ids=torch.tensor([src], device=self.device), past_key_values=prefix, use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)  # predicts every candidate's first token
        kv = [(layer.keys, layer.values) for layer in prefix.layers]
        sums = [0.0] * len(ids)
        # the model returns logits over the vocabulary at every position: passes within LOGITS_PASS_BYTES
        for chunk in ranker.chunks(ids, ranker.logits_pass_tokens()):
            rows = [ids[i] for i in chunk]
            labels = ranker.pad_rows(rows)
            totals = first[labels[:, 0]]
            if labels.shape[1] > 1:
                tail = self._tail(kv, labels, [len(r) - 1 for r in rows])
                totals = totals + torch.tensor(tail, device=self.device)
            for i, s in zip(chunk, totals.tolist()):
                sums[i] = s
        return sums

    def _tail(self, kv, labels: torch.Tensor, rest: list[int]) -> list[float]:
        """Summed log-probs of each row's tokens after its first, the rows continuing the shared
        instruction ``kv``."""
        ranker = self.ranker
        b = labels.shape[0]
        cache = view_cache([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in kv])
        logits = self.model(input_ids=labels[:, :-1], past_key_values=cache, use_cache=True).logits
        h, lab, rows = ranker.real_positions(logits, labels[:, 1:], rest)
        del logits  # the pass's logits at every position, freed before the log-softmax blocks
        lp = ranker.head_logprobs(h, lab, lambda x: x)
        return torch.zeros(b, device=self.device).index_add_(0, rows, lp).tolist()

    def steps(self, src: list[int]) -> "CausalSteps":
        return CausalSteps(self, src)


class CausalSteps(Steps):
    """Keeps the instruction's keys/values as one row every beam views, and each beam's own after it."""

    def __init__(self, backend: CausalBackend, src: list[int]):
        from transformers.cache_utils import DynamicCache

        self.model = backend.model
        self.device = backend.device
        cache = DynamicCache()
        inp = torch.tensor([src], device=self.device)
        out = self.model(input_ids=inp, attention_mask=torch.ones_like(inp), past_key_values=cache, use_cache=True)
        self.first_logprobs = step_logprobs(out.logits[:, -1])  # the instruction's last position predicts the title
        self.prefix = [(layer.keys, layer.values) for layer in cache.layers]
        self.length = len(src)
        self.own = None

    def first(self) -> torch.Tensor:
        return self.first_logprobs

    def advance(self, parents: list[int], tokens: list[int]) -> torch.Tensor:
        rows = len(tokens)
        idx = torch.tensor(parents, device=self.device)
        pairs = []
        for i, (k, v) in enumerate(self.prefix):
            k, v = k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:])
            if self.own is not None:
                k = torch.cat([k, self.own[i][0].index_select(0, idx)], dim=2)
                v = torch.cat([v, self.own[i][1].index_select(0, idx)], dim=2)
            pairs.append((k, v))
        cache = view_cache(pairs)
        out = self.model(input_ids=torch.tensor(tokens, device=self.device)[:, None], past_key_values=cache,
                         use_cache=True)
        self.own = [(layer.keys[:, :, self.length :], layer.values[:, :, self.length :]) for layer in cache.layers]
        return step_logprobs(out.logits[:, -1])
