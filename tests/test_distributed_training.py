"""Training in several processes on CPU (``torchrun --nproc_per_node 2``, gloo) and the loss the
Trainer logs under gradient accumulation and DDP, on a tiny T5 for a few steps.

With learning rate 0 the model never moves, so every logged loss is the untrained model's
token-mean cross-entropy on the batches of its logging window, which this test computes on
its own from the instruction file the run wrote.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructrec.checkpoint import read_meta
from instructrec.modeling import TINY_T5, build_base
from instructrec.ranker import eos_id
from instructrec.training.instructions import read_examples
from instructrec.training.presets import PRESETS
from instructrec.training.tune import tokenize_examples

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train", "--preset", "smoke", "--no-progress", "--max-steps", "8", "--eval-steps", "4",
          "--save-steps", "4", "--dtype", "float32", "--device", "cpu", "--learning-rate", "0"]


def _env() -> dict:
    # PYTHONPATH: the processes torchrun starts import this tree, not another installed copy
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(out: Path, *extra: str, procs: int = 1, base: str = TINY_T5) -> list[str]:
    extra = ("--base", base, *extra)  # a later --base wins
    if procs == 1:
        return [sys.executable, "-m", "instructrec.cli", *COMMON, "--out", str(out), *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "instructrec.cli", *COMMON, "--out", str(out), *extra]


def _run(out: Path, *extra: str, procs: int = 1, base: str = TINY_T5) -> subprocess.CompletedProcess:
    return subprocess.run(_command(out, *extra, procs=procs, base=base), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=240)


def _side_by_side(runs: dict[str, tuple], base: str = TINY_T5) -> dict[str, subprocess.CompletedProcess]:
    """One-process runs (``name: (out, *extra)``) started together, one thread each: the two cores."""
    started = {name: subprocess.Popen(_command(*args, base=base), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for name, args in runs.items()}
    done = {}
    for name, popen in started.items():
        try:
            stdout, stderr = popen.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in started.values():
                other.kill()
            raise
        done[name] = subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr)
    return done


def _logged(out: Path) -> list[dict]:
    state = json.loads((out / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    return [h for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    done = {}
    # the two one-process runs side by side (one thread each, the two cores), then the two-process one
    alone = _side_by_side({"one": (base / "one", "--batch-size", "8"),
                           "accum": (base / "accum", "--batch-size", "4", "--grad-accum", "2")})
    for name, proc in alone.items():
        assert proc.returncode == 0, proc.stderr[-4000:]
        done[name] = (base / name, proc)
    proc = _run(base / "ddp", "--batch-size", "4", procs=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done["ddp"] = (base / "ddp", proc)
    return done


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and "checkpoints" not in p.parts}


def test_two_processes_write_one_complete_output(runs):
    one, _ = runs["one"]
    ddp, proc = runs["ddp"]
    assert _files(ddp) == _files(one)  # the same layout as a 1-process run, nothing half-written left
    assert not any(p.name.endswith((".tmp", ".old")) for p in ddp.iterdir())
    # the same instruction data (one writer; the other process read its file) and annotations
    assert (ddp / "instructions.jsonl").read_bytes() == (one / "instructions.jsonl").read_bytes()
    assert sorted((ddp / "annotations.jsonl").read_text().splitlines()) == sorted((one / "annotations.jsonl").read_text().splitlines())
    meta, meta_one = read_meta(ddp / "model"), read_meta(one / "model")
    assert set(meta) == set(meta_one) and meta["steps"] == 8 and meta["validation"]["cases"] == PRESETS["smoke"].eval_users
    assert proc.stdout.count('"model":') == 1  # one summary, from the main process
    # the model directory loads and ranks
    from instructrec.modeling import load_model
    from instructrec.ranker import Ranker

    scores = Ranker(load_model(str(ddp / "model"), device="cpu", dtype="float32")).score("racing games", ["Forza", "Tetris"]).scores
    assert len(scores) == 2 and all(s < 0 for s in scores)


def test_logged_loss_is_the_token_mean_under_accumulation_and_ddp(runs):
    one, _ = runs["one"]
    model, tokenizer, _ = build_base(TINY_T5)
    model.eval()
    feats = tokenize_examples(read_examples(one / "instructions.jsonl"), tokenizer, PRESETS["smoke"], eos_id(tokenizer, model))
    with torch.inference_mode():
        per_example = [float(model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss)
                       for f in feats[:200]]
    expected = sum(per_example) / len(per_example)
    logged = {name: _logged(out) for name, (out, _) in runs.items()}
    for name, entries in logged.items():
        assert len(entries) == 2
        for entry in entries:  # before the fix: 2x at accumulation 2 and on 2 processes
            assert entry["loss"] == pytest.approx(expected, rel=0.08), (name, entry, expected)
    # the gradient norm of the same global batch size agrees too (it was scaled with the loss)
    norms = {name: sum(e["grad_norm"] for e in entries) / 2 for name, entries in logged.items()}
    assert norms["accum"] == pytest.approx(norms["one"], rel=0.25) and norms["ddp"] == pytest.approx(norms["one"], rel=0.25)


def test_main_process_failure_stops_every_process_with_a_clear_error(tmp_path):
    (tmp_path / "annotations-dir").mkdir()  # only the main process reads it: a directory, not a file
    proc = _run(tmp_path / "bad", "--annotations", str(tmp_path / "annotations-dir"), procs=2)
    assert proc.returncode != 0
    # each process ends with a one-line error (the Traceback torchrun's agent prints is its own)
    bad = f"{tmp_path / 'annotations-dir'}: is a directory, not an annotations file"
    assert f"instructrec train: {bad}" in proc.stderr  # the main process
    assert f"instructrec train: the main process failed: DataError: {bad}" in proc.stderr  # the other
    assert "instructrec/training/tune.py" not in proc.stderr and "instructrec/training/distributed.py" not in proc.stderr


def test_gradient_checkpointing_same_loss_and_gradients(tmp_path):
    """--gradient-checkpointing recomputes activations (T5 reports turning its cache off for it)
    and yields the loss and gradient norm of the run without it, on the Flan-T5 layout."""
    logged = {}
    variants = {"plain": (), "ckpt": ("--gradient-checkpointing",)}
    runs = _side_by_side({name: (tmp_path / name, "--batch-size", "8", *extra) for name, extra in variants.items()},
                         base="tiny-random-flan-t5")
    for name, extra in variants.items():
        proc = runs[name]
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("incompatible with gradient checkpointing" in proc.stderr) == bool(extra)
        logged[name] = _logged(tmp_path / name)
        assert read_meta(tmp_path / name / "model")["preset"]["gradient_checkpointing"] == bool(extra)
    for a, b in zip(logged["plain"], logged["ckpt"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_sharded_model_validates_and_saves(tmp_path):
    """FSDP2 on CPU: the encoder cannot run alone on the sharded model; validation by full
    forwards on both processes equals the unsharded fast path, and the gathered state saves a
    model that scores the same."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    assert sorted(r["rank"] for r in results) == [0, 1]
    blocks = {f"{stack}.block.{i}": "FSDPT5Block" for stack in ("encoder", "decoder") for i in range(2)}
    for r in results:  # the units test_gpu_recipes.py sees accelerate make from the FSDP yaml
        assert r["units"] == {"": "FSDPT5ForConditionalGeneration", "shared": "FSDPEmbedding", "lm_head": "FSDPLinear", **blocks}
        assert r["sharded"] is True and r["encoder_alone"] == "RuntimeError"
        assert r["max_diff"] < 1e-4
    assert [r["saved_max_diff"] for r in results if r["rank"] == 0][0] < 1e-4
