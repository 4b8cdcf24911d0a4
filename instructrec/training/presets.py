"""Training presets: the budgets ``instructrec train --preset`` names.

``smoke`` trains a tiny random model in well under a minute (tests); ``quick`` is the
quick-start default, sized for minutes on 2 CPU cores (measured times: docs/results.md); ``full`` is the
quality run (hours on a CPU; minutes on a GPU with Flan-T5 or the default).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from instructrec.modeling import MINILM, MINILM_PREFIX, TINY


@dataclass(frozen=True)
class Preset:
    name: str
    base: str
    data: str = "games-sample"
    users: int | None = None  # seeded subsample of users (None = all)
    max_history: int = 20
    max_source_tokens: int = 256
    max_target_tokens: int = 48
    per_case: int = 2  # instruction examples generated per training case
    history_share: float = 0.5  # share of examples on the history-only need (sequential recommendation)
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    learning_rate: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    # Train only the decoder (with its cross-attention): the encoder keeps its pretrained
    # representations and costs no backward pass.
    freeze_encoder: bool = False
    # What training minimises: "mle" (the target's likelihood, paper Eq. 1) or "listwise"
    # (softmax over the target and sampled negatives + mle_weight x mle; instructrec/training/objectives.py).
    objective: str = "mle"
    popular_negatives: int = 1  # listwise: negatives drawn by training popularity ...
    uniform_negatives: int = 2  # ... and uniformly (never items the user touched)
    hard_negatives: int = 0  # ... and from the 50 the MiniLM bi-encoder finds nearest the history (hard-10's kind)
    mle_weight: float = 0.5
    decoder_layers: int | None = None  # keep only the decoder's first N layers (None = all)
    frozen_layers: int | None = None  # prefix-LM: freeze the embeddings and the first N layers
    max_cases: int | None = None  # seeded subsample of training cases (None = all)
    eval_steps: int = 250
    save_steps: int = 50  # resumable checkpoints: at most this many steps are redone after a crash
    eval_users: int = 200  # validation cases ranked (1 positive + 9 negatives) at each evaluation
    logging_steps: int = 10
    seed: int = 0
    # GPU-scale knobs: recompute activations in the backward pass (memory for compute), train
    # LoRA adapters instead of every weight, and how many resumable checkpoints (each with the
    # optimizer state resuming needs) are kept.
    gradient_checkpointing: bool = False
    lora: bool = False
    save_total_limit: int | None = 2  # None: every checkpoint (a relay leg's default, tune_cli)

    def override(self, **changes) -> "Preset":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


PRESETS: dict[str, Preset] = {
    "smoke": Preset("smoke", base=TINY, users=60, max_history=5, max_source_tokens=128, max_target_tokens=32,
                    per_case=1, batch_size=8, max_steps=24, learning_rate=1e-3, warmup_steps=0, eval_steps=12,
                    save_steps=6, eval_users=20, logging_steps=4),
    # The quick-start default: the prefix-LM, listwise, on the full Games data, sized to finish the
    # whole command in minutes on 2 cores. Chosen by measurement (docs/training.md "Choosing the
    # default"): side by side on one thread each, it led the 2-layer BERT2BERT at the same steps
    # (validation HR@1 0.263 vs 0.22 at 2,400 examples, 0.327 vs 0.29 at 4,800) at 0.81x its
    # examples/s. Embeddings (the tied output layer) and the bottom 3 layers stay frozen: cheaper
    # steps, and the pretrained reading of text is kept. Most examples on the history-only need.
    "quick": Preset("quick", base=MINILM_PREFIX, data="games", max_cases=16000, max_history=10, max_source_tokens=192,
                    per_case=1, history_share=0.8, objective="listwise", frozen_layers=3, batch_size=16,
                    max_steps=640, learning_rate=2e-4, warmup_steps=20, eval_steps=640, save_steps=40, eval_users=200),
    # The long CPU run of the same recipe: one pass over Games' 288,626 training cases, half of the
    # examples on needs with a preference or an intention. Checkpoints (weights + optimizer, for
    # resuming) every 250 steps (about 10 minutes on one thread), the last one kept; validation on
    # 500 users at each, which is the learning curve (`instructrec curve`).
    "full": Preset("full", base=MINILM_PREFIX, data="games", max_history=10, max_source_tokens=192, per_case=1,
                   history_share=0.5, objective="listwise", frozen_layers=3, batch_size=16, max_steps=18000,
                   learning_rate=2e-4, warmup_steps=100, eval_steps=250, save_steps=250, eval_users=500,
                   logging_steps=50, save_total_limit=1),
    # The earlier BERT2BERT default, as a measured alternative: 2-layer decoder, frozen encoder.
    "quick-bert2bert": Preset("quick-bert2bert", base=MINILM, data="games", max_cases=16000, max_history=10,
                              max_source_tokens=192, per_case=1, history_share=0.8, objective="listwise",
                              decoder_layers=2, freeze_encoder=True, batch_size=16, max_steps=600,
                              learning_rate=3e-4, warmup_steps=20, eval_steps=600, save_steps=40, eval_users=200),
}

# The paper's recipe for a large seq2seq model: likelihood (Eq. 1) on 20-item histories,
# instructions up to 320 tokens, 3 examples per case. Flan-T5-XL (the paper's model) on GPUs
# takes it with 32 examples per optimizer step, sized by the arithmetic in instructrec/training/memory.py
# (docs/gpu.md; computed, not measured). Checkpoints every 1,000 steps, the last one kept.
#   one 80 GB GPU, LoRA: 16 per step x 2 accumulated, bf16 autocast, gradient checkpointing
#   eight GPUs, every weight, FSDP (deploy/accelerate/fsdp-8gpu.yaml): 4 per GPU x 8
_PAPER = Preset("paper", base="google/flan-t5-xl", data="games", max_history=20, max_source_tokens=320, per_case=3,
                batch_size=32, max_steps=30000, learning_rate=1e-4, warmup_steps=500, eval_steps=1000,
                save_steps=1000, eval_users=1000, logging_steps=50, save_total_limit=1)
PRESETS["flan-t5-xl-lora"] = replace(_PAPER, name="flan-t5-xl-lora", lora=True, batch_size=16, grad_accum=2,
                                     learning_rate=3e-4, gradient_checkpointing=True)
PRESETS["flan-t5-xl-full"] = replace(_PAPER, name="flan-t5-xl-full", batch_size=4, grad_accum=1, learning_rate=1e-4,
                                     gradient_checkpointing=True)
