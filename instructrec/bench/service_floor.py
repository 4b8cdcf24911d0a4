"""The floor under ``instructrec bench service``'s latencies: the LM FLOPs of the requests the
bench sends over the matmul rate this CPU reaches at the threads one request gets.

The instruction and candidate token counts come from the service's own preparation
(:meth:`instructrec.service.engine.Engine.prepare` on the body as the route validates it), the
FLOPs from the ranker bench's formula (:func:`~instructrec.bench.ranker_bench.request_flops`),
the rate from a square matmul (:func:`~instructrec.bench.ranker_bench.matmul_peak`) in the dtype
the service computes in. No scoring of the request can take less time than the floor on this
CPU (padding, softmax, Python and HTTP only add), so a p50 target below it cannot be met here by
tuning the service. Measured after the service cells, so it does not disturb them.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from . import report

PEAK_SIZE = 1024
DESCRIPTION = ("floor ms = the median request's executed LM FLOPs (instructrec.bench.ranker_bench.FLOPS_FORMULA; "
               "instruction and candidate tokens counted by the service's own preparation of each request the bench "
               "built for that candidate count) ÷ the best rate of a square matmul in the service's dtype at the "
               "torch threads one request runs on, times the lanes a request alone may use (all of them when idle "
               "lanes lend a hand, lend_lanes; else one); floor req/s = lanes × that rate ÷ the same FLOPs. Not counted: "
               "embeddings, layer norms, softmax, padding, the fused signals (semantic, behaviour, sequential), "
               "Python and HTTP. Cold cells only: a warm cell's scores come from the cache")
FIELDS = ("gflop_per_request", "floor_ms", "floor_req_s")


def executed_variant(precision: str) -> str:
    """The ranker bench's variant the service runs in ``precision`` (whose executed FLOPs count)."""
    if precision == "int8":
        return "int8"
    return "bf16" if "bfloat16" in precision else "shared_kv"


def matmul_dtype(precision: str):
    """The dtype whose matmul rate bounds the service: the one it computes in (float32 for int8,
    whose attention and head stay float32)."""
    import torch

    if "bfloat16" in precision:
        return torch.bfloat16
    return torch.float16 if "float16" in precision else torch.float32


def request_threads(settings: dict[str, Any], default_threads: int) -> tuple[int, int]:
    """(torch threads one request's kernels run on, requests scored at once): what the service
    sets (:func:`~instructrec.service.engine.service_torch_threads`), else torch's default."""
    from instructrec.service.engine import service_torch_threads

    lanes = int(settings.get("lanes") or 1)
    return service_torch_threads(lanes, settings.get("torch_threads")) or default_threads, lanes


def request_lanes(settings: dict[str, Any]) -> int:
    """Lanes one request alone may compute on: every lane when idle ones lend a hand (the
    service's ``lend_lanes``, on by default), else its own."""
    lanes = int(settings.get("lanes") or 1)
    return lanes if lanes > 1 and settings.get("lend_lanes", True) else 1


def prep_engine(overrides: dict[str, Any]):
    """The served model's engine in this process, loaded by the service's own ``load_engine``
    with the service's settings minus what does not prepare /rerank (gate, catalogue, cache);
    this process's torch thread count is left as it was."""
    import torch

    from instructrec.service.checks import resolve_model
    from instructrec.service.engine import load_engine
    from instructrec.service.settings import Settings

    settings = Settings(**{**overrides, "gate": "none", "sequential": "none", "behaviour": None, "catalogue": None,
                           "semantic": False, "redis_url": ""})
    threads = torch.get_num_threads()
    try:
        return load_engine(settings, resolve_model(settings))
    finally:
        torch.set_num_threads(threads)


def prepared_tokens(engine, body: bytes) -> tuple[int, list[int]]:
    """(instruction tokens, target tokens per distinct candidate) of one /rerank body, as the
    service prepares it: the route's schema and limits, the handler's need, ``Engine.prepare``."""
    from instructrec.service.schemas import RerankRequest
    from instructrec.service.serving import need_of

    s = engine.settings
    context = {"max_text_chars": s.max_text_chars, "max_candidates": s.max_candidates, "max_history": s.max_history}
    req = RerankRequest.model_validate(json.loads(body), context=context)
    prepared = engine.prepare(need_of(req), req.template, [c.title for c in req.candidates])
    return prepared.source_tokens, [len(ids) for ids, _ in prepared.targets.values()]


def flops_by_size(engine, dims: dict, variant: str, bodies: dict[int, Sequence[bytes]]) -> list[dict[str, Any]]:
    """Per candidate count: the executed GFLOP of its requests (median, min, max) and their tokens."""
    from .ranker_bench import request_flops

    out = []
    for n, group in sorted(bodies.items()):
        sizes = [prepared_tokens(engine, b) for b in group]
        gflop = [request_flops(dims, s, t)["executed"][variant] / 1e9 for s, t in sizes]
        source = [s for s, _ in sizes]
        targets = [sum(t) / len(t) for _, t in sizes if t]
        out.append({"candidates": n, "requests": len(group), "variant": variant,
                    "gflop_median": report.median(gflop), "gflop_min": min(gflop), "gflop_max": max(gflop),
                    "source_tokens_median": report.median(source), "source_tokens_min": min(source),
                    "source_tokens_max": max(source),
                    "target_tokens_mean": sum(targets) / len(targets) if targets else None})
    return out


def measure_peak(dtype, threads: int, size: int = PEAK_SIZE) -> dict[str, Any]:
    """``matmul_peak`` at ``threads`` torch threads (this process's count restored afterwards)."""
    import torch

    from .ranker_bench import matmul_peak

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {**matmul_peak(dtype, size), "threads": threads}
    finally:
        torch.set_num_threads(before)


def skipped(reason: str) -> dict[str, Any]:
    """The floor section of a run that measures none (its cells get null floor fields)."""
    return {"floor": {"description": DESCRIPTION, "reason": reason}, "matmul_peak": None, "request_flops": None}


def measure(overrides: dict[str, Any], settings: dict[str, Any], precision: str | None,
            bodies: dict[int, Sequence[bytes]], default_threads: int, peak_size: int = PEAK_SIZE,
            progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The floor section of a run that started the service with ``overrides`` (``settings``: its
    resolved public settings; ``precision``: what /ready reported it computes in)."""
    from .ranker_bench import model_dims

    progress("floor: preparing the bench's requests as the service does ...")
    engine = prep_engine(overrides)
    dims = model_dims(engine.loaded.model)
    if dims is None:
        return skipped(f"no FLOPs formula for {type(engine.loaded.model).__name__}")
    precision = precision or engine.loaded.precision
    variant = executed_variant(precision)
    flops = flops_by_size(engine, dims, variant, bodies)
    threads, lanes = request_threads(settings, default_threads)
    dtype = matmul_dtype(precision)
    progress(f"floor: matmul peak, {dtype} {peak_size}x{peak_size} at {threads} thread(s) ...")
    peak = measure_peak(dtype, threads, peak_size)
    floor = {"description": DESCRIPTION, "reason": None, "precision": precision, "variant": variant,
             "threads": threads, "lanes": lanes, "request_lanes": request_lanes(settings), "model_dims": dims}
    return {"floor": floor, "matmul_peak": peak, "request_flops": flops}


def apply(cells: list[dict[str, Any]], section: dict[str, Any]) -> None:
    """Give every cell the floor fields: its size's median GFLOP, the floor ms and req/s (cold
    cells of a measured floor; null elsewhere)."""
    floor = section.get("floor") or {}
    peak, lanes, alone = section.get("matmul_peak"), floor.get("lanes") or 1, floor.get("request_lanes") or 1
    by_size = {f["candidates"]: f["gflop_median"] for f in section.get("request_flops") or []}
    for c in cells:
        gflop = by_size.get(c.get("candidates")) if c.get("phase") == "cold" else None
        if gflop is None or not peak:
            c.update(dict.fromkeys(FIELDS))
            continue
        rate = peak["gflops_best"]
        c.update(gflop_per_request=gflop, floor_ms=gflop / (rate * alone) * 1000, floor_req_s=lanes * rate / gflop)
