"""The GPU recipes of docs/gpu.md, as far as a CPU can check them: the Flan-T5-XL presets run end to end
on a tiny model in Flan-T5's layout (one process with LoRA; every weight sharded by FSDP2 over two
processes under ``accelerate launch`` with the FSDP config, and resumed), the FSDP config is what
accelerate turns into an FSDP2 plugin wrapping T5 blocks, and the memory arithmetic behind the
presets counts the real model class."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructrec.checkpoint import read_meta
from instructrec.training.memory import FLAN_T5_XL, count_parameters, estimate, preset_table
from instructrec.training.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "deploy" / "accelerate" / "fsdp-8gpu.yaml"
SMALL = ["--base", "tiny-random-flan-t5", "--users", "60", "--eval-users", "20", "--max-steps", "2", "--eval-steps", "2",
         "--save-steps", "2", "--device", "cpu", "--dtype", "float32", "--no-progress"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
            "TOKENIZERS_PARALLELISM": "false"}


def test_xl_presets():
    lora, full = PRESETS["flan-t5-xl-lora"], PRESETS["flan-t5-xl-full"]
    assert lora.base == full.base == "google/flan-t5-xl"
    assert lora.lora and not full.lora and lora.gradient_checkpointing and full.gradient_checkpointing
    assert lora.batch_size * lora.grad_accum == full.batch_size * 8 == 32  # the same global batch
    for p in (lora, full):  # checkpoints with optimizer state at evaluations only, one kept
        assert p.save_steps == p.eval_steps == 1000 and p.save_total_limit == 1
        assert p.objective == "mle" and p.per_case == 3 and p.max_source_tokens == 320  # the paper's recipe
    cpu = PRESETS["full"]  # the CPU default's long run: the same cadence, more often (steps are small)
    assert cpu.save_steps == cpu.eval_steps and cpu.save_total_limit == 1


def test_parameter_count_is_the_models():
    """count_parameters against T5's shape by hand, and against a built model's own count."""
    total, lora = count_parameters(FLAN_T5_XL)
    c = FLAN_T5_XL
    d, ff, inner, v, n = c["d_model"], c["d_ff"], c["num_heads"] * c["d_kv"], c["vocab_size"], c["num_layers"]
    attention, gated_ff = 4 * d * inner, 3 * d * ff
    by_hand = (2 * v * d  # shared embeddings, separate head
               + n * (attention + gated_ff + 2 * d) + 32 * c["num_heads"] + d  # encoder blocks, position bias, final norm
               + n * (2 * attention + gated_ff + 3 * d) + 32 * c["num_heads"] + d)  # decoder
    assert total == by_hand
    # rank 16 x (in + out) per linear layer: q, k, v, o per attention, wi_0, wi_1, wo per feed-forward
    assert lora == 16 * (n * (4 * (d + inner) + 3 * (d + ff)) + n * (8 * (d + inner) + 3 * (d + ff)))
    from instructrec.modeling import build_tiny_flan_t5

    model, _ = build_tiny_flan_t5()
    cfg = model.config
    tiny = dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
                num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False)
    assert count_parameters(tiny)[0] == sum(p.numel() for p in model.parameters())  # separate head counted once


def test_memory_arithmetic_fits_80gb_and_shows_the_old_preset_did_not():
    rows = dict(preset_table())
    for name, e in rows.items():
        assert e.total > 0
    lora = next(e for n, e in rows.items() if n.startswith("flan-t5-xl-lora"))
    fsdp = next(e for n, e in rows.items() if n.startswith("flan-t5-xl-full (8"))
    old = next(e for n, e in rows.items() if "old" in n)
    assert lora.total < 40e9 and fsdp.total < 20e9 and old.total >= 80e9
    # sharding divides weights, gradients and optimizer state by the processes
    ddp = estimate(lora=False, processes=8, sharded=False, batch=4, source_tokens=320, target_tokens=48, checkpointing=True)
    assert fsdp.optimizer == pytest.approx(ddp.optimizer / 8) and fsdp.gradients == pytest.approx(ddp.gradients / 8)
    # checkpointing keeps block inputs only
    assert estimate(lora=False, processes=1, sharded=False, batch=4, source_tokens=320, target_tokens=48,
                    checkpointing=False).activations > 5 * ddp.activations


def test_fsdp_config_is_an_fsdp2_plugin_wrapping_t5_blocks(monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(FSDP_CONFIG), "-m", "instructrec.cli", "train"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == 8 and args.use_fsdp
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["T5Block"]
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type) and not plugin.activation_checkpointing
    from transformers.models.t5.modeling_t5 import T5Block  # the class named there exists

    assert T5Block.__name__ in plugin.transformer_cls_names_to_wrap


def test_one_gpu_lora_recipe_runs_on_cpu(tmp_path):
    out = tmp_path / "lora"
    proc = subprocess.run([sys.executable, "-m", "instructrec.cli", "train", "--preset", "flan-t5-xl-lora", "--out", str(out), *SMALL],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = read_meta(out / "model")
    assert meta["lora"] is True and meta["preset"]["gradient_checkpointing"] and meta["steps"] == 2
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == "t5" and config.get("scale_decoder_outputs") is False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_variant(path: Path) -> Path:
    """The 8-GPU yaml with only the process count and the device changed."""
    import yaml

    recipe = yaml.safe_load(FSDP_CONFIG.read_text())
    yaml_cpu = {**recipe, "num_processes": 2, "use_cpu": True}
    path.write_text(yaml.safe_dump(yaml_cpu))
    return path


# The recipe's command on the tiny Flan-layout T5. The preset warms up over 500 steps, so the
# learning rate is raised for the weights to move measurably in 4 steps.
FULL = ["train", "--preset", "flan-t5-xl-full", *SMALL, "--learning-rate", "0.05"]


def _launch(config: Path, out: Path, steps: int, *entry: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
           str(_free_port()), *entry, *FULL, "--out", str(out), "--max-steps", str(steps)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_eight_gpu_fsdp2_recipe_trains_and_resumes_on_two_cpu_processes(tmp_path):
    """The FSDP yaml (CPU variant) under ``accelerate launch``: accelerate's FSDP2 preparation of
    the tiny Flan-layout T5 (T5 blocks, embeddings, head, root) trains 2 steps, saves a
    FULL_STATE_DICT checkpoint, and a second launch resumes it to step 4. The resumed run does
    only steps 3-4 and ends on the weights a 4-step run without sharding (DDP) reaches.

    accelerate 1.15 runs the FSDP yaml on CPUs as plain DDP without a word; the FSDP launches go
    through tests/fsdp_cpu_entry.py, which keeps accelerate's FSDP2 plugin (see there)."""
    from transformers.models.t5.modeling_t5 import T5Block

    from instructrec.modeling import TINY_FLAN_T5, build_base

    config = _cpu_variant(tmp_path / "fsdp-2cpu.yaml")
    entry = [str(ROOT / "tests" / "fsdp_cpu_entry.py")]

    # accelerate's own launch of the CPU yaml trains with DDP: the reference, and the reason for the entry
    ddp_out = tmp_path / "ddp"
    _launch(config, ddp_out, 4, "-m", "instructrec.cli")
    ddp_ckpt = ddp_out / "checkpoints" / "checkpoint-4"
    assert (ddp_ckpt / "optimizer.pt").is_file() and not (ddp_ckpt / "pytorch_model_fsdp.bin").exists()

    out = tmp_path / "fsdp"
    first = _launch(config, out, 2, *entry)
    units = [json.loads(line.split("FSDP_UNITS ", 1)[1]) for line in first.stdout.splitlines() if "FSDP_UNITS " in line]
    assert sorted(u["rank"] for u in units) == [0, 1]
    model, _, _ = build_base(TINY_FLAN_T5)
    blocks = {name: "FSDPT5Block" for name, m in model.named_modules() if isinstance(m, T5Block)}
    assert len(blocks) == 4
    # one unit per T5 block (the yaml's TRANSFORMER_BASED_WRAP), the input embeddings and the untied
    # head (accelerate's own units), the root; the stacks' embeddings are no units of their own
    for u in units:
        assert u["units"] == {"": "FSDPT5ForConditionalGeneration", "shared": "FSDPEmbedding", "lm_head": "FSDPLinear", **blocks}
    ckpt = out / "checkpoints" / "checkpoint-2"
    # FSDP's checkpoint: full model state in one file (FULL_STATE_DICT), the sharded optimizer's state
    assert (ckpt / "pytorch_model_fsdp.bin").is_file() and (ckpt / "optimizer.bin").is_file()
    assert not (ckpt / "optimizer.pt").exists()
    at_step_2 = _weights(ckpt)
    assert read_meta(out / "model")["steps"] == 2

    resumed = _launch(config, out, 4, *entry)
    assert f"resuming from {ckpt}" in resumed.stderr
    meta = read_meta(out / "model")
    assert meta["steps"] == 4 and meta["resumed_from"] == str(ckpt) and meta["preset"]["name"] == "flan-t5-xl-full"
    # this launch evaluated at step 4 only: it did not train steps 1-2 again
    evaluations = [line for line in resumed.stdout.splitlines() if "'eval_hr@1'" in line]
    assert len(evaluations) == 1
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [h["step"] for h in state["log_history"] if "eval_hr@1" in h] == [2, 4]
    at_step_4 = _weights(out / "checkpoints" / "checkpoint-4")
    assert _max_diff(at_step_4, at_step_2) > 1e-4  # steps 3-4 moved the weights
    # weights, optimizer moments, schedule and data position all came back: measured 3e-7 from
    # the unsharded run (summation order); a lost optimizer state or batch differs by ~1e-4
    assert _max_diff(at_step_4, _weights(ddp_ckpt)) < 1e-5

    # the final model (the best validated one, gathered from the shards) as other runtimes load it
    from transformers import AutoModelForSeq2SeqLM

    best = {2: at_step_2, 4: at_step_4}[meta["best_step"]]
    assert _max_diff(_weights(out / "model"), best) == 0.0
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False
    loaded = AutoModelForSeq2SeqLM.from_pretrained(str(out / "model"))
    assert loaded.lm_head.weight is not loaded.shared.weight and torch.equal(loaded.lm_head.weight, best["lm_head.weight"])


def test_readme_memory_table_is_the_arithmetic(capsys):
    """docs/gpu.md's per-GPU table is what `python -m instructrec.training.memory` prints now."""
    from instructrec.training.memory import main

    main()
    printed = capsys.readouterr().out.strip().splitlines()
    readme = (ROOT / "docs" / "gpu.md").read_text()
    for line in printed[1:]:
        assert line in readme, line
    assert "computed, not measured" in readme
