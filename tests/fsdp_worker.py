"""Run by tests/test_distributed_training.py under ``torchrun --nproc_per_node 2`` (CPU, gloo):
validation and saving of a T5 in Flan-T5's layout sharded with FSDP2 into the units accelerate's
FSDP2 preparation makes with deploy/accelerate/fsdp-8gpu.yaml (TRANSFORMER_BASED_WRAP on T5Block):
one per T5 block, the input embeddings, the untied head, the root. tests/test_gpu_recipes.py runs
accelerate's own preparation and checks it makes these units."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)


def fsdp_units(model) -> dict[str, str]:
    """Each module ``fully_shard`` made an FSDP unit, by its name ("" for the root) and class."""
    from torch.distributed.fsdp import FSDPModule

    return {name: type(m).__name__ for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, FSDPModule)}


def main(out: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers.models.t5.modeling_t5 import T5Block

    from instructrec.modeling import TINY_FLAN_T5, LoadedModel, build_base, load_model
    from instructrec.ranker import Ranker
    from instructrec.training import distributed
    from instructrec.training.tune import _save_model_dir
    from instructrec.training.validation import score_cases

    dist.init_process_group("gloo")
    model, tokenizer, _ = build_base(TINY_FLAN_T5)  # the same seeded weights on every process
    model.eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="t", kind="seq2seq", device=torch.device("cpu"), dtype=torch.float32)
    ranker = Ranker(loaded)
    words = "legend zelda mario kart halo doom quest star wars edition remastered deluxe racing puzzle".split()
    cases = [ranker.encode(f"user {c} played {' '.join(words[c % 5: c % 5 + 4])}; pick one",
                           [" ".join(words[(c + j) % 14 : (c + j) % 14 + 1 + j % 4]) for j in range(10)]) for c in range(7)]
    with torch.inference_mode():
        reference = score_cases(ranker, cases)  # unsharded: the fast path
    distributed.one_embeddings_module(model)  # as training does before the Trainer wraps it
    for block in [*model.encoder.block, *model.decoder.block]:
        assert isinstance(block, T5Block)
        fully_shard(block)
    fully_shard(model.shared)
    fully_shard([model.lm_head], reshard_after_forward=False)
    fully_shard(model)
    result = {"sharded": distributed.sharded(model), "rank": dist.get_rank(), "units": fsdp_units(model)}
    with torch.inference_mode():
        sharded = score_cases(Ranker(loaded), cases)
    result["max_diff"] = max(abs(a - b) for r, s in zip(reference, sharded) for a, b in zip(r, s))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    distributed.on_main(lambda: _save_model_dir(model, tokenizer, out / "model", {"test": True}, state_dict=state))
    # last: before any forward of the root it would make the embeddings' unit FSDP's root, and every later forward fail
    try:
        with torch.no_grad():
            model.get_encoder()(input_ids=torch.tensor([cases[0].source]))
        result["encoder_alone"] = "ran"
    except RuntimeError as exc:
        result["encoder_alone"] = type(exc).__name__
    if distributed.is_main():
        again = Ranker(load_model(str(out / "model"), device="cpu", dtype="float32"))
        with torch.inference_mode():
            saved = score_cases(again, cases)
        result["saved_max_diff"] = max(abs(a - b) for r, s in zip(reference, saved) for a, b in zip(r, s))
    print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
