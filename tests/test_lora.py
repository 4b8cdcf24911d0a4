"""LoRA on the Flan-T5 layout (the one-GPU Flan-T5-XL recipe): the merged model that ``instructrec
train --lora`` saves and a user serves scores as the model with its adapters loaded.

peft starts every B matrix at zero, so a fresh adapter changes nothing and cannot tell a right
merge from a dropped one: the adapters here get random non-zero A and B, and the merged scores
must move away from the base model's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from instructrec.modeling import TINY_FLAN_T5, LoadedModel, build_base, load_model
from instructrec.ranker import Ranker

peft = pytest.importorskip("peft")

torch.set_num_threads(1)

SOURCE = "A user played: 1. Halo; 2. Doom; 3. Quake. They ask for a fast shooter. Pick the best candidate."
CANDS = ["Doom Eternal", "Halo Infinite", "Mario Kart 8 Deluxe", "Tetris", "The Legend of Zelda: Breath of the Wild",
         "Quake Champions", "Stardew Valley"]


def _loaded(model, tokenizer) -> LoadedModel:
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name="lora", kind="seq2seq", device=torch.device("cpu"),
                       dtype=torch.float32)


def _adapted():
    """The tiny Flan-T5 with the adapters training attaches (``_trainable``: r=16, all linear
    layers), every A and B matrix random and non-zero."""
    from instructrec.training.presets import PRESETS
    from instructrec.training.tune import _trainable

    model, tokenizer, _ = build_base(TINY_FLAN_T5)
    preset = dataclasses.replace(PRESETS["flan-t5-xl-lora"], base=TINY_FLAN_T5)
    lora = _trainable(model, "seq2seq", preset, lora=True)
    g = torch.Generator().manual_seed(0)
    perturbed = 0
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
                perturbed += ".lora_B." in name
    assert perturbed > 20  # every attention and feed-forward projection of encoder and decoder
    return lora, tokenizer


def test_merged_model_scores_as_its_adapters(tmp_path):
    from peft import PeftModel

    from instructrec.training.tune import _save_model_dir

    lora, tokenizer = _adapted()
    adapter_scores = Ranker(_loaded(lora, tokenizer)).score(SOURCE, CANDS).scores

    # the adapters saved and loaded on a fresh base, as peft users load them
    lora.save_pretrained(tmp_path / "adapter")
    base, _, _ = build_base(TINY_FLAN_T5)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert Ranker(_loaded(reloaded, tokenizer)).score(SOURCE, CANDS).scores == pytest.approx(adapter_scores, abs=1e-6)

    # what `instructrec train --lora` saves (merged), loaded the way `instructrec rank` and the service load it
    _save_model_dir(lora, tokenizer, tmp_path / "model", {"base_model": TINY_FLAN_T5, "lora": True})
    served = load_model(str(tmp_path / "model"), device="cpu", dtype="float32")
    assert not any("lora" in name for name, _ in served.model.named_parameters())
    assert served.model.lm_head.weight is not served.model.shared.weight  # Flan-T5's own head survived the merge
    merged_scores = Ranker(served).score(SOURCE, CANDS).scores
    assert merged_scores == pytest.approx(adapter_scores, abs=1e-4)
    # and the fast path equals one full forward per candidate on the merged model too
    assert Ranker(served).score(SOURCE, CANDS, naive=True).scores == pytest.approx(merged_scores, abs=1e-4)

    # the adapters changed the scores: a merge that dropped them would fail above
    base_scores = Ranker(load_model(TINY_FLAN_T5, device="cpu", dtype="float32")).score(SOURCE, CANDS).scores
    assert max(abs(m - b) for m, b in zip(merged_scores, base_scores)) > 0.05
    # saving merged a copy: the model in training keeps its adapters
    assert Ranker(_loaded(lora, tokenizer)).score(SOURCE, CANDS).scores == adapter_scores
    assert any(".lora_B." in name for name, _ in lora.named_parameters())
