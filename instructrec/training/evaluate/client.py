"""``instructrec eval-client``: the offline protocol, scored by a live ``/rerank`` service.

The client reads a candidate file (the one ``instructrec evaluate`` wrote, or one it writes
itself the same way), builds each case's need exactly as the offline evaluation does
(:func:`instructrec.training.evaluate.run.scenario_needs`: history titles, teacher preference, vague or
specific intention), and sends it with the candidates (id = item id, title) to
``POST /rerank``. The scores that come back, mapped to the candidate order by id, give
the rank of the target with the offline rule (:func:`instructrec.training.metrics.rank_of`), and the
metrics and bootstrap intervals are the offline ones. With the template the offline run
selected, the ranks equal ``instructrec evaluate``'s for the same checkpoint.

``OUT/responses.jsonl`` holds a header (what the answers depend on: service URL, model
checkpoint, candidate file digest, scenario, template, needs) and one line per answered
case, appended and flushed as each answer arrives, so a rerun skips the cases already
answered. ``OUT/results.json`` is written at the end. Only ``httpx`` talks to the service:
nothing here imports ``service``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from instructrec import files
from instructrec.aspects import Intention, UserNeed
from instructrec.records import percentile
from instructrec.templates import TEMPLATE_VERSION

from ..data.load import load_dataset
from ..data.types import MAX_HISTORY, Case, DataError, InteractionData
from ..metrics import bootstrap_intervals, metrics_from_ranks, rank_of
from ..retry_after import retry_after_seconds
from . import candidates as cand
from .scenarios import get_scenarios

log = logging.getLogger(__name__)

SCHEMA = "instructrec-eval-client/1"
RESPONSES_FORMAT = "instructrec-eval-client-responses"
RESPONSES, RESULTS = "responses.jsonl", "results.json"
RETRYABLE = (429, 502, 503, 504)  # retried (Retry-After honoured), like connection errors and timeouts
FATAL = (400, 401, 403, 404, 405)  # the same for every case: stop the run
MAX_RETRY_AFTER = 600.0
# What a resumed run must share with the answers on file (else: another --out, or --fresh).
RESUME_KEYS = ("url", "model", "template_table", "digest", "scenario", "template", "max_history", "needs", "fusion",
               "hybrid")
FUSION_MODES = ("auto", "lm-only")  # what /rerank's `fusion` field takes


class ClientError(Exception):
    """A run-stopping problem, reported as one line (no traceback), exit code 2."""


@dataclass
class ClientConfig:
    url: str
    out: Path
    data: str | InteractionData = "games-sample"
    candidates: str | Path | None = None  # a candidate file; None: build test/uniform-10 for `users`, `seed`
    users: int | None = None  # with no candidate file: that many users (0: all)
    seed: int | None = None  # None: the candidate file's seed (bootstrap seed, as offline)
    scenario: str = "sequential"
    template: str | None = None  # None: the service's own selection
    fusion: str = "auto"  # auto: fused where the service has a gate; lm-only: the LM alone
    annotations: str | None = None  # None: the offline teacher, cached in OUT/annotations.jsonl
    max_history: int = MAX_HISTORY
    api_key: str | None = None
    concurrency: int = 8
    timeout: float = 60.0
    retries: int = 5
    backoff: float = 0.5  # first exponential back-off step, seconds (doubles per retry, with jitter)
    limit: int | None = None  # request at most this many new cases (a rerun continues)
    fresh: bool = False  # discard answers on file instead of resuming
    resamples: int = 1000
    progress: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"--fusion must be one of {', '.join(FUSION_MODES)}, not {self.fusion!r}")
        if self.retries < 0:
            raise ValueError("--retries must be >= 0")
        if self.timeout <= 0:
            raise ValueError("--timeout must be positive")
        if self.max_history < 0:
            raise ValueError("--max-history must be >= 0")
        if self.candidates is None and self.users is None:
            raise ValueError("give --candidates FILE, or --users N (and --seed S) to write a uniform 1+9 test file")


def base_url(url: str) -> str:
    """``http(s)://host[:port][/prefix]`` without a trailing slash or ``/rerank``."""
    url = url.strip().rstrip("/")
    if url.endswith("/rerank"):
        url = url[: -len("/rerank")]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ClientError(f"bad --url {url!r}: expected the service's base URL, e.g. http://localhost:8000")
    return url


# --- the cases and their needs ---------------------------------------------------------------


def uniform_test_file(data: InteractionData, users: int | None, seed: int, out: Path) -> cand.CandidateFile:
    """The test/uniform-10 file ``instructrec evaluate --users N --seed S`` writes (same header,
    same cases, so the same digest), at ``OUT/candidates/test-uniform-10.jsonl``."""
    header = {"dataset": data.name, "source": data.source, "split": "test", "setting": "uniform-10",
              "negatives": "uniform", "n_negatives": 9, "seed": seed, "users": users, "retriever": None}
    path = out / "candidates" / "test-uniform-10.jsonl"
    if path.exists():
        existing = cand.read(path, data)
        if all(existing.header.get(k) == v for k, v in header.items()):
            return existing
    cases = cand.pick_users(cand.full_cases(data, "test"), users, seed)
    return cand.write(path, header, cand.uniform_candidates(data, cases, 9, seed))


def annotation_cases(data: InteractionData, file: cand.CandidateFile) -> list[Case]:
    """The file's cases with the target's review, as the offline run annotates them."""
    out = []
    for c in file.cases:
        seq = data.sequences.get(c.user_id, ())
        t = len(c.history)
        review = seq[t].review if t < len(seq) and seq[t].item_id == c.target else ""
        out.append(Case(c.user_id, c.history, c.target, review))
    return out


def request_body(data: InteractionData, case: cand.CandidateCase, need: UserNeed, template: str | None,
                 fusion: str = "auto") -> dict:
    """The /rerank request carrying exactly ``need`` (raw texts: the service normalises them,
    as the offline path does), the candidates as {id: item id, title}, and the fusion asked for.
    History items go with their ids, so a service with a behaviour index knows them."""
    ids = case.history[len(case.history) - len(need.history):] if need.history else ()
    body: dict[str, Any] = {"history": [{"id": i, "title": t} for i, t in zip(ids, need.history)],
                            "candidates": [{"id": c, "title": data.title(c)} for c in case.candidates],
                            "return_scores": True, "fusion": fusion}
    if need.preference:
        body["preference"] = need.preference
    if need.intention:
        body["intention"] = {"text": need.intention,
                             "kind": "vague" if need.intention_kind is Intention.VAGUE else "specific"}
    if need.context:
        body["instruction"] = need.context
    if template:
        body["template"] = template
    return body


def needs_digest(needs: Sequence[UserNeed]) -> str:
    """The offline unit key's digest of the needs (run.run_unit)."""
    return hashlib.sha256(repr(list(needs)).encode()).hexdigest()[:16]


# --- HTTP ------------------------------------------------------------------------------------


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header, capped at MAX_RETRY_AFTER; None if absent or unreadable."""
    seconds = retry_after_seconds(value)
    return None if seconds is None else min(seconds, MAX_RETRY_AFTER)


_JITTER = random.Random()


def backoff_delay(base: float, attempt: int) -> float:
    """Exponential back-off with jitter: half of ``base * 2**attempt`` fixed, half random (capped at 60 s)."""
    step = min(60.0, base * (2 ** attempt))
    return step / 2 + _JITTER.uniform(0, step / 2)


def error_of(response) -> dict:
    """``{status, type, message, field}`` of an error answer (the service's JSON error shape, or its text)."""
    err: dict[str, Any] = {"status": response.status_code, "type": "http_error", "message": "", "field": None}
    try:
        body = response.json()
        detail = body.get("error") if isinstance(body, dict) else None
    except ValueError:
        detail = None
    if isinstance(detail, dict):
        err.update(type=str(detail.get("type") or "http_error"), message=str(detail.get("message") or ""),
                   field=detail.get("field"))
    else:
        err["message"] = " ".join(response.text.split())[:300] or response.reason_phrase
    return err


def describe(err: dict) -> str:
    status = f"HTTP {err['status']} " if err.get("status") else ""
    field = f" (field {err['field']})" if err.get("field") else ""
    return f"{status}{err.get('type', 'error')}{field}: {err.get('message', '')}"


def _fatal(err: dict, url: str) -> ClientError:
    status = err.get("status")
    hint = ""
    if status == 401:
        hint = " -- pass --api-key or set INSTRUCTREC_API_KEY"
    elif status in (404, 405):
        hint = f" -- is {url} the base URL of an instructrec service?"
    return ClientError(f"{url}/rerank answered {describe(err)}{hint}")


def _parse(body: Any, case: cand.CandidateCase) -> tuple[list[float], dict]:
    """Scores in candidate order (by id) from a /rerank answer; ValueError if it does not fit."""
    if not isinstance(body, dict) or not isinstance(body.get("results"), list):
        raise ValueError("the answer has no 'results' list")
    results = body["results"]
    if len(results) != len(case.candidates):
        raise ValueError(f"{len(results)} results for {len(case.candidates)} candidates")
    by_id: dict[str, float] = {}
    for r in results:
        cid, score = str(r.get("id")), r.get("score")
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise ValueError(f"candidate {cid!r} came back without a score")
        index = r.get("index")
        if isinstance(index, int) and not (0 <= index < len(case.candidates) and case.candidates[index] == cid):
            raise ValueError(f"candidate {cid!r} came back at index {index}, which holds another candidate")
        by_id[cid] = float(score)
    missing = [c for c in case.candidates if c not in by_id]
    if missing:
        raise ValueError(f"candidate {missing[0]!r} is missing from the answer")
    template = body.get("template") or {}
    model = body.get("model") or {}
    fusion = body.get("fusion") or {}
    meta = {"template": template.get("id"), "table_version": template.get("table_version"),
            "checkpoint_version": model.get("checkpoint_version"), "fusion": fusion.get("mode", "lm-only")}
    return [by_id[c] for c in case.candidates], meta


async def rerank_case(client, url: str, body: dict, case: cand.CandidateCase, retries: int, backoff: float,
                      sleep: Callable = asyncio.sleep) -> dict:
    """One case: POST /rerank with retries. Returns the line for responses.jsonl (scores or error);
    raises :class:`ClientError` on an answer that would be the same for every case."""
    import httpx

    last: dict = {}
    for attempt in range(retries + 1):
        delay = None
        start = time.perf_counter()
        try:
            response = await client.post("/rerank", json=body)
        except httpx.TransportError as exc:  # connection refused/reset, timeouts, protocol errors
            last = {"status": None, "type": "connection_error", "message": f"{type(exc).__name__}: {exc}".strip(": "),
                    "field": None}
        else:
            latency = time.perf_counter() - start
            if response.status_code == 200:
                try:
                    scores, meta = _parse(response.json(), case)
                except ValueError as exc:
                    return {"user_id": case.user_id, "target": case.target, "attempts": attempt + 1,
                            "error": {"status": 200, "type": "bad_response", "message": str(exc), "field": None}}
                return {"user_id": case.user_id, "target": case.target, "scores": scores,
                        "rank": rank_of(scores, case.positive), "template": meta["template"],
                        "latency": round(latency, 6), "attempts": attempt + 1,
                        "checkpoint_version": meta["checkpoint_version"], "table_version": meta["table_version"],
                        "fusion": meta["fusion"]}
            err = error_of(response)
            if response.status_code in RETRYABLE:
                delay = retry_after(response.headers.get("retry-after"))
                last = err
            elif response.status_code in FATAL or err.get("field") == "template":  # the same for every case
                raise _fatal(err, url)
            else:  # this case's request is unacceptable (e.g. a title over the service's length limit)
                return {"user_id": case.user_id, "target": case.target, "attempts": attempt + 1, "error": err}
        if attempt == retries:
            break
        await sleep(backoff_delay(backoff, attempt) if delay is None else delay)
    return {"user_id": case.user_id, "target": case.target, "attempts": retries + 1,
            "error": {**last, "message": f"gave up after {retries + 1} attempts: {last.get('message', '')}"}}


async def ready(client, url: str, retries: int, backoff: float) -> dict:
    """GET /ready until it says ready (following Retry-After while the model loads)."""
    import httpx

    for attempt in range(retries + 1):
        delay = None
        try:
            r = await client.get("/ready")
        except httpx.ConnectError as exc:
            raise ClientError(f"cannot connect to {url} ({exc or type(exc).__name__}): is the service running, "
                              "and is --url right?") from None
        except httpx.TransportError as exc:
            if attempt == retries:
                raise ClientError(f"{url}/ready: {type(exc).__name__}: {exc}") from None
        else:
            if r.status_code == 200:
                try:
                    return r.json()
                except ValueError:
                    raise ClientError(f"{url}/ready answered 200 but not JSON: is it an instructrec service?") from None
            if r.status_code == 503:
                try:
                    body = r.json()
                except ValueError:
                    body = {}
                if body.get("status") == "failed":
                    raise ClientError(f"the service at {url} failed to load its model: {body.get('error')}")
                if attempt == retries:
                    raise ClientError(f"the service at {url} is not ready after {retries + 1} attempts "
                                      f"(status {body.get('status', 'unavailable')})")
                delay = retry_after(r.headers.get("retry-after"))
            elif r.status_code in RETRYABLE and attempt < retries:
                delay = retry_after(r.headers.get("retry-after"))
            else:
                err = error_of(r)
                hint = (" -- pass --api-key or set INSTRUCTREC_API_KEY" if r.status_code == 401 else
                        f" -- is {url} the base URL of an instructrec service?" if r.status_code == 404 else "")
                raise ClientError(f"{url}/ready answered {describe(err)}{hint}")
        await asyncio.sleep(backoff_delay(backoff, attempt) if delay is None else delay)
    raise ClientError(f"the service at {url} is not ready")


# --- responses.jsonl -------------------------------------------------------------------------


def read_responses(path: Path) -> tuple[dict | None, list[dict]]:
    """Header and lines of a responses file; a truncated last line (a killed run) is cut off."""
    if not path.exists():
        return None, []
    header, rows = None, []
    for number, row in files.jsonl_objects(path, DataError, torn_tail="repair"):
        if header is None:
            if row.get("format") != RESPONSES_FORMAT:
                raise DataError(path, number, f'not an eval-client responses file (no "format": "{RESPONSES_FORMAT}" header)')
            header = row
        else:
            rows.append(row)
    return header, rows


# --- the run ---------------------------------------------------------------------------------


def evaluate_service(cfg: ClientConfig) -> dict:
    """Run (or resume) the evaluation of the service at ``cfg.url``; writes and returns results.json's dict."""
    from .run import EvalConfig, annotate, scenario_needs

    started = time.perf_counter()
    url = base_url(cfg.url)
    out = cfg.out
    results_path = out / RESULTS
    if results_path.exists():
        try:
            schema = json.loads(results_path.read_text()).get("schema")
        except (ValueError, AttributeError):
            schema = None
        if schema != SCHEMA:
            raise ClientError(f"{results_path} is not an eval-client result (an `instructrec evaluate` report?): "
                              "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    scenario = get_scenarios([cfg.scenario])[0]
    data = cfg.data if isinstance(cfg.data, InteractionData) else load_dataset(cfg.data)

    if cfg.candidates is not None:
        file = cand.read(cfg.candidates, data)
    else:
        file = uniform_test_file(data, cfg.users or None, cfg.seed or 0, out)
    if file.header.get("dataset") not in (None, data.name):
        raise ClientError(f"{file.path} was written for dataset {file.header.get('dataset')!r}, "
                          f"--data is {data.name!r}")
    seed = cfg.seed if cfg.seed is not None else int(file.header.get("seed") or 0)

    acfg = EvalConfig(data=data, out=out, annotations=cfg.annotations, progress=cfg.progress)
    annotations = annotate(data, annotation_cases(data, file), [scenario], acfg)
    used = scenario_needs(data, file, scenario, annotations, cfg.max_history)
    digest = needs_digest([n for _, n in used])
    if not used:
        raise ClientError(f"scenario {scenario.name}: no case of {file.path} has the annotations it needs")

    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)

    async def main() -> tuple[dict, list[dict], list[dict], dict]:
        async with httpx.AsyncClient(base_url=url, timeout=cfg.timeout, limits=limits, headers=headers,
                                     trust_env=False) as client:
            info = await ready(client, url, cfg.retries, cfg.backoff)
            model = info.get("model") if isinstance(info.get("model"), dict) else {}
            header = {"format": RESPONSES_FORMAT, "version": 1, "url": url,
                      "model": model.get("checkpoint_version"), "model_name": model.get("name"),
                      "digest": file.digest, "candidate_file": str(file.path), "scenario": scenario.name,
                      "template": cfg.template, "max_history": cfg.max_history, "needs": digest,
                      "template_table": info.get("template_version"), "fusion": cfg.fusion,
                      "hybrid": info.get("hybrid_version")}
            path = out / RESPONSES
            if cfg.fresh and path.exists():
                path.unlink()
            old, rows = read_responses(path)
            if old is not None and not any("scores" in r for r in rows):
                path.unlink()  # nothing answered on file: start over
                old, rows = None, []
            if old is not None:
                differ = [k for k in RESUME_KEYS if old.get(k) != header[k]]
                if differ:
                    what = ", ".join(f"{k} {old.get(k)!r} -> {header[k]!r}" for k in differ)
                    raise ClientError(f"{path} holds answers of another run ({what}): use another --out, "
                                      "or --fresh to discard them")
            done = {(r["user_id"], r["target"]) for r in rows if "scores" in r}
            todo = [(c, n) for c, n in used if (c.user_id, c.target) not in done]
            if cfg.limit is not None:
                todo = todo[: max(0, cfg.limit)]
            new: list[dict] = []
            with path.open("a", encoding="utf-8") as f:
                if old is None:
                    f.write(json.dumps(header) + "\n")
                    f.flush()
                await _send_all(client, url, data, cfg, todo, f, new, total=len(used), initial=len(done))
            return header, rows, new, info

    try:
        header, old_rows, new_rows, info = asyncio.run(main())
    except httpx.InvalidURL as exc:
        raise ClientError(f"bad --url {cfg.url!r}: {exc}") from None

    return _summarise(cfg, url, file, scenario, used, old_rows, new_rows, header, info, seed, TEMPLATE_VERSION,
                      time.perf_counter() - started, results_path)


async def _send_all(client, url: str, data: InteractionData, cfg: ClientConfig,
                    todo: list[tuple[cand.CandidateCase, UserNeed]], f, new: list[dict], total: int, initial: int) -> None:
    from tqdm import tqdm

    sem = asyncio.Semaphore(cfg.concurrency)
    bar = tqdm(total=total, initial=initial, desc=f"rerank {url}", unit="case", disable=not cfg.progress)
    errors = 0

    async def one(case: cand.CandidateCase, need: UserNeed) -> None:
        nonlocal errors
        async with sem:
            row = await rerank_case(client, url, request_body(data, case, need, cfg.template, cfg.fusion), case, cfg.retries,
                                    cfg.backoff)
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        new.append(row)
        bar.update(1)
        if "error" in row:
            errors += 1
            if errors <= 3:
                bar.write(f"user {case.user_id}: {describe(row['error'])}", file=sys.stderr)
        bar.set_postfix(errors=errors, refresh=False)

    tasks = [asyncio.ensure_future(one(c, n)) for c, n in todo]
    try:
        if tasks:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()


def _summarise(cfg: ClientConfig, url: str, file: cand.CandidateFile, scenario, used, old_rows: list[dict],
               new_rows: list[dict], header: dict, info: dict, seed: int, local_table: str, seconds: float,
               results_path: Path) -> dict:
    rows = old_rows + new_rows
    n_cases = len(file.cases)
    answers: dict[tuple[str, str], dict] = {}
    failures: dict[tuple[str, str], dict] = {}
    for r in rows:
        key = (r.get("user_id"), r.get("target"))
        if "scores" in r:
            answers[key] = r
            failures.pop(key, None)
        elif key not in answers:
            failures[key] = r
    user_ids, ranks, latencies, templates, versions, fusions = [], [], [], Counter(), Counter(), Counter()
    for case, _ in used:  # file order, as the offline unit
        r = answers.get((case.user_id, case.target))
        if r is None:
            continue
        if len(r["scores"]) != len(case.candidates):
            raise DataError(results_path.parent / RESPONSES, None, f"user {case.user_id}: {len(r['scores'])} scores "
                            f"for {len(case.candidates)} candidates")
        user_ids.append(case.user_id)
        ranks.append(rank_of(r["scores"], case.positive))
        latencies.append(float(r.get("latency") or 0.0))
        templates[r.get("template")] += 1
        versions[r.get("checkpoint_version")] += 1
        fusions[r.get("fusion", "lm-only")] += 1
    keys = {(c.user_id, c.target) for c, _ in used}
    errors = [failures[k] for k in failures if k in keys]
    resumed = len({(r["user_id"], r["target"]) for r in old_rows if "scores" in r} & keys)
    table = info.get("template_version") or header.get("template_table")
    results = {
        "schema": SCHEMA,
        "command": cfg.command,
        "url": url,
        "model": {"name": header.get("model_name"), "checkpoint_version": header.get("model")},
        "checkpoint_versions_answered": dict(versions),
        "template_table": {"service": table, "local": local_table, "same": table == local_table},
        "candidate_file": {"path": str(file.path), "digest": file.digest, "cases": len(file.cases), **file.header},
        "scenario": {"name": scenario.name, "label": scenario.label, "title": scenario.title},
        "template": {"requested": cfg.template, "used": dict(templates)},
        "fusion": {"requested": cfg.fusion, "answered": dict(fusions), "hybrid_version": header.get("hybrid")},
        "max_history": cfg.max_history,
        "annotations": cfg.annotations or str(cfg.out / "annotations.jsonl"),
        "counts": {"cases": n_cases, "usable": len(used), "skipped": n_cases - len(used), "answered": len(ranks),
                   "errors": len(errors), "not_requested": len(used) - len(ranks) - len(errors),
                   "resumed": resumed},
        "metrics": metrics_from_ranks(ranks),
        "ci95": bootstrap_intervals(ranks, resamples=cfg.resamples, seed=seed),
        "latency": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                    "mean": sum(latencies) / len(latencies) if latencies else None,
                    "max": max(latencies) if latencies else None},
        "errors": [{"user_id": e.get("user_id"), **e.get("error", {})} for e in errors[:20]],
        "user_ids": user_ids,
        "ranks": ranks,
        "seconds": round(seconds, 2),
    }
    files.write_json(results_path, results, indent=1)
    return results


def table(results: dict) -> str:
    """A short text table of the metrics with their 95% intervals, counts and latency."""
    c, m, ci, lat = results["counts"], results["metrics"], results["ci95"], results["latency"]
    used = results["template"]["used"]
    lines = [f"{results['scenario']['name']} {results['scenario']['label']} on {results['url']} "
             f"(template {results['template']['requested'] or 'service default'}; used "
             f"{', '.join(f'{k} x{v}' for k, v in used.items()) or '-'})",
             f"fusion {results['fusion']['requested']}: answered "
             f"{', '.join(f'{k} x{v}' for k, v in results['fusion']['answered'].items()) or '-'}",
             f"cases {c['cases']}  usable {c['usable']}  skipped {c['skipped']}  answered {c['answered']}  "
             f"errors {c['errors']}  not requested {c['not_requested']}",
             f"{'metric':<8} {'value':>6}  95% CI"]
    for name in ("hr@1", "hr@3", "hr@5", "ndcg@3", "ndcg@5", "mrr"):
        if name in m:
            lo, hi = ci.get(name, (float("nan"), float("nan")))
            lines.append(f"{name:<8} {m[name]:>6.3f}  [{lo:.3f}, {hi:.3f}]")
    if lat["p50"] is not None:
        lines.append(f"latency p50 {lat['p50'] * 1000:.0f} ms  p95 {lat['p95'] * 1000:.0f} ms")
    return "\n".join(lines)
