"""Encoder-decoder models (T5 and Flan-T5, mT5 and umT5, BART, BERT2BERT): the paper's shape.

The encoder reads the instruction once. One decoder step from the start token, shared by all of
the instruction's candidates, fills the cross-attention keys/values and scores every
candidate's first token; the rest of each candidate runs in the ranker's length buckets, reading
the shared keys/values as views (no copy), the vocabulary head applied only at real positions.
"""

from __future__ import annotations

import torch

from instructrec.modeling import SEQ2SEQ

from .base import Backend, CachedSteps, Head, cached, row_bytes, step_logprobs, view_cache


class Seq2SeqBackend(Backend):
    kind = SEQ2SEQ
    cross_attention = True

    def naive(self, src: list[int], ids: list[list[int]]) -> list[float]:
        """One full forward per candidate: the reference the fast path must equal."""
        start = self.ranker.start_id()
        inp = torch.tensor([src], device=self.device)
        out = []
        for t in ids:
            labels = torch.tensor([t], device=self.device)
            dec = torch.tensor([[start] + t[:-1]], device=self.device)
            logits = self.model(input_ids=inp, attention_mask=torch.ones_like(inp), decoder_input_ids=dec).logits
            out.append(float(torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).sum()))
        return out

    def fast(self, srcs: list[list[int]], ids: list[list[list[int]]]) -> list[list[float]]:
        """All instructions through the encoder as one padded batch, then the shared start step
        (unless every instruction has one candidate or sharing is off), then the candidates' rest."""
        lengths = torch.tensor([len(s) for s in srcs], device=self.device)
        inp = self.ranker.pad_rows(srcs)
        mask = (torch.arange(inp.shape[1], device=self.device)[None, :] < lengths[:, None]).long()
        enc = self.model.get_encoder()(input_ids=inp, attention_mask=mask).last_hidden_state
        if not self.ranker.share_cross_kv or all(len(req) == 1 for req in ids):
            # one candidate per instruction: a shared first step would only add a decoder pass
            flat = [(r, j) for r, req in enumerate(ids) for j in range(len(req))]
            sums = [[0.0] * len(req) for req in ids]
            shared = None
        else:
            first, shared = self._start_step(enc, mask)
            sums = [first[r, [t[0] for t in req]].tolist() for r, req in enumerate(ids)]
            flat = [(r, j) for r, req in enumerate(ids) for j in range(len(req)) if len(req[j]) > 1]
        for (r, j), value in zip(flat, self.decode(enc, mask, [ids[r][j] for r, j in flat],
                                                    [r for r, _ in flat], shared)):
            sums[r][j] += value
        return sums

    def _start_step(self, enc: torch.Tensor, mask: torch.Tensor):
        """One decoder step per instruction from the start token: the same first step for all of
        its candidates. It fills the cross-attention cache (K/V of every layer) and the start
        position's self-attention K/V, and its logits score every candidate's first token.
        Returns (first-token log-probs per instruction, (self K/V, cross K/V) per layer)."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        probe = EncoderDecoderCache(DynamicCache(), DynamicCache())
        first = self.model(encoder_outputs=(enc,), attention_mask=mask, past_key_values=probe, use_cache=True,
                           decoder_input_ids=torch.full((enc.shape[0], 1), self.ranker.start_id(),
                                                        device=self.device)).logits
        shared = ([(layer.keys, layer.values) for layer in probe.self_attention_cache.layers],
                  [(layer.keys, layer.values) for layer in probe.cross_attention_cache.layers])
        return torch.log_softmax(first[:, 0].float(), dim=-1), shared

    def decode(self, enc: torch.Tensor, mask: torch.Tensor, targets: list[list[int]], owners: list[int],
               shared) -> list[float]:
        """Summed log-probs of ``targets`` (rows of the requests ``owners``) through the decoder.
        With ``shared`` = (start-step self-attention K/V, cross-attention K/V) per request, rows
        continue after the shared start step and read those as views; with ``None`` every row
        starts from the start token and its decoder projects the encoder output to cross-attention
        K/V itself (the benchmark's ``encoder_once``)."""
        from transformers.cache_utils import EncoderDecoderCache

        ranker = self.ranker
        body, head = decoder_parts(self.model)
        skip = 1 if shared else 0  # tokens already scored by the shared start step

        def run(rows, pick, labels):
            if shared:
                inputs = ranker.pad_rows([t[:-1] for t in rows])
                cache = EncoderDecoderCache(*(view_cache([(pick(k), pick(v)) for k, v in kv]) for kv in shared))
            else:
                inputs, cache = ranker.with_start(labels), None
            return body(inputs, pick(enc), pick(mask), cache)

        copied = row_bytes([enc, mask, *cached(shared)]) if shared else 0
        return ranker.bucketed(targets, owners, copied, skip, run, head)

    @classmethod
    def candidate_states(cls, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, dec: torch.Tensor,
                         owner: torch.Tensor):
        """The encoder runs under ``no_grad`` and in eval mode when it is frozen (no dropout in a
        part that does not learn); each row's decoder reads its instruction's encoder states."""
        encoder = model.get_encoder()
        frozen = not any(p.requires_grad for p in encoder.parameters())
        if frozen:
            encoder.eval()
            with torch.no_grad():
                enc = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            enc = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        body, head = decoder_parts(model)
        return body(dec, enc.index_select(0, owner), attention_mask.index_select(0, owner), None), head

    def shares_passes(self) -> bool:
        return self.ranker.share_cross_kv

    def kv_row_bytes(self, source_tokens: int) -> int:
        """Every layer's cross-attention keys/values, the encoder states and mask, measured."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        with torch.inference_mode():
            inp = torch.full((1, max(1, source_tokens)), self.ranker.eos, device=self.device)
            mask = torch.ones_like(inp)
            enc = self.model.get_encoder()(input_ids=inp, attention_mask=mask).last_hidden_state
            probe = EncoderDecoderCache(DynamicCache(), DynamicCache())
            self.model(encoder_outputs=(enc,), attention_mask=mask, past_key_values=probe, use_cache=True,
                       decoder_input_ids=torch.full((1, 1), self.ranker.start_id(), device=self.device))
            shared = ([(layer.keys, layer.values) for layer in probe.self_attention_cache.layers],
                      [(layer.keys, layer.values) for layer in probe.cross_attention_cache.layers])
            return row_bytes([enc, mask, *cached(shared)])

    def encoder(self) -> torch.nn.Module | None:
        return self.model.get_encoder() if hasattr(self.model, "get_encoder") else None

    def steps(self, src: list[int]) -> "Seq2SeqSteps":
        return Seq2SeqSteps(self, src)


class Seq2SeqSteps(CachedSteps):
    """Encodes once; keeps the cross-attention keys/values as one row that every beam views."""

    def __init__(self, backend: Seq2SeqBackend, src: list[int]):
        model = backend.model
        self.device = backend.device
        self.body, self.head = decoder_parts(model)
        inp = torch.tensor([src], device=self.device)
        self.mask = torch.ones_like(inp)
        self.enc = model.get_encoder()(input_ids=inp, attention_mask=self.mask).last_hidden_state
        self.start = backend.ranker.start_id()
        self.own = None  # decoder self-attention keys/values per layer, one row per beam
        self.cross = None  # cross-attention keys/values per layer, one row (shared as views)

    def _step(self, tokens: torch.Tensor, own) -> torch.Tensor:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        rows = tokens.shape[0]
        if self.cross is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        else:
            cross = [(k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:])) for k, v in self.cross]
            cache = EncoderDecoderCache(view_cache(own), view_cache(cross))
        hidden = self.body(tokens, self.enc.expand(rows, -1, -1), self.mask.expand(rows, -1), cache)
        self.own = [(layer.keys, layer.values) for layer in cache.self_attention_cache.layers]
        if self.cross is None:
            self.cross = [(layer.keys, layer.values) for layer in cache.cross_attention_cache.layers]
        return step_logprobs(self.head(hidden[:, -1]))


def decoder_parts(model):
    """(body, head): the decoder stack returning hidden states, and the vocabulary head.

    Splitting them lets the ranker apply the head only at real target positions, a block of
    the vocabulary at a time. Known architectures get a split (BERT2BERT; T5, mT5 and umT5);
    any other seq2seq model falls back to the full forward (identical scores; the head then
    runs on padding too, and the ranker bounds its passes by ``LOGITS_PASS_BYTES``). A peft
    model is split as the model its adapters live in.
    """
    from transformers import EncoderDecoderModel

    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if isinstance(model, EncoderDecoderModel) and hasattr(model.decoder, "bert") and hasattr(model.decoder, "cls"):
        if getattr(model, "enc_to_dec_proj", None) is not None:
            return _generic_parts(model)

        def body(dec, enc, mask, cache):
            return model.decoder.bert(input_ids=dec, encoder_hidden_states=enc, encoder_attention_mask=mask,
                                      past_key_values=cache, use_cache=True).last_hidden_state

        predictions = model.decoder.cls.predictions
        return body, Head(predictions.transform, predictions.decoder)
    scales = _t5_family_scales(model)
    if scales is not None:
        def body(dec, enc, mask, cache):
            return model.decoder(input_ids=dec, encoder_hidden_states=enc, encoder_attention_mask=mask,
                                 past_key_values=cache, use_cache=True).last_hidden_state

        scale = model.config.d_model ** -0.5 if scales else 1.0
        return body, Head(lambda h: h * scale, model.lm_head)
    return _generic_parts(model)


def _t5_family_scales(model) -> bool | None:
    """Whether a T5-family model's forward multiplies the decoder output by ``d_model ** -0.5``
    before ``lm_head`` (``None``: not of the family). Each class decides it its own way in
    transformers 5.23: T5 by :func:`t5_scales_decoder_output`, umT5 by ``tie_word_embeddings``,
    mT5 never (its configs say ``tie_word_embeddings: false`` anyway). The tests hold the split
    to each model's own forward, so a release that changes this shows there."""
    from transformers import MT5ForConditionalGeneration, T5ForConditionalGeneration, UMT5ForConditionalGeneration

    if isinstance(model, T5ForConditionalGeneration):
        return t5_scales_decoder_output(model.config)
    if isinstance(model, UMT5ForConditionalGeneration):
        return bool(model.config.tie_word_embeddings)
    if isinstance(model, MT5ForConditionalGeneration):
        return False
    return None


def t5_scales_decoder_output(config) -> bool:
    """Whether T5's forward multiplies the decoder output by ``d_model ** -0.5`` before the head:
    what the model itself reads. transformers 5.x keeps it in ``scale_decoder_outputs`` (false for
    Flan-T5 and T5 v1.1, whose configs say ``tie_word_embeddings: false``) and reports
    ``tie_word_embeddings`` true for every T5; older versions read ``tie_word_embeddings``."""
    flag = getattr(config, "scale_decoder_outputs", None)
    return bool(config.tie_word_embeddings if flag is None else flag)


def _generic_parts(model):
    def body(dec, enc, mask, cache):
        return model(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec, past_key_values=cache,
                     use_cache=True).logits

    return body, lambda logits: logits
