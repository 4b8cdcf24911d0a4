"""GPU memory the Flan-T5-XL presets need: arithmetic from the model's shape, not a measurement.

No GPU is reachable where this was written; these figures size the presets and the README's
GPU section, and are labelled computed there. Parameter counts come from the real model class
built on the meta device (no memory, no download) with Flan-T5-XL's published configuration.

    python -m instructrec.training.memory          # the table for both XL presets

What is counted, per GPU (bytes per element in brackets), for P parameters of which T train,
on N processes (s = N when sharded, else 1):
  weights   fp32 master weights [4] (bf16 autocast computes from them): 4P/s, plus, sharded,
            two T5 blocks gathered at a time (the one computing and the prefetched one)
  gradients fp32 [4] of the trainable parameters: 4T/s
  buckets   DDP on several processes copies the gradients into its all-reduce buckets [4]: 4T
            (``gradient_as_bucket_view`` is off in accelerate's and the Trainer's DDP)
  optimizer AdamW's two moments, fp32 [8] per trainable parameter: 8T/s
  autocast  bf16 autocast caches its bf16 copy [2] of every trainable fp32 weight it casts (a
            leaf that requires grad) until the forward pass ends: 2T, whole even when
            sharded (FSDP2 gathers each block's weights, autocast keeps their copies); frozen
            weights are cast anew at each use and not kept
  activations with gradient checkpointing: each block's input kept (fp32 residual stream [4]),
            one block's working set recomputed at a time (bf16 [2] projections and feed-forward,
            fp32 [4] attention scores with T5's position bias, bf16 [2] probabilities);
            without it, every block's working set at once
  logits    bf16 logits [2], their fp32 copy for the loss [4] and its gradient [4]
Not counted: the CUDA context and allocator fragmentation (add 2-5 GB), NCCL buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
# config.json of google/flan-t5-xl (the fields that size it)
FLAN_T5_XL = dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                  num_heads=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
LORA_RANK = 16  # instructrec/training/tune.py: LoraConfig(r=16, target_modules="all-linear")


def count_parameters(config: dict = FLAN_T5_XL, lora_rank: int = LORA_RANK) -> tuple[int, int]:
    """(all parameters, LoRA parameters with ``target_modules="all-linear"``) of a T5 of this config,
    counted on the model class itself, built on the meta device. A separate ``lm_head`` (untied
    configs) counts on its own."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    with torch.device("meta"):
        model = T5ForConditionalGeneration(T5Config(**config, decoder_start_token_id=0))
    total = sum(p.numel() for p in model.parameters())  # shared once (tied embeddings)
    if config.get("tie_word_embeddings") is False:
        total += model.lm_head.weight.numel()  # a checkpoint's own head, as loaded
    lora = sum(lora_rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head")  # peft's all-linear leaves the output layer out
    return total, lora


@dataclass(frozen=True)
class Estimate:
    weights: float
    gradients: float
    buckets: float
    optimizer: float
    autocast: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.buckets + self.optimizer + self.autocast + self.activations
                + self.logits)


def estimate(*, lora: bool, processes: int, sharded: bool, batch: int, source_tokens: int, target_tokens: int,
             checkpointing: bool, bf16: bool = True, config: dict = FLAN_T5_XL) -> Estimate:
    """Bytes per GPU for one training step of a T5 of ``config`` (see the module docstring)."""
    total, lora_params = count_parameters(config)
    trainable = lora_params if lora else total
    share = processes if sharded else 1
    d, ff, heads, vocab = config["d_model"], config["d_ff"], config["num_heads"], config["vocab_size"]
    layers = config["num_layers"] + config["num_decoder_layers"]
    block = (total - 2 * vocab * d) / layers  # parameters of one block, embeddings and head aside
    weights = 4 * (total + lora_params * lora) / share + (4 * 2 * block if sharded else 0)
    gradients = 4 * trainable / share
    buckets = 4 * trainable if processes > 1 and not sharded else 0
    optimizer = 8 * trainable / share
    autocast = 2 * trainable if bf16 else 0

    def working_set(tokens: int, keys: int, cross: bool) -> float:
        """One block's activations kept for backward (batch rows of ``tokens``, attending to ``keys``)."""
        attn = 1 + cross
        per_token = 2 * (d * (4 * attn + 2) + 3 * ff)  # bf16: q/k/v/o per attention, norms, gated feed-forward
        scores = batch * heads * tokens * (tokens + cross * keys) * (4 + 2)  # fp32 scores + bf16 probabilities
        return batch * tokens * per_token + scores

    enc = working_set(source_tokens, source_tokens, False)
    dec = working_set(target_tokens, source_tokens, True)
    if checkpointing:
        kept = 4 * batch * d * (source_tokens * config["num_layers"] + target_tokens * config["num_decoder_layers"])
        activations = kept + max(enc, dec)
    else:
        activations = enc * config["num_layers"] + dec * config["num_decoder_layers"]
    logits = batch * target_tokens * vocab * (2 + 4 + 4)
    return Estimate(weights, gradients, buckets, optimizer, autocast, activations, logits)


def preset_table() -> list[tuple[str, Estimate]]:
    from .presets import PRESETS

    rows = []
    for name, processes, sharded in (("flan-t5-xl-lora", 1, False), ("flan-t5-xl-full", 8, True)):
        p = PRESETS[name]
        rows.append((f"{name} ({processes} GPU{'s' if processes > 1 else ''}{', FSDP' if sharded else ''})",
                     estimate(lora=p.lora, processes=processes, sharded=sharded, batch=p.batch_size,
                              source_tokens=p.max_source_tokens, target_tokens=p.max_target_tokens,
                              checkpointing=p.gradient_checkpointing)))
    full = PRESETS["flan-t5-xl-full"]
    rows.append(("flan-t5-xl-full on 8 GPUs with DDP instead of FSDP",
                 estimate(lora=False, processes=8, sharded=False, batch=full.batch_size, source_tokens=full.max_source_tokens,
                          target_tokens=full.max_target_tokens, checkpointing=True)))
    rows.append(("the old `full` preset on Flan-T5-XL (32 a GPU, no checkpointing, DDP)",
                 estimate(lora=False, processes=8, sharded=False, batch=32, source_tokens=320, target_tokens=48,
                          checkpointing=False)))
    return rows


def main() -> None:
    total, lora = count_parameters()
    print(f"Flan-T5-XL: {total:,} parameters; LoRA r={LORA_RANK} all-linear: {lora:,}")
    print("| run | weights | gradients | DDP buckets | AdamW | autocast copies | activations | logits | total per GPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, e in preset_table():
        cells = [e.weights, e.gradients, e.buckets, e.optimizer, e.autocast, e.activations, e.logits, e.total]
        print(f"| {name} | " + " | ".join(f"{x / GB:.1f} GB" for x in cells) + " |")


if __name__ == "__main__":
    main()
