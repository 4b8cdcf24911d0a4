"""The prefix-LM (one BERT reads the instruction bidirectionally and decodes each candidate after
it, :mod:`instructrec.prefixlm`): the instruction's keys/values are computed once per request and
every candidate row reads them."""

from __future__ import annotations

import torch

from instructrec import prefixlm
from instructrec.modeling import PREFIX_LM

from .base import EXACT, Backend, CachedSteps, Head, PassShapes, cached, row_bytes, step_logprobs

# A prefix-LM reads an instruction padded to a multiple of this many tokens (padding masked):
# every new length meant new kernels for oneDNN and attention to create (148 matmul primitives
# for one new 10-candidate request), while a few lengths can be warmed up at start-up. On 30 new
# Games requests: 52-59 ms the first time without it, 46-47 ms with it and the warm-up.
SOURCE_BUCKET = 16
# On a CPU its candidate passes are padded too (:class:`PassShapes`): widths to multiples of 8
# tokens, rows to multiples of 4 (of 8 past 32), the head's rows to multiples of 64; and the
# candidates read the instruction's keys/values at its padded length (the padding masked,
# :func:`instructrec.prefixlm.attend_after_prefix`). Measured on the shipped model (Intel Xeon
# with AMX, bf16, one thread, a training run on the other core), the median of 50 new
# 10-candidate Games requests after 10 others: 55-66 ms before (three runs), 43-56 ms with the
# instruction read padded (four), 40-47 ms with the passes padded too (three of them alternated
# with three of the former, 43-56); the same requests again took 46-49 ms in each way.
CPU_PASS_SHAPES = PassShapes(width=8, rows=4, head_rows=64)


class PrefixLMBackend(Backend):
    kind = PREFIX_LM
    shares_positions = True

    def naive(self, src: list[int], ids: list[list[int]]) -> list[float]:
        """One pass of the HF model per candidate with the prefix-LM mask: the reference."""
        head = prefix_head(self.model)
        start, out = self.ranker.start_id(), []
        for t in ids:
            hidden = prefixlm.full_forward(self.model.bert, src, [start] + t[:-1])
            logits = head(hidden)
            out.append(float(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(t, device=self.device)[:, None]).sum()))
        return out

    def fast(self, srcs: list[list[int]], ids: list[list[list[int]]]) -> list[list[float]]:
        """All instructions in one padded pass that keeps every layer's keys/values; then the
        candidates of all of them in length buckets, each row reading its instruction's
        keys/values (views when a bucket holds one request's rows), the head only at real
        positions and once over all buckets."""
        ranker, bert = self.ranker, self.model.bert
        lengths = torch.tensor([len(s) for s in srcs], device=self.device)
        kv = self._read(srcs, lengths)
        flat = [(r, j) for r, req in enumerate(ids) for j in range(len(req))]

        def run(rows, pick, labels):
            return prefixlm.decode_candidates(bert, kv, lengths, ranker.with_start(labels), pick, shared=pick.shared)

        totals = ranker.bucketed([ids[r][j] for r, j in flat], [r for r, _ in flat],
                                 row_bytes(cached([kv])), 0, run, prefix_head(self.model))
        sums = [[0.0] * len(req) for req in ids]
        for (r, j), value in zip(flat, totals):
            sums[r][j] = value
        return sums

    def _read(self, srcs: list[list[int]], lengths: torch.Tensor):
        """Every layer's keys/values of the instructions, read padded to ``SOURCE_BUCKET`` multiples
        (padding masked): the ranker and the generator read an instruction the same way. On a CPU
        in position parts that idle lanes may share (always, lanes or not, so that the parts and
        their bits never depend on the lanes); a GPU reads it whole."""
        inp = self.ranker.pad_rows(srcs, SOURCE_BUCKET)
        mask = (torch.arange(inp.shape[1], device=self.device)[None, :] < lengths[:, None]).long()
        parts = self.ranker.map_parts if torch.device(self.device).type == "cpu" else None
        return prefixlm.read_instruction(self.model.bert, inp, mask, map_parts=parts)[1]

    @classmethod
    def candidate_states(cls, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, dec: torch.Tensor,
                         owner: torch.Tensor):
        """Each instruction's keys/values per layer, read once; the rows decoded after theirs.
        Frozen parts run in eval mode (no dropout in a part that does not learn)."""
        for part in (model.bert.embeddings, *model.bert.encoder.layer):
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()
        _, kv = prefixlm.read_instruction(model.bert, input_ids, attention_mask)
        hidden = prefixlm.decode_candidates(model.bert, kv, attention_mask.sum(dim=1), dec,
                                            lambda t: t.index_select(0, owner))
        return hidden, prefix_head(model)

    def shares_passes(self) -> bool:
        return True

    def pass_shapes(self) -> PassShapes:
        return CPU_PASS_SHAPES if torch.device(self.device).type == "cpu" else EXACT

    def warm_instruction_lengths(self) -> list[int]:
        """Instructions are read padded to multiples of ``SOURCE_BUCKET``: each such length within
        the ranker's limit has kernels of its own to create."""
        return list(range(SOURCE_BUCKET, self.ranker.max_source_tokens + SOURCE_BUCKET, SOURCE_BUCKET))

    def kv_row_bytes(self, source_tokens: int) -> int:
        """The per-layer instruction keys/values, measured."""
        with torch.inference_mode():
            inp = torch.full((1, max(1, source_tokens)), self.ranker.eos, device=self.device)
            _, kv = prefixlm.read_instruction(self.model.bert, inp, torch.ones_like(inp))
        return row_bytes(cached([kv]))

    def steps(self, src: list[int]) -> "PrefixSteps":
        return PrefixSteps(self, src)


class PrefixSteps(CachedSteps):
    """Reads the instruction once, then decodes after it one position at a time
    (:func:`instructrec.prefixlm.decode_step`)."""

    def __init__(self, backend: PrefixLMBackend, src: list[int]):
        self.bert = backend.model.bert
        self.device = backend.device
        self.head = prefix_head(backend.model)
        self.start = backend.ranker.start_id()
        self.kv = backend._read([src], torch.tensor([len(src)], device=self.device))
        self.length = len(src)
        self.own = None

    def _step(self, tokens: torch.Tensor, own) -> torch.Tensor:
        hidden, self.own = prefixlm.decode_step(self.bert, self.kv, self.length, tokens, own)
        return step_logprobs(self.head(hidden))


def prefix_head(model) -> Head:
    """The masked-LM head of a prefix-LM, split before its output layer."""
    predictions = model.cls.predictions
    return Head(predictions.transform, predictions.decoder)
