"""Scoring memory with mT5's 250,112-entry vocabulary: the log-probabilities of the candidate
tokens are gathered a block at a time, so one scoring call's peak does not grow with the
candidates (the logits of every candidate token at once are 1 MB a token). Tiny random models
(d_model 16) from tests/scoring_memory_worker.py; the peak is measured in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructrec.backends import Head, decoder_parts
from instructrec.modeling import LoadedModel, minilm_tokenizer
from instructrec.ranker import LOGITS_PASS_BYTES, Ranker

from .scoring_memory_worker import build, requests

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def _peak(arch: str, candidates: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scoring_memory_worker.py"), arch, str(candidates)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak is read from Linux's /proc")
@pytest.mark.parametrize("arch, bound_mb", [
    ("mt5", 64),  # the split head: hidden states, then 1,024 x 2,048 logits at a time (measured 10 MB)
    ("bart", 4 * LOGITS_PASS_BYTES / MB),  # full logits from the model, passes within LOGITS_PASS_BYTES (172 MB)
    ("gpt2", 4 * LOGITS_PASS_BYTES / MB),  # decoder-only, the same (146 MB)
])
def test_peak_memory_does_not_hold_every_candidate_tokens_logits(arch, bound_mb):
    """200 candidates, 1,185 target tokens: their logits together are 1,131 MB. Keeping them all
    for one reduction at the end peaked at 2,385 MB (mT5), 2,328 MB (BART) and 805 MB (GPT-2:
    one 4,096-token pass of logits) on the 2-core AMD EPYC this was written on."""
    got = _peak(arch, 200)
    assert got["target_tokens"] == 1185 and got["all_logits_mb"] > 4 * bound_mb
    assert got["peak_mb"] < bound_mb, got["peak_mb"]


def _loaded(arch: str) -> LoadedModel:
    model, kind = build(arch)
    model.eval()
    return LoadedModel(model=model, tokenizer=minilm_tokenizer(), name=arch, kind=kind, device=torch.device("cpu"),
                       dtype=torch.float32)


@pytest.mark.parametrize("arch", ["mt5", "umt5", "bart", "gpt2"])
def test_scores_equal_one_full_forward_per_candidate(arch):
    """The ranker's scores (mT5/umT5 through the split head, BART and GPT-2 in passes of at most
    LOGITS_PASS_BYTES of logits) equal log_softmax over the whole vocabulary of one full forward
    per candidate (token ids from the whole 250k vocabulary). Summed over 3-8 tokens the scores are
    near -90, where the decoder's float32 rounding in other batch shapes alone moves them by up to
    4e-5 (mT5); a wrong split (a missed output scaling) moves them by whole nats."""
    loaded = _loaded(arch)
    model = loaded.model
    ranker = Ranker(loaded, max_source_tokens=64, max_target_tokens=16)
    split = loaded.kind == "seq2seq" and isinstance(decoder_parts(model)[1], Head)
    assert split == (arch in ("mt5", "umt5"))
    request = requests(40, seed=3)
    if not split:
        assert len(ranker.chunks(request.targets, ranker.logits_pass_tokens())) >= 3  # several bounded passes
    with torch.inference_mode():
        got = ranker.score_many([request], reduction="sum")[0].scores
        want = []
        for target in request.targets:
            if loaded.kind == "causal":
                logits = model(input_ids=torch.tensor([request.source + target])).logits[0, len(request.source) - 1 : -1]
            else:
                dec = torch.tensor([[model.config.decoder_start_token_id] + target[:-1]])
                logits = model(input_ids=torch.tensor([request.source]), decoder_input_ids=dec).logits[0]
            want.append(float(torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(target)[:, None]).sum()))
    assert got == pytest.approx(want, abs=1e-4, rel=0)


@pytest.mark.parametrize("arch", ["mt5", "umt5"])
def test_split_head_blocks_equal_the_full_log_softmax(arch, monkeypatch):
    """log p(label) a block of the vocabulary and of the rows at a time equals the log-softmax of
    the model's whole logits (float64), on 300 rows of the model's own decoder states in three
    row blocks (the blocks made smaller than the ranker's 1,024 rows: each row's reference costs
    a float64 log-softmax over 250k logits)."""
    import instructrec.ranker as ranker_module

    monkeypatch.setattr(ranker_module, "VOCAB_BLOCK_ROWS", 128)
    loaded = _loaded(arch)
    model = loaded.model
    _, head = decoder_parts(model)
    g = torch.Generator().manual_seed(0)
    dec = torch.randint(2, model.config.vocab_size, (10, 30), generator=g)
    labels = torch.randint(0, model.config.vocab_size, (300,), generator=g)
    with torch.inference_mode():
        enc = model.get_encoder()(input_ids=torch.tensor([requests(1).source])).last_hidden_state
        hidden = model.decoder(input_ids=dec, encoder_hidden_states=enc.expand(10, -1, -1)).last_hidden_state.reshape(300, -1)
        got = Ranker(loaded).head_logprobs(hidden, labels, head)
        want = torch.log_softmax(model.lm_head(head.pre(hidden)).double(), -1).gather(-1, labels[:, None]).squeeze(-1)
        # and head.pre is the model's own: its logits are the full forward's
        full = model(encoder_outputs=(enc.expand(10, -1, -1),), decoder_input_ids=dec).logits.reshape(300, -1)
    assert torch.equal(model.lm_head(head.pre(hidden)), full)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["bart", "gpt2"])
def test_bounded_passes_equal_one_pass_of_every_logit(arch, monkeypatch):
    """With full logits from the model, passes within LOGITS_PASS_BYTES score as the passes of the
    token budget alone (4,096 tokens: the passes the ranker ran before)."""
    import instructrec.ranker as ranker_module

    ranker = Ranker(_loaded(arch), max_source_tokens=64, max_target_tokens=16)
    request = requests(40, seed=3)
    bounded_passes = len(ranker.chunks(request.targets, ranker.logits_pass_tokens()))
    bounded = ranker.score_many([request], reduction="sum")[0].scores
    monkeypatch.setattr(ranker_module, "LOGITS_PASS_BYTES", 2**50)
    assert ranker.logits_pass_tokens() == ranker.batch_tokens == 4096
    assert bounded_passes >= 3 > len(ranker.chunks(request.targets, ranker.logits_pass_tokens()))
    assert bounded == pytest.approx(ranker.score_many([request], reduction="sum")[0].scores, abs=1e-5, rel=0)
