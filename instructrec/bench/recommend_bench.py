"""``instructrec bench recommend``: the latency of ``POST /recommend`` over a real catalogue.

The bench builds the catalogue of the data set for the model (``instructrec catalogue build``'s
code; or takes ``--catalogue``), starts the service on loopback as a child process with it (a
fresh cache namespace), and sends real Games histories one request at a time, for each ``k``:
the *cold* requests are each sent for the first time (generated), the *cached* ones replay
them (answered from the cache). Per ``k``: client and server-side (``Server-Timing``)
latency percentiles, and the decoding steps the beam search ran.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from . import report
from .service_bench import (BenchError, ChildServer, Workload, _delete_namespace, _parse_sets, _redis_ok, _server_ms,
                            log)


def build_bench_catalogue(model: str, data, dataset: str, out: Path) -> Path:
    """The catalogue of ``data`` (the data set named ``dataset``) for ``model``: its titles as
    the model tokenises them."""
    from instructrec.catalogue import build_catalogue, load_text_side
    from instructrec.ranker import token_limits
    from instructrec.training.data.catalogue_items import catalogue_items

    items, _ = catalogue_items(data)
    text = load_text_side(model)
    catalogue = build_catalogue(items, text.tokenizer, eos=text.eos, max_target_tokens=token_limits(text.meta)[1],
                                model=model, source=dataset)
    return catalogue.save(out / f"catalogue-{dataset}.npz")


def _time(client, body: dict) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = client.post("/recommend", json=body)
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        raise BenchError(f"/recommend answered {r.status_code}: {r.text[:300]}")
    answer = r.json()
    return {"ms": ms, "server_ms": _server_ms(r.headers), "steps": answer["usage"]["steps"],
            "hit": answer["cache"]["hit"], "results": len(answer["results"])}


def _summary(k: int, phase: str, samples: list[dict]) -> dict[str, Any]:
    lat = [s["ms"] for s in samples]
    server = [s["server_ms"] for s in samples if s["server_ms"] is not None]
    return {"k": k, "phase": phase, "requests": len(samples), "p50_ms": report.percentile(lat, 50),
            "p95_ms": report.percentile(lat, 95), "max_ms": max(lat),
            "server_p50_ms": report.percentile(server, 50) if server else None,
            "server_p95_ms": report.percentile(server, 95) if server else None,
            "mean_steps": sum(s["steps"] for s in samples) / len(samples),
            "hits": sum(s["hit"] for s in samples), "mean_results": sum(s["results"] for s in samples) / len(samples)}


def run_recommend(*, model: str | None, catalogue: str | None, ks: Sequence[int], requests: int, history: int,
                  dataset: str, seed: int, settings: Sequence[str], threads: int | None, redis_url: str,
                  log_dir: str, progress: Callable[[str], None] = log) -> dict[str, Any]:
    import httpx

    from instructrec.modeling import DEFAULT_MODEL_DIR
    from .ranker_bench import load_games

    model = model or str(DEFAULT_MODEL_DIR)
    out = Path(log_dir)
    machine = report.machine_info()
    data = load_games(dataset)
    if catalogue is None:
        progress(f"building the {dataset} catalogue for {model} ...")
        catalogue = str(build_bench_catalogue(model, data, dataset, out))
    workload = Workload(data, history=history, seed=seed)
    bodies = {k: [{"history": workload.titles_of(workload.windows[(i + 1000 * j) % len(workload.windows)]), "k": k}
                  for i in range(requests)] for j, k in enumerate(ks)}
    cache = bool(redis_url.strip()) and _redis_ok(redis_url)
    namespace = f"instructrec-bench:recommend:{uuid.uuid4().hex[:10]}"
    overrides: dict[str, Any] = {"model": model, "catalogue": catalogue, "log_level": "warning",
                                 "redis_url": redis_url if cache else "", "cache_namespace": namespace,
                                 **({"torch_threads": threads} if threads else {}), **_parse_sets(settings)}
    server = ChildServer(overrides, out / "recommend-server.log")
    rows = []
    try:
        info = server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=600, trust_env=False) as client:
            _time(client, {"history": workload.titles_of(workload.windows[-1]), "k": max(ks)})  # first-use kernels
            for k in ks:
                cold = []
                for i, body in enumerate(bodies[k]):
                    cold.append(_time(client, body))
                    progress(f"k={k} cold {i + 1}/{requests}: {cold[-1]['ms']:.0f} ms, {cold[-1]['steps']} steps")
                rows.append(_summary(k, "cold", cold))
                if cache:
                    rows.append(_summary(k, "cached", [_time(client, body) for body in bodies[k]]))
    finally:
        server.stop()
        if cache:
            _delete_namespace(redis_url, namespace)
    from instructrec.catalogue import load_catalogue

    cat = load_catalogue(catalogue)
    return {"kind": "recommend", "machine": machine,
            "config": {"ks": list(ks), "requests": requests, "history": history, "dataset": dataset, "seed": seed,
                       "cache": cache, "settings": list(settings)},
            "server": {"model": model, "checkpoint_version": (info.get("model") or {}).get("checkpoint_version"),
                       "catalogue": catalogue, "items": len(cat), "distinct_titles": cat.header["leaves"]},
            "workload": {"description": f"real {dataset} histories ({history} consecutive titles of one user), no "
                                        f"instruction text (the history-only matching template), one request at a "
                                        f"time; cold requests are each new, cached ones replay them"},
            "rows": rows}


__all__ = ["run_recommend", "build_bench_catalogue"]
