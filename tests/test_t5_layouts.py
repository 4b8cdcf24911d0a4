"""T5 layouts the ranker must score right: the default T5 config (tied head, output scaled by
d_model ** -0.5) and Flan-T5's (``tie_word_embeddings: false``: separate ``lm_head``, gated-gelu,
no scaling), each on a tiny random model."""

from __future__ import annotations

import random

import pytest
import torch

from instructrec.backends import t5_scales_decoder_output
from instructrec.modeling import TINY_FLAN_T5, TINY_T5, build_base, keep_untied_head, load_model
from instructrec.ranker import Ranker, target_ids

torch.set_num_threads(1)

SOURCE = "A user played: 1. Halo; 2. Doom; 3. Quake. They ask for a fast shooter. Pick the best candidate."
WORDS = "legend zelda mario kart halo doom quest star wars edition remastered deluxe racing puzzle".split()


def _candidates(n: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(k)) or "x" for k in ([0, 1, 2, 4, 9, 20, 60] * n)[:n]]


CANDS = _candidates(14)


@pytest.fixture(scope="module")
def models():
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(name, device="cpu", dtype="float32")
        return cache[name]

    return get


def test_flan_layout_is_what_flan_t5_xl_declares(models):
    model = models(TINY_FLAN_T5).model
    cfg = model.config
    assert cfg.is_gated_act and cfg.feed_forward_proj == "gated-gelu" and cfg.n_positions == 512
    assert cfg.scale_decoder_outputs is False and not t5_scales_decoder_output(cfg)
    assert model.lm_head.weight is not model.shared.weight
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    # the default layout scales (and ties) as the original T5 did
    default = models(TINY_T5).model
    assert t5_scales_decoder_output(default.config) and default.lm_head.weight is default.shared.weight


@pytest.mark.parametrize("name", [TINY_T5, TINY_FLAN_T5])
def test_fast_equals_naive_and_the_models_own_loss(models, name):
    ranker = Ranker(models(name), batch_tokens=16)
    ids = [target_ids(ranker.tokenizer, c, ranker.max_target_tokens, ranker.eos)[0] for c in CANDS]
    assert len(ranker.chunks(ids)) > 3  # several decoder passes
    fast = ranker.score(SOURCE, CANDS, reduction="sum").scores
    naive = ranker.score(SOURCE, CANDS, reduction="sum", naive=True).scores
    assert max(abs(f - n) for f, n in zip(fast, naive)) < 1e-4, (fast, naive)
    # mean log-likelihood = minus the model's own forward loss (token-mean cross-entropy) for the pair
    means = ranker.score(SOURCE, CANDS, reduction="mean").scores
    src = torch.tensor([ranker.source_ids(SOURCE)[0]])
    with torch.inference_mode():
        for score, labels in zip(means, ids):
            loss = ranker.model(input_ids=src, attention_mask=torch.ones_like(src), labels=torch.tensor([labels])).loss
            assert score == pytest.approx(-float(loss), abs=1e-4)


def test_flan_head_survives_save_load_and_lora_merge(tmp_path, models):
    """A Flan-T5 loaded from a directory keeps its own head through ``tie_weights()`` (which
    accelerate's FSDP2 preparation calls) and peft's merge: the merged model, whose LoRA update
    is still zero, scores exactly as the base."""
    peft = pytest.importorskip("peft")
    loaded = models(TINY_FLAN_T5)
    loaded.model.save_pretrained(tmp_path / "flan")
    loaded.tokenizer.save_pretrained(tmp_path / "flan")
    model, tokenizer, kind = build_base(str(tmp_path / "flan"))
    assert kind == "seq2seq" and model.lm_head.weight is not model.shared.weight
    assert torch.equal(model.lm_head.weight, loaded.model.lm_head.weight)
    model.tie_weights()  # what accelerate's FSDP2 preparation does to the model
    assert model.lm_head.weight is not model.shared.weight and model.encoder.embed_tokens.weight is model.shared.weight
    assert torch.equal(model.lm_head.weight, loaded.model.lm_head.weight)
    lora = peft.get_peft_model(model, peft.LoraConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM, r=4, target_modules="all-linear"))
    merged = lora.merge_and_unload()
    assert merged.lm_head.weight is not merged.shared.weight
    assert torch.equal(merged.lm_head.weight, loaded.model.lm_head.weight)
    merged.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    again = load_model(str(tmp_path / "merged"), device="cpu", dtype="float32")
    base_scores = Ranker(loaded).score(SOURCE, CANDS[:5]).scores
    assert Ranker(again).score(SOURCE, CANDS[:5]).scores == pytest.approx(base_scores, abs=1e-5)


# -- what other runtimes read --------------------------------------------------------


def _trained(name: str, steps: int = 3):
    """A tiny T5 after a few optimizer steps, prepared for training as ``instructrec train`` does."""
    from instructrec.ranker import eos_id
    from instructrec.training.presets import PRESETS
    from instructrec.training.tune import _trainable

    model, tokenizer, kind = build_base(name)
    model = _trainable(model, kind, PRESETS["smoke"], lora=False)
    src = tokenizer(SOURCE, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for c in CANDS[1:1 + steps]:
        labels = torch.tensor([target_ids(tokenizer, c, 48, eos_id(tokenizer, model))[0]])
        model(input_ids=src, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer


@pytest.mark.parametrize("name, own_head", [(TINY_FLAN_T5, True), (TINY_T5, False)])
def test_saved_config_reads_the_same_everywhere(tmp_path, name, own_head):
    """What ``instructrec train`` saves loads with plain ``AutoModelForSeq2SeqLM`` to the trained
    model's logits, and its config says what transformers 4.x, vLLM and TGI read from
    ``tie_word_embeddings`` alone: true = the head is the embeddings and the decoder output is
    scaled (the original T5), false = a head of its own, no scaling (Flan-T5). transformers 5.x
    wrote true for both."""
    import json

    from transformers import AutoModelForSeq2SeqLM

    from instructrec.modeling import saved_tensor_names
    from instructrec.training.tune import _save_model_dir

    model, tokenizer = _trained(name)
    assert (model.lm_head.weight is not model.shared.weight) is own_head
    if own_head:
        assert not torch.equal(model.lm_head.weight, model.shared.weight)
    _save_model_dir(model, tokenizer, tmp_path / "model", {"test": True})
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["tie_word_embeddings"] is (not own_head)
    assert config["tie_word_embeddings"] is t5_scales_decoder_output(model.config)  # tied <=> scaled, as 4.x reads it
    assert ("lm_head.weight" in saved_tensor_names(tmp_path / "model")) is own_head
    loaded = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "model")).eval()
    enc = tokenizer([SOURCE, "a shorter instruction"], padding=True, return_tensors="pt")
    dec = torch.tensor([[0, 11, 12, 13, 14], [0, 21, 22, 23, 24]])
    with torch.inference_mode():
        expected = model(**enc, decoder_input_ids=dec).logits
        got = loaded(**enc, decoder_input_ids=dec).logits
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())


def test_a_t5_no_runtime_reads_alike_is_not_saved(tmp_path):
    """The original layout's scaling with a head of its own has no ``tie_word_embeddings`` that the
    older runtimes read right: refused, not written."""
    from instructrec.training.tune import _save_model_dir

    model, tokenizer, _ = build_base(TINY_T5)
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach() * 2)
    keep_untied_head(model)
    with pytest.raises(ValueError, match="its own lm_head with d_model"):
        _save_model_dir(model, tokenizer, tmp_path / "model", {"test": True})
    assert not (tmp_path / "model").exists()


# -- precision guards ---------------------------------------------------------------


@pytest.mark.parametrize("name", [TINY_T5, TINY_FLAN_T5])
def test_float16_is_refused_for_t5(name):
    with pytest.raises(ValueError, match="float16 is refused for t5.*bfloat16"):
        load_model(name, device="cpu", dtype="float16")


def test_float16_refusal_is_a_clear_cli_error():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "instructrec.cli", "rank", "--model", TINY_FLAN_T5, "--device", "cpu",
                           "--dtype", "float16", "--history", "Halo 3", "--candidate", "Doom", "--candidate", "Tetris"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "float16 is refused" in proc.stderr and "Traceback" not in proc.stderr


def test_auto_bf16_only_with_native_bf16():
    from instructrec.modeling import native_bf16, resolve_dtype

    assert not native_bf16((7, 0)) and not native_bf16((7, 5))  # V100, T4: bf16 only emulated
    assert native_bf16((8, 0)) and native_bf16((8, 6)) and native_bf16((9, 0))  # A100, A10/RTX 30, H100
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("half-ish", torch.device("cpu"))


def test_head_log_probs_are_float32_and_close_in_bf16(models):
    """In bfloat16 the head's log-softmax still runs in float32 (scores within bf16 rounding of float32)."""
    from instructrec.backends import Head
    from instructrec.ranker import _blocked_logprobs

    fp32 = models(TINY_FLAN_T5)
    ranker = Ranker(fp32)
    src = torch.tensor([ranker.source_ids(SOURCE)[0]])
    labels = torch.tensor(target_ids(ranker.tokenizer, CANDS[4], 48, ranker.eos)[0])
    dec = torch.cat([torch.tensor([ranker.start_id()]), labels[:-1]])[None]
    with torch.inference_mode():
        hidden = fp32.model(input_ids=src, decoder_input_ids=dec, output_hidden_states=True).decoder_hidden_states[-1][0]
        head = Head(lambda h: h, fp32.model.lm_head)
        exact = torch.log_softmax(head(hidden).double(), -1).gather(-1, labels[:, None]).squeeze(-1)
        blocked = _blocked_logprobs(head, hidden, labels)
        rows = ranker._token_logprobs(head(hidden), labels)
        assert blocked.dtype == rows.dtype == torch.float32
        assert torch.allclose(blocked.double(), exact, atol=1e-4) and torch.allclose(rows.double(), exact, atol=1e-4)
        bf16_head = Head(lambda h: h, torch.nn.Linear(64, fp32.model.lm_head.out_features, bias=False).to(torch.bfloat16))
        bf16_head.final.weight.copy_(fp32.model.lm_head.weight)
        low = _blocked_logprobs(bf16_head, hidden.to(torch.bfloat16), labels)
        # measured 0.0035 nats (bf16 weights and hidden states; logits rounded to bf16 per block)
        assert low.dtype == torch.float32 and (low.double() - exact).abs().max() < 0.05
