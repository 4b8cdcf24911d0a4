"""Run by tests/test_scoring_memory.py in a fresh process: the peak memory one scoring call adds,
on a tiny random model with mT5's vocabulary (250,112 entries), printed as JSON.

``python tests/scoring_memory_worker.py ARCH CANDIDATES`` with ARCH one of ``mt5`` or ``umt5``
(the T5 family's split head), ``bart`` (a seq2seq model the ranker has no split for: full logits from
the model) and ``gpt2`` (decoder-only). The peak is the kernel's resident-set high-water mark
(``VmHWM``), reset just before the call, less the resident set then: what the call itself
made resident, whatever allocated it (torch keeps no CPU allocator statistics)."""

from __future__ import annotations

import gc
import json
import random
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's instructrec

torch.set_num_threads(1)

VOCAB = 250_112  # mT5's


def _status_kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def build(arch: str):
    """(model, kind): tiny (d_model 16) and randomly initialised, seeded."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    if arch == "mt5":
        config = tf.MT5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, **common)
        return tf.MT5ForConditionalGeneration(config), "seq2seq"
    if arch == "umt5":
        config = tf.UMT5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, **common)
        return tf.UMT5ForConditionalGeneration(config), "seq2seq"
    if arch == "bart":
        config = tf.BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                               max_position_embeddings=128, bos_token_id=0, forced_eos_token_id=None, **common)
        return tf.BartForConditionalGeneration(config), "seq2seq"
    if arch == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                               eos_token_id=1, pad_token_id=0)
        return tf.GPT2LMHeadModel(config), "causal"
    raise SystemExit(f"unknown arch {arch!r}")


def requests(n_candidates: int, seed: int = 0):
    """One instruction of 40 tokens and ``n_candidates`` titles of 3 to 7 tokens plus end-of-sequence,
    ids drawn from the whole vocabulary."""
    from instructrec.ranker import Encoded

    rnd = random.Random(seed)
    source = [rnd.randrange(2, VOCAB) for _ in range(40)] + [1]
    targets = [[rnd.randrange(2, VOCAB) for _ in range(rnd.randint(3, 7))] + [1] for _ in range(n_candidates)]
    return Encoded(source, 0, targets, 0)


def main(arch: str, n_candidates: int) -> None:
    from instructrec.modeling import LoadedModel, minilm_tokenizer
    from instructrec.ranker import Ranker

    model, kind = build(arch)
    model.eval()
    loaded = LoadedModel(model=model, tokenizer=minilm_tokenizer(), name=arch, kind=kind, device=torch.device("cpu"),
                         dtype=torch.float32)
    ranker = Ranker(loaded, max_source_tokens=64, max_target_tokens=16)
    request = requests(n_candidates)
    ranker.score_many([requests(4, seed=1)], reduction="sum")  # one-time set-up (kernels, caches) before measuring
    gc.collect()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    scored = ranker.score_many([request], reduction="sum")[0]
    peak = _status_kb("VmHWM") - before
    tokens = sum(len(t) for t in request.targets)
    print(json.dumps({"arch": arch, "peak_mb": peak / 1024, "target_tokens": tokens,
                      "all_logits_mb": tokens * VOCAB * 4 / 2**20, "scores": scored.scores}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
