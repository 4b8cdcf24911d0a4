"""Instruction tuning end to end on the smoke preset: checkpoints, metadata, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instructrec.checkpoint import read_meta
from instructrec.templates import TEMPLATE_VERSION
from instructrec.training.presets import PRESETS
from instructrec.training.checkpoints import last_good_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "instructrec.cli", "train", "--preset", "smoke", "--out", str(out), "--no-progress", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = subprocess.run(_train_cmd(out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_smoke_writes_model_and_metadata(smoke_run):
    out, proc = smoke_run
    summary = json.loads(proc.stdout[proc.stdout.rindex("{\n  \"model\""):])  # the summary follows the step logs
    assert summary["steps"] == PRESETS["smoke"].max_steps
    model_dir = out / "model"
    assert (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))
    meta = read_meta(model_dir)
    assert meta["template_version"] == TEMPLATE_VERSION
    assert meta["base_model"] == PRESETS["smoke"].base
    assert meta["data"]["examples"] > 0 and meta["data"]["users"] == PRESETS["smoke"].users
    assert meta["examples_per_second"] > 0
    assert 0 < meta["train_seconds_total"] <= meta["train_seconds_this_run"]  # steps only, against the wall
    assert 0.0 <= meta["validation"]["hr@1"] <= 1.0 and meta["validation"]["cases"] == PRESETS["smoke"].eval_users
    # every instruction example records its template, <P,I,T>, teacher field and user
    rows = [json.loads(l) for l in (out / "instructions.jsonl").read_text().splitlines()]
    assert len(rows) == meta["data"]["examples"]
    assert all(r["template_id"] and r["instantiation"].startswith("<") and r["user_id"] and "teacher" in r for r in rows)
    assert any(r["teacher"] == "offline-v2" for r in rows) and any(r["teacher"] is None for r in rows)



def _best_step_by_validation(out: Path) -> int:
    """The step of the first validation that beat every earlier one, from the run's Trainer state."""
    state = json.loads((Path(last_good_checkpoint(out / "checkpoints")) / "trainer_state.json").read_text())
    evals = [(h["step"], h["eval_hr@1"]) for h in state["log_history"] if "eval_hr@1" in h]
    assert evals
    best_step, best = None, -1.0
    for step, hr1 in evals:
        if hr1 > best:
            best_step, best = step, hr1
    return best_step


def test_best_holds_the_first_best_validation_and_model_holds_best(smoke_run):
    """OUT/best is saved when validation HR@1 improves and left alone when it does not; OUT/model
    is the best one, with the run's own numbers."""
    out, _ = smoke_run
    best_step = _best_step_by_validation(out)
    best, model = read_meta(out / "best"), read_meta(out / "model")
    assert best["steps"] == best_step and model["best_step"] == best_step
    assert model["validation"] == best["validation"] and model["relay"] == best["relay"]
    assert model["steps"] == PRESETS["smoke"].max_steps and "train_loss" in model and "train_loss" not in best
    weights = sorted(p.name for p in (out / "best").glob("*.safetensors"))
    assert weights and all((out / "best" / w).read_bytes() == (out / "model" / w).read_bytes() for w in weights)


def test_every_preset_option_given_reaches_the_preset():
    """`instructrec train`'s options named after a Preset field override it; --data does not (it is
    the path train() reads, the preset keeps naming its dataset)."""
    import argparse
    import dataclasses

    from instructrec.training.presets import Preset
    from instructrec.training.tune_cli import NOT_OVERRIDES, add_arguments, preset_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    fields = {f.name for f in dataclasses.fields(Preset)}
    argv, want = ["--out", "o", "--preset", "smoke", "--data", "elsewhere"], {}
    for action in parser._actions:
        if action.dest not in fields or action.dest in NOT_OVERRIDES or not action.option_strings:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:  # a switch: the opposite of the smoke preset's value
            if action.const == getattr(PRESETS["smoke"], action.dest):
                continue
            argv.append(flag)
            want[action.dest] = action.const
        else:
            value = action.choices[-1] if action.choices else {int: 7, float: 0.25}.get(action.type, "x")
            argv += [flag, str(value)]
            want[action.dest] = value
    assert len(want) >= 25
    preset = preset_from_args(parser.parse_args(argv))
    assert {k: getattr(preset, k) for k in want} == want
    assert preset.data == PRESETS["smoke"].data and preset.name == "smoke"
    assert preset_from_args(parser.parse_args(["--out", "o", "--preset", "smoke"])) == PRESETS["smoke"]

def test_trained_model_ranks_through_the_cli(smoke_run):
    out, _ = smoke_run
    proc = subprocess.run([sys.executable, "-m", "instructrec.cli", "rank", "--model", str(out / "model"),
                           "--history", "Halo 3 - Xbox 360", "--candidate", "Gears of War - Xbox 360",
                           "--candidate", "Mario Kart Wii", "--json"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads(proc.stdout)
    assert sorted(r["index"] for r in answer["ranked"]) == [0, 1]


def test_resume_after_kill_loses_no_steps(tmp_path):
    """kill -9 mid-run, rerun the same command: it resumes from the last checkpoint and ends at max_steps."""
    out = tmp_path / "run"
    preset = PRESETS["smoke"]
    proc = subprocess.Popen(_train_cmd(out, "--max-steps", "40"), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            ckpt = last_good_checkpoint(out / "checkpoints")
            if ckpt and int(ckpt.rsplit("-", 1)[1]) >= 2 * preset.save_steps:
                break
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = int(last_good_checkpoint(out / "checkpoints").rsplit("-", 1)[1])
    assert killed_at < 40
    assert not (out / "model").exists()
    again = subprocess.run(_train_cmd(out, "--max-steps", "40"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    meta = read_meta(out / "model")
    assert meta["steps"] == 40
    # it resumed from the last complete checkpoint written before the kill: no step before it is redone
    assert meta["resumed_from"] and Path(meta["resumed_from"]).name == f"checkpoint-{killed_at}"
    state = json.loads((Path(last_good_checkpoint(out / "checkpoints")) / "trainer_state.json").read_text())
    assert state["global_step"] == 40


def test_bad_data_path_is_a_clear_error(tmp_path):
    proc = subprocess.run(_train_cmd(tmp_path / "o", "--data", str(tmp_path / "missing")), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "missing" in proc.stderr and "Traceback" not in proc.stderr


def test_generic_seq2seq_with_lora_trains_and_merges(tmp_path):
    """The path Flan-T5-XL takes on a GPU (any HF seq2seq, LoRA adapters, merged on save), on a tiny T5."""
    pytest.importorskip("peft")
    out = tmp_path / "t5"
    proc = subprocess.run(_train_cmd(out, "--base", "tiny-random-t5", "--lora", "--max-steps", "6", "--eval-steps", "6",
                                     "--dtype", "float32"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = read_meta(out / "model")
    assert meta["lora"] is True and meta["base_model"] == "tiny-random-t5" and meta["steps"] == 6
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == "t5"
    # merged weights: a plain HF model directory that loads and ranks without peft
    from instructrec.modeling import load_model
    from instructrec.ranker import Ranker

    loaded = load_model(str(out / "model"), device="cpu", dtype="float32")
    assert not any("lora" in name for name, _ in loaded.model.named_parameters())
    scores = Ranker(loaded).score("a user who likes racing games", ["Forza Motorsport 4", "Tetris"]).scores
    assert len(scores) == 2 and all(s < 0 for s in scores)


def test_freeze_encoder_trains_only_the_decoder(tmp_path):
    """--freeze-encoder: the saved encoder is the base's, bit for bit; the decoder moved."""
    import torch

    from instructrec.modeling import build_base, load_model

    out = tmp_path / "frozen"
    proc = subprocess.run(_train_cmd(out, "--freeze-encoder", "--max-steps", "6", "--eval-steps", "6", "--dtype", "float32"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_meta(out / "model")["preset"]["freeze_encoder"] is True
    trained = load_model(str(out / "model"), device="cpu", dtype="float32").model
    base, _, _ = build_base(PRESETS["smoke"].base)
    base_params = dict(base.named_parameters())
    encoder = {n: p for n, p in trained.named_parameters() if n.startswith("encoder.")}
    decoder = {n: p for n, p in trained.named_parameters() if n.startswith("decoder.")}
    assert encoder and decoder
    assert all(torch.equal(p, base_params[n]) for n, p in encoder.items())
    assert any(not torch.equal(p, base_params[n]) for n, p in decoder.items())


@pytest.mark.parametrize("name", ["tiny-random-t5", "tiny-random-flan-t5"])
def test_t5_trains_with_one_embeddings_module(name):
    """Training gives a T5 one input-embeddings module that both stacks call (FSDP2 needs the shared
    weight in one unit; tests/test_gpu_recipes.py trains it sharded): the same outputs, one name in
    the state dict, and --freeze-encoder still freezes the embeddings the encoder reads."""
    import torch

    from instructrec.modeling import build_base
    from instructrec.training.tune import _trainable

    model, _, kind = build_base(name)
    ids, dec = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[0, 11, 12]])
    with torch.inference_mode():
        before = model.eval()(input_ids=ids, decoder_input_ids=dec).logits
    names = set(model.state_dict())
    model = _trainable(model, kind, PRESETS["smoke"].override(freeze_encoder=True), lora=False)
    assert model.encoder.embed_tokens is model.shared and model.decoder.embed_tokens is model.shared
    assert names - set(model.state_dict()) == {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    assert [n for n, m in model.named_modules() if m is model.shared] == ["shared"]
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids, decoder_input_ids=dec).logits, before)
    assert not model.shared.weight.requires_grad and all(p.requires_grad for p in model.decoder.block.parameters())


@pytest.mark.parametrize("base", ["tiny-random", "tiny-random-t5"])
def test_listwise_objective_with_a_cut_decoder_trains_and_resumes(tmp_path, base):
    """--objective listwise on BERT2BERT and the generic seq2seq path (T5), with --decoder-layers:
    the listwise terms are logged, the saved model has the cut decoder, and a rerun resumes."""
    out = tmp_path / "lw"
    args = ("--base", base, "--objective", "listwise", "--decoder-layers", "1", "--max-steps", "8", "--eval-steps", "8",
            "--save-steps", "4", "--dtype", "float32")
    proc = subprocess.run(_train_cmd(out, *args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'listwise':" in proc.stdout + proc.stderr and "'target_first':" in proc.stdout + proc.stderr
    meta = read_meta(out / "model")
    assert meta["preset"]["objective"] == "listwise" and meta["preset"]["decoder_layers"] == 1
    config = json.loads((out / "model" / "config.json").read_text())
    assert (config["decoder"]["num_hidden_layers"] if base == "tiny-random" else config["num_decoder_layers"]) == 1
    again = subprocess.run(_train_cmd(out, *args[:-8], "--max-steps", "12", "--eval-steps", "12", "--save-steps", "4",
                                      "--dtype", "float32"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    meta = read_meta(out / "model")
    assert meta["steps"] == 12 and Path(meta["resumed_from"]).name == "checkpoint-8"
    # the resumed run had to beat the best the first one saved
    assert read_meta(out / "best")["steps"] == meta["best_step"] == _best_step_by_validation(out)


def test_unknown_objective_is_refused(tmp_path):
    proc = subprocess.run(_train_cmd(tmp_path / "o", "--objective", "pairwise"), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "invalid choice: 'pairwise'" in proc.stderr


def test_prefix_lm_trains_with_frozen_bottom_and_ranks(tmp_path):
    out = tmp_path / "pl"
    proc = subprocess.run(_train_cmd(out, "--base", "tiny-random-prefixlm", "--objective", "listwise", "--frozen-layers", "1",
                                     "--hard-negatives", "2", "--max-steps", "6", "--eval-steps", "6", "--dtype", "float32"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = read_meta(out / "model")
    assert meta["preset"]["frozen_layers"] == 1 and meta["validation"]["cases"] == PRESETS["smoke"].eval_users
    assert meta["preset"]["hard_negatives"] == 2 and "negatives (2 hard)" in proc.stderr
    assert list((out / "embeddings").glob("titles-*.npy"))  # the bi-encoder's title vectors, kept for a resume
    from instructrec.modeling import PREFIX_LM, load_model

    assert load_model(str(out / "model"), device="cpu", dtype="float32").kind == PREFIX_LM
    wrong = subprocess.run(_train_cmd(tmp_path / "w", "--base", "tiny-random-prefixlm", "--freeze-encoder"),
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "--frozen-layers" in wrong.stderr and "Traceback" not in wrong.stderr


def test_learning_curve_from_the_checkpoints(smoke_run, tmp_path):
    """`instructrec curve` reads every validation of the run from its Trainer state: steps,
    examples seen, cumulative training time; writes the table, the PNG and the README block."""
    out, _ = smoke_run
    preset = PRESETS["smoke"]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- curve:smoke:start -->\nold\n<!-- curve:smoke:end -->\ntail\n")
    proc = subprocess.run([sys.executable, "-m", "instructrec.cli", "curve", "--run", str(out), "--name", "smoke",
                           "--baseline", "popularity=0.45", "--readme", str(readme)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "curve.json").read_text())
    steps = list(range(preset.eval_steps, preset.max_steps + 1, preset.eval_steps))
    assert [r["step"] for r in rows] == steps
    assert [r["examples"] for r in rows] == [s * preset.batch_size for s in steps]
    assert all(0 <= r["hr@1"] <= 1 for r in rows) and rows[-1]["train_minutes"] >= rows[0]["train_minutes"]
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("tail\n")
    assert f"| {steps[-1]} | {steps[-1] * preset.batch_size:,} |" in text
    assert (tmp_path / "docs" / "curves" / "smoke.png").stat().st_size > 1000
    missing = subprocess.run([sys.executable, "-m", "instructrec.cli", "curve", "--run", str(tmp_path / "none")],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no complete checkpoint" in missing.stderr


def test_listwise_trains_lora_adapters_of_a_seq2seq_model(tmp_path):
    """The path a Flan-T5 takes on one GPU with --objective listwise: LoRA adapters learn through
    the listwise loss (the base weights stay), and the merged model ranks."""
    pytest.importorskip("peft")
    out = tmp_path / "lora-lw"
    proc = subprocess.run(_train_cmd(out, "--base", "tiny-random-t5", "--lora", "--objective", "listwise", "--max-steps", "6",
                                     "--eval-steps", "6", "--dtype", "float32"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'listwise':" in proc.stdout + proc.stderr
    meta = read_meta(out / "model")
    assert meta["lora"] is True and meta["preset"]["objective"] == "listwise" and meta["steps"] == 6
    import torch

    from instructrec.modeling import build_base, load_model

    merged = load_model(str(out / "model"), device="cpu", dtype="float32").model
    base = dict(build_base("tiny-random-t5")[0].named_parameters())
    # LoRA on all linear layers, merged: the attention projections moved, the embeddings did not
    assert any(not torch.equal(p, base[n]) for n, p in merged.named_parameters() if n.endswith("SelfAttention.q.weight"))
    assert torch.equal(merged.get_input_embeddings().weight, base["shared.weight"])


def test_missing_annotations_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc = subprocess.run(_train_cmd(tmp_path / "o", "--annotations", str(missing)), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"{missing}: no such annotations file" in proc.stderr
    assert "Traceback" not in proc.stderr
