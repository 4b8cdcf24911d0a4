"""The prefix-LM shape: one pretrained BERT reads the instruction and decodes each candidate.

The instruction is read bidirectionally, exactly as the pretrained model reads any text;
each candidate title follows it in the same sequence and is decoded causally: a candidate
token attends to the whole instruction and to its own earlier tokens, never to another
candidate (the UniLM sequence-to-sequence mask). Every attention weight between
instruction and candidate is a pretrained one; only the head's transform starts random
(its output layer is tied to the word embeddings). The score is still log P(candidate |
instruction).

Because the instruction never attends to a candidate, its keys and values at each layer
are those of reading it alone: :func:`read_instruction` computes them once, and
:func:`decode_candidates` runs any number of candidate rows against them (as views, no
copy). Training and ranking both score through these two functions. The reference
(:func:`full_forward`) runs one whole sequence through the HF model with the same block
mask, so the two paths check each other.

A checkpoint is a plain ``BertForMaskedLM`` directory whose config carries
``"instructrec_shape": "prefix-lm"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SHAPE_KEY, SHAPE = "instructrec_shape", "prefix-lm"
CANDIDATE_TYPE = 1  # token type of candidate tokens (instruction tokens are type 0)


def is_prefix_lm(config) -> bool:
    return getattr(config, SHAPE_KEY, None) == SHAPE


def mark(model) -> None:
    setattr(model.config, SHAPE_KEY, SHAPE)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def _layer(layer, x: torch.Tensor, mask: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None,
           heads: int, training: bool):
    """One BERT layer (post-norm) with keys/values = ``prefix`` (if any) followed by ``x``'s own;
    returns the new hidden states and ``x``'s keys/values."""
    att = layer.attention.self
    q, k, v = (_split_heads(proj(x), heads) for proj in (att.query, att.key, att.value))
    own = (k, v)
    if prefix is not None:
        k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=att.dropout.p if training else 0.0)
    ctx = ctx.transpose(1, 2).reshape(x.shape)
    h = layer.attention.output(ctx, x)
    return layer.output(layer.intermediate(h), h), own


def read_instruction(bert, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The instruction pass (bidirectional, padding masked): last hidden states and each
    layer's keys/values, which every candidate of the instruction then reads."""
    x = bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
    mask = attention_mask.bool()[:, None, None, :]
    heads = bert.config.num_attention_heads
    kv = []
    for layer in bert.encoder.layer:
        x, own = _layer(layer, x, mask, None, heads, layer.training)
        kv.append(own)
    return x, kv


def decode_candidates(bert, kv, source_lengths: torch.Tensor, inputs: torch.Tensor, pick=None) -> torch.Tensor:
    """Hidden states of candidate rows ``inputs`` ([rows, width]: start token then the title
    but its last token, right-padded) decoded after their instruction.

    ``kv`` is :func:`read_instruction`'s per-layer keys/values; ``pick`` maps a per-instruction
    tensor to the rows' (default: row i reads instruction i). ``source_lengths`` are the
    instructions' real lengths: a candidate's positions continue from there, and it attends
    to the instruction's real tokens and to its own earlier tokens only.
    """
    pick = pick or (lambda t: t)
    rows, width = inputs.shape
    lengths = pick(source_lengths)
    positions = lengths[:, None] + torch.arange(width, device=inputs.device)[None, :]
    x = bert.embeddings(input_ids=inputs, token_type_ids=torch.full_like(inputs, CANDIDATE_TYPE), position_ids=positions)
    source_width = kv[0][0].shape[2]
    to_source = torch.arange(source_width, device=inputs.device)[None, :] < lengths[:, None]  # [rows, S]
    causal = torch.ones(width, width, dtype=torch.bool, device=inputs.device).tril()
    mask = torch.cat([to_source[:, None, :].expand(rows, width, source_width), causal.expand(rows, width, width)], dim=2)
    mask = mask[:, None]  # [rows, 1, width, S + width]
    heads = bert.config.num_attention_heads
    for layer, (k, v) in zip(bert.encoder.layer, kv):
        x, _ = _layer(layer, x, mask, (pick(k), pick(v)), heads, layer.training)
    return x


def full_forward(bert, source: list[int], inputs: list[int]) -> torch.Tensor:
    """Reference: the hidden states of one candidate's positions from one pass of the HF
    model over instruction + candidate, with the prefix-LM block mask given as a 4D mask."""
    s, t = len(source), len(inputs)
    device = bert.embeddings.word_embeddings.weight.device
    ids = torch.tensor([source + inputs], device=device)
    allowed = torch.zeros(s + t, s + t, dtype=torch.bool, device=device)
    allowed[:, :s] = True
    allowed[s:, s:] = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    types = torch.tensor([[0] * s + [CANDIDATE_TYPE] * t], device=device)
    return bert(input_ids=ids, token_type_ids=types, attention_mask=allowed[None, None]).last_hidden_state[0, s:]


def build_from_bert(path: str):
    """A prefix-LM from a BERT checkpoint directory: ``BertForMaskedLM`` with its output layer
    tied to the word embeddings (a missing MLM head starts random)."""
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized" head is expected
    try:
        model = BertForMaskedLM.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
    mark(model)
    return model
