"""The instruction examples as one stream that the training relay's legs consume in turn.

A leg of the relay (``instructrec train --init models/<name>``) runs on some machine for as
long as it is allowed, and the next leg, elsewhere, continues from the shipped weights; for
every leg to see new examples, they must agree on one order of the examples and on how far
into it the shipped weights got (``data_position`` in the card). The examples themselves are
seeded (:mod:`instructrec.training.instructions`); the order is the one a plain run's Trainer
takes (``group_by_length``: a seeded permutation cut into mega-batches sorted by length, the
longest batch first), so a leg started without ``--init`` consumed exactly the first
``steps x batch`` of it. Pass ``e`` of the stream is the same permutation seeded ``seed + e``.
"""

from __future__ import annotations

import torch


def pass_order(lengths: list[int], batch: int, seed: int, epoch: int = 0) -> list[int]:
    """Example indices of one pass, as the Trainer's length-grouped sampler orders them in a
    one-process run seeded ``seed``: its sampler draws from the global generator, seeded by the
    Trainer, after torch's DataLoader iterator has taken one int64 for its base seed
    (transformers 5.23, accelerate 1.15, torch 2.13; tests/test_relay.py checks it)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(seed + epoch)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base seed
    return get_length_grouped_indices(lengths, batch, generator=generator)


def window(lengths: list[int], batch: int, seed: int, start: int, count: int) -> list[int]:
    """Indices of the stream's examples ``start`` to ``start + count`` (passes following each other)."""
    n = len(lengths)
    if n == 0 or count <= 0:
        return []
    out: list[int] = []
    epoch, offset = divmod(start, n)
    while len(out) < count:
        order = pass_order(lengths, batch, seed, epoch)
        out.extend(order[offset : offset + count - len(out)])
        epoch, offset = epoch + 1, 0
    return out
