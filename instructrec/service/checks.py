"""What must hold before a model is served, checked before any work: at start-up
(:func:`instructrec.service.app.create_app`) and before a model swap (``POST /admin/reload``).
Each failure is a :class:`ConfigError` naming the setting or file."""

from __future__ import annotations

from pathlib import Path

from .engine import gate_path, sequential_path
from .settings import Settings


class ConfigError(ValueError):
    """The settings cannot work (e.g. no model to serve)."""


def resolve_model(settings: Settings) -> str:
    """The model to serve: the same resolution as ``instructrec rank --model``."""
    from instructrec.modeling import ModelNotFound, resolve_model_name

    try:
        return resolve_model_name(settings.model)
    except ModelNotFound as exc:
        raise ConfigError(str(exc)) from None


def check_device(settings: Settings) -> None:
    """Refuse a device this machine lacks (or int8 off the CPU) at start-up, not after the model loads."""
    from instructrec.modeling import resolve_device

    try:
        device = resolve_device(settings.device)
    except RuntimeError as exc:  # torch's "Invalid device string" and CUDA missing both land here
        raise ConfigError(f"setting device: {exc}") from None
    if settings.dtype == "int8" and device.type != "cpu":
        raise ConfigError(f"setting dtype: int8 (dynamic quantisation) runs on the CPU only, not on {device}; "
                          "use bfloat16 or float32 on a GPU")


def check_lanes(settings: Settings) -> None:
    """Lanes need one torch thread each: torch's thread count is the whole process's, and a lane
    with several would make its answers depend on what the other lanes run meanwhile."""
    if settings.lanes > 1 and settings.torch_threads not in (None, 1):
        raise ConfigError(f"settings lanes={settings.lanes} and torch_threads={settings.torch_threads}: each lane "
                          "runs one torch thread; leave INSTRUCTREC_TORCH_THREADS unset (or 1) with "
                          "INSTRUCTREC_LANES > 1, or set INSTRUCTREC_LANES=1")


def check_catalogue(settings: Settings) -> None:
    """A named catalogue file must exist (whether it fits the model is checked at load)."""
    if settings.catalogue and not Path(settings.catalogue).is_file():
        raise ConfigError(f"catalogue {settings.catalogue} does not exist; make it with `instructrec catalogue build "
                          "--data DIR|--items FILE.jsonl --model <the served model> --out CAT`")


def check_hybrid(settings: Settings, model_name: str) -> None:
    """Named gate and behaviour files must exist, and a behaviour index needs a gate (whether
    they are readable and fit the catalogue is checked at load: /health says why not)."""
    gate = gate_path(settings, model_name)
    if settings.gate and gate is not None and not gate.is_file():
        raise ConfigError(f"gate file {gate} does not exist; fit one for the served model with `instructrec gate fit`, "
                          "or set INSTRUCTREC_GATE=none to serve LM-only answers")
    sequential = sequential_path(settings, model_name)
    if settings.sequential and sequential is not None and not (sequential / "sequential.json").is_file():
        raise ConfigError(f"sequential model {sequential} does not exist; train one with `instructrec sequential train`, "
                          "or set INSTRUCTREC_SEQUENTIAL=none")
    if sequential is not None and gate is None and settings.sequential:
        raise ConfigError(f"sequential model {sequential} given without a gate to fuse it with: set "
                          "INSTRUCTREC_GATE (or put gate.json in the model directory)")
    if settings.behaviour:
        if not Path(settings.behaviour).is_file():
            raise ConfigError(f"behaviour index {settings.behaviour} does not exist; build one with `instructrec "
                              "behaviour build`")
        if gate is None:
            raise ConfigError(f"behaviour index {settings.behaviour} given without a gate to fuse it with: set "
                              "INSTRUCTREC_GATE (or put gate.json in the model directory)")
