"""Command-line options every model-running command spells the same way.

``serve``, ``rank``, ``recommend``, ``evaluate``, ``train``, ``gate fit`` and ``promote`` all
take ``--device`` and ``--dtype`` from here, with the same names, values and help, so a user who
learned one command knows them all (``serve`` reads the same values from ``INSTRUCTREC_DEVICE``
and ``INSTRUCTREC_DTYPE`` too).
"""

from __future__ import annotations

import argparse

DEVICE_HELP = "where the model runs: cpu, cuda, cuda:N, or auto (a GPU if torch sees one, else the CPU)"

# What inference can run in; training computes in float32 or under bf16 autocast only (float16
# overflows T5-family models, and int8 has no gradients).
INFERENCE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
TRAINING_DTYPES = ("auto", "float32", "bfloat16")
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

DTYPE_HELP = {
    INFERENCE_DTYPES: "what the model computes in: auto (bfloat16 where the hardware computes it natively: a GPU of "
                      "compute capability 8.0+, a CPU with AVX512-BF16 or AMX; else float32), float32, bfloat16, "
                      "float16 (refused for T5-family models: they overflow), int8 (CPU only: dynamically quantised "
                      "linear layers); bf16, fp32 and fp16 are accepted too",
    TRAINING_DTYPES: "what training computes in: auto (bf16 autocast where the hardware computes it natively, else "
                     "float32), float32, or bfloat16 (autocast over float32 master weights); bf16 and fp32 are "
                     "accepted too",
}


def dtype_name(allowed: tuple[str, ...]):
    """An argparse ``type`` that maps aliases (bf16, fp32, fp16) to the full names and refuses the rest."""

    def parse(value: str) -> str:
        name = ALIASES.get(value.strip().lower(), value.strip().lower())
        if name not in allowed:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(allowed)}")
        return name

    parse.__name__ = "dtype"  # what argparse names in its error message
    return parse


def add_device_options(parser: argparse.ArgumentParser, *, training: bool = False, default: str | None = "auto",
                       dtype_default: str | None = None) -> None:
    """``--device`` and ``--dtype``. ``default=None`` leaves both unset when not given, for a
    command (``serve``) whose settings also come from the environment."""
    allowed = TRAINING_DTYPES if training else INFERENCE_DTYPES
    parser.add_argument("--device", default=default, metavar="DEVICE", help=f"{DEVICE_HELP} (default: {default or 'auto'})")
    dtype_default = default if dtype_default is None else dtype_default
    parser.add_argument("--dtype", default=dtype_default, type=dtype_name(allowed), metavar="DTYPE",
                        help=f"{DTYPE_HELP[allowed]} (default: {dtype_default or 'auto'})")


def training_bf16(dtype: str | None) -> bool | None:
    """The bf16 autocast switch a training ``--dtype`` asks for (None: the hardware decides)."""
    return {None: None, "auto": None, "bfloat16": True, "float32": False}[dtype]
