"""``instructrec bench ranker|service|soak|recommend``: benchmark the ranker variants or the running
service, soak the service with a fault mid-run, or time /recommend over a catalogue.

Results go to ``--out`` (default ``artifacts/bench``): ``results.json``, ``results.md`` and
PNG plots; see :mod:`instructrec.bench.report`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from . import report
from .hybrid_bench import run_hybrid
from .load_bench import run_load
from .recommend_bench import run_recommend
from .service_bench import BenchError, run_bench
from .soak import DEFAULT_FAULTS, FAULTS, run_soak


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, not {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    return [x for x in text.replace(" ", "").split(",") if x]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True

    from .ranker_bench import DEFAULT_CANDIDATES, VARIANTS

    p = sub.add_parser("ranker", help="time one request through every scoring variant of the same model",
                       description="Naive per-candidate, encoder-once without shared K/V, the shared-K/V fast path, "
                                   "bf16 and int8 on a real Games request; FLOPs and the CPU's matmul peak.")
    p.add_argument("--model", default=None, help="built-in name or checkpoint directory (default: the model "
                   "the quick start serves, artifacts/quickstart/model if trained, else models/minilm-games)")
    p.add_argument("--candidates", default=",".join(map(str, DEFAULT_CANDIDATES)), type=str,
                   help="candidate counts per request (default 1,10,100,1000)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant and size (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant and size first (default 1)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--naive-max", type=int, default=100,
                   help="largest candidate count the naive variant runs at; skipped beyond (default 100)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)} (default all)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="ranker token budget per forward pass (default 4096)")
    p.add_argument("--peak-size", type=int, default=1024, help="side of the square matmul of the peak measurement")
    p.add_argument("--seed", type=int, default=0, help="seed of the candidate sample (default 0)")
    p.add_argument("--dataset", default="games-sample", help="data set for the request (default games-sample)")
    p.add_argument("--profile-candidates", type=int, default=100,
                   help="after timing, profile shared_kv, bf16 and int8 (those run) once at this many candidates with the torch "
                        "profiler (time by group of ops); 0 skips (default 100)")
    p.add_argument("--out", default=str(report.DEFAULT_OUT), help=f"output directory (default {report.DEFAULT_OUT})")
    p.set_defaults(_bench_parser=p, _bench_run=_run_ranker)

    r = sub.add_parser("readme", help="regenerate the README's performance section from results.json")
    r.add_argument("--out", default=str(report.DEFAULT_OUT), help=f"results directory (default {report.DEFAULT_OUT})")
    r.add_argument("--readme", default="README.md", help="the README whose benchmark blocks to update, there or in the docs/*.md page beside it that holds them (default README.md)")
    r.set_defaults(_bench_parser=r, _bench_run=_run_readme)

    s = sub.add_parser("service", help="load-test the /rerank service with real Games requests",
                       description="Starts the service on loopback (or uses --url, loopback only) and replays real "
                                   "Games requests: latency percentiles, requests/s, errors; cache cold and warm; "
                                   "micro-batching on and off.")
    s.add_argument("--model", default=None, help="model the started service serves (default: the model the "
                   "quick start serves; ignored with --url)")
    s.add_argument("--url", help="benchmark this already-running service instead (loopback addresses only)")
    s.add_argument("--api-key", help="bearer key for --url (default: env INSTRUCTREC_API_KEY)")
    s.add_argument("--concurrency", default="1,8,32,128", type=str, help="concurrent clients (default 1,8,32,128)")
    s.add_argument("--candidates", default="10,100", type=str, help="candidates per request (default 10,100)")
    s.add_argument("--requests", type=int, default=256, help="requests per cell at most (default 256)")
    s.add_argument("--duration", type=float, default=30.0, help="seconds per cell at most (default 30)")
    s.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds (default 120)")
    s.add_argument("--history", type=int, default=20, help="history titles per request, at most (default 20)")
    s.add_argument("--batching", default="on,off", help="modes to run: on,off (default both; ignored with --url)")
    s.add_argument("--phases", default="cold,warm", help="cache phases: cold,warm (default both)")
    s.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                   help="Redis of the started service's cache; '' runs without cache (warm phase skipped)")
    s.add_argument("--server", choices=("subprocess", "thread"), default="subprocess",
                   help="how to start the service: a child process (default) or uvicorn in a thread of this process")
    s.add_argument("--peak-size", type=int, default=1024, help="side of the square matmul whose rate gives the "
                   "floor (measured after the cells; default 1024)")
    _started_service_options(s, seed_help="seed of the request sample", dataset="games-sample")
    s.set_defaults(_bench_parser=s, _bench_run=_run_service)

    k = sub.add_parser("soak", help="many clients for a long run with Redis stopped and restarted mid-run; every "
                                    "answer checked against the same request answered alone",
                       description="Starts a private Redis and the service (or uses --url, loopback only), answers "
                                   "each distinct real Games request alone (the references), then sends the load "
                                   "with the fault plan and checks every answer.")
    k.add_argument("--model", default=None, help="model the started service serves (default: the model the quick "
                   "start serves, artifacts/quickstart/model if trained, else models/minilm-games; ignored with --url)")
    k.add_argument("--url", help="soak this already-running loopback service instead (no redis fault then)")
    k.add_argument("--clients", type=int, default=200, help="concurrent clients (default 200)")
    k.add_argument("--requests", type=int, default=4000, help="requests of the load phase (default 4000)")
    k.add_argument("--distinct", type=int, default=40, help="distinct requests they are drawn from (default 40)")
    k.add_argument("--candidates", type=int, default=10, help="candidates per request (default 10)")
    k.add_argument("--history", type=int, default=20, help="history titles per request, at most (default 20)")
    k.add_argument("--faults", default=",".join(DEFAULT_FAULTS), help=f"subset of {','.join(FAULTS)}, or none "
                   f"(default {','.join(DEFAULT_FAULTS)}; swap needs --swap-model)")
    k.add_argument("--resend", action="store_true", help="send a refused request again after its Retry-After "
                   "(at most 30 times) until it is answered; then every request must be answered")
    k.add_argument("--swap-model", default=None, help="the swap fault: the model version the service swaps to "
                   "(POST /admin/reload) at 50%% of the load, e.g. a newer checkpoint of the served model")
    k.add_argument("--burst", type=int, default=128, help="requests of the burst at 80%% (default 128)")
    k.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds (default 60); "
                   "a request without an answer by then counts as lost")
    k.add_argument("--max-seconds", type=float, default=1200.0, help="stop sending after this long (default 1200)")
    _started_service_options(k, seed_help="seed of the requests and their order", dataset="games")
    k.set_defaults(_bench_parser=k, _bench_run=_run_soak)
    _add_recommend(sub)


def _add_recommend(sub) -> None:
    m = sub.add_parser("recommend", help="time POST /recommend (constrained generation over a catalogue) for each k",
                       description="Builds the data set's catalogue for the model (or takes --catalogue), starts the "
                                   "service with it, and sends real histories one at a time: cold (generated) and "
                                   "cached latency, decoding steps.")
    m.add_argument("--model", default=None, help="model the started service serves (default: the quick-start model)")
    m.add_argument("--catalogue", help="catalogue file to serve (default: build the data set's for --model)")
    m.add_argument("--k", dest="ks", default="10,50", type=str, help="k values (default 10,50)")
    m.add_argument("--requests", type=int, default=20, help="distinct requests per k (default 20)")
    m.add_argument("--history", type=int, default=20, help="history titles per request, at most (default 20)")
    m.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                   help="Redis of the started service ('' runs without cache: no cached rows)")
    _started_service_options(m, seed_help="seed of the requests", dataset="games")
    m.set_defaults(_bench_parser=m, _bench_run=_run_recommend)

    h = sub.add_parser("hybrid", help="time what fusion (behaviour, semantic, sequential) adds to LM scoring",
                       description="In one process, real Games requests: the LM alone, then fused as the service fuses "
                                   "them, with title vectors new and cached; the ratio to LM-only in one run.")
    h.add_argument("--model", required=True, help="checkpoint directory (its gate.json is used when present)")
    h.add_argument("--sequential", help="the sequential model's directory (default: none)")
    h.add_argument("--candidates", default="10,100", help="candidates per request (default 10,100)")
    h.add_argument("--requests", type=int, default=30, help="timed requests per size (default 30)")
    h.add_argument("--history", type=int, default=20, help="history items per request (default 20)")
    h.add_argument("--dataset", default="games", help="data set of the requests and the index (default games)")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    h.add_argument("--out", default=str(report.DEFAULT_OUT), help=f"output directory (default {report.DEFAULT_OUT})")
    h.set_defaults(_bench_parser=h, _bench_run=_run_hybrid)

    ld = sub.add_parser("load", help="host memory of loading a float32 checkpoint to serve it in a narrower dtype",
                        description="Each way of loading in a fresh process, on one generated Flan-layout T5 checkpoint "
                                    "stored in float32: peak resident and peak anonymous memory.")
    ld.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"), help="the serving dtype (default bfloat16)")
    ld.add_argument("--d-model", type=int, default=512, help="model width (default 512)")
    ld.add_argument("--layers", type=int, default=6, help="encoder and decoder layers each (default 6)")
    ld.add_argument("--vocab", type=int, default=32128, help="vocabulary (default 32128, T5's)")
    ld.add_argument("--out", default=str(report.DEFAULT_OUT), help=f"output directory (default {report.DEFAULT_OUT})")
    ld.set_defaults(_bench_parser=ld, _bench_run=_run_load)


def _run_load(args: argparse.Namespace) -> int:
    if min(args.d_model, args.layers, args.vocab) < 1:
        print("instructrec bench load: error: --d-model, --layers and --vocab must be at least 1", file=sys.stderr)
        return 2
    section = run_load(Path(args.out) / "load", args.dtype, args.d_model, args.layers, args.vocab)
    _publish(args, "load", section, report.load_table)
    return 0


def _run_hybrid(args: argparse.Namespace) -> int:
    try:
        sizes = _int_list(args.candidates)
        if args.requests < 1 or args.history < 1:
            raise argparse.ArgumentTypeError("--requests and --history must be at least 1")
    except argparse.ArgumentTypeError as exc:
        print(f"instructrec bench hybrid: error: {exc}", file=sys.stderr)
        return 2
    try:
        section = run_hybrid(model=args.model, candidates=sizes, requests=args.requests, history=args.history,
                             dataset=args.dataset, seed=args.seed, threads=args.threads, sequential=args.sequential)
    except ValueError as exc:  # a bad model, gate, sequential model or data set: the message names it
        print(f"instructrec bench hybrid: error: {exc}", file=sys.stderr)
        return 2
    _publish(args, "hybrid", section, report.hybrid_table)
    return 0


def _run_recommend(args: argparse.Namespace) -> int:
    try:
        ks = _int_list(args.ks)
        from instructrec.generation import MAX_K

        if any(k > MAX_K for k in ks) or args.requests < 1:
            raise argparse.ArgumentTypeError(f"k must be 1 to {MAX_K} and --requests at least 1")
    except argparse.ArgumentTypeError as exc:
        print(f"instructrec bench recommend: error: {exc}", file=sys.stderr)
        return 2
    try:
        section = run_recommend(model=args.model, catalogue=args.catalogue, ks=ks, requests=args.requests,
                                history=args.history, dataset=args.dataset, seed=args.seed, settings=args.settings,
                                threads=args.threads, redis_url=args.redis_url, log_dir=args.out)
    except BenchError as exc:
        print(f"instructrec bench recommend: error: {exc}", file=sys.stderr)
        return 2
    _publish(args, "recommend", section, report.recommend_table)
    return 0


def _started_service_options(p: argparse.ArgumentParser, *, seed_help: str, dataset: str) -> None:
    """The options the service and soak benches share: the service they start, the requests, the output."""
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="extra service setting for the started service (repeatable), e.g. --set max_queue=256")
    p.add_argument("--threads", type=int, help="torch threads of the started service (setting torch_threads)")
    p.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default 0)")
    p.add_argument("--dataset", default=dataset, help=f"data set of the requests (default {dataset})")
    p.add_argument("--out", default=str(report.DEFAULT_OUT), help=f"output directory (default {report.DEFAULT_OUT})")


def canonical_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """``instructrec bench <name>`` with every option spelled out as resolved (defaults included)."""
    words = ["instructrec", "bench", args.bench]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        flag = action.option_strings[-1]
        if action.dest == "api_key":
            if value:
                words += [flag, "***"]
            continue
        if value is None or value is False:
            continue
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            for v in value:
                words += [flag, str(v)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _publish(args: argparse.Namespace, name: str, section: dict, table, secret: str | None = None) -> None:
    """Record how the bench was run, write its section of the report and print its table."""
    section["command"] = canonical_command(args._bench_parser, args)
    section["invoked_as"] = report.invoked_as()
    if secret:
        section["invoked_as"] = section["invoked_as"].replace(secret, "***")
    paths = report.write(args.out, name, section)
    print(table(section))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")


def _resolve_model(args: argparse.Namespace, bench: str) -> bool:
    """``--model`` as the quick start and ``rank`` resolve it (none given: the model the quick
    start serves), so the recorded command names what ran; False after printing why not."""
    from instructrec.modeling import ModelNotFound, resolve_model_name

    try:
        args.model = resolve_model_name(args.model)
    except ModelNotFound as exc:
        print(f"instructrec bench {bench}: error: {exc}", file=sys.stderr)
        return False
    return True


def _run_ranker(args: argparse.Namespace) -> int:
    from .ranker_bench import VARIANTS, run_bench

    try:
        sizes = _int_list(args.candidates)
        variants = _name_list(args.variants)
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        if args.repeats < 1 or args.warmup < 0 or args.naive_max < 0 or args.peak_size < 8 or args.profile_candidates < 0:
            raise argparse.ArgumentTypeError("--repeats >= 1, --warmup >= 0, --naive-max >= 0, --peak-size >= 8, "
                                             "--profile-candidates >= 0")
    except argparse.ArgumentTypeError as exc:
        print(f"instructrec bench ranker: error: {exc}", file=sys.stderr)
        return 2
    if not _resolve_model(args, "ranker"):
        return 2
    section = run_bench(model=args.model, candidates=sizes, repeats=args.repeats, warmup=args.warmup,
                        threads=args.threads, naive_max=args.naive_max, variants=variants,
                        batch_tokens=args.batch_tokens, seed=args.seed, peak_size=args.peak_size, dataset=args.dataset,
                        profile_candidates=args.profile_candidates)
    _publish(args, "ranker", section, report.ranker_table)
    return 0


def _run_service(args: argparse.Namespace) -> int:
    try:
        concurrency = _int_list(args.concurrency)
        sizes = _int_list(args.candidates)
    except argparse.ArgumentTypeError as exc:
        print(f"instructrec bench service: error: {exc}", file=sys.stderr)
        return 2
    if args.url is None and not _resolve_model(args, "service"):
        return 2
    try:
        section = run_bench(
            model=args.model, url=args.url, api_key=args.api_key, concurrency=concurrency, candidates=sizes,
            requests=args.requests, duration=args.duration, timeout=args.timeout, history=args.history,
            batching=_name_list(args.batching), phases=_name_list(args.phases), redis_url=args.redis_url,
            server=args.server, settings=args.settings, threads=args.threads, seed=args.seed, dataset=args.dataset,
            log_dir=args.out, peak_size=args.peak_size)
    except BenchError as exc:
        print(f"instructrec bench service: error: {exc}", file=sys.stderr)
        return 2
    _publish(args, "service", section, report.service_table, secret=args.api_key)
    return 0


def _run_soak(args: argparse.Namespace) -> int:
    faults = [] if args.faults.strip() in ("", "none") else _name_list(args.faults)
    if args.url is None and not _resolve_model(args, "soak"):
        return 2
    try:
        section = run_soak(model=args.model, url=args.url, clients=args.clients, requests=args.requests,
                           distinct=args.distinct, candidates=args.candidates, history=args.history, faults=faults,
                           swap_model=args.swap_model, resend=args.resend,
                           burst=args.burst, timeout=args.timeout, max_seconds=args.max_seconds,
                           settings=args.settings, threads=args.threads, seed=args.seed, dataset=args.dataset,
                           log_dir=args.out)
    except BenchError as exc:
        print(f"instructrec bench soak: error: {exc}", file=sys.stderr)
        return 2
    _publish(args, "soak", section, report.soak_table)
    return 0 if section["passed"] else 1


def _run_readme(args: argparse.Namespace) -> int:
    results = report.load(args.out)
    if not results:
        print(f"instructrec bench readme: error: no results in {args.out}; run `instructrec bench ranker` first",
              file=sys.stderr)
        return 2
    try:
        path = report.update_readme(args.readme, results)
    except (OSError, ValueError) as exc:
        print(f"instructrec bench readme: error: {exc}", file=sys.stderr)
        return 2
    print(f"updated the performance section of {path} from {args.out}/results.json")
    return 0


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)
