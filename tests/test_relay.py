"""The training relay on a tiny prefix-LM: one stream of examples that legs consume in turn,
``train --init`` from the shipped model (and its resume), and ``promote``'s rule and records."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructrec.checkpoint import checkpoint_version, read_meta
from instructrec.shipped import read_card, read_header, render_card
from instructrec.training import promote as promote_mod
from instructrec.training import tune
from instructrec.training.checkpoints import last_good_checkpoint
from instructrec.training.objectives import ListwiseCollator
from instructrec.training.presets import PRESETS
from instructrec.training.stream import pass_order, window

ROOT = Path(__file__).resolve().parents[1]
PRESET = PRESETS["smoke"].override(base="tiny-random-prefixlm", objective="listwise", frozen_layers=1, users=200,
                                   max_steps=6, eval_steps=3, save_steps=3)
PER_STEP = PRESET.batch_size
USERS = 30  # relay validation users in these tests (the rule's 500 on Games)


def _train(out: Path, preset=PRESET, init: Path | None = None, **kwargs) -> tuple[dict, list, list]:
    """One in-process run: its final metadata, its dataset's features, and the batches collated (the
    ones it trained on, and the one the data loader reads ahead)."""
    sets, batches = [], []
    orig_init, orig_call = tune._Examples.__init__, ListwiseCollator.__call__

    def init_(self, features):
        orig_init(self, features)
        sets.append(features)

    def call(self, features):
        batches.append([f["input_ids"] for f in features])
        return orig_call(self, features)

    tune._Examples.__init__, ListwiseCollator.__call__ = init_, call
    try:
        meta = tune.train(preset, out, bf16=False, progress=False, init=init, **kwargs)
    finally:
        tune._Examples.__init__, ListwiseCollator.__call__ = orig_init, orig_call
    return meta, sets[0], batches


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """Leg 1 from the base, promoted into the (empty) shipped slot."""
    root = tmp_path_factory.mktemp("relay")
    meta, features, batches = _train(root / "leg1")
    verdict = promote_mod.promote(root / "leg1", root / "models" / "tiny-games", users=USERS,
                                  legs_csv=root / "docs" / "legs.csv", curve_png=root / "docs" / "curve.png")
    return root, meta, features, batches, verdict


def test_a_plain_run_trains_on_the_streams_first_examples(relay):
    """The stream's pass 0 is the order the Trainer's length-grouped sampler took."""
    _, meta, features, batches, _ = relay
    lengths = [len(f["input_ids"]) for f in features]
    order = pass_order(lengths, PER_STEP, PRESET.seed)
    assert sorted(order) == list(range(len(features)))
    fed = [ids for batch in batches for ids in batch]
    assert fed[: PRESET.max_steps * PER_STEP] == [features[i]["input_ids"] for i in order[: PRESET.max_steps * PER_STEP]]
    assert meta["relay"]["start"] == 0 and meta["relay"]["init"] is None
    assert meta["relay"]["data_position"] == meta["best_step"] * PER_STEP == meta["relay"]["examples_total"]


def test_first_promotion_ships_the_leg_with_its_card_and_log(relay):
    root, meta, _, _, verdict = relay
    shipped = root / "models" / "tiny-games"
    assert verdict["promoted"] and verdict["hr@1_shipped"] is None and verdict["users"] == USERS
    card = read_card(shipped)
    assert card["data_position"] == meta["relay"]["data_position"] and card["preset"] == "smoke"
    assert card["validation"]["hr@1"] == verdict["hr@1_candidate"] and card["validation"]["seed"] == promote_mod.RELAY_SEED
    assert card["legs"][0]["examples"] == meta["relay"]["data_position"] and card["validation_curve"]
    assert read_header(shipped)["base"] == "tiny-random-prefixlm"
    rows = list(csv.DictReader((root / "docs" / "legs.csv").open()))
    assert len(rows) == 1 and rows[0]["promoted"] == "yes" and rows[0]["cpu"] and rows[0]["hr1_shipped"] == ""
    assert (root / "docs" / "curve.png").stat().st_size > 1000


def test_init_leg_continues_the_stream_and_resumes_as_it_started(relay):
    root, _, features, _, _ = relay
    shipped = root / "models" / "tiny-games"
    start = read_card(shipped)["data_position"]
    lengths = [len(f["input_ids"]) for f in features]
    leg = root / "leg2"
    short = PRESET.override(max_steps=4, save_steps=2, eval_steps=2)
    meta, _, batches = _train(leg, short, init=shipped)
    stream = window(lengths, PER_STEP, PRESET.seed, start, 6 * PER_STEP)
    fed = [ids for batch in batches for ids in batch]
    assert fed[: 4 * PER_STEP] == [features[i]["input_ids"] for i in stream[: 4 * PER_STEP]]  # new examples, in order
    relay_meta = meta["relay"]
    assert relay_meta["start"] == start and relay_meta["init"]["checkpoint_version"] == checkpoint_version(shipped)
    assert relay_meta["data_position"] == start + meta["best_step"] * PER_STEP
    assert relay_meta["examples_total"] == read_card(shipped)["examples_total"] + meta["best_step"] * PER_STEP
    assert json.loads((leg / tune.INIT_FILE).read_text())["start"] == start

    # the shipped model moves on meanwhile; the same command, longer, resumes the leg where it stood
    card = read_card(shipped)
    from instructrec.shipped import write_card

    write_card(shipped, {**card, "data_position": start + 800})
    try:
        again, _, batches = _train(leg, short.override(max_steps=6), init=shipped)
    finally:
        write_card(shipped, card)
    assert Path(again["resumed_from"]).name == "checkpoint-4" and again["steps"] == 6
    assert [ids for b in batches for ids in b][: 2 * PER_STEP] == [features[i]["input_ids"] for i in stream[4 * PER_STEP:]]
    assert again["relay"]["start"] == start


def test_stream_start_moves_a_leg_past_the_examples_earlier_legs_read(relay, tmp_path):
    """Legs that were not promoted leave the card where it was: ``--stream-start`` reads on past them."""
    root, _, features, _, _ = relay
    shipped = root / "models" / "tiny-games"
    card = read_card(shipped)
    later = card["data_position"] + 3 * PER_STEP
    lengths = [len(f["input_ids"]) for f in features]
    meta, _, batches = _train(tmp_path / "leg", PRESET.override(max_steps=2, eval_steps=2, save_steps=2), init=shipped,
                              stream_start=later)
    fed = [ids for batch in batches for ids in batch]
    assert fed[: 2 * PER_STEP] == [features[i]["input_ids"] for i in window(lengths, PER_STEP, PRESET.seed, later, 2 * PER_STEP)]
    relay_meta = meta["relay"]
    assert relay_meta["start"] == later and relay_meta["data_position"] == later + meta["best_step"] * PER_STEP
    assert relay_meta["examples_total"] == card["examples_total"] + meta["best_step"] * PER_STEP  # what the weights saw


def test_a_soup_averages_legs_and_counts_what_each_cost(relay, tmp_path):
    """Two legs on different windows of the stream and the shipped model they started from,
    averaged: every tensor is the members' weighted mean, the relay record counts both legs, and
    ``promote`` takes the soup like any leg."""
    from instructrec.modeling import build_base
    from instructrec.training import soup as soup_mod

    root = relay[0]
    shipped = root / "models" / "tiny-games"
    card = read_card(shipped)
    short = PRESET.override(max_steps=2, eval_steps=2, save_steps=2, learning_rate=1e-2)
    a, _, _ = _train(tmp_path / "a", short, init=shipped)
    # b leaves a gap after a's window: the soup read what both legs read, not the span between them
    b, _, _ = _train(tmp_path / "b", short, init=shipped, stream_start=card["data_position"] + 3 * PER_STEP)
    meta = soup_mod.soup([(str(tmp_path / "a"), 2.0), (str(tmp_path / "b"), 1.0), (str(shipped), 1.0)], tmp_path / "soup")

    states = [build_base(str(p), torch.float32)[0].state_dict()
              for p in (tmp_path / "a" / "model", tmp_path / "b" / "model", shipped, tmp_path / "soup")]
    changed = [k for k in states[0] if not torch.equal(states[0][k], states[2][k])]
    assert changed and not torch.equal(states[0][changed[0]], states[1][changed[0]])
    for k in states[0]:
        torch.testing.assert_close(states[3][k], 0.5 * states[0][k] + 0.25 * states[1][k] + 0.25 * states[2][k])
    frozen = [k for k in states[0] if torch.equal(states[0][k], states[1][k]) and torch.equal(states[0][k], states[2][k])]
    assert frozen and all(torch.equal(states[3][k], states[2][k]) for k in frozen)  # what no leg changed stays bit for bit
    third = soup_mod.soup([(str(tmp_path / "a"), 1.0), (str(tmp_path / "b"), 1.0), (str(shipped), 1.0)], tmp_path / "third")
    assert third["relay"]["soup"][0]["weight"] == round(1 / 3, 6)
    thirds = build_base(str(tmp_path / "third"), torch.float32)[0].state_dict()
    assert all(torch.equal(thirds[k], states[2][k]) for k in frozen)  # (x + x + x) / 3 need not round back to x
    relay_meta = meta["relay"]
    assert relay_meta["start"] == card["data_position"] and relay_meta["data_position"] == b["relay"]["data_position"]
    assert relay_meta["examples_total"] == card["examples_total"] + (a["best_step"] + b["best_step"]) * PER_STEP
    assert [m["weight"] for m in relay_meta["soup"]] == [0.5, 0.25, 0.25]

    verdict = promote_mod.promote(tmp_path / "soup", shipped, dry_run=True, users=USERS)
    assert verdict["candidate"] == str(tmp_path / "soup") and verdict["users"] == USERS
    assert verdict["leg"]["examples"] == (a["best_step"] + b["best_step"]) * PER_STEP and "choice" not in verdict

    candidate = promote_mod.resolve(tmp_path / "soup")
    row = promote_mod._leg_row(candidate, {**{k: None for k in ("hr@1_shipped", "gain", "ci_low", "ci_high")},
                                            "hr@1_candidate": 0.5, "users": USERS}, True, "float32")
    card = promote_mod._card(shipped, candidate, card, row, {"hr@1_candidate": 0.5, "users": USERS, "dtype": "float32"})
    assert card["legs"][-1]["soup"] == relay_meta["soup"] and card["data_position"] == relay_meta["data_position"]
    assert f"is a soup (`instructrec soup`), the weighted mean of: 0.5 × `{relay_meta['soup'][0]['member']}`" in render_card(card)

    # several candidates: the best on other validation users (never the relay users) faces the rule
    _, relay_users, others = promote_mod.relay_cases(promote_mod.preset_of(a), users=USERS, choice_users=20)
    assert len(others) == 20 and not {c.user_id for c in relay_users} & {c.user_id for c in others}
    verdict = promote_mod.promote([tmp_path / "a", tmp_path / "soup"], shipped, dry_run=True, users=USERS, choice_users=20)
    choice = verdict["choice"]
    rates = [c["hr@1"] for c in choice["candidates"]]
    assert choice["users"] == 20 and len(rates) == 2 and verdict["users"] == USERS and 0 <= choice["shipped"] <= 1
    assert choice["chosen"] == verdict["candidate"] == choice["candidates"][0 if rates[0] >= rates[1] else 1]["candidate"]
    assert "other validation users (the choice)" in promote_mod.table(verdict)

    with pytest.raises(soup_mod.SoupError, match="not a relay leg"):
        soup_mod.soup([(str(root / "leg1"), 1.0)], tmp_path / "bad")
    with pytest.raises(soup_mod.SoupError, match="positive"):
        soup_mod.parse_member(f"{tmp_path / 'a'}:0")
    assert soup_mod.parse_member("runs/a:2") == ("runs/a", 2.0) and soup_mod.parse_member("runs/a") == ("runs/a", 1.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run([sys.executable, "-m", "instructrec.cli", "soup", str(tmp_path / "missing"), "--out", str(tmp_path / "x")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr and "Traceback" not in bad.stderr


def test_stream_start_needs_a_leg_and_a_position(tmp_path):
    with pytest.raises(tune.TrainingError, match="only a relay leg"):
        tune.train(PRESET, tmp_path / "a", bf16=False, progress=False, stream_start=10)
    with pytest.raises(tune.TrainingError, match="0 or more"):
        tune.train(PRESET, tmp_path / "b", bf16=False, progress=False, init=tmp_path, stream_start=-1)
    assert not (tmp_path / "a").exists()


def test_init_leg_starts_from_the_shipped_weights(relay, tmp_path):
    """With a learning rate of 0 the leg's model is the shipped one, tensor for tensor."""
    root = relay[0]
    shipped = root / "models" / "tiny-games"
    meta, _, _ = _train(tmp_path / "lr0", PRESET.override(max_steps=2, eval_steps=2, learning_rate=0.0), init=shipped)
    from instructrec.modeling import load_model

    got = load_model(tmp_path / "lr0" / "model", device="cpu", dtype="float32").model.state_dict()
    want = load_model(shipped, device="cpu", dtype="float32").model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_promoting_no_gain_keeps_the_shipped_model_and_logs_the_leg(relay, tmp_path):
    root = relay[0]
    shipped = root / "models" / "tiny-games"
    before = (shipped / "weights.safetensors").read_bytes()
    legs = root / "docs" / "legs.csv"
    n = len(list(csv.DictReader(legs.open())))
    verdict = promote_mod.promote(root / "leg1" / "best", shipped, users=USERS, legs_csv=legs,
                                  curve_png=root / "docs" / "curve.png")
    assert not verdict["promoted"] and verdict["gain"] == 0.0 and verdict["ci_low"] == verdict["ci_high"] == 0.0
    assert "< 0.01" in verdict["reason"] and (shipped / "weights.safetensors").read_bytes() == before
    assert verdict["note"] == f"this leg started from the base, not from {shipped}"
    rows = list(csv.DictReader(legs.open()))
    assert len(rows) == n + 1 and rows[-1]["promoted"] == "no" and rows[-1]["hr1_shipped"] == rows[-1]["hr1_candidate"]


def test_promote_cli_dry_run_reports_and_writes_nothing(relay, tmp_path):
    root = relay[0]
    ckpt = last_good_checkpoint(root / "leg1" / "checkpoints")  # a Trainer checkpoint as the candidate
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "instructrec.cli", "promote", ckpt, "--shipped", str(tmp_path / "none"),
                           "--users", str(USERS), "--dry-run", "--legs-csv", str(tmp_path / "legs.csv")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    step = int(ckpt.rsplit("-", 1)[1])
    assert verdict["promoted"] and verdict["dry_run"] and verdict["data_position"] == step * PER_STEP
    assert "would promote" in proc.stdout and "| candidate" in proc.stdout
    assert not (tmp_path / "none").exists() and not (tmp_path / "legs.csv").exists()
    bad = subprocess.run([sys.executable, "-m", "instructrec.cli", "promote", str(tmp_path / "missing")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr and "Traceback" not in bad.stderr


def test_init_refuses_what_is_not_a_shipped_model(relay, tmp_path):
    root = relay[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "instructrec.cli", "train", "--preset", "smoke", "--out", str(tmp_path / "o"), "--no-progress"]
    proc = subprocess.run([*cmd, "--init", str(root / "leg1" / "model")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "not a shipped model directory" in proc.stderr
    proc = subprocess.run([*cmd, "--init", str(root / "models" / "tiny-games")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # the smoke preset trains tiny-random, not the prefix-LM
    assert proc.returncode == 2 and "pass --base tiny-random-prefixlm" in proc.stderr


def test_the_rule_and_the_paired_interval():
    assert promote_mod.decide(0.40, None, None)[0]
    assert not promote_mod.decide(0.405, 0.40, 0.001)[0]  # below the minimum gain
    assert not promote_mod.decide(0.45, 0.40, -0.01)[0]  # the interval reaches 0
    assert promote_mod.decide(0.45, 0.40, 0.01)[0]
    a, b = [1] * 60 + [0] * 40, [1] * 50 + [0] * 50  # the candidate wins 10 cases, loses none
    gain, low, high = promote_mod.paired_bootstrap(a, b)
    assert gain == pytest.approx(0.10) and 0 < low < gain < high
    assert promote_mod.paired_bootstrap(a, b) == (gain, low, high)  # seeded


def test_the_evaluation_reports_the_whole_relays_budget(relay, tmp_path):
    """A model continued by relay legs is reported with every leg's training time and examples,
    not only its last leg's."""
    import shutil

    from instructrec.training.data.load import load_dataset
    from instructrec.training.evaluate.methods import InstructionModel

    model = tmp_path / "leg-n"
    shutil.copytree(relay[0] / "models" / "tiny-games", model)
    meta = json.loads((model / "instructrec.json").read_text())
    leg_seconds = meta["train_seconds_total"]
    meta["relay"] = {**meta["relay"], "examples_total": 123_456, "train_seconds_total": leg_seconds + 3600.0}
    (model / "instructrec.json").write_text(json.dumps(meta))
    m = InstructionModel(load_dataset("games-sample"), model, "shipped", device="cpu", dtype="float32")
    assert m.train_seconds == leg_seconds + 3600.0
    assert "tuned by the training relay (123,456 examples)" in m.notes


def test_a_relay_leg_keeps_every_checkpoint_unless_told():
    """promote compares a leg's checkpoints on the relay users after the leg: a leg keeps them all."""
    import argparse

    from instructrec.training.tune_cli import add_arguments, preset_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    leg = ["--preset", "full", "--out", "x", "--init", "models/minilm-games"]
    assert preset_from_args(parser.parse_args(leg)).save_total_limit is None
    assert preset_from_args(parser.parse_args([*leg, "--save-total-limit", "3"])).save_total_limit == 3
    assert preset_from_args(parser.parse_args(["--preset", "full", "--out", "x"])).save_total_limit == \
        PRESETS["full"].save_total_limit == 1
