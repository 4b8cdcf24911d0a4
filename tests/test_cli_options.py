"""``--device`` and ``--dtype`` are spelled the same way by every command that runs a model, and
``instructrec serve`` takes them (and every other setting) as flags: checked on the real
argument parsers and on a real ``instructrec serve`` process on loopback."""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from instructrec.cli import registered

ROOT = Path(__file__).resolve().parents[1]

# each command with the arguments it needs besides the options under test
COMMANDS = {
    "serve": [],
    "rank": ["--candidate", "a"],
    "recommend": ["--catalogue", "x.npz"],
    "evaluate": ["--data", "games", "--out", "o"],
    "train": ["--out", "o"],
    "gate": ["fit", "--model", "m", "--data", "games"],
    "promote": ["candidate"],
}


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"instructrec {command}", exit_on_error=False)
    importlib.import_module(registered()[command].module).add_arguments(parser)
    return parser


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subparsers:  # `gate fit`
        parser = subparsers[0].choices["fit"]
    return next(a for a in parser._actions if flag in a.option_strings)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_device_and_dtype(command):
    args = _parser(command).parse_args([*COMMANDS[command], "--device", "cpu", "--dtype", "BF16"])
    assert (args.device, args.dtype) == ("cpu", "bfloat16")  # an alias, in any case, becomes the full name
    args = _parser(command).parse_args([*COMMANDS[command], "--dtype", "float32"])
    assert args.dtype == "float32"


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_dtype_is_refused_naming_the_flag(command, capsys):
    parser = _parser(command)
    parser.exit_on_error = True
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*COMMANDS[command], "--dtype", "float8"])
    assert exc.value.code == 2
    assert "--dtype" in capsys.readouterr().err


def test_the_options_read_the_same_everywhere():
    device_help = {c: _option(_parser(c), "--device").help.split(" (default")[0] for c in COMMANDS}
    assert len(set(device_help.values())) == 1, device_help
    # inference commands share one dtype text; training names what autocast does instead
    dtype_help = {c: _option(_parser(c), "--dtype").help.split(" (default")[0] for c in COMMANDS if c != "train"}
    assert len(set(dtype_help.values())) == 1, dtype_help
    with pytest.raises(argparse.ArgumentError):
        _parser("train").parse_args(["--out", "o", "--dtype", "int8"])  # no gradients through int8


def test_serve_has_a_flag_for_every_setting_but_secrets():
    from instructrec.service.cli import settings_from_args
    from instructrec.service.settings import Settings

    parser = _parser("serve")
    flags = {s for a in parser._actions for s in a.option_strings}
    for name in Settings.model_fields:
        assert (f"--{name.replace('_', '-')}" in flags) == (name != "api_key"), name
    s = settings_from_args(parser.parse_args(["--batch-tokens", "512", "--no-warmup", "--reduction", "sum",
                                              "--redis-url", "", "--dtype", "fp32"]))
    assert (s.batch_tokens, s.warmup, s.reduction, s.cache_enabled, s.dtype) == (512, False, "sum", False, "float32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(*flags: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "instructrec.cli", "serve", "--model", "tiny-random", "--redis-url", "",
                             *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_runs_on_the_device_and_dtype_its_flags_name():
    port = _free_port()
    # the flag wins over the environment, as for every setting
    proc = _serve("--device", "cpu", "--dtype", "fp32", "--port", str(port), env={"INSTRUCTREC_DTYPE": "bfloat16"})
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while True:
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                try:
                    ready = client.get("/ready")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server never became ready"
                time.sleep(0.2)
            assert ready.json()["model"]["device"] == "cpu"
            assert ready.json()["model"]["precision"] == "torch.float32"
            answer = client.post("/rerank", json={"intention": {"text": "a racing game"}, "candidates": ["Kart", "Chess"]})
            assert answer.status_code == 200 and len(answer.json()["results"]) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("flags, message", [(("--device", "cuda"), "setting device: device 'cuda' requested but CUDA is not available"),
                                            (("--device", "gpu"), "setting device:"),
                                            (("--dtype", "float8"), "argument --dtype")])
def test_serve_refuses_what_this_machine_cannot_do_at_once(flags, message):
    proc = _serve(*flags, "--port", str(_free_port()))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert message in err and "Traceback" not in err, err


def test_train_refuses_a_dtype_its_older_flag_contradicts(capsys):
    from instructrec.training.tune_cli import run

    parser = _parser("train")
    assert run(parser.parse_args(["--out", "o", "--dtype", "float32", "--bf16"])) == 2
    assert "--dtype float32 and --bf16 disagree" in capsys.readouterr().err
    args = parser.parse_args(["--out", "o", "--no-bf16"])  # the older spelling alone still parses
    assert (args.bf16, args.dtype) == (False, "auto")
