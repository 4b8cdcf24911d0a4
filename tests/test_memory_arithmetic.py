"""The per-GPU memory formula the README shows, term by term, on Flan-T5-XL's real parameter count."""

from __future__ import annotations

import pytest

from instructrec.training.memory import count_parameters, estimate

XL = dict(batch=4, source_tokens=320, target_tokens=48, checkpointing=True)


def test_ddp_holds_22_bytes_per_parameter_besides_activations():
    """fp32 weights 4 + gradients 4 + DDP's bucket copy 4 + AdamW 8 + autocast's bf16 copies 2."""
    params, _ = count_parameters()
    ddp = estimate(lora=False, processes=8, sharded=False, **XL)
    assert ddp.total - ddp.activations - ddp.logits == pytest.approx(22 * params)
    assert 62e9 < ddp.total < 64e9  # "about 63 GB", not the 46 GB once printed


def test_fsdp_shards_all_but_autocast_copies_and_the_gathered_blocks():
    params, _ = count_parameters()
    fsdp = estimate(lora=False, processes=8, sharded=True, **XL)
    assert fsdp.gradients == pytest.approx(4 * params / 8) and fsdp.optimizer == pytest.approx(8 * params / 8)
    assert fsdp.buckets == 0 and fsdp.autocast == pytest.approx(2 * params)  # kept whole: every gathered block's copy
    assert estimate(lora=False, processes=8, sharded=True, bf16=False, **XL).autocast == 0


def test_one_process_has_no_buckets_and_lora_caches_only_its_adapters():
    _, lora_params = count_parameters()
    lora = estimate(lora=True, processes=1, sharded=False, **XL)
    assert lora.buckets == 0 and lora.autocast == pytest.approx(2 * lora_params)  # the frozen base is cast anew each use
