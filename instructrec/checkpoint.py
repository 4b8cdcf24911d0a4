"""Checkpoint metadata: the file beside an HF model directory that says what it is.

It records the base model, the template-table version the model was tuned on, the
data, the steps and throughput, and validation metrics, so a server can refuse a
checkpoint tuned on another template table and caches can key on its version.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import files

META_FILE = "instructrec.json"


def read_json(path: str | Path, error: type[Exception] = ValueError) -> dict:
    """A JSON file beside a model ({} when absent); bad JSON raises ``error`` naming the file and line."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc


def read_meta(directory: str | Path) -> dict:
    return read_json(Path(directory) / META_FILE)


def write_meta(directory: str | Path, meta: dict) -> Path:
    return files.write_json(Path(directory) / META_FILE, meta, indent=2, sort_keys=True)


WHOLE_FILE_BYTES = 32 << 20  # weights files up to this size are hashed whole (the shipped model's ~11 MB)


def checkpoint_version(directory: str | Path) -> str:
    """A short content hash of the weights file(s): changes whenever the weights change. Small
    files (the shipped model's changed tensors) are hashed whole, so the version follows every
    tensor; for large ones head and tail are enough to tell checkpoints apart, and fast."""
    h = hashlib.sha256()
    files = sorted(Path(directory).glob("*.safetensors")) or sorted(Path(directory).glob("*.bin"))
    for f in files:
        stat = f.stat()
        h.update(f"{f.name}:{stat.st_size}".encode())
        with f.open("rb") as fh:
            if stat.st_size <= WHOLE_FILE_BYTES:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
                continue
            h.update(fh.read(1 << 20))
            fh.seek(max(0, stat.st_size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]
