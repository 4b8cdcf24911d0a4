"""Multi-process training (``torchrun`` / ``accelerate launch``): who writes the shared files.

Every process runs :func:`instructrec.training.tune.train`. Files under ``OUT`` (annotations,
instructions, ``best/``, ``model/``) are written by the main process only while the
others wait at a barrier, and the main process's decisions (reuse the instruction file
or build it) are broadcast so no process reads a file another is still writing. If the
main process fails inside such a step, the others raise the same error instead of
waiting for the barrier's timeout.

Single-process runs take none of these paths: no process group, no barrier.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# Ranks wait this long for the main process (annotating, validating, saving an XL model).
TIMEOUT = timedelta(minutes=60)


class MainProcessFailed(RuntimeError):
    """Raised on the other ranks when the main process failed in a step they waited for."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def init(cpu: bool) -> None:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1) before the data steps,
    so they can wait on the main process; the Trainer reuses the group. gloo on CPU, NCCL on GPUs
    (accelerate's choice); a DeepSpeed launch initialises through DeepSpeed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    from accelerate import PartialState

    PartialState(cpu=cpu, timeout=TIMEOUT)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    return not active() or dist.get_rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> None:
    """Leave the process group together at the end of a run. A rank that exits while another
    still holds gloo's connections open can make that one abort on its way out ("terminate called
    without an active exception", a failed run after all its files were written)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def from_main(value: T) -> T:
    """The main process's ``value`` on every process (picklable objects)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(step: Callable[[], T]) -> T | None:
    """Run ``step`` on the main process while the others wait; returns its result on the main
    process, ``None`` elsewhere. An exception on the main process is raised there and, as
    :class:`MainProcessFailed`, on the others."""
    if not active():
        return step()
    error: BaseException | None = None
    result = None
    if is_main():
        try:
            result = step()
        except BaseException as exc:  # re-raised below, after the others heard of it
            error = exc
    message = from_main(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise MainProcessFailed(f"the main process failed: {message}")
    return result


def gather(values: list[Any]) -> list[Any]:
    """Concatenation of every process's ``values`` in rank order (on every process)."""
    if not active():
        return list(values)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(values))
    return [v for part in parts for v in part]


def sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are split across processes (FSDP, DeepSpeed ZeRO-3): then
    no process can run a submodule such as the encoder on its own."""
    for param in model.parameters():
        if type(param).__name__ == "DTensor" or hasattr(param, "ds_id"):  # FSDP2 / ZeRO-3
            return True
        break
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())


def one_embeddings_module(model: torch.nn.Module) -> None:
    """Let the input embeddings be one module, registered once, that every stack calls.

    transformers 5.x builds T5's ``encoder.embed_tokens`` and ``decoder.embed_tokens`` as modules of
    their own holding ``shared.weight``. accelerate's FSDP2 preparation makes the input embeddings
    (``shared``) an FSDP unit, which leaves the stacks' modules, and so the same parameter, to the
    root unit too: FSDP2 refuses that at the first forward ("shared with a parameter already managed
    by another FSDP group"). Registering ``shared`` under the stacks as well (``set_input_embeddings``)
    makes one unit, but then the full state dict lists it under three names and torch's
    broadcast-from-rank-0 load, which resuming an FSDP checkpoint uses, fails on the extra names.
    So the stacks keep a plain reference to ``shared``: one module (one FSDP unit, its hooks run on
    every call), one name in every state dict. The forward is unchanged. Models without such
    copies (BERT2BERT, the prefix-LM) are left as they are."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if get is not None else None
    except NotImplementedError:
        return
    if not isinstance(embeddings, torch.nn.Embedding):
        return
    registered = False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is embeddings and not registered:
                registered = True  # the first registration (T5: ``shared``) stays
            elif child is embeddings or _same_embedding(child, embeddings):
                del parent._modules[name]
                object.__setattr__(parent, name, embeddings)  # an attribute, not a submodule


def _same_embedding(module: torch.nn.Module, embeddings: torch.nn.Embedding) -> bool:
    """Whether ``module`` computes what ``embeddings`` does: same class, same settings (padding
    index, any scale), the same weight tensor."""
    def settings(m):
        return {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}

    return (type(module) is type(embeddings) and module.weight is embeddings.weight
            and settings(module) == settings(embeddings))


def freeze_unused(model: torch.nn.Module) -> None:
    """Freeze parameters the training loss never reaches, so DDP can run without
    ``find_unused_parameters`` (an extra graph traversal every step): the pooler of a BERT
    encoder (BERT2BERT computes it, the decoder reads only the hidden states)."""
    encoder = getattr(model, "encoder", None)
    pooler = getattr(encoder, "pooler", None)
    if isinstance(pooler, torch.nn.Module):
        for param in pooler.parameters():
            param.requires_grad_(False)
