"""The Trainer checkpoints in a run's OUT/checkpoints, found without importing torch or the Trainer:
``instructrec curve`` reads them and starts at once."""

from __future__ import annotations

from pathlib import Path


def last_good_checkpoint(directory: Path) -> str | None:
    """The newest Trainer checkpoint that was written completely (kill -9 can leave a partial one)."""
    if not directory.is_dir():
        return None
    found = []
    for d in directory.glob("checkpoint-*"):
        try:
            step = int(d.name.split("-")[-1])
        except ValueError:
            continue
        optimizer = (d / "optimizer.pt").is_file() or (d / "optimizer.bin").is_file()  # .bin: FSDP's
        if (d / "trainer_state.json").is_file() and any(d.glob("*.safetensors")) and optimizer:
            found.append((step, d))
    return str(max(found)[1]) if found else None
