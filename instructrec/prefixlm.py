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


def _layer(layer, x: torch.Tensor, attend, heads: int):
    """One BERT layer (post-norm) whose attention is ``attend(q, k, v)`` over ``x``'s own queries,
    keys and values (split into heads); returns the new hidden states and ``x``'s keys/values."""
    att = layer.attention.self
    q, k, v = (_split_heads(proj(x), heads) for proj in (att.query, att.key, att.value))
    ctx = attend(q, k, v).transpose(1, 2).reshape(x.shape)
    h = layer.attention.output(ctx, x)
    return layer.output(layer.intermediate(h), h), (k, v)


def _dropout(layer) -> float:
    return layer.attention.self.dropout.p if layer.training else 0.0


def read_instruction(bert, input_ids: torch.Tensor, attention_mask: torch.Tensor, map_parts=None):
    """The instruction pass (bidirectional, padding masked): last hidden states and each
    layer's keys/values, which every candidate of the instruction then reads. With
    ``map_parts`` (inference) the positions go in :func:`position_parts`, whose layers
    ``map_parts`` may compute on several threads (:func:`_read_in_parts`)."""
    x = bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
    mask = attention_mask.bool()[:, None, None, :]
    heads = bert.config.num_attention_heads
    if map_parts is not None and not bert.training:
        return _read_in_parts(bert, x, mask, heads, map_parts)
    kv = []
    for layer in bert.encoder.layer:
        def attend(q, k, v, p=_dropout(layer)):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)

        x, own = _layer(layer, x, attend, heads)
        kv.append(own)
    return x, kv


# Positions of an instruction read in parts: the fewest parts of at most this many positions
# (every part but the last a multiple of 16), so that idle lanes can share the instruction's pass.
PART_POSITIONS = 96


def position_parts(width: int) -> list[slice]:
    """The parts an instruction of ``width`` (padded) positions is read in: a function of the
    width alone, so a request is computed the same way whichever threads compute it."""
    n = -(-width // PART_POSITIONS)
    size = -(-(-(-width // n)) // 16) * 16
    return [slice(a, min(a + size, width)) for a in range(0, width, size)]


def _read_in_parts(bert, x: torch.Tensor, mask: torch.Tensor, heads: int, map_parts):
    """:func:`read_instruction` with each layer's work split by positions: every part's queries,
    keys and values (linear layers act on each position alone), then, with all keys and values
    joined, every part's attention, output and feed-forward. Each of the two steps is one
    ``map_parts`` call over the parts, so a layer waits for its slowest part twice."""
    parts = position_parts(x.shape[1])
    xs = [x[:, p] for p in parts]
    kv = []
    for layer in bert.encoder.layer:
        att = layer.attention.self
        qkv = map_parts(lambda xp: tuple(_split_heads(proj(xp), heads) for proj in (att.query, att.key, att.value)), xs)
        k = torch.cat([t[1] for t in qkv], dim=2) if len(qkv) > 1 else qkv[0][1]
        v = torch.cat([t[2] for t in qkv], dim=2) if len(qkv) > 1 else qkv[0][2]

        def rest(i: int, layer=layer, k=k, v=v) -> torch.Tensor:
            xp, q = xs[i], qkv[i][0]
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(xp.shape)
            h = layer.attention.output(ctx, xp)
            return layer.output(layer.intermediate(h), h)

        xs = map_parts(rest, range(len(parts)))
        kv.append((k, v))
    return (torch.cat(xs, dim=1) if len(xs) > 1 else xs[0]), kv


# On a CPU, torch's flash attention kernel also gives each query's log-sum-exp, which lets the
# prefix part and the own part be computed by it separately and joined exactly (as flash
# attention joins its own blocks). Its scores stay float32 inside the kernel and nothing of the
# size of the scores is written to memory: measured on an Intel Xeon with AMX (bf16, one thread,
# 12 heads over a padded 192-token instruction), 8 rows x 16 tokens took 578 against 900 us with
# the scores as float32 tensors, 4 x 16: 320 against 522 us. Not on GPUs (the kernel is the CPU's).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend_after_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                        prefix_v: torch.Tensor, prefix_real: int | None = None) -> torch.Tensor:
    """Causal attention of candidate rows (``q``: [rows, heads, width, d]; ``k``, ``v``: [rows,
    heads, own, d], own >= width, the queries being the last ``width`` positions) over one
    shared prefix (``prefix_k``/``prefix_v``: [1, heads, S, d], the first ``prefix_real``
    positions real, default all) and their own earlier positions, without copying the prefix
    per row: the rows' queries are folded into one sequence against the prefix, and the two
    parts' softmaxes joined by their log-sum-exps. The prefix is read at its padded width (its
    padding masked) so that the kernels take the few shapes of padded instructions. The
    concatenated alternative copied the prefix into every row: at 100 candidates it took 49.5
    ms a layer in float32 against 9.1 ms for the folded form (13.7 vs 8.6 ms in bf16; 1 thread)."""
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        return _flash_after_prefix(q, k, v, prefix_k, prefix_v, prefix_real)
    return _math_after_prefix(q, k, v, prefix_k, prefix_v, prefix_real)


def _own_causal(width: int, own: int, device) -> torch.Tensor:
    """Which own positions each query sees: own keys may run ahead of the queries (a decoding
    step: earlier positions come from a cache); query i sits at own position i + (own - width)."""
    return torch.ones(width, own, dtype=torch.bool, device=device).tril(own - width)


def _flash_after_prefix(q, k, v, prefix_k, prefix_v, prefix_real):
    """:func:`attend_after_prefix` by the CPU flash kernel, once over the prefix for all rows'
    queries folded together and once over each row's own positions; joined in float32."""
    rows, heads, width, d = q.shape
    folded = q.transpose(0, 1).reshape(1, heads, rows * width, d)
    mask = None
    if prefix_real is not None and prefix_real < prefix_k.shape[2]:
        mask = torch.zeros(1, 1, 1, prefix_k.shape[2], dtype=q.dtype, device=q.device)
        mask[..., prefix_real:] = float("-inf")
    to_prefix, lse_prefix = _CPU_FLASH(folded, prefix_k, prefix_v, attn_mask=mask)
    to_prefix = to_prefix.view(heads, rows, width, d).transpose(0, 1)
    lse_prefix = lse_prefix.view(heads, rows, width).transpose(0, 1)
    own = k.shape[2]
    if own == width:
        to_own, lse_own = _CPU_FLASH(q, k, v, is_causal=True)
    else:
        seen = torch.zeros(width, own, dtype=q.dtype, device=q.device).masked_fill_(
            ~_own_causal(width, own, q.device), float("-inf"))
        to_own, lse_own = _CPU_FLASH(q, k, v, attn_mask=seen)
    top = torch.maximum(lse_prefix, lse_own)
    w_prefix, w_own = (lse_prefix - top).exp_(), (lse_own - top).exp_()
    total = w_prefix + w_own
    out = to_prefix.float() * (w_prefix / total)[..., None] + to_own.float() * (w_own / total)[..., None]
    return out.to(v.dtype)


def _math_after_prefix(q, k, v, prefix_k, prefix_v, prefix_real):
    """:func:`attend_after_prefix` with the scores and the softmax as float32 tensors (as
    scaled_dot_product_attention's kernels keep them)."""
    rows, heads, width, d = q.shape
    scale = d ** -0.5
    qf = q.float()
    folded = qf.transpose(0, 1).reshape(1, heads, rows * width, d)
    to_prefix = (folded @ prefix_k.float().transpose(-1, -2)).mul_(scale)  # [1, heads, rows*width, S]
    if prefix_real is not None and prefix_real < prefix_k.shape[2]:
        to_prefix[..., prefix_real:] = float("-inf")
    causal = _own_causal(width, k.shape[2], q.device)
    to_own = (qf @ k.float().transpose(-1, -2)).mul_(scale).masked_fill_(~causal, float("-inf"))
    top = torch.maximum(to_prefix.amax(-1).view(heads, rows, width).transpose(0, 1), to_own.amax(-1))
    to_prefix = to_prefix.sub_(top.transpose(0, 1).reshape(1, heads, rows * width, 1)).exp_()
    to_own = to_own.sub_(top[..., None]).exp_()
    total = to_prefix.sum(-1).view(heads, rows, width).transpose(0, 1) + to_own.sum(-1)
    out = (to_prefix.to(v.dtype) @ prefix_v).view(heads, rows, width, d).transpose(0, 1) + to_own.to(v.dtype) @ v
    return (out.float() / total[..., None]).to(v.dtype)


def decode_candidates(bert, kv, source_lengths: torch.Tensor, inputs: torch.Tensor, pick=None,
                      shared: int | None = None) -> torch.Tensor:
    """Hidden states of candidate rows ``inputs`` ([rows, width]: start token then the title
    but its last token, right-padded) decoded after their instruction.

    ``kv`` is :func:`read_instruction`'s per-layer keys/values; ``pick`` maps a per-instruction
    tensor to the rows' (default: row i reads instruction i). ``source_lengths`` are the
    instructions' real lengths: a candidate's positions continue from there, and it attends
    to the instruction's real tokens and to its own earlier tokens only. ``shared``: every row
    reads instruction ``shared`` (then, outside training, :func:`attend_after_prefix` reads its
    keys/values once for all rows instead of a copy per row).
    """
    pick = pick or (lambda t: t)
    rows, width = inputs.shape
    lengths = pick(source_lengths)
    positions = lengths[:, None] + torch.arange(width, device=inputs.device)[None, :]
    x = bert.embeddings(input_ids=inputs, token_type_ids=torch.full_like(inputs, CANDIDATE_TYPE), position_ids=positions)
    heads = bert.config.num_attention_heads
    if shared is not None and not bert.training:
        real = int(source_lengths[shared])
        for layer, (k, v) in zip(bert.encoder.layer, kv):
            prefix = (k[shared : shared + 1], v[shared : shared + 1])
            x, _ = _layer(layer, x, lambda q, k_, v_, p=prefix: attend_after_prefix(q, k_, v_, *p, prefix_real=real), heads)
        return x
    source_width = kv[0][0].shape[2]
    to_source = torch.arange(source_width, device=inputs.device)[None, :] < lengths[:, None]  # [rows, S]
    causal = torch.ones(width, width, dtype=torch.bool, device=inputs.device).tril()
    mask = torch.cat([to_source[:, None, :].expand(rows, width, source_width), causal.expand(rows, width, width)], dim=2)
    mask = mask[:, None]  # [rows, 1, width, S + width]
    for layer, (k, v) in zip(bert.encoder.layer, kv):
        def attend(q, k_, v_, p=(pick(k), pick(v)), drop=_dropout(layer)):
            return F.scaled_dot_product_attention(q, torch.cat([p[0], k_], dim=2), torch.cat([p[1], v_], dim=2),
                                                  attn_mask=mask, dropout_p=drop)

        x, _ = _layer(layer, x, attend, heads)
    return x


def decode_step(bert, kv, source_length: int, inputs: torch.Tensor, own=None):
    """One decoding step of rows that all follow instruction 0 of ``kv`` (``source_length`` real
    tokens): ``inputs`` [rows, 1] are each row's next input token, ``own`` the rows' keys/values
    of their earlier candidate positions per layer (None at the start token). Returns the rows'
    hidden states [rows, hidden] and their keys/values including this position, which a caller
    reorders (beam search) and passes back. The same attention as :func:`decode_candidates`
    with ``shared``, one position at a time."""
    rows = inputs.shape[0]
    done = 0 if own is None else own[0][0].shape[2]
    positions = torch.full_like(inputs, source_length + done)
    x = bert.embeddings(input_ids=inputs, token_type_ids=torch.full_like(inputs, CANDIDATE_TYPE), position_ids=positions)
    heads = bert.config.num_attention_heads
    grown = []
    for i, (layer, (k, v)) in enumerate(zip(bert.encoder.layer, kv)):
        prefix = (k[:1], v[:1])

        def attend(q, k_, v_, i=i, p=prefix):
            if own is not None:
                k_, v_ = torch.cat([own[i][0], k_], dim=2), torch.cat([own[i][1], v_], dim=2)
            grown.append((k_, v_))
            return attend_after_prefix(q, k_, v_, *p, prefix_real=source_length)

        x, _ = _layer(layer, x, attend, heads)
    return x[:, 0], grown


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
