"""Instruction tuning (paper Eq. 1): minimise the negative log-likelihood of the target
response given the instruction, over a mixture of templates and task forms.

Built on the HF Trainer, which brings what a long CPU or multi-GPU run needs: progress
bars, bf16 autocast, gradient accumulation, DDP through ``accelerate launch``/``torchrun``,
and resumable checkpoints (model, optimizer, scheduler, RNG and data position). On top
of it this module adds the recommender's own validation (HR@1 of the likelihood ranker
on held-out cases, the metric that picks the best checkpoint) and the output layout:

    OUT/instructions.jsonl    the generated instruction data (reused on resume)
    OUT/annotations.jsonl     teacher annotations (a resumable cache)
    OUT/checkpoints/          Trainer checkpoints for resuming after a crash or kill -9
    OUT/best/                 the best model by validation HR@1 so far
    OUT/model/                the final model: HF directory + instructrec.json
    OUT/init.json             with --init: the shipped model and stream position this leg started from

Every saved model's metadata carries ``relay``: how far into the data stream its weights got
(``data_position``) and the examples and training seconds behind them over every leg
(:mod:`instructrec.training.stream`; ``instructrec promote`` ships them with the weights).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from instructrec.aspects import UserNeed
from instructrec.checkpoint import checkpoint_version, read_meta, write_meta
from instructrec.instruction import build as build_instruction
from instructrec.instruction import source_token_ids
from instructrec.modeling import (
    PREFIX_LM,
    SEQ2SEQ,
    LoadedModel,
    build_base,
    cpu_has_bf16,
    cuda_has_bf16,
    cut_decoder,
    resolve_device,
    write_portable_t5_config,
)
from instructrec.ranker import Ranker, decoder_start_id, eos_id, target_ids
from instructrec.records import code_commit, platform_brief
from instructrec.templates import TEMPLATE_VERSION

from . import distributed, stream
from .annotate.offline import OfflineTeacher
from .annotate.teachers import Kind
from .checkpoints import last_good_checkpoint
from .data.load import load_dataset
from .data.types import Case, InteractionData
from .instructions import Example, Mixture, build_examples, read_examples, summary, write_examples
from .metrics import candidate_set, metrics_from_ranks, rank_of
from .objectives import OBJECTIVES, ListwiseCollator, NegativeSampler, attach_negatives, freeze_bottom, listwise_loss
from .presets import Preset

log = logging.getLogger(__name__)
# EncoderDecoderModel warns on every step that its loss moved into the framework in v4.12.
warnings.filterwarnings("ignore", message="Version v4.12.0 introduces a better way", category=FutureWarning)

EVAL_SEED = 2023  # candidate sets for validation are fixed by this seed


class TrainingError(RuntimeError):
    pass


def validation_metrics(model, tokenizer, data: InteractionData, cases: list[Case], preset: Preset,
                       device: torch.device, n_negatives: int = 9, kind: str = SEQ2SEQ) -> dict[str, float]:
    """HR/NDCG of the likelihood ranker on ``cases`` (1 positive + ``n_negatives``), serving path,
    several cases per call (:mod:`instructrec.training.validation`; full forwards on every process for a
    sharded model)."""
    return metrics_from_ranks(validation_ranks(model, tokenizer, data, cases, preset, device, n_negatives, kind))


def validation_ranks(model, tokenizer, data: InteractionData, cases: list[Case], preset: Preset,
                     device: torch.device, n_negatives: int = 9, kind: str = SEQ2SEQ) -> list[int]:
    """The 0-based rank of each case's positive among its candidates (the history-only need)."""
    from .validation import score_cases

    was_training = model.training
    model.eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="training", kind=kind, device=device,
                         dtype=next(model.parameters()).dtype)
    ranker = Ranker(loaded, max_source_tokens=preset.max_source_tokens, max_target_tokens=preset.max_target_tokens)
    encoded, positives = [], []
    for case in cases:
        need = UserNeed(history=tuple(data.title(i) for i in case.history))
        inst = build_instruction(need, tokenizer, ranker.max_source_tokens)
        cands = candidate_set(data, case, n_negatives, EVAL_SEED)
        encoded.append(ranker.encode(inst.source, [data.title(c) for c in cands]))
        positives.append(cands.index(case.target))
    try:
        with torch.inference_mode():
            scores = score_cases(ranker, encoded)
    finally:
        model.train(was_training)
    return [rank_of(s, p) for s, p in zip(scores, positives)]


class _Examples(torch.utils.data.Dataset):
    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]


def tokenize_examples(examples: list[Example], tokenizer, preset: Preset, eos: int) -> list[dict]:
    """Token ids of each example's instruction (cut by the ranker's rule, so training sees what
    serving will) and target."""
    sources = source_token_ids(tokenizer, [e.source for e in examples], preset.max_source_tokens)
    feats = []
    for (ids, _), ex in zip(sources, examples):
        labels, _ = target_ids(tokenizer, ex.target, preset.max_target_tokens, eos)
        feats.append({"input_ids": ids, "labels": labels})
    return feats


def annotate_offline(data: InteractionData, cases: list[Case], path: Path, progress: bool) -> dict:
    """Fine-grained annotations from the offline teacher, cached in ``path`` (resumable)."""
    from .annotate.pipeline import annotate_cases, load_annotations

    asyncio.run(annotate_cases(data, cases, OfflineTeacher(), list(Kind), path, progress=progress))
    return load_annotations(path)


def _save_model_dir(model, tokenizer, target: Path, meta: dict, state_dict: dict | None = None) -> None:
    """Write an HF model directory atomically (a temp dir renamed into place); ``state_dict``: the
    full weights gathered from a sharded model."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if hasattr(model, "merge_and_unload"):  # a peft model: save the merged weights, serving needs no peft
        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(tmp, state_dict=state_dict)
    write_portable_t5_config(tmp)  # what transformers 4.x, vLLM and TGI read must be the model saved
    tokenizer.save_pretrained(tmp)
    write_meta(tmp, meta)
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _save_model(trainer, tokenizer, target: Path, meta: dict) -> None:
    """Save the trainer's model from every process's call: a sharded model's full state is gathered
    first (a collective), then the main process writes the directory while the others wait."""
    model = trainer.model
    state = None
    if distributed.sharded(model):
        if hasattr(model, "merge_and_unload"):
            raise TrainingError("LoRA adapters with a sharded model (FSDP/ZeRO-3) are not supported; "
                                "train LoRA on one GPU or without sharding")
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    distributed.on_main(lambda: _save_model_dir(model, tokenizer, target, meta, state_dict=state))


def train(preset: Preset, out: str | Path, *, data_path: str | None = None, annotations_path: str | None = None,
          device: str | None = None, bf16: bool | None = None, lora: bool = False, resume: bool = True,
          progress: bool = True, init: str | Path | None = None, stream_start: int | None = None) -> dict:
    """Run (or resume) one instruction-tuning job; returns the final model's metadata. ``init``: a
    shipped model directory (a leg of the relay): start from its weights, and from where its
    card says the data stream stopped (or at example ``stream_start``)."""
    if stream_start is not None and (not init or stream_start < 0):
        raise TrainingError(f"--stream-start {stream_start}: " + ("a position in the stream is 0 or more" if init else
                                                                  "only a relay leg (--init) starts inside the stream"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lora = lora or preset.lora
    dev = resolve_device(device)
    distributed.init(cpu=dev.type == "cpu")  # under torchrun: shared files are the main process's
    if not resume:
        distributed.on_main(lambda: _start_over(out))
    use_bf16 = bf16 if bf16 is not None else (
        (dev.type == "cuda" and cuda_has_bf16(dev)) or (dev.type == "cpu" and cpu_has_bf16()))

    data, split, model, tokenizer, kind = _data_and_base(preset, data_path, init)
    eos = eos_id(tokenizer, model)
    train_cases = _seeded_subset(split.train, preset.max_cases, preset.seed) if preset.max_cases else split.train
    examples = _instruction_examples(data, train_cases, tokenizer, preset, out, annotations_path, resume, progress)
    stats = summary(examples)
    if distributed.is_main():
        (out / "instructions_summary.json").write_text(json.dumps(stats, indent=2) + "\n")
    features = _features(examples, data, split, tokenizer, preset, eos, out / "embeddings")
    per_step = preset.batch_size * preset.grad_accum * distributed.world_size()
    relay = _relay_start(out, init, preset, len(examples), per_step, resume, stream_start)
    if init:  # this leg's window of the stream, in order (the Trainer then reads it sequentially)
        lengths = [len(f["input_ids"]) for f in features]
        features = [features[i] for i in stream.window(lengths, per_step, preset.seed, relay["start"],
                                                        preset.max_steps * per_step)]
    valid_cases = _seeded_subset(split.valid, preset.eval_users, preset.seed, key=lambda c: c.user_id)

    model = _trainable(model, kind, preset, lora)
    base_meta = {
        "base_model": preset.base,
        "template_version": TEMPLATE_VERSION,
        "preset": asdict(preset),
        "data": {"name": data.name, "source": data.source, "users": len(data.sequences), "items": len(data.items),
                 "train_cases": len(split.train), "cases_used": len(train_cases), "examples": len(examples), "validation_cases": len(valid_cases)},
        "instructions": stats,
        "lora": lora,
        "bf16": use_bf16,
        "device": str(dev),
        "machine": platform_brief(),
        "commit": code_commit(),
        "init": relay["init"],
    }
    run = _Run(preset=preset, data=data, valid_cases=valid_cases, tokenizer=tokenizer, kind=kind, base_meta=base_meta,
               start_id=decoder_start_id(model), pad_id=tokenizer.pad_token_id or 0, relay=relay, per_step=per_step)
    train_set = _Examples(features)
    trainer = RecTrainer(
        model=model,
        args=_training_arguments(preset, out, dev, use_bf16, progress, sequential=bool(init)),
        data_collator=_collator(run, model),
        train_dataset=train_set,
        eval_dataset=train_set,  # unused: evaluate() ranks validation cases instead
        processing_class=tokenizer,
        callbacks=[Throughput(run)],
        run=run,
    )
    best_dir = out / "best"
    trainer.add_callback(BestModel(trainer, best_dir))

    ckpt = distributed.from_main(last_good_checkpoint(out / "checkpoints") if resume else None)
    if ckpt:
        log.info("resuming from %s", ckpt)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=ckpt)
    wall = time.perf_counter() - started

    # The final model, OUT/model: the best validated one (with this run's numbers), else the last weights.
    meta = {**base_meta, "steps": trainer.state.global_step,
            "examples_per_second": round(run.examples / run.train_seconds, 2) if run.train_seconds else None,
            "train_seconds_this_run": round(wall, 1), "train_seconds_total": run.seconds_total(trainer.state),
            "train_loss": result.training_loss,
            "resumed_from": ckpt}
    if distributed.from_main(best_dir.exists()):
        best = read_meta(best_dir)
        meta["validation"] = best.get("validation", {})
        meta["best_step"] = best.get("steps")
        meta["relay"] = best.get("relay")  # model/ holds the best weights: their position
        distributed.on_main(lambda: _copy_model_dir(best_dir, out / "model", meta))
    else:
        meta["relay"] = run.relay_at(trainer.state.global_step, meta["train_seconds_total"])
        _save_model(trainer, tokenizer, out / "model", meta)
    return meta


def _start_over(out: Path) -> None:
    """Drop a previous run's outputs (the annotation cache stays valid: it is keyed by request)."""
    for stale in ("checkpoints", "best", "model"):
        shutil.rmtree(out / stale, ignore_errors=True)
    (out / "instructions.jsonl").unlink(missing_ok=True)
    (out / INIT_FILE).unlink(missing_ok=True)


def _data_and_base(preset: Preset, data_path: str | None, init: str | Path | None = None):
    """The data (and its split) and the base model (with ``init``'s shipped tensors applied), after
    checking the preset can train it."""
    if init:
        from instructrec.shipped import is_shipped, read_header

        if not is_shipped(init):
            raise TrainingError(f"--init {init}: not a shipped model directory (weights.safetensors without config.json, "
                                "as `instructrec promote` writes it)")
        shipped_base = read_header(init)["base"]
        if shipped_base != preset.base:
            raise TrainingError(f"--init {init} was tuned from {shipped_base}, but this run trains {preset.base}; "
                                f"pass --base {shipped_base}")
    data = load_dataset(data_path or preset.data)
    if preset.users:
        data = data.sample_users(preset.users, seed=preset.seed)
    split = data.split(preset.max_history)
    # float32 master weights whatever the checkpoint is stored in; bf16 is autocast's, per operation
    model, tokenizer, kind = build_base(str(init) if init else preset.base, torch.float32)
    if kind not in (SEQ2SEQ, PREFIX_LM):
        raise TrainingError(f"base model {preset.base!r} is a {kind} model; instruction tuning here trains "
                            "encoder-decoders and the prefix-LM")
    if kind == PREFIX_LM and preset.freeze_encoder:
        raise TrainingError("a prefix-LM has no separate encoder: use --frozen-layers N instead of --freeze-encoder")
    if preset.objective not in OBJECTIVES:
        raise TrainingError(f"unknown objective {preset.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if preset.objective == "listwise" and distributed.world_size() > 1:
        # the loss calls the encoder and decoder directly, outside DDP's forward, so
        # gradients would not be synchronised across processes
        raise TrainingError("--objective listwise runs in one process (one GPU or the CPU); "
                            "use --objective mle for multi-process (DDP) runs")
    if preset.decoder_layers:
        cut_decoder(model, preset.decoder_layers)
    return data, split, model, tokenizer, kind


INIT_FILE = "init.json"


def _relay_start(out: Path, init: str | Path | None, preset: Preset, n_examples: int, per_step: int, resume: bool,
                 stream_start: int | None = None) -> dict:
    """Where this run starts in the relay: at 0 from the base; with ``init``, where the shipped
    model's card says the stream stopped (or at ``stream_start``: legs that were not promoted
    leave the card where it was, so the next leg would read their examples again), with the
    examples and seconds behind it. Recorded in OUT/init.json, which a resumed run keeps even
    if the shipped model has moved on since."""
    from instructrec.shipped import read_card

    here = {"preset": preset.name, "seed": preset.seed, "examples": n_examples, "per_step": per_step}
    if not init:
        return {"start": 0, "examples_before": 0, "seconds_before": 0.0, "init": None, "stream": here}
    path = out / INIT_FILE
    if resume and path.exists() and distributed.from_main(last_good_checkpoint(out / "checkpoints")):
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded["init"]["checkpoint_version"] != checkpoint_version(init):
            log.warning("%s has changed since this leg started from it (%s); resuming the leg as it started",
                        init, recorded["init"]["checkpoint_version"])
        return recorded
    card = read_card(init)
    if not isinstance(card.get("data_position"), int):
        raise TrainingError(f"{Path(init) / 'card.json'}: no data_position (how far into the data stream the shipped "
                            "weights got); ship models with `instructrec promote`")
    theirs = card.get("stream") or {}
    if theirs and (theirs.get("preset"), theirs.get("examples")) != (preset.name, n_examples):
        log.warning("%s counted its data position in the %s stream of %s examples; this run's is the %s stream of %d",
                    init, theirs.get("preset"), theirs.get("examples"), preset.name, n_examples)
    relay = {"start": card["data_position"] if stream_start is None else stream_start, "examples_before": int(card.get("examples_total") or card["data_position"]),
             "seconds_before": float(card.get("train_seconds_total") or 0.0),
             "init": {"from": str(init), "checkpoint_version": checkpoint_version(init)}, "stream": here}
    distributed.on_main(lambda: path.write_text(json.dumps(relay, indent=2) + "\n", encoding="utf-8"))
    log.info("relay: starting from %s at example %d of the %s stream", init, relay["start"], preset.name)
    return relay


def _seeded_subset(cases: list[Case], limit: int, seed: int, key=None) -> list[Case]:
    """At most ``limit`` of ``cases``, a seeded sample (sorted by ``key`` if given) when there are more."""
    if len(cases) <= limit:
        return cases
    picked = random.Random(seed).sample(cases, limit)
    return sorted(picked, key=key) if key else picked


def _instruction_examples(data: InteractionData, cases: list[Case], tokenizer, preset: Preset, out: Path,
                          annotations_path: str | None, resume: bool, progress: bool) -> list[Example]:
    """The run's instruction examples: reused from OUT when resuming, else built by the main
    process (annotating first unless annotations are given) and read back by the others."""
    examples_path = out / "instructions.jsonl"
    if distributed.from_main(examples_path.exists() and resume):
        examples = read_examples(examples_path)
        log.info("reusing %d instruction examples from %s", len(examples), examples_path)
    else:
        def build_and_write():  # the main process annotates and writes; the others read its file
            if annotations_path:
                from .annotate.pipeline import read_annotations_file

                annotations = read_annotations_file(annotations_path)
            else:
                annotations = annotate_offline(data, cases, out / "annotations.jsonl", progress)
            built = build_examples(data, cases, annotations, tokenizer, preset.max_source_tokens,
                                   seed=preset.seed, mixture=Mixture(per_case=preset.per_case, history_share=preset.history_share))
            write_examples(examples_path, built)
            return built

        examples = distributed.on_main(build_and_write)
        if examples is None:
            examples = read_examples(examples_path)
    if not examples:
        raise TrainingError(f"no training examples could be built from {data.source or data.name}")
    return examples


def _features(examples: list[Example], data: InteractionData, split, tokenizer, preset: Preset, eos: int,
              embeddings: Path | None = None) -> list[dict]:
    """Token ids per example, with sampled negatives for the listwise objective (hard ones from
    the bi-encoder, its title embeddings kept in ``embeddings``)."""
    features = tokenize_examples(examples, tokenizer, preset, eos)
    if preset.objective == "listwise":
        # popularity over every training case of the data, not only the sampled ones
        sampler = NegativeSampler(data, split.train, popular=preset.popular_negatives, uniform=preset.uniform_negatives,
                                  hard=preset.hard_negatives)
        pools = None
        if preset.hard_negatives:
            from .hard_negatives import hard_pools

            def find() -> object:
                return hard_pools(examples, split.train, data, max_history=preset.max_history, cache_dir=embeddings)

            try:  # the main process first: it writes the title embeddings the others then read
                pools = distributed.on_main(find) or find()
            except RuntimeError as exc:
                raise TrainingError(str(exc)) from None
        listed = attach_negatives(features, examples, data, sampler, tokenizer, preset.max_target_tokens, eos, preset.seed,
                                  pools)
        log.info("listwise: %d of %d examples contrast their target with %d negatives (%d hard)", listed, len(features),
                 preset.hard_negatives + preset.popular_negatives + preset.uniform_negatives, preset.hard_negatives)
    return features


def _trainable(model, kind: str, preset: Preset, lora: bool):
    """The model with what this run trains: LoRA adapters, or the weights left unfrozen."""
    if lora and kind != SEQ2SEQ:
        raise TrainingError("--lora trains adapters of a seq2seq model (e.g. Flan-T5); the prefix-LM trains in full")
    if lora:
        try:
            from peft import LoraConfig, TaskType, get_peft_model
        except ImportError as exc:
            raise TrainingError("--lora needs peft: pip install 'instructrec[lora]'") from exc
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=16, lora_alpha=32,
                                                 lora_dropout=0.05, target_modules="all-linear"))
    distributed.freeze_unused(model)
    if preset.freeze_encoder:
        for param in model.get_encoder().parameters():
            param.requires_grad_(False)
    if preset.frozen_layers:
        if kind != PREFIX_LM:
            raise TrainingError("--frozen-layers applies to a prefix-LM; use --freeze-encoder for an encoder-decoder")
        freeze_bottom(model, preset.frozen_layers)
    # FSDP2 needs the shared embeddings in one unit. Last: --freeze-encoder reaches the embeddings
    # through the encoder's submodules (they are its input too), which this takes away.
    distributed.one_embeddings_module(model)
    return model


@dataclass
class _Run:
    """What the trainer, its callbacks and ``train()`` share over one run: validation inputs, the
    metadata written with each saved model, training-step time, listwise loss terms."""

    preset: Preset
    data: InteractionData
    valid_cases: list[Case]
    tokenizer: object
    kind: str
    base_meta: dict
    start_id: int
    pad_id: int
    relay: dict = field(default_factory=dict)
    per_step: int = 1  # examples per optimizer step, over every process
    train_seconds: float = 0.0
    examples: int = 0
    prior_seconds: float | None = None
    loss_parts: dict[str, list[float]] = field(default_factory=dict)

    def seconds_total(self, state=None) -> float:
        """Seconds of training steps over every run of this output folder (resumes included)."""
        if self.prior_seconds is None and state is not None:
            self.prior_seconds = next((h["train_seconds_total"] for h in reversed(state.log_history)
                                       if "train_seconds_total" in h), 0.0)
        return round((self.prior_seconds or 0.0) + self.train_seconds, 1)

    def relay_at(self, step: int, seconds: float) -> dict:
        """The relay's position for weights after ``step`` steps of this run (and ``seconds`` of them)."""
        consumed = step * self.per_step
        r = self.relay
        return {"data_position": r["start"] + consumed, "examples_total": r["examples_before"] + consumed,
                "train_seconds_total": round(r["seconds_before"] + seconds, 1), "start": r["start"], "steps": step,
                "examples_before": r["examples_before"], "seconds_before": r["seconds_before"],
                "init": r["init"], "stream": r["stream"]}


class RecTrainer(Trainer):
    """The Trainer with the listwise loss, training-time logs, and validation by ranking (what
    :class:`BestModel` reads to keep the best model)."""

    def __init__(self, *args, run: _Run, **kwargs):
        self.run = run
        super().__init__(*args, **kwargs)
        # T5's forward takes **kwargs, so the Trainer would take its loss for one already divided by the
        # target tokens of the whole accumulated batch across processes (it is a plain per-batch mean),
        # skip the division by the accumulation steps and multiply by the number of processes: the loss
        # and gradients would be scaled by both. Declared as it is, the Trainer divides the mean by the
        # accumulation steps and DDP averages across processes.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "cand_labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        run = self.run
        loss, parts = listwise_loss(model, inputs, start_id=run.start_id, pad_id=run.pad_id,
                                    mle_weight=run.preset.mle_weight)
        for k, v in parts.items():
            run.loss_parts.setdefault(k, []).append(v)
        return (loss, None) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        parts = self.run.loss_parts
        if "loss" in logs and parts:  # the listwise terms, averaged since the last log
            logs.update({k: round(sum(v) / len(v), 4) for k, v in parts.items()})
            parts.clear()
        # training seconds and examples so far, over every resumed run (the learning curve's x axes)
        logs["train_seconds_total"] = self.run.seconds_total(self.state)
        logs["examples_seen"] = self.state.global_step * self.args.per_device_train_batch_size \
            * self.args.gradient_accumulation_steps * max(1, self.args.world_size)
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        start = time.perf_counter()
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self._validate().items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 2)
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _validate(self) -> dict[str, float]:
        run = self.run

        # Under Trainer the model's forward autocasts when bf16 is on; rank under the same
        # autocast so every part of the fast path computes in one dtype.
        def validate():
            with torch.autocast(self.args.device.type, dtype=torch.bfloat16, enabled=bool(self.args.bf16)):
                return validation_metrics(self.model, run.tokenizer, run.data, run.valid_cases, run.preset,
                                          self.args.device, kind=run.kind)

        # a sharded model validates on every process; otherwise the main one does, the others wait
        if distributed.sharded(self.model):
            return validate()
        return distributed.from_main(distributed.on_main(validate))


class BestModel(TrainerCallback):
    """Saves the model to ``directory`` (OUT/best) each time validation HR@1 beats the best so far.

    Every process gets the same metrics, so all take the same branch: saving a sharded model
    gathers its weights, a collective. Holds the trainer for that gather (its accelerator)."""

    def __init__(self, trainer: RecTrainer, directory: Path):
        self.trainer = trainer
        self.directory = directory
        # a resumed run has to beat what the earlier runs of this OUT saved
        self.best = read_meta(directory).get("validation", {}).get("hr@1", -1.0) if directory.exists() else -1.0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        hr1 = metrics["eval_hr@1"]
        if hr1 <= self.best:
            return
        self.best = hr1
        run = self.trainer.run
        seconds = run.seconds_total(state)
        meta = {**run.base_meta, "steps": state.global_step, "train_seconds_total": seconds,
                "validation": {k.removeprefix("eval_"): v for k, v in metrics.items()},
                "relay": run.relay_at(state.global_step, seconds)}
        _save_model(self.trainer, run.tokenizer, self.directory, meta)


class Throughput(TrainerCallback):
    """Examples per second over training steps only (evaluation excluded)."""

    def __init__(self, run: _Run):
        self.run = run

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.run.train_seconds += time.perf_counter() - self._t
        self.run.examples += args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)


def _training_arguments(preset: Preset, out: Path, dev: torch.device, use_bf16: bool, progress: bool,
                        sequential: bool = False) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=preset.batch_size,
        gradient_accumulation_steps=preset.grad_accum,
        max_steps=preset.max_steps,
        learning_rate=preset.learning_rate,
        warmup_steps=preset.warmup_steps,
        weight_decay=preset.weight_decay,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        bf16=use_bf16,
        use_cpu=dev.type == "cpu",
        eval_strategy="steps",
        eval_steps=preset.eval_steps,
        save_strategy="steps",
        save_steps=preset.save_steps,
        save_total_limit=preset.save_total_limit,
        activation_checkpointing=preset.gradient_checkpointing,  # --gradient-checkpointing
        # non-reentrant: works with frozen inputs (LoRA, a frozen encoder) and under FSDP
        activation_checkpointing_kwargs={"use_reentrant": False} if preset.gradient_checkpointing else None,
        ddp_find_unused_parameters=False,  # every trainable parameter is used (the encoder pooler is frozen)
        logging_steps=preset.logging_steps,
        # a relay leg's examples come already in the stream's (length-grouped) order
        train_sampling_strategy="sequential" if sequential else "group_by_length",
        report_to="none",
        seed=preset.seed,
        data_seed=preset.seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def _collator(run: _Run, model):
    # the listwise path scores candidates itself; a prefix-LM trains through it for mle too (no negatives)
    if run.preset.objective == "listwise" or run.kind == PREFIX_LM:
        return ListwiseCollator(run.pad_id)
    return DataCollatorForSeq2Seq(run.tokenizer, model=model, label_pad_token_id=-100)


def _copy_model_dir(source: Path, target: Path, meta: dict) -> None:
    """``source`` as ``target`` with ``meta``: copied beside, then renamed into place, never a half-copied model."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    write_meta(tmp, meta)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
