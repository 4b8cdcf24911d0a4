"""Bench results on disk: ``results.json``, ``results.md`` (tables) and PNG plots.

Both benches write into the same directory (default ``artifacts/bench``): each owns one
section of ``results.json`` (``"ranker"`` / ``"service"``), so running both leaves one
report with both; a section is replaced whenever its bench runs again. Every section
carries the machine description and the command line of its own run. ``results.md`` and
the plots are regenerated from the whole ``results.json`` each time.

Also the Spearman correlation the benches use. Percentiles, the machine description and the
command line come from :mod:`instructrec.records` (re-exported here), which training uses too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from instructrec import files
from instructrec.blocks import between, holder
from instructrec.records import (CPU_FEATURES, bf16_support, cpu_flags, cpu_model, invoked_as,  # noqa: F401
                                 machine_info, median, percentile, physical_cores)

SCHEMA = 1
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RANKER_PLOT = "ranker_ms_vs_candidates.png"
SERVICE_LATENCY_PLOT = "service_latency_vs_concurrency.png"
SERVICE_THROUGHPUT_PLOT = "service_throughput_vs_concurrency.png"
DEFAULT_OUT = Path("artifacts") / "bench"
MATPLOTLIB_PIN = "matplotlib==3.11.2"

# --- statistics ------------------------------------------------------------------------------


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties get the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson on tie-averaged ranks); None when undefined
    (fewer than two values, or one side constant)."""
    if len(a) != len(b):
        raise ValueError("spearman needs two sequences of the same length")
    if len(a) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / math.sqrt(va * vb)


# --- files -----------------------------------------------------------------------------------


def load(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / RESULTS_JSON
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"schema": SCHEMA}
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return {"schema": SCHEMA}
    return data


def write(out_dir: str | Path, section: str, data: dict[str, Any]) -> dict[str, Path]:
    """Put ``data`` as ``section`` into ``out_dir/results.json`` and regenerate the Markdown
    report and the plots. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = load(out)
    results[section] = data
    paths = {"json": out / RESULTS_JSON, "md": out / RESULTS_MD}
    files.write_json(paths["json"], results, indent=2, default=_json_default)
    plots, plot_error = {}, None
    try:
        plots = make_plots(results, out)
    except ImportError:
        plot_error = f"matplotlib is not installed, no plots (pip install {MATPLOTLIB_PIN})"
    paths.update(plots)
    paths["md"].write_text(render_markdown(results, plots={k: v.name for k, v in plots.items()}, note=plot_error))
    return paths


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --- Markdown --------------------------------------------------------------------------------


def _f(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:,.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _ms(value) -> str:
    if value is None:
        return "–"
    return f"{value:,.2f}" if value < 10 else f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _features(m: dict) -> str:
    return ", ".join(f for f, on in (m.get("cpu_features") or {}).items() if on) or "none of interest"


def _machine_md(m: dict) -> str:
    feats = _features(m)
    load_avg = m.get("load_average")
    la = " / ".join(f"{x:.2f}" for x in load_avg) if load_avg else "–"
    return (f"- CPU: {m.get('cpu_model')} — {m.get('usable_cpus')} usable of {m.get('logical_cpus')} logical CPUs "
            f"({m.get('physical_cores') or '?'} physical cores); features: {feats}; torch CPU capability "
            f"{m.get('torch_cpu_capability')}\n"
            f"- torch {m.get('torch')}, transformers {m.get('transformers')}, Python {m.get('python')}, "
            f"{m.get('platform')}\n"
            f"- torch threads: {m.get('torch_threads')} intra-op, {m.get('torch_interop_threads')} inter-op; "
            f"env {m.get('env') or '{}'}\n"
            f"- load average (1/5/15 min) at start: {la} — measured at {m.get('time')}")


def render_markdown(results: dict, plots: dict[str, str] | None = None, note: str | None = None) -> str:
    plots = plots or {}
    parts = ["# instructrec benchmark results", ""]
    if note:
        parts += [f"_{note}_", ""]
    if "ranker" in results:
        parts += [render_ranker(results["ranker"], plots.get("ranker")), ""]
    if "service" in results:
        parts += [render_service(results["service"], plots.get("service_latency"), plots.get("service_throughput")), ""]
    if "soak" in results:
        parts += ["## Soak", "", f"Command: `{results['soak'].get('command', '')}`", "", soak_table(results["soak"]), ""]
    if "hybrid" in results:
        h = results["hybrid"]
        parts += ["## Hybrid fusion", "", f"Command: `{h.get('command', '')}`", "", _machine_md(h["machine"]), "",
                  hybrid_table(h), ""]
    if "recommend" in results:
        r = results["recommend"]
        parts += ["## /recommend", "", f"Command: `{r.get('command', '')}`", "", _machine_md(r["machine"]), "",
                  recommend_table(r), ""]
    parts += [render_targets(results), ""]
    return "\n".join(parts)


def ranker_table(section: dict) -> str:
    """The main ranker table: one row per (candidates, variant)."""
    header = ["candidates", "variant", "median ms", "min ms", "max ms", "candidates/s", "× naive", "GFLOP/req",
              "GFLOP/s", "% of peak", "Spearman vs fp32", "max |Δ| vs naive"]
    rows = []
    for r in section.get("rows", []):
        if r["status"] != "ok":
            rows.append([str(r["candidates"]), r["variant"], r["status"], "", "", "", "", "", "", "",
                         "", r.get("reason", "")])
            continue
        ratio = r.get("ratio_to_naive")
        rows.append([
            str(r["candidates"]), r["variant"], _ms(r["median_ms"]), _ms(r["min_ms"]), _ms(r["max_ms"]),
            _f(r["candidates_per_s"], 0), f"{ratio:.1f}×" if ratio is not None else "–",
            _f(r.get("gflop_executed"), 2), _f(r.get("gflops_per_s"), 1),
            _f(100 * r["peak_fraction"], 1, "%") if r.get("peak_fraction") is not None else "–",
            _f(r.get("spearman_vs_fp32"), 4), _f(r.get("max_abs_diff_vs_naive"), 6) if r.get(
                "max_abs_diff_vs_naive") is not None else "–",
        ])
    return _table(header, rows)


def render_ranker(s: dict, plot: str | None) -> str:
    cfg = s.get("config", {})
    inp = s.get("input", {})
    peak = s.get("peak", {})
    out = ["## Ranker: one request, every scoring variant (`instructrec bench ranker`)", "",
           f"Command: `{s.get('command')}`  ", f"Invoked as: `{s.get('invoked_as')}`", "",
           _machine_md(s.get("machine", {})), ""]
    bf = s.get("bf16_support", {})
    out.append(f"- bf16 on this CPU: avx512_bf16 {'yes' if bf.get('avx512_bf16') else 'no'}, amx_bf16 "
               f"{'yes' if bf.get('amx_bf16') else 'no'}, amx_int8 {'yes' if bf.get('amx_int8') else 'no'}; "
               f"oneDNN bf16 supported: {bf.get('mkldnn_bf16_supported')}; quantized engine "
               f"{s.get('quantized_engine')}")
    out.append(f"- model: `{cfg.get('model')}` ({_f(cfg.get('parameters_m'), 1)} M parameters, {cfg.get('kind')}); "
               f"ranker budget {cfg.get('batch_tokens')} tokens per forward pass, max target tokens "
               f"{cfg.get('max_target_tokens')}, reduction {cfg.get('reduction')}")
    out.append(f"- input: Games user `{inp.get('user')}`, {inp.get('history_titles')} history titles rendered by "
               f"`instructrec.instruction.build` with template `{inp.get('template')}` = {inp.get('source_tokens')} "
               f"instruction tokens; candidates are real Games titles (seed {cfg.get('seed')}), "
               f"{_f(inp.get('mean_target_tokens'), 1)} target tokens each on average (with end-of-sequence)")
    out.append(f"- repeats {cfg.get('repeats')} after {cfg.get('warmup')} warm-up call(s) per variant and size, "
               f"variants interleaved within each repeat; naive only up to {cfg.get('naive_max')} candidates "
               f"(skipped beyond, nothing extrapolated); × naive = naive median / variant median at the same size, "
               f"same run")
    if peak:
        cells = []
        for key in ("float32", "bfloat16"):
            p = peak.get(key)
            if p:
                cells.append(f"{key} {p['gflops_best']:.1f} GFLOP/s (median {p['gflops_median']:.1f})")
        out.append(f"- matmul practical peak (square {peak.get('size')}×{peak.get('size')} @ same threads, best of "
                   f"the timed calls, same process): " + "; ".join(cells))
    out += ["", ranker_table(s), ""]
    if plot:
        out += [f"![ms per request vs candidates]({plot})", ""]
    prof = profile_table(s)
    if prof:
        out += [f"Where the time of one {s['profile']['candidates']}-candidate request goes (torch profiler, one "
                f"call per variant after the timed runs; self CPU time of the ops by group, share of the profiled "
                f"wall time):", "", prof, ""]
        for v, p in s["profile"]["variants"].items():
            out += [f"Costliest ops of `{v}`:", "",
                    _table(["op", "input shapes", "calls", "self ms"],
                           [[f"`{o['op']}`", " ".join(str(tuple(x)) for x in o["shapes"][:3]), str(o["calls"]),
                             _f(o["self_ms"], 1)] for o in p["top_ops"]]), ""]
    out += ["Variants:", ""]
    for name, v in s.get("variants", {}).items():
        state = "" if v.get("status") == "ok" else f" — **{v.get('status')}**: {v.get('reason')}"
        out.append(f"- `{name}`: {v.get('description')}{state}")
    f = s.get("flops", {})
    if f.get("formula"):
        out += ["", "FLOPs (analytic, from the model config; 1 multiply-add = 2 FLOPs):", "", "```", f["formula"], "```"]
        if f.get("dims"):
            out.append(f"dims: {json.dumps(f['dims'])}")
    elif f.get("reason"):
        out += ["", f"FLOPs: not computed ({f['reason']})"]
    out += ["", "GFLOP/req is the work each variant actually executes (naive repeats the encoder and the "
                "cross-attention K/V per candidate, encoder_once repeats the K/V per candidate); GFLOP/s = GFLOP/req ÷ "
                "median time; % of peak compares with the measured matmul peak of the variant's compute dtype "
                "(fp32 peak for int8, which has no measured int8 peak here). Spearman vs fp32: rank correlation "
                "of the variant's scores with the fp32 shared_kv scores of the same request; max |Δ| vs naive: "
                "largest score difference from the naive fp32 reference (only where naive ran). On an untuned base model "
                "(e.g. minilm-bert2bert) the scores of different titles are nearly equal, so rank correlations "
                "mostly measure noise: judge bf16/int8 accuracy on a tuned checkpoint."]
    return "\n".join(out)


def profile_table(section: dict) -> str:
    """Time by group of ops per profiled variant (empty when the run profiled nothing)."""
    variants = (section.get("profile") or {}).get("variants") or {}
    if not variants:
        return ""
    names = list(variants)
    groups = [g["group"] for g in next(iter(variants.values()))["groups"]]
    rows = []
    for i, group in enumerate(groups):
        line = [group]
        for v in names:
            g = variants[v]["groups"][i]
            line.append(f"{_f(g['ms'], 1)} ({g['share'] * 100:.0f}%)" if g.get("share") is not None else _f(g["ms"], 1))
        rows.append(line)
    rows.append(["outside aten ops (Python, framework, the profiler)"] + [
        f"{_f(variants[v]['outside_ops_ms'], 1)} ({variants[v]['outside_ops_ms'] / variants[v]['wall_ms'] * 100:.0f}%)"
        for v in names])
    rows.append(["wall time of the profiled call"] + [_f(variants[v]["wall_ms"], 1) for v in names])
    n = section["profile"].get("candidates")
    timed = {x["variant"]: x.get("median_ms") for x in section.get("rows", [])
             if x.get("candidates") == n and x.get("status") == "ok"}
    # the profiler's own cost: mostly in the "outside" row, a little in every op
    rows.append(["median of the timed calls, unprofiled"] + [_f(timed.get(v), 1) for v in names])
    return _table(["ms (share)"] + [f"`{v}`" for v in names], rows)


CPU_NOTE = ("CPU ms/req: CPU seconds the serving process spent (all its threads: HTTP, preparation, lanes; "
            "`process_cpu_seconds_total` on its /metrics, before and after the cell) per answer. A machine of N "
            "CPUs answers at most N ÷ that per second, whatever the concurrency; the targets below give that "
            "ceiling next to the requests/s ratios. Not measured when the service runs in the bench's own process.")


def floor_columns(cell: dict) -> list[str]:
    """A service cell's "GFLOP/req" and "floor ms" ("–" where not measured, or in older results)."""
    gflop = cell.get("gflop_per_request")
    return [_f(gflop, 3 if gflop is not None and gflop < 10 else 1), _ms(cell.get("floor_ms"))]


def floor_note(section: dict) -> str:
    """What the floor columns mean in this run: the matmul rate and the FLOPs, or why there are none."""
    floor, peak = section.get("floor"), section.get("matmul_peak")
    if not floor:
        return ""
    if not peak:
        return f"GFLOP/req and floor ms: not measured ({floor.get('reason')})."
    sizes = "; ".join(f"{f['candidates']} candidates: {_f(f['gflop_median'], 3)} GFLOP median "
                      f"({_f(f['gflop_min'], 3)}-{_f(f['gflop_max'], 3)}), instruction {_f(f['source_tokens_median'], 0)}"
                      f" tokens median" for f in section.get("request_flops") or [])
    return (f"GFLOP/req and floor ms: {floor['description']}. Here: {floor['precision']} (executed FLOPs of "
            f"`{floor['variant']}`), matmul {peak['dtype']} {peak['size']}×{peak['size']} at {peak['threads']} "
            f"thread(s): best {_f(peak['gflops_best'], 1)} GFLOP/s, median {_f(peak['gflops_median'], 1)}, "
            f"{floor.get('request_lanes') or 1} lane(s) for a request alone; {sizes}.")


def service_table(section: dict) -> str:
    header = ["batching", "cache", "candidates", "concurrency", "ok", "errors", "req/s", "p50 ms", "GFLOP/req",
              "floor ms", "CPU ms/req", "p95 ms", "p99 ms", "server p50 ms", "cache hits", "mean batch size", "wall s"]
    rows = []
    for c in section.get("cells", []):
        if c.get("status") != "ok":
            rows.append([c.get("batching", ""), c.get("phase", ""), str(c.get("candidates", "")),
                         str(c.get("concurrency", "")), c.get("status", ""), c.get("reason", "")] + [""] * 11)
            continue
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(c["errors"].items())) or "0"
        hits = c.get("cache_hit_fraction")
        rows.append([
            c["batching"], c["phase"], str(c["candidates"]), str(c["concurrency"]), str(c["ok"]), errors,
            _f(c.get("requests_per_s"), 1), _ms(c.get("p50_ms")), *floor_columns(c),
            _ms(c.get("server_cpu_ms_per_request")), _ms(c.get("p95_ms")), _ms(c.get("p99_ms")),
            _ms(c.get("server_p50_ms")), _f(100 * hits, 0, "%") if hits is not None else "–",
            _f(c.get("mean_batch_size"), 2), _f(c.get("wall_s"), 1),
        ])
    return _table(header, rows)


def render_service(s: dict, latency_plot: str | None, throughput_plot: str | None) -> str:
    cfg = s.get("config", {})
    out = ["## Service: /rerank under load (`instructrec bench service`)", "",
           f"Command: `{s.get('command')}`  ", f"Invoked as: `{s.get('invoked_as')}`", "",
           _machine_md(s.get("machine", {})), ""]
    srv = s.get("server", {})
    out.append(f"- server: {srv.get('description')}")
    if srv.get("model"):
        out.append(f"- model: `{srv['model']}` (checkpoint version `{srv.get('checkpoint_version')}`)")
    out.append(f"- requests: {s.get('workload', {}).get('description')}")
    out.append(f"- load: closed loop, `concurrency` clients each sending its next request when the last one "
               f"answered; per cell at most {cfg.get('requests')} requests and {cfg.get('duration_s')} s "
               f"(in-flight requests finish), timeout {cfg.get('timeout_s')} s; latency = client-side time "
               f"from sending the request to its full response; req/s = successful responses ÷ wall time")
    for name, m in s.get("modes", {}).items():
        out.append(f"- batching **{name}**: {m.get('description')}")
    cache = s.get("cache", {})
    out.append(f"- cache: {cache.get('description')}")
    out += ["", service_table(s), ""]
    if floor_note(s):
        out += [floor_note(s), ""]
    out += [CPU_NOTE, ""]
    parts = [c for c in s.get("cells", []) if c.get("status") == "ok" and c.get("server_mean_ms")]
    if parts:
        out += ["Where the server's time goes (mean ms from the service's histograms over the cell: prepare per "
                "request = template, fitting, tokenisation; queue, encode, decode per scoring job):", ""]
        rows = []
        for c in parts:
            m = c["server_mean_ms"]
            rows.append([c["batching"], c["phase"], str(c["candidates"]), str(c["concurrency"]),
                         _ms(m.get("prepare")), _ms(m.get("queue")), _ms(m.get("encode")), _ms(m.get("decode")),
                         _ms(c.get("server_p50_ms"))])
        out += [_table(["batching", "cache", "candidates", "concurrency", "prepare", "queue", "encode", "decode",
                        "server p50 (total)"], rows), ""]
    cached = s.get("cached_request", [])
    if cached:
        out += ["Fully cached request, server-side time (every candidate a cache hit; lowest concurrency of the warm "
                "phase):", ""]
        out.append(_table(["batching", "candidates", "concurrency", "requests", "server p50 ms", "server p95 ms",
                           "client p50 ms", "source"],
                          [[c["batching"], str(c["candidates"]), str(c["concurrency"]), str(c["requests"]),
                            _ms(c.get("server_p50_ms")), _ms(c.get("server_p95_ms")), _ms(c.get("client_p50_ms")),
                            c.get("source", "")] for c in cached]))
        out.append("")
    for plot, alt in ((latency_plot, "latency percentiles vs concurrency"), (throughput_plot, "requests/s vs concurrency")):
        if plot:
            out += [f"![{alt}]({plot})", ""]
    out.append("server p50: time inside the server process from the request reaching the app to the response "
               "headers (the bench server's timing header; from the `instructrec_request_duration_seconds` "
               "histogram when benchmarking an external --url). Cache hits: candidate scores served from the cache "
               "over all candidates of the cell's successful requests (0 % cold, 100 % warm when the run is clean). Mean batch size: scoring jobs per batch "
               "from the `instructrec_batch_size` histogram over the cell.")
    return "\n".join(out)


# --- targets (issue 5; the load issue) -----------------------------------------------------------------------


def _cell(section: dict, **want):
    for c in section.get("cells", []):
        if c.get("status") == "ok" and all(c.get(k) == v for k, v in want.items()):
            return c
    return None


def targets(results: dict) -> list[dict]:
    """The issue's targets against this report's numbers (None = not measured in this report)."""
    out = []
    r = results.get("ranker")
    if r:
        row = next((x for x in r.get("rows", []) if x["variant"] == "shared_kv" and x["candidates"] == 100
                    and x["status"] == "ok"), None)
        ratio = row.get("ratio_to_naive") if row else None
        measured = f"{ratio:.1f}×" if ratio is not None else None
        if measured and row.get("naive_flop_ratio"):
            # Both paths must run the decoder and vocabulary head over every candidate token; only
            # the encoder work is saved, so at equal arithmetic speed this is the whole speed-up
            # (naive's smaller matmuls run slower per FLOP, which can add a little).
            measured += f" (naive/fast FLOP ratio on this request: {row['naive_flop_ratio']:.1f}×)"
        faster = [x for x in r.get("rows", []) if x["candidates"] == 100 and x["status"] == "ok"
                  and x["variant"] in ("bf16", "int8") and x.get("ratio_to_naive")]
        if measured and faster:
            measured += "; " + ", ".join(f"{x['variant']} {x['ratio_to_naive']:.1f}×" for x in faster)
        out.append({"target": "encoder-once path >= 15x naive at 100 candidates (same run)",
                    "measured": measured, "pass": None if ratio is None else ratio >= 15})
    s = results.get("service")
    if s:
        for n, limit in ((10, 50.0), (100, 250.0)):
            c = _cell(s, batching="on", phase="cold", candidates=n, concurrency=1) or _cell(
                s, batching="external", phase="cold", candidates=n, concurrency=1)
            p50 = c.get("p50_ms") if c else None
            floor = f" (floor {c['floor_ms']:.1f} ms)" if c and c.get("floor_ms") is not None else ""
            out.append({"target": f"p50 /rerank, {n} candidates, 20-item history, one client <= {limit:.0f} ms "
                                  f"(cold cache)",
                        "measured": f"{p50:.1f} ms{floor}" if p50 is not None else None,
                        "pass": None if p50 is None else p50 <= limit})
        for n in sorted({c.get("candidates") for c in s.get("cells", []) if c.get("candidates") is not None}):
            on, off = _cell(s, batching="on", phase="cold", candidates=n, concurrency=32), _cell(
                s, batching="off", phase="cold", candidates=n, concurrency=32)
            ok = None
            measured = None
            if on and off and on.get("requests_per_s") and off.get("requests_per_s"):
                gain = on["requests_per_s"] / off["requests_per_s"]
                ok = gain >= 2 and (on.get("p99_ms") or 0) <= (off.get("p99_ms") or 0)
                measured = (f"{gain:.2f}× req/s; p99 {on.get('p99_ms'):.0f} vs {off.get('p99_ms'):.0f} ms")
            out.append({"target": f"32 clients, {n} candidates (cold): micro-batching >= 2x req/s of no batching at "
                                  f"no worse p99", "measured": measured, "pass": ok})
        out += _scaling_targets(s)
        cached = [c for c in s.get("cached_request", []) if c.get("server_p50_ms") is not None]
        if cached:
            worst = max(c["server_p50_ms"] for c in cached)
            out.append({"target": "fully cached request p50 <= 2 ms server-side",
                        "measured": f"{worst:.2f} ms (worst over candidate counts / modes)", "pass": worst <= 2.0})
        else:
            out.append({"target": "fully cached request p50 <= 2 ms server-side", "measured": None, "pass": None})
    return out


def _swap_rows(s: dict[str, Any]) -> list[list[str]]:
    """The swap fault's rows: the swap, and the answers each version gave."""
    swap = s.get("swap")
    if not swap:
        return []
    done = f"{swap['from']} → {swap['to']} in {swap['seconds']:.1f} s" if swap.get("status") == 200 else \
        f"**{swap.get('status')}**: {swap.get('error', '')}"
    versions = ", ".join(f"{v}: {n}" for v, n in sorted(s.get("versions", {}).items(), key=lambda x: str(x[0])))
    return [["model swap at 50% (POST /admin/reload)", done], ["answers by checkpoint version", versions]]


def soak_table(s: dict[str, Any]) -> str:
    """The soak run (``instructrec bench soak``) as a table and its cache hit ratio over time."""
    c = s["config"]
    rows = [
        ["load", f"{c['clients']} clients × {c['requests']} requests ({c['distinct']} distinct, {c['candidates']} "
                 f"candidates)" + (f" + a burst of {c['burst']}" if c.get("burst") else "")],
        ["faults", ", ".join(c["faults"]) or "none"],
        ["answered (200)", f"{s['answered']} of {s['planned']}" + (
            f" ({s['retries']} refusals sent again after their Retry-After)" if s.get("resend") else "")],
        ["outcomes", ", ".join(f"{k}: {v}" for k, v in sorted(s["outcomes"].items()))],
        ["lost (no answer)", str(s["lost"])],
        ["not sent (--max-seconds ran out)", str(s.get("not_sent", 0))],
        ["wrong answers", str(s["wrong"])],
        ["refusals without Retry-After", str(s["refused_without_retry_after"])],
        ["cache errors while Redis was up", "–" if s["cache_errors_while_redis_up"] is None
         else f"{s['cache_errors_while_redis_up']:g}"],
        ["cache errors in all", "–" if s["cache_errors_after"] is None
         else f"{s['cache_errors_after'] - (s['cache_errors_before'] or 0):g}"],
        ["p50 / p95 / p99 of answered, client side", f"{_ms(s['p50_ms'])} / {_ms(s['p95_ms'])} / "
                                                     f"{_ms(s['p99_ms'])} ms"],
        ["p50 / p95 / p99 of answered, server side", f"{_ms(s.get('server_p50_ms'))} / {_ms(s.get('server_p95_ms'))} / "
                                                     f"{_ms(s.get('server_p99_ms'))} ms"],
        ["answered per second", _f(s["requests_per_s"], 1)],
        *_swap_rows(s),
        ["verdict", "passed" if s["passed"] else "**failed**"],
    ]
    windows = s["hit_ratio_windows"]
    ratios = " ".join("–" if w["hit_ratio"] is None else f"{w['hit_ratio']:.2f}" for w in windows)
    refused = " ".join(str(sum(v for k, v in w.get("outcomes", {}).items() if k != "200")) for w in windows)
    marks = {"redis": "Redis stopped at 30%, started at 60%", "swap": "the model swapped at 50%",
             "burst": "the burst after 80% is not in them"}
    faults = "; ".join(text for name, text in marks.items() if name in c["faults"])
    return (_table(["", ""], rows) + f"\n\nIn {len(windows)} windows of {windows[0]['to'] - windows[0]['from']} "
            f"requests in send order{f' ({faults})' if faults else ''}:\n\n"
            f"- cache hit ratio of the answered: {ratios}\n- refused (429/503): {refused}\n")


def recommend_table(section: dict) -> str:
    """The /recommend bench (``instructrec bench recommend``): latency per k, cold and cached."""
    s = section["server"]
    rows = [[str(r["k"]), r["phase"], str(r["requests"]), _ms(r["p50_ms"]), _ms(r["p95_ms"]),
             _ms(r["server_p50_ms"]), _ms(r["server_p95_ms"]), _f(r["mean_steps"], 1)]
            for r in section["rows"]]
    return (f"/recommend over {s['items']:,} items ({s['distinct_titles']:,} distinct titles), model {s['model']}:\n\n"
            + _table(["k", "phase", "requests", "p50 ms", "p95 ms", "server p50 ms", "server p95 ms",
                             "decoding steps"], rows))


def hybrid_table(section: dict) -> str:
    """The fusion bench (``instructrec bench hybrid``): LM alone vs what fusion adds."""
    s = section["server"]
    rows = [[str(r["candidates"]), str(r["requests"]), _ms(r["lm_p50_ms"]), _f(r["fusion_cold_p50_ms"], 2),
             _f(r["fusion_warm_p50_ms"], 2), _f(r["fusion_warm_p95_ms"], 2), _f(r["ratio_warm"], 3)]
            for r in section["rows"]]
    return (f"Fusion of model {s['model']} ({s['precision']}, hybrid {s['hybrid']}):\n\n"
            + _table(["candidates", "requests", "LM p50 ms", "fusion p50 ms (titles new)", "fusion p50 ms (cached)",
                      "fusion p95 ms (cached)", "(LM + fusion) / LM"], rows))


def load_table(section: dict) -> str:
    """The load bench (``instructrec bench load``): host memory of each way of loading."""
    s = section["server"]
    rows = [[r["variant"], _f(r["peak_rss_mb"], 0), _f(r["peak_anon_mb"], 0), _f(r["end_anon_mb"], 0),
             _f(r["weights_mb"], 0), _f(r["seconds"], 2)] for r in section["rows"]]
    return (f"Loading a {s['parameters'] / 1e6:.0f} M-parameter checkpoint stored in float32 ({s['file_mb']} MB) to serve "
            f"it in {s['dtype']}, transformers {s['transformers']}, {s['cpu']}:\n\n"
            + _table(["way", "peak RSS MB", "peak anonymous MB", "anonymous after MB", "weights MB", "seconds"], rows))


def _scaling_targets(s: dict) -> list[dict]:
    """Requests/s at 8 and 32 clients against one client's, cold, per candidate count (the load
    issue: at least 2x); a cell not run is not measured."""
    out = []
    counts = sorted({c.get("candidates") for c in s.get("cells", []) if c.get("candidates") is not None})
    for n in counts:
        one = _cell(s, batching="on", phase="cold", candidates=n, concurrency=1)
        for clients in (8, 32):
            many = _cell(s, batching="on", phase="cold", candidates=n, concurrency=clients)
            ratio = (many["requests_per_s"] / one["requests_per_s"]
                     if one and many and one.get("requests_per_s") and many.get("requests_per_s") else None)
            measured = None if ratio is None else \
                f"{ratio:.2f}× ({many['requests_per_s']:.1f} vs {one['requests_per_s']:.1f} req/s)"
            ceiling = cpu_ceiling(s, many, one) if ratio is not None else None
            if ceiling:
                measured += f"; {ceiling}"
            out.append({"target": f"{clients} clients, {n} candidates (cold): >= 2x the req/s of one client",
                        "measured": measured, "pass": None if ratio is None else ratio >= 2})
    return out


def cpu_ceiling(s: dict, many: dict, one: dict) -> str | None:
    """The ceiling the machine puts on a loaded cell: its CPUs over the CPU seconds the serving
    process spent per answer in that cell, and that as a multiple of one client's req/s; and how
    many CPUs one client alone keeps busy (idle lanes lend it a hand), whose complement is all
    that more clients can add."""
    cpu_ms = many.get("server_cpu_ms_per_request")
    cpus = (s.get("machine") or {}).get("usable_cpus")
    if not cpu_ms or not cpus or not one.get("requests_per_s"):
        return None
    ceiling = cpus / (cpu_ms / 1000)
    out = (f"ceiling {cpus} CPUs ÷ {cpu_ms:.0f} CPU-ms per answer = {ceiling:.1f} req/s = "
           f"{ceiling / one['requests_per_s']:.2f}×")
    if one.get("server_cpu_ms_per_request"):  # what one client leaves idle bounds what more clients can add
        busy = one["server_cpu_ms_per_request"] / 1000 * one["requests_per_s"]
        out += f"; one client alone keeps {busy:.2f} of the {cpus} CPUs busy"
    return out


def render_targets(results: dict) -> str:
    rows = targets(results)
    if not rows:
        return ""
    mark = {True: "met", False: "**not met**", None: "not measured"}
    return "\n".join(["## Targets", "",
                      _table(["target", "measured", "status"],
                             [[t["target"], t["measured"] or "–", mark[t["pass"]]] for t in rows]),
                      "", "_Numbers from a shared or busy machine are indicative only._"])


# --- the README's performance section --------------------------------------------------------

MACHINE_CLASSES = ("amx-bf16", "avx512-bf16", "no-bf16")


def machine_class(machine: dict | None) -> str:
    """The kind of CPU speed figures belong to. The bf16 matmul units set both the floor and what
    the service reaches (AMX about twice AVX512-BF16 per core, and no bf16 half again), so each
    kind keeps its own speed block: a run on one never overwrites another's."""
    features = (machine or {}).get("cpu_features") or {}
    if features.get("amx_bf16"):
        return "amx-bf16"
    return "avx512-bf16" if features.get("avx512_bf16") else "no-bf16"


def speed_markers(kind: str) -> tuple[str, str]:
    """The markers of one machine class's speed block."""
    return (f"<!-- bench:{kind}:start (generated by `instructrec bench readme`; do not edit) -->",
            f"<!-- bench:{kind}:end -->")


def results_machine_class(results: dict) -> str:
    """The machine class of the ranker and service runs in ``results`` (one class: a block that
    mixed two machines' figures would compare what cannot be compared)."""
    kinds = {machine_class(results[k].get("machine")) for k in ("ranker", "service") if k in results}
    if len(kinds) > 1:
        raise ValueError(f"the ranker and service benches ran on different kinds of machine ({', '.join(sorted(kinds))}): "
                         "run both on one machine")
    return kinds.pop() if kinds else machine_class(None)


def readme_section(results: dict) -> str:
    """Compact tables for the README, from the same results.json as results.md."""
    parts = []
    machine = next((results[k]["machine"] for k in ("ranker", "service") if results.get(k, {}).get("machine")), None)
    if machine:
        parts += [f"Machine (class `{machine_class(machine)}`): {machine.get('cpu_model')}, "
                  f"{machine.get('usable_cpus')} CPUs; features {_features(machine)}; torch {machine.get('torch')}.", ""]
    r = results.get("ranker")
    if r:
        sizes = sorted({x["candidates"] for x in r.get("rows", [])})
        variants = list(dict.fromkeys(x["variant"] for x in r.get("rows", [])))
        cell = {(x["variant"], x["candidates"]): x for x in r.get("rows", [])}
        rows = []
        for v in variants:
            line = [f"`{v}`"]
            for n in sizes:
                x = cell.get((v, n))
                if not x or x.get("status") != "ok":
                    line.append("skipped")
                    continue
                ratio = x.get("ratio_to_naive")
                line.append(_ms(x["median_ms"]) + (f" ({ratio:.1f}×)" if ratio and v != "naive" else ""))
            rows.append(line)
        parts += [f"Command: `{r.get('command', '')}`", "",
                  "Median ms per request (× naive in the same run):", "",
                  _table(["variant"] + [f"{n} candidates" for n in sizes], rows), ""]
        prof = profile_table(r)
        if prof:
            parts += [f"Where the time of one {r['profile']['candidates']}-candidate request goes (torch profiler, "
                      "self time of the ops by group):", "", prof, ""]
    s = results.get("service")
    if s:
        header = ["batching", "cache", "candidates", "clients", "req/s", "p50 ms", "GFLOP/req", "floor ms",
                  "CPU ms/req", "p99 ms", "errors", "mean batch"]
        rows = []
        for c in s.get("cells", []):
            if c.get("status") != "ok":
                continue
            errors = sum(c.get("errors", {}).values())
            rows.append([c["batching"], c["phase"], str(c["candidates"]), str(c["concurrency"]),
                         _f(c.get("requests_per_s"), 1), _ms(c.get("p50_ms")), *floor_columns(c),
                         _ms(c.get("server_cpu_ms_per_request")), _ms(c.get("p99_ms")), str(errors),
                         _f(c.get("mean_batch_size"), 2)])
        parts += [f"Command: `{s.get('command', '')}`", "", _table(header, rows), ""]
        if floor_note(s):
            parts += [floor_note(s), ""]
        parts += [CPU_NOTE, ""]
    t = targets(results)
    if t:
        mark = {True: "met", False: "**not met**", None: "not measured"}
        parts += ["Targets of the performance issue:", "",
                  _table(["target", "measured", "status"], [[x["target"], x["measured"] or "–", mark[x["pass"]]] for x in t]), ""]
    return "\n".join(parts).rstrip() + "\n"


SOAK_START = "<!-- soak:start (generated by `instructrec bench readme`; do not edit) -->"
SOAK_END = "<!-- soak:end -->"


RECOMMEND_START = "<!-- bench-recommend:start (generated by `instructrec bench readme`; do not edit) -->"
RECOMMEND_END = "<!-- bench-recommend:end -->"


def update_readme(readme: str | Path, results: dict) -> Path:
    """Replace the speed block of the results' machine class (:func:`machine_class`) with
    :func:`readme_section` (when the results hold the ranker or service bench; a class's first
    block is added after the other classes' blocks), the soak markers' block (the reliability
    section) with the soak run, and the /recommend markers' block with that bench, each only
    when the README has its markers and the results have its run."""
    kind = results_machine_class(results)
    path, start, end = _speed_block(readme, kind)  # the README, or the docs/ page holding the benches
    text = path.read_text(encoding="utf-8")
    if any(k in results for k in ("ranker", "service")):
        if start not in text:  # this kind's first run: its block goes after the other kinds' blocks
            last = max(text.rfind(speed_markers(k)[1]) for k in MACHINE_CLASSES)
            cut = last + len(text[last:].split("\n", 1)[0]) + 1
            text = f"{text[:cut]}\n{start}\n{end}\n{text[cut:]}"
        text = between(text, start, end, readme_section(results))
    rec = results.get("recommend")
    if rec and RECOMMEND_START in text and RECOMMEND_END in text:
        m = rec["machine"]
        body = (f"Command: `{rec.get('command', '')}` ({m.get('cpu_model')}, {m.get('usable_cpus')} CPUs, "
                f"torch threads {m.get('torch_threads')})\n\n{recommend_table(rec)}\n")
        text = between(text, RECOMMEND_START, RECOMMEND_END, body)
    soak = results.get("soak")
    if soak and SOAK_START in text and SOAK_END in text:
        body = f"Command: `{soak.get('command', '')}`\n\n{_machine_md(soak['machine'])}\n\n{soak_table(soak)}"
        text = between(text, SOAK_START, SOAK_END, body)
    path.write_text(text, encoding="utf-8")
    return path


def _speed_block(readme: str | Path, kind: str) -> tuple[Path, str, str]:
    """The file holding ``kind``'s speed block, else the one holding another class's; and the markers."""
    start, end = speed_markers(kind)
    for other in dict.fromkeys((kind, *MACHINE_CLASSES)):  # its own block first
        try:
            return holder(readme, *speed_markers(other)), start, end
        except ValueError:
            continue
    raise ValueError(f"{readme}: no speed block: add the markers {start} ... {end} "
                     "(to it or to a docs/*.md beside it)")


# --- plots -----------------------------------------------------------------------------------


def make_plots(results: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    if "ranker" in results:
        paths["ranker"] = out / RANKER_PLOT
        _plot_ranker(plt, results["ranker"], paths["ranker"])
    if "service" in results and results["service"].get("cells"):
        paths["service_latency"] = out / SERVICE_LATENCY_PLOT
        paths["service_throughput"] = out / SERVICE_THROUGHPUT_PLOT
        _plot_service(plt, results["service"], paths["service_latency"], paths["service_throughput"])
    return paths


def _int_ticks(ax, values) -> None:
    """x ticks at the measured values, labelled as plain integers."""
    from matplotlib.ticker import FixedLocator, NullLocator

    if values:
        ax.xaxis.set_major_locator(FixedLocator(values))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(v) for v in values])


def _plot_ranker(plt, s: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in s.get("variants", {}):
        rows = [r for r in s.get("rows", []) if r["variant"] == name and r["status"] == "ok"]
        if not rows:
            continue
        xs = [r["candidates"] for r in rows]
        ys = [r["median_ms"] for r in rows]
        err = [[y - r["min_ms"] for y, r in zip(ys, rows)], [r["max_ms"] - y for y, r in zip(ys, rows)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _int_ticks(ax, sorted({r["candidates"] for r in s.get("rows", [])}))
    ax.set_xlabel("candidates per request")
    ax.set_ylabel("ms per request (median, min–max)")
    ax.set_title(f"ranker: {s.get('config', {}).get('model')}, {s.get('input', {}).get('source_tokens')} "
                 f"instruction tokens", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_service(plt, s: dict, latency_path: Path, throughput_path: Path) -> None:
    cells = [c for c in s.get("cells", []) if c.get("status") == "ok"]
    sizes = sorted({c["candidates"] for c in cells}) or [0]
    series = sorted({(c["batching"], c["phase"]) for c in cells})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for k, (mode, phase) in enumerate(series):
            rows = sorted((c for c in cells if c["candidates"] == n and c["batching"] == mode and c["phase"] == phase),
                          key=lambda c: c["concurrency"])
            if not rows:
                continue
            xs = [c["concurrency"] for c in rows]
            for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
                ax.plot(xs, [c[f"{q}_ms"] for c in rows], style, marker="o", markersize=3, color=colors[k % len(colors)],
                        label=f"{mode}/{phase} {q}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _int_ticks(ax, sorted({c["concurrency"] for c in cells}))
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("latency ms")
        ax.set_title(f"{n} candidates per request", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(latency_path, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for k, (mode, phase) in enumerate(series):
            rows = sorted((c for c in cells if c["candidates"] == n and c["batching"] == mode and c["phase"] == phase),
                          key=lambda c: c["concurrency"])
            if rows:
                ax.plot([c["concurrency"] for c in rows], [c["requests_per_s"] for c in rows], marker="o",
                        color=colors[k % len(colors)], label=f"batching {mode} / {phase}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _int_ticks(ax, sorted({c["concurrency"] for c in cells}))
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("requests/s")
        ax.set_title(f"{n} candidates per request", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(throughput_path, dpi=120)
    plt.close(fig)
