"""``instructrec bench hybrid``: what fusion adds to a request's scoring, in one process.

For each candidate count, real Games requests (a user's consecutive history titles, uniform
candidate items) are scored by the LM alone, then fused with the behaviour index, the
semantic encoder and (with ``--sequential``) the SASRec, as the service fuses them. Fusion is
timed twice: *cold*, the first time a request's titles are embedded, and *warm*, when the
title vectors are cached (the steady state of a service whose catalogue repeats). The ratio
(LM + fusion) / LM is measured on the same model, requests and thread count in one run.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from instructrec.aspects import UserNeed
from instructrec.instruction import build as build_instruction
from instructrec.text import normalise

from . import report


def run_hybrid(*, model: str, candidates: Sequence[int], requests: int, history: int, dataset: str, seed: int,
               threads: int | None, sequential: str | None, progress: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    from instructrec.hybrid import GATE_FILE, Hybrid
    from instructrec.hybrid.gate import Gate, load_gate
    from instructrec.hybrid.semantic import SemanticEncoder
    from instructrec.hybrid.sequential import load_sequential
    from instructrec.modeling import load_model
    from instructrec.ranker import Ranker
    from instructrec.training.hybrid.behaviour_cli import build_for

    from .ranker_bench import load_games

    if threads:
        torch.set_num_threads(threads)
    machine = report.machine_info()
    loaded = load_model(model)
    ranker = Ranker(loaded)
    data = load_games(dataset)
    progress(f"building the {dataset} behaviour index ...")
    index = build_for(data)

    gate_path = Path(model) / GATE_FILE
    gate = load_gate(gate_path) if gate_path.is_file() else Gate.neutral()
    hybrid = Hybrid(gate, index, SemanticEncoder(), load_sequential(sequential) if sequential else None)
    rng = random.Random(seed)
    users = sorted(u for u, s in data.sequences.items() if len(s) > history)
    items = sorted(data.items)
    rows = []
    for n in candidates:
        samples = []
        for r in range(requests + 1):  # the first request only warms kernels up
            user = users[rng.randrange(len(users))]
            hist_ids = [x.item_id for x in data.sequences[user][:history]]
            cand_ids = rng.sample(items, n)
            need = UserNeed(history=tuple(normalise(data.title(i)) for i in hist_ids))
            titles = [normalise(data.title(i)) for i in cand_ids]
            source = build_instruction(need, loaded.tokenizer, ranker.max_source_tokens).source
            t0 = time.perf_counter()
            lm = ranker.score(source, titles).scores
            t1 = time.perf_counter()
            hybrid.fuse(lm, need, titles, cand_ids, hist_ids)
            t2 = time.perf_counter()
            hybrid.fuse(lm, need, titles, cand_ids, hist_ids)
            t3 = time.perf_counter()
            if r:
                samples.append({"lm": (t1 - t0) * 1000, "cold": (t2 - t1) * 1000, "warm": (t3 - t2) * 1000})
        lm_p50 = report.percentile([s["lm"] for s in samples], 50)
        warm_p50 = report.percentile([s["warm"] for s in samples], 50)
        rows.append({"candidates": n, "requests": len(samples), "lm_p50_ms": lm_p50,
                     "fusion_cold_p50_ms": report.percentile([s["cold"] for s in samples], 50),
                     "fusion_warm_p50_ms": warm_p50, "fusion_warm_p95_ms": report.percentile([s["warm"] for s in samples], 95),
                     "ratio_warm": (lm_p50 + warm_p50) / lm_p50})
        progress(f"{n} candidates: LM p50 {lm_p50:.1f} ms, fusion p50 {warm_p50:.2f} ms warm")
    return {"kind": "hybrid", "machine": machine,
            "config": {"candidates": list(candidates), "requests": requests, "history": history, "dataset": dataset,
                       "seed": seed, "threads": torch.get_num_threads()},
            "server": {"model": model, "precision": loaded.precision, "hybrid": hybrid.version,
                       "gate": str(gate_path) if gate_path.is_file() else "neutral (no gate.json beside the model)"},
            "rows": rows}
