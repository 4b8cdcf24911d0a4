"""``instructrec train``: instruction-tune a seq2seq model from a preset."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from instructrec.options import add_device_options, training_bf16

from .data.types import DataError
from .presets import PRESETS, Preset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="smoke: tiny model, <1 min (tests); quick: the quick-start default, minutes on 2 cores; full: the long run of the training relay")
    parser.add_argument("--out", required=True, help="output directory (the model lands in OUT/model)")
    parser.add_argument("--data", help="dataset directory, 'games' (the full Games data shipped) or 'games-sample' (default: the preset's)")
    parser.add_argument("--base", help="base model: a built-in name (minilm-prefixlm, minilm-bert2bert, tiny-random, tiny-random-prefixlm), an HF model directory, or a hub id such as google/flan-t5-xl")
    parser.add_argument("--init", metavar="SHIPPED",
                        help="a leg of the training relay: start from a shipped model (models/minilm-games) and from "
                             "where its card says the data stream stopped, so the leg sees new examples")
    parser.add_argument("--stream-start", type=int, metavar="N",
                        help="with --init: start at example N of the data stream instead of the card's position (past "
                             "the examples earlier legs from the same weights read: docs/relay/legs.csv's data_position)")
    parser.add_argument("--annotations", help="annotations.jsonl from `instructrec annotate` (default: run the offline teacher)")
    parser.add_argument("--users", type=int, help="train on a seeded subsample of this many users")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int, help="examples per device per micro-batch (the global batch is this x --grad-accum x processes)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches accumulated per optimizer step")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--max-history", type=int)
    parser.add_argument("--max-source-tokens", type=int)
    parser.add_argument("--eval-steps", type=int)
    parser.add_argument("--save-steps", type=int)
    parser.add_argument("--eval-users", type=int)
    parser.add_argument("--per-case", type=int, help="instruction examples per training case")
    parser.add_argument("--history-share", type=float, help="share of examples on the history-only need (0..1)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--objective", choices=["mle", "listwise"],
                        help="mle: the target's likelihood (paper Eq. 1); listwise: softmax over the target and sampled "
                             "negatives + --mle-weight x mle (default: the preset's)")
    parser.add_argument("--popular-negatives", type=int, help="listwise: negatives drawn by training popularity")
    parser.add_argument("--uniform-negatives", type=int, help="listwise: negatives drawn uniformly")
    parser.add_argument("--hard-negatives", type=int,
                        help="listwise: negatives drawn from the 50 unseen items the MiniLM bi-encoder finds nearest the "
                             "example's history, as the hard-10 evaluation draws them (default 0)")
    parser.add_argument("--mle-weight", type=float, help="listwise: weight of the target's likelihood loss")
    parser.add_argument("--decoder-layers", type=int, help="keep only the decoder's first N layers (BERT2BERT, T5)")
    parser.add_argument("--frozen-layers", type=int, help="prefix-LM: freeze the embeddings and the first N layers")
    parser.add_argument("--max-cases", type=int, help="build instructions from a seeded subsample of this many training cases")
    freeze = parser.add_mutually_exclusive_group()
    freeze.add_argument("--freeze-encoder", dest="freeze_encoder", action="store_true", default=None,
                        help="train the decoder and its cross-attention only (default: the preset's)")
    freeze.add_argument("--no-freeze-encoder", dest="freeze_encoder", action="store_false")
    add_device_options(parser, training=True)
    # the earlier spelling of --dtype bfloat16 / float32, still accepted
    parser.add_argument("--bf16", dest="bf16", action="store_true", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", default=None,
                        help="train LoRA adapters (needs the 'lora' extra); the saved model is merged (default: the preset's)")
    ckpt = parser.add_mutually_exclusive_group()
    ckpt.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None,
                      help="recompute activations in the backward pass: far less memory, about a third more compute (default: the preset's)")
    ckpt.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--save-total-limit", type=int, help="resumable checkpoints kept (each with optimizer state; default: the preset's, "
                        "every one for a relay leg, --init)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="start over instead of resuming from OUT")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


# --data is the path this run reads (train()'s data_path); the preset keeps naming its own dataset,
# which the saved metadata records and `instructrec promote` reads back.
NOT_OVERRIDES = {"name", "data"}


def preset_from_args(args: argparse.Namespace) -> Preset:
    """The named preset with every option given that is one of its fields (an option left out is None).
    A relay leg (``--init``) keeps every checkpoint unless ``--save-total-limit`` says otherwise:
    promote compares them on the relay users after the leg, and the best step there need not be
    the best on the preset's validation (leg 12's step 250 gained +0.012 on the relay users and
    was deleted by the time the leg ended)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Preset)
             if f.name not in NOT_OVERRIDES and hasattr(args, f.name)}
    preset = PRESETS[args.preset].override(**given)
    if getattr(args, "init", None) and given.get("save_total_limit") is None:
        preset = dataclasses.replace(preset, save_total_limit=None)
    return preset


def run(args: argparse.Namespace) -> int:
    from .tune import TrainingError, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    preset = preset_from_args(args)
    bf16 = training_bf16(args.dtype)
    if args.bf16 is not None and bf16 is not None and args.bf16 != bf16:
        print(f"instructrec train: --dtype {args.dtype} and --{'' if args.bf16 else 'no-'}bf16 disagree; give --dtype only",
              file=sys.stderr)
        return 2
    try:
        meta = train(preset, args.out, data_path=args.data, annotations_path=args.annotations, device=args.device,
                     bf16=args.bf16 if bf16 is None else bf16, lora=preset.lora, resume=args.resume, progress=args.progress, init=args.init,
                     stream_start=args.stream_start)
    except (DataError, TrainingError, FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"instructrec train: {exc}", file=sys.stderr)
        return 2
    from . import distributed

    summary = {k: meta.get(k) for k in ("steps", "best_step", "examples_per_second", "validation", "template_version", "relay")}
    if distributed.is_main():  # one summary per run, not one per process
        print(json.dumps({"model": f"{args.out}/model", **summary}, indent=2))
    distributed.finish()
    return 0
