"""`instructrec bench ranker|service` end to end on the tiny-random model at tiny sizes.

Both benches write into one directory (the report merges their sections); the service
bench starts real servers (child processes, as by default) on loopback and uses the
machine's Redis when there is one.
"""

from __future__ import annotations

import json

import pytest
import torch

from instructrec.bench import report
from instructrec.bench.ranker_bench import VARIANTS, no_shared_kv_ranker
from instructrec.bench.service_bench import Sample, histogram_quantile, loopback_error, summarize, warm_replay
from instructrec.cli import main
from instructrec.modeling import TINY, load_model
from instructrec.ranker import Ranker, target_ids

torch.set_num_threads(1)

SIZES = (1, 5, 7)
NAIVE_MAX = 5
CONCURRENCY = (1, 4)
REQUESTS = 12
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def _results(out) -> dict:
    return json.loads((out / report.RESULTS_JSON).read_text())


def _png(path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG, path


# --- ranker ------------------------------------------------------------------------------------


def test_ranker_bench_end_to_end(out):
    rc = main(["bench", "ranker", "--model", TINY, "--candidates", ",".join(map(str, SIZES)), "--repeats", "2",
               "--warmup", "1", "--threads", "1", "--naive-max", str(NAIVE_MAX), "--peak-size", "64",
               "--profile-candidates", "5", "--out", str(out)])
    assert rc == 0
    r = _results(out)["ranker"]
    assert r["command"].startswith("instructrec bench ranker --model tiny-random --candidates 1,5,7")
    assert r["machine"]["cpu_model"] and r["machine"]["torch"] == torch.__version__
    assert r["input"]["history_titles"] == 20 and r["input"]["source_tokens"] > 50
    assert r["peak"]["float32"]["gflops_best"] > 0 and r["peak"]["bfloat16"]["gflops_best"] > 0

    rows = {(x["variant"], x["candidates"]): x for x in r["rows"]}
    assert set(rows) == {(v, n) for v in VARIANTS for n in SIZES}  # every variant x size, in one run
    for (v, n), row in rows.items():
        if v == "naive" and n > NAIVE_MAX:
            assert row["status"] == "skipped" and "naive-max" in row["reason"]
            continue
        if v == "int8" and row["status"] == "failed":  # allowed where quantised kernels are missing
            assert row["reason"]
            continue
        assert row["status"] == "ok", row
        assert len(row["times_ms"]) == 2 and all(t > 0 for t in row["times_ms"])
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["candidates_per_s"] == pytest.approx(n / (row["median_ms"] / 1000))
        assert row["gflop_executed"] > 0 and row["gflops_per_s"] > 0 and row["peak_fraction"] > 0
        # naive's executed FLOPs over this variant's: 1 for naive, above 1 once the encoder is shared
        assert (row["naive_flop_ratio"] == pytest.approx(1.0)) == (v == "naive" or n == 1), row
        naive = rows["naive", n]
        if naive["status"] == "ok":  # the ratio is against naive of this run at this size
            assert row["ratio_to_naive"] == pytest.approx(naive["median_ms"] / row["median_ms"])
            assert row["max_abs_diff_vs_naive"] is not None
        else:
            assert row["ratio_to_naive"] is None  # nothing extrapolated
    assert rows["naive", 1]["ratio_to_naive"] == pytest.approx(1.0)
    for v in ("encoder_once", "shared_kv"):  # the fp32 variants give the naive scores
        for n in (1, 5):
            assert rows[v, n]["max_abs_diff_vs_naive"] < 1e-4
    for v in ("bf16", "int8"):
        if rows[v, 5]["status"] == "ok":
            assert -1 <= rows[v, 5]["spearman_vs_fp32"] <= 1
            assert rows[v, 1]["spearman_vs_fp32"] is None  # undefined for one candidate
    # executed work: naive repeats encoder + cross K/V per candidate, encoder_once the K/V only,
    # shared_kv also runs the start-token step once for all candidates
    assert rows["naive", 5]["gflop_executed"] > rows["encoder_once", 5]["gflop_executed"] > rows["shared_kv", 5][
        "gflop_executed"]
    assert rows["encoder_once", 5]["gflop_executed"] > rows["encoder_once", 5]["gflop_request"] > rows["shared_kv", 5][
        "gflop_executed"]
    assert rows["shared_kv", 1]["gflop_executed"] == pytest.approx(rows["shared_kv", 1]["gflop_request"])

    # the profile: every op's self time in one group, the groups within the profiled wall time
    from instructrec.bench.ranker_bench import PROFILE_GROUPS

    assert r["profile"]["candidates"] == 5 and "shared_kv" in r["profile"]["variants"]
    for p in r["profile"]["variants"].values():
        groups = {g["group"]: g["ms"] for g in p["groups"]}
        assert sum(groups.values()) == pytest.approx(p["in_ops_ms"]) and p["in_ops_ms"] <= p["wall_ms"]
        assert groups["layer matmuls (encoder, decoder)"] > 0 and groups["vocabulary head matmul"] > 0
        assert groups[PROFILE_GROUPS[2]] > 0 and groups["attention (scaled dot product)"] > 0
        assert p["top_ops"] and p["top_ops"][0]["self_ms"] >= p["top_ops"][-1]["self_ms"]

    md = (out / report.RESULTS_MD).read_text()
    assert "| candidates | variant | median ms |" in md and "L_enc * S * (8*H*A" in md
    assert "Where the time of one 5-candidate request goes" in md and "| vocabulary head matmul |" in md
    for v in VARIANTS:
        assert f"| {v} |" in md
    _png(out / report.RANKER_PLOT)


def test_encoder_once_variant_recomputes_cross_kv_per_chunk():
    loaded = load_model(TINY, device="cpu", dtype="float32")
    layers = loaded.model.decoder.bert.encoder.layer
    calls: list[int] = []
    hooks = [layer.crossattention.self.key.register_forward_hook(lambda *_, k=k: calls.append(k))
             for k, layer in enumerate(layers)]
    try:
        source = "A user played: 1. Halo; 2. Doom. Pick the best candidate."
        cands = [f"game {i} " + "deluxe " * (i % 5) for i in range(30)]
        slow = no_shared_kv_ranker(loaded, batch_tokens=32)
        chunks = slow.chunks([target_ids(slow.tokenizer, c, slow.max_target_tokens, slow.eos)[0] for c in cands])
        assert len(chunks) > 3
        scores = slow.score(source, cands).scores
        assert len(calls) == len(chunks) * len(layers)  # K/V per chunk (and per row inside it), not once
        fast = Ranker(loaded, batch_tokens=32).score(source, cands).scores
        assert scores == pytest.approx(fast, abs=1e-5)
    finally:
        for h in hooks:
            h.remove()


# --- service -----------------------------------------------------------------------------------


def _cache() -> bool:
    from instructrec.bench.service_bench import DEFAULT_REDIS, _redis_ok

    return _redis_ok(DEFAULT_REDIS)


def test_service_bench_end_to_end(out):
    """Both batching modes, cold and warm cache, the default server: the service in child
    processes on free loopback ports."""
    from instructrec.bench.service_bench import DEFAULT_REDIS

    cache = _cache()
    rc = main(["bench", "service", "--model", TINY, "--concurrency", ",".join(map(str, CONCURRENCY)),
               "--requests", str(REQUESTS), "--candidates", "5", "--duration", "60", "--set", "warmup=false",
               "--redis-url", DEFAULT_REDIS if cache else "", "--out", str(out)])
    assert rc == 0
    results = _results(out)
    assert "ranker" in results  # both benches' sections in one report
    s = results["service"]
    assert s["command"].startswith("instructrec bench service --model tiny-random --concurrency 1,4")
    assert s["server"]["kind"] == "subprocess" and s["machine"]["cpu_model"]
    assert "max_batch_requests=1" in s["modes"]["off"]["description"]
    assert s["modes"]["off"]["settings"]["max_batch_requests"] == 1
    cells = {(c["batching"], c["phase"], c["candidates"], c["concurrency"]): c for c in s["cells"]}
    assert set(cells) == {(m, p, 5, c) for m in ("on", "off") for p in ("cold", "warm") for c in CONCURRENCY}
    for (mode, phase, _, conc), c in cells.items():
        if phase == "warm" and not cache:
            assert c["status"] == "skipped"
            continue
        assert c["status"] == "ok" and c["sent"] == c["ok"] == REQUESTS and c["errors"] == {}, c
        assert 0 < c["p50_ms"] <= c["p95_ms"] <= c["p99_ms"] and c["requests_per_s"] > 0
        assert c["server_p50_ms"] > 0 and c["server_ms_source"] == "header"
        assert c["server_cpu_ms_per_request"] > 0  # the child's process_cpu_seconds_total over the answers
        if cache:
            assert c["cache_hit_fraction"] == (0.0 if phase == "cold" else 1.0)
        if phase == "cold":
            assert c["batches"] > 0 and c["server_mean_ms"]["decode"] > 0 and c["server_mean_ms"]["prepare"] > 0
            if mode == "off":
                assert c["mean_batch_size"] == 1.0 and c["batches"] == REQUESTS  # every request its own batch
    if cache:
        cached = {(c["batching"], c["candidates"]): c for c in s["cached_request"]}
        assert set(cached) == {("on", 5), ("off", 5)}
        for c in cached.values():
            assert c["concurrency"] == 1 and c["requests"] == REQUESTS and c["server_p50_ms"] > 0

    md = (out / report.RESULTS_MD).read_text()
    assert "## Ranker" in md and "## Service" in md and "| batching | cache | candidates |" in md
    assert "## Targets" in md
    _png(out / report.SERVICE_LATENCY_PLOT)
    _png(out / report.SERVICE_THROUGHPUT_PLOT)


def test_service_bench_thread_server(tmp_path, capsys):
    """--server thread: uvicorn in a thread of this process, batching on, no cache; each cold
    cell's floor from the requests' FLOPs as the service prepares them and the matmul rate."""
    rc = main(["bench", "service", "--model", TINY, "--concurrency", "2", "--requests", "4", "--candidates", "10,100",
               "--batching", "on", "--redis-url", "", "--server", "thread", "--set", "warmup=false",
               "--set", "lanes=1", "--peak-size", "256", "--out", str(tmp_path)])
    assert rc == 0
    s = _results(tmp_path)["service"]
    assert s["server"]["kind"] == "thread" and list(s["modes"]) == ["on"] and not s["cache"]["enabled"]
    cells = {(c["phase"], c["candidates"]): c for c in s["cells"]}
    # the bench's own process: its CPU time would count the clients too
    assert all(c.get("server_cpu_ms_per_request") is None for c in s["cells"])
    for n in (10, 100):
        cold, warm = cells[("cold", n)], cells[("warm", n)]
        assert cold["status"] == "ok" and cold["ok"] == 4 and cold["batches"] >= 1
        assert cold["cache_hit_fraction"] is None  # no cache
        assert warm["status"] == "skipped" and warm["floor_ms"] is None and warm["gflop_per_request"] is None
    _check_floor(s, tmp_path, capsys.readouterr().out)


def _check_floor(s: dict, out, printed: str) -> None:
    """The floor fields against the bench's own requests, prepared here by the service's functions."""
    from instructrec.bench.ranker_bench import load_games, model_dims, request_flops
    from instructrec.bench.service_bench import Workload
    from instructrec.bench.service_floor import prepared_tokens
    from instructrec.service.engine import load_engine
    from instructrec.service.settings import Settings

    peak, floor = s["matmul_peak"], s["floor"]
    precision = s["server"]["precision"]
    assert floor["reason"] is None and floor["precision"] == precision and floor["lanes"] == 1
    assert floor["request_lanes"] == 1
    assert peak["size"] == 256 and peak["gflops_best"] >= peak["gflops_median"] > 0
    assert peak["dtype"] == ("bfloat16" if "bfloat16" in precision else "float32")
    assert peak["threads"] == torch.get_num_threads()  # lanes 1, no torch_threads: torch's default here
    ten, hundred = (next(c for c in s["cells"] if c["phase"] == "cold" and c["candidates"] == n) for n in (10, 100))
    assert 0 < ten["gflop_per_request"] < hundred["gflop_per_request"]
    assert 0 < ten["floor_ms"] < hundred["floor_ms"]
    for c in (ten, hundred):
        assert c["floor_ms"] == pytest.approx(c["gflop_per_request"] / peak["gflops_best"] * 1000, rel=1e-9)
        assert c["floor_req_s"] == pytest.approx(1000 / c["floor_ms"], rel=1e-9)
    # the same requests the bench built (same seed, same order), prepared as the service prepares them
    workload = Workload(load_games("games-sample"), history=20, seed=0)
    bodies = {n: workload.make(4, n) for n in (10, 100)}
    engine = load_engine(Settings(model=TINY, redis_url="", warmup=False), TINY)
    dims = model_dims(engine.loaded.model)
    for row in s["request_flops"]:
        sizes = [prepared_tokens(engine, b) for b in bodies[row["candidates"]]]
        source = sorted(n for n, _ in sizes)
        assert (row["source_tokens_min"], row["source_tokens_max"]) == (source[0], source[-1])
        assert row["source_tokens_median"] == (source[1] + source[2]) / 2
        gflop = sorted(request_flops(dims, n, t)["executed"][floor["variant"]] / 1e9 for n, t in sizes)
        assert row["gflop_median"] == pytest.approx((gflop[1] + gflop[2]) / 2)
        assert all(len(t) == row["candidates"] for _, t in sizes)
    # S of one body straight from the engine's own preparation of the need the handler reads
    from instructrec.service.schemas import RerankRequest
    from instructrec.service.serving import need_of

    req = RerankRequest.model_validate(json.loads(bodies[10][0]))
    prepared = engine.prepare(need_of(req), None, [c.title for c in req.candidates])
    assert prepared_tokens(engine, bodies[10][0])[0] == prepared.source_tokens == len(prepared.source_ids)
    assert "| p50 ms | GFLOP/req | floor ms |" in printed
    md = (out / report.RESULTS_MD).read_text()
    assert "| p50 ms | GFLOP/req | floor ms |" in md and f"matmul {peak['dtype']} 256×256 at" in md


def test_a_request_alone_gets_every_lane_in_the_floor_when_idle_lanes_lend_a_hand():
    """Two lanes lending: a lone request may compute on both, so its floor is half the one-lane
    floor; without lending (or with one lane) it is the one-lane floor; req/s floors stay lanes x."""
    from instructrec.bench import service_floor

    assert service_floor.request_lanes({"lanes": 2}) == 2
    assert service_floor.request_lanes({"lanes": 2, "lend_lanes": False}) == 1
    assert service_floor.request_lanes({"lanes": 1}) == 1
    peak = {"gflops_best": 200.0}
    flops = [{"candidates": 10, "gflop_median": 10.0}]
    for alone, floor_ms in ((2, 25.0), (1, 50.0)):
        cells = [{"phase": "cold", "candidates": 10}]
        service_floor.apply(cells, {"floor": {"lanes": 2, "request_lanes": alone}, "matmul_peak": peak,
                                    "request_flops": flops})
        assert cells[0]["floor_ms"] == pytest.approx(floor_ms) and cells[0]["floor_req_s"] == pytest.approx(40.0)


def test_floor_fields_are_null_when_not_measured_and_old_results_still_render():
    """--url (or a model without a FLOPs formula): null floor fields and a note saying why; a
    results.json from before the floor renders "–" in its columns."""
    from instructrec.bench import service_floor

    cells = [{"batching": "external", "phase": "cold", "candidates": 10, "concurrency": 1, "status": "ok", "ok": 1,
              "errors": {}, "p50_ms": 53.1}]
    section = {"cells": cells, **service_floor.skipped("--url: the bench does not know the remote service's model")}
    service_floor.apply(cells, section)
    assert all(cells[0][k] is None for k in service_floor.FIELDS) and section["matmul_peak"] is None
    assert "| 53.1 | – | – |" in report.service_table(section)
    assert "not measured (--url: the bench does not know" in report.render_service(section, None, None)
    old = {"batching": "on", "phase": "cold", "candidates": 10, "concurrency": 1, "status": "ok", "errors": {},
           "requests_per_s": 17.9, "p50_ms": 53.1, "p99_ms": 81.9, "mean_batch_size": 1.0}
    text = report.readme_section({"service": {"command": "instructrec bench service", "cells": [old]}})
    assert "| p50 ms | GFLOP/req | floor ms | CPU ms/req | p99 ms |" in text
    assert "| on | cold | 10 | 1 | 17.9 | 53.1 | – | – | – | 81.9 | 0 | 1.00 |" in text
    assert "53.1 ms |" in text and "floor" not in text.split("Targets")[1]  # no floor in the targets either
    measured = dict(old, gflop_per_request=0.5, floor_ms=4.0)
    text = report.readme_section({"service": {"command": "x", "cells": [measured]}})
    assert "| 53.1 | 0.500 | 4.00 |" in text and "53.1 ms (floor 4.0 ms)" in text


def test_the_scaling_targets_show_the_cpu_ceiling_of_the_loaded_cell():
    """N CPUs cannot answer more than N / (CPU seconds per answer) per second: the loaded cell's
    own CPU time gives the ceiling of its ratio to one client; without it, no ceiling."""
    def cell(clients, rps, cpu_ms=None):
        return {"batching": "on", "phase": "cold", "candidates": 10, "concurrency": clients, "status": "ok",
                "errors": {}, "ok": 50, "requests_per_s": rps, "p50_ms": 100.0,
                "server_cpu_ms_per_request": cpu_ms}

    s = {"machine": {"usable_cpus": 2}, "cells": [cell(1, 9.0, 105.0), cell(8, 16.8, 110.0), cell(32, 17.3)]}
    rows = {t["target"]: t for t in report.targets({"service": s})}
    eight = rows["8 clients, 10 candidates (cold): >= 2x the req/s of one client"]
    assert eight["pass"] is False
    assert eight["measured"] == ("1.87× (16.8 vs 9.0 req/s); ceiling 2 CPUs ÷ 110 CPU-ms per answer = 18.2 req/s "
                                 "= 2.02×; one client alone keeps 0.94 of the 2 CPUs busy")
    assert "ceiling" not in rows["32 clients, 10 candidates (cold): >= 2x the req/s of one client"]["measured"]
    assert "| 110.0 |" in report.service_table(s) and "CPU ms/req" in report.readme_section({"service": s})


def test_service_bench_with_url_leaves_the_floor_null(tmp_path):
    """--url: the bench does not know the remote model, so no FLOPs, no matmul run, null fields."""
    from instructrec.bench.service_bench import ThreadServer

    server = ThreadServer({"model": TINY, "redis_url": "", "warmup": False, "log_level": "warning"}, tmp_path / "log")
    try:
        server.wait_ready()
        rc = main(["bench", "service", "--url", server.url, "--concurrency", "1", "--requests", "2",
                   "--candidates", "3", "--phases", "cold", "--out", str(tmp_path)])
    finally:
        server.stop()
    assert rc == 0
    s = _results(tmp_path)["service"]
    (cell,) = s["cells"]
    assert cell["status"] == "ok" and cell["floor_ms"] is None and cell["gflop_per_request"] is None
    assert cell["server_cpu_ms_per_request"] > 0  # from the service's /metrics, wherever it runs
    assert s["matmul_peak"] is None and s["request_flops"] is None and "--url" in s["floor"]["reason"]


def test_one_request_runs_on_one_thread_per_lane():
    from instructrec.bench.service_floor import executed_variant, request_threads

    assert request_threads({"lanes": 2, "torch_threads": None}, 4) == (1, 2)
    assert request_threads({"lanes": 1, "torch_threads": 3}, 4) == (3, 1)
    assert request_threads({}, 4) == (4, 1)
    assert [executed_variant(p) for p in ("torch.bfloat16", "torch.float32", "int8")] == ["bf16", "shared_kv", "int8"]


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://example.com:8000", "http://192.168.0.1",
                                 "ftp://127.0.0.1:21/"])
def test_service_bench_refuses_non_loopback_url(tmp_path, capsys, url):
    rc = main(["bench", "service", "--url", url, "--requests", "1", "--out", str(tmp_path)])
    assert rc == 2
    assert "loopback" in capsys.readouterr().err or url.startswith("ftp")
    assert not (tmp_path / report.RESULTS_JSON).exists()


def test_loopback_and_statistics_helpers():
    for ok in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000/", "https://127.5.6.7"):
        assert loopback_error(ok) is None, ok
    for bad in ("http://0.0.0.0:8000", "http://10.0.0.1", "http://localhost.example.com", "http://[2001:db8::1]"):
        assert loopback_error(bad), bad
    assert report.percentile([1, 2, 3, 4], 50) == 2.5 and report.percentile([5], 99) == 5
    assert report.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert report.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert report.spearman([1, 1], [1, 2]) is None and report.spearman([1], [1]) is None
    # server-side time from the service's histogram when the response has no timing header
    cell = summarize([Sample(0, 5.0, "200")], 1.0, {"request_buckets": {0.001: 0, 0.0025: 1, float("inf"): 1}})
    assert cell["server_ms_source"] == "histogram" and 1.0 <= cell["server_p50_ms"] <= 2.5
    # cumulative buckets: 10 requests <= 1 ms, 10 more <= 2 ms
    assert histogram_quantile(0.5, {0.001: 10, 0.002: 20, float("inf"): 20}) == pytest.approx(0.001)
    assert histogram_quantile(0.75, {0.001: 10, 0.002: 20, float("inf"): 20}) == pytest.approx(0.0015)


def test_readme_section_is_regenerated_between_markers(tmp_path):
    from instructrec.bench import report

    results = {"ranker": {"command": "instructrec bench ranker --x", "rows": [
        {"variant": "naive", "candidates": 10, "status": "ok", "median_ms": 700.0, "ratio_to_naive": 1.0},
        {"variant": "shared_kv", "candidates": 10, "status": "ok", "median_ms": 100.0, "ratio_to_naive": 7.0},
        {"variant": "naive", "candidates": 100, "status": "ok", "median_ms": 7000.0, "ratio_to_naive": 1.0},
        {"variant": "shared_kv", "candidates": 100, "status": "ok", "median_ms": 400.0, "ratio_to_naive": 17.5,
         "naive_flop_ratio": 6.7},
        {"variant": "int8", "candidates": 100, "status": "ok", "median_ms": 350.0, "ratio_to_naive": 20.0}]}}
    readme = tmp_path / "README.md"
    amx, bf16 = report.speed_markers("amx-bf16"), report.speed_markers("avx512-bf16")
    readme.write_text(f"# x\n\nbefore\n{bf16[0]}\nstale\n{bf16[1]}\nafter\n", encoding="utf-8")
    results["ranker"]["machine"] = {"cpu_model": "EPYC", "cpu_features": {"avx2": True, "avx512_bf16": True}}
    report.update_readme(readme, results)
    text = readme.read_text(encoding="utf-8")
    assert "stale" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert "Machine (class `avx512-bf16`): EPYC" in text
    assert "| `shared_kv` | 100.0 (7.0×) | 400.0 (17.5×) |" in text
    assert ("| encoder-once path >= 15x naive at 100 candidates (same run) | 17.5× (naive/fast FLOP ratio on this "
            "request: 6.7×); int8 20.0× | met |") in text
    # another kind of machine gets a block of its own after the first, which it leaves alone
    results["ranker"]["machine"] = {"cpu_model": "Xeon", "cpu_features": {"avx512_bf16": True, "amx_bf16": True}}
    report.update_readme(readme, results)
    results["ranker"]["rows"][1]["median_ms"] = 90.0
    report.update_readme(readme, results)
    text = readme.read_text(encoding="utf-8")
    assert text.index(bf16[1]) < text.index(amx[0]) < text.index("Xeon") < text.index(amx[1]) < text.index("after")
    assert text.count(amx[0]) == 1 and text.count("EPYC") == 1 and text.count("Xeon") == 1
    assert text.split(amx[0])[0].count("| `shared_kv` | 100.0 (7.0×) |") == 1
    assert text.split(amx[0])[1].count("| `shared_kv` | 90.0 (7.0×) |") == 1
    # the ranker from one kind of machine and the service from another do not make one block
    results["service"] = {"machine": {"cpu_features": {}}, "cells": []}
    with pytest.raises(ValueError, match="different kinds of machine"):
        report.update_readme(readme, results)
    readme.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no speed block: add the markers <!-- bench:amx-bf16:start"):
        report.update_readme(readme, {"ranker": results["ranker"]})


def test_profile_groups():
    from instructrec.bench.ranker_bench import PROFILE_GROUPS, profile_group

    assert profile_group("aten::addmm", True) == "vocabulary head matmul"
    assert profile_group("aten::addmm", False) == profile_group("quantized::linear_dynamic", False) == PROFILE_GROUPS[0]
    assert profile_group("quantized::linear_dynamic", True) == "vocabulary head matmul"
    assert profile_group("mkldnn::_linear_pointwise", False) == PROFILE_GROUPS[0]  # a packed bf16 linear layer
    assert profile_group("aten::_log_softmax", False) == profile_group("aten::exp_", True) == PROFILE_GROUPS[2]
    assert profile_group("aten::_scaled_dot_product_flash_attention_for_cpu", False) == PROFILE_GROUPS[3]
    assert profile_group("aten::cat", False) == PROFILE_GROUPS[4]
    assert profile_group("aten::gelu", False) == PROFILE_GROUPS[5]
    assert profile_group("aten::something_new", False) == "other ops"


def test_flops_formula_matches_torch_flop_counter():
    """The report's FLOPs of a request are what torch's FLOP counter sees the ranker execute
    (matmuls and attention), for the fast path (start-token step shared) and for naive."""
    from torch.utils.flop_counter import FlopCounterMode

    from instructrec.ranker import Encoded
    from instructrec.bench.ranker_bench import model_dims, request_flops

    loaded = load_model(TINY, device="cpu", dtype="float32")
    ranker = Ranker(loaded)
    source = list(range(1000, 1040))
    targets = [[2000 + i, 2001 + i, 2002 + i, ranker.eos] for i in range(5)]  # one length: no padding
    formula = request_flops(model_dims(loaded.model), len(source), [len(t) for t in targets])["executed"]
    for variant, naive in (("shared_kv", False), ("naive", True)):
        with FlopCounterMode(display=False) as counter:
            ranker.score_many([Encoded(source, 0, targets, 0)], naive=naive)
        assert counter.get_total_flops() == pytest.approx(formula[variant], rel=0.05), variant


def test_warm_replay_cycles_the_successful_cold_requests():
    cold = [b"r0", b"r1", b"r2", b"r3", b"r4", b"r5"]
    # the cold phase ran out of time after four, one of which failed
    samples = [Sample(2, 5.0, "200"), Sample(0, 5.0, "200"), Sample(1, 5.0, "429"), Sample(3, 5.0, "200")]
    assert warm_replay(cold, samples) == [b"r0", b"r2", b"r3", b"r0", b"r2", b"r3"]
    assert warm_replay(cold, [Sample(i, 1.0, "200") for i in range(6)]) == cold
    assert warm_replay(cold, [Sample(0, 1.0, "ReadTimeout")]) == []


def test_recommend_bench_end_to_end(tmp_path):
    """`instructrec bench recommend` on the tiny prefix-LM: it builds the Games-sample catalogue, starts
    the service with it, times cold (generated) and cached requests per k, and the README block gets
    its table."""
    from instructrec.bench.service_bench import DEFAULT_REDIS

    cache = _cache()
    out = tmp_path / "bench"
    rc = main(["bench", "recommend", "--model", "tiny-random-prefixlm", "--dataset", "games-sample", "--k", "2,5",
               "--requests", "3", "--set", "warmup=false", "--redis-url", DEFAULT_REDIS if cache else "",
               "--out", str(out)])
    assert rc == 0
    r = _results(out)["recommend"]
    assert r["command"].startswith("instructrec bench recommend --model tiny-random-prefixlm")
    assert (out / "catalogue-games-sample.npz").is_file() and r["server"]["items"] > 1000
    rows = {(x["k"], x["phase"]): x for x in r["rows"]}
    assert set(rows) == {(k, p) for k in (2, 5) for p in (("cold", "cached") if cache else ("cold",))}
    for (k, phase), x in rows.items():
        assert x["requests"] == 3 and x["mean_results"] == k and 0 < x["p50_ms"] <= x["p95_ms"]
        assert x["server_p50_ms"] > 0
        if phase == "cold":
            assert x["mean_steps"] > 1 and x["hits"] == 0
        else:
            assert x["mean_steps"] == 0 and x["hits"] == 3
    readme = tmp_path / "README.md"
    start, end = report.speed_markers("no-bf16")
    readme.write_text(f"{start}\nother benches\n{end}\n{report.RECOMMEND_START}\n{report.RECOMMEND_END}\n", encoding="utf-8")
    report.update_readme(readme, _results(out))
    text = readme.read_text(encoding="utf-8")
    assert "| k | phase | requests | p50 ms |" in text
    assert "other benches" in text  # without ranker or service results their block is left as it was


def test_hybrid_bench_end_to_end(tmp_path):
    """`instructrec bench hybrid` on the tiny prefix-LM over Games-sample: LM and fusion times per
    size, a neutral gate when none is beside the model, and its section in the report."""
    out = tmp_path / "bench"
    rc = main(["bench", "hybrid", "--model", "tiny-random-prefixlm", "--dataset", "games-sample", "--candidates", "3,7",
               "--requests", "2", "--history", "3", "--threads", "1", "--out", str(out)])
    assert rc == 0
    h = _results(out)["hybrid"]
    assert h["command"].startswith("instructrec bench hybrid --model tiny-random-prefixlm")
    assert h["server"]["gate"].startswith("neutral") and "beh-" in h["server"]["hybrid"]
    assert [r["candidates"] for r in h["rows"]] == [3, 7]
    for r in h["rows"]:
        assert r["requests"] == 2 and r["lm_p50_ms"] > 0 and r["fusion_warm_p50_ms"] > 0
        assert r["ratio_warm"] == pytest.approx((r["lm_p50_ms"] + r["fusion_warm_p50_ms"]) / r["lm_p50_ms"])
    assert "Hybrid fusion" in (out / "results.md").read_text()
    assert main(["bench", "hybrid", "--model", "tiny-random-prefixlm", "--requests", "0", "--out", str(out)]) == 2


def test_load_bench_end_to_end(tmp_path, capsys):
    """`bench load` loads one float32 checkpoint both ways, each in its own process: both end
    with the same bf16 weights, and every memory figure is a real, positive reading."""
    assert main(["bench", "load", "--d-model", "64", "--layers", "1", "--vocab", "3000", "--out", str(tmp_path)]) == 0
    section = json.loads((tmp_path / "results.json").read_text())["load"]
    rows = {r["variant"]: r for r in section["rows"]}
    assert set(rows) == {"as-stored-then-cast", "target-dtype"}
    assert {tuple(r["dtypes"]) for r in rows.values()} == {("torch.bfloat16",)}
    assert rows["as-stored-then-cast"]["weights_mb"] == rows["target-dtype"]["weights_mb"] > 0
    assert all(r["peak_rss_mb"] >= r["peak_anon_mb"] > 0 for r in rows.values())
    assert section["server"]["parameters"] > 0 and "peak anonymous MB" in capsys.readouterr().out


def test_load_model_reads_a_float32_checkpoint_straight_into_bf16(tmp_path):
    """load_model(dtype=bfloat16) of an HF directory stored in float32 gives the model the old
    way gave (read as stored, then cast): the same bf16 tensors, hence the same scores."""
    from transformers import AutoModelForSeq2SeqLM

    from instructrec.modeling import TINY_FLAN_T5, build_base

    model, tokenizer, _ = build_base(TINY_FLAN_T5)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, device="cpu", dtype="bfloat16")
    reference = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).to(torch.bfloat16).state_dict()
    state = loaded.model.state_dict()
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_benches_default_to_the_model_the_quick_start_serves(tmp_path, monkeypatch, capsys):
    """No --model: the model `rank` and the quick start would pick; where there is none, a clear
    error naming both places, before any work."""
    from instructrec.modeling import DEFAULT_MODEL_DIR
    from instructrec.shipped import DEFAULT_SHIPPED

    monkeypatch.chdir(tmp_path)  # neither artifacts/quickstart/model nor models/minilm-games here
    for bench in ("ranker", "service"):
        assert main(["bench", bench, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"instructrec bench {bench}: error: no model given")
        assert str(DEFAULT_MODEL_DIR) in err and str(DEFAULT_SHIPPED) in err


def test_targets_compare_each_load_with_one_client():
    """The load issue's target: req/s at 8 and 32 clients against one client's, per candidate
    count, from the cold cells with batching on; a missing cell is not measured."""
    def cell(n, clients, rps):
        return {"status": "ok", "batching": "on", "phase": "cold", "candidates": n, "concurrency": clients,
                "requests_per_s": rps, "p50_ms": 10.0}

    rows = report.targets({"service": {"cells": [cell(10, 1, 4.0), cell(10, 8, 9.0), cell(10, 32, 7.0),
                                                 cell(100, 1, 1.0), cell(100, 8, 1.5)]}})
    got = {r["target"]: r for r in rows if "one client" in r["target"]}
    assert got["8 clients, 10 candidates (cold): >= 2x the req/s of one client"]["pass"] is True
    assert got["32 clients, 10 candidates (cold): >= 2x the req/s of one client"]["measured"].startswith("1.75×")
    assert got["32 clients, 10 candidates (cold): >= 2x the req/s of one client"]["pass"] is False
    assert got["8 clients, 100 candidates (cold): >= 2x the req/s of one client"]["pass"] is False
    assert got["32 clients, 100 candidates (cold): >= 2x the req/s of one client"]["pass"] is None
    assert "## Targets" in report.render_targets({"service": {"cells": [cell(10, 1, 4.0)]}})
