"""A real Prometheus scraping a live service, evaluating the Grafana dashboard and the alert rules.

The ``prometheus`` binary (Debian's package; ``.ci/run`` installs it) runs on a free loopback
port with a temporary config that scrapes a uvicorn server (tiny-random model, the machine's
Redis) every second and loads ``deploy/prometheus/alerts.yml``. Two rounds of traffic go
through every rerank route and /recommend, with a 422 and a flood that gets 429s, then every PromQL
expression of the dashboard and of the alert rules is evaluated through Prometheus's HTTP API:
each parses, each dashboard expression returns data, and the values that the traffic fixes
are checked (a 5xx ratio of 0 rather than no data, one request per batch on average).
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from instructrec.service.app import create_app
from instructrec.service.settings import Settings
from tests.service_fixtures import SHARED_REDIS, ServerThread, delete_namespace, free_port, unique_namespace
from tests.test_deploy import ALERTS, alert_expressions, dashboard_expressions

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None,
                                reason="prometheus not installed (Debian: apt-get install prometheus; .ci/run does)")

torch.set_num_threads(1)

RERANK_ROUTES = '/rerank|/v1/rerank|/v2/rerank'
WORDS = "legend zelda mario kart halo doom quest star wars edition remastered deluxe racing puzzle farm".split()


def titles(n: int, tag: str) -> list[str]:
    return [f"{WORDS[i % len(WORDS)]} {WORDS[(i * 5) % len(WORDS)]} {tag} {i}" for i in range(n)]


class Prometheus:
    """``prometheus`` on 127.0.0.1:<free port>, scraping one target every second."""

    def __init__(self, workdir: Path, target: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "instructrec", "static_configs": [{"targets": [target]}]}],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Prometheus":
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"prometheus did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def query(self, expr: str) -> list[dict]:
        """An instant query; fails the test with Prometheus's own message if it does not parse."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr!r}: {body.get('error', r.text)}"
        assert body["data"]["resultType"] == "vector", expr
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, want: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.value(expr) != want:
            assert time.monotonic() < deadline, f"{expr} never reached {want} (now {self.value(expr)})"
            time.sleep(0.2)


def served_requests(client: httpx.Client) -> float:
    """Rerank-route requests the service has counted so far (its own /metrics)."""
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        m = re.match(r'instructrec_request_duration_seconds_count\{(.*)\} (\S+)$', line)
        if m and re.search(rf'route="({RERANK_ROUTES})"', m.group(1)):
            total += float(m.group(2))
    return total


def traffic(url: str, client: httpx.Client, tag: str) -> None:
    """Every rerank route, /recommend, cache hits, one 422 and a flood until at least one 429."""
    body = {"history": ["Halo 3"], "instruction": "a racing game", "candidates": titles(5, "native")}
    for _ in range(2):  # the second time from the cache
        assert client.post("/rerank", json=body).status_code == 200
    for path in ("/v1/rerank", "/v2/rerank"):
        r = client.post(path, json={"query": "a farming game", "documents": titles(4, path), "top_n": 2})
        assert r.status_code == 200, r.text
    for _ in range(2):  # generation over the catalogue, then the same answer from the cache
        r = client.post("/recommend", json={"history": ["Halo 3"], "instruction": f"a racing game {tag}", "k": 3})
        assert r.status_code == 200, r.text
    r = client.post("/v2/rerank", json={"query": "a farming game", "documents": []})
    assert r.status_code == 422 and r.json()["message"].startswith("documents")

    async def flood(k: int):
        async with httpx.AsyncClient(base_url=url, timeout=120) as ac:
            return await asyncio.gather(*(
                ac.post("/rerank", json={"instruction": f"game {j}", "candidates": titles(80, f"{tag}-{k}-{j}")})
                for j in range(6)))

    for k in range(5):
        codes = [r.status_code for r in asyncio.run(flood(k))]
        assert set(codes) <= {200, 429}, codes
        if 429 in codes:
            return
    raise AssertionError("no 429 from five floods")


def _threshold_removed(expr: str) -> str:
    """An alert expression without its final comparison: ``x > 0.05`` -> ``x``."""
    return re.sub(r"\s*(==|!=|>=|<=|>|<)\s*[-+]?[0-9.]+(e[-+]?[0-9]+)?\s*$", "", expr.strip())


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    import redis

    try:
        redis.Redis.from_url(SHARED_REDIS, socket_timeout=1).ping()
    except redis.RedisError:
        pytest.skip("no Redis at 127.0.0.1:6379")
    from instructrec.catalogue import CatalogueItem, build_catalogue
    from instructrec.modeling import load_model
    from instructrec.ranker import Ranker

    loaded = load_model("tiny-random", device="cpu", dtype="float32")
    ranker = Ranker(loaded)
    items = [CatalogueItem(f"c{i}", t) for i, t in enumerate(titles(30, "catalogue"))]
    catalogue = build_catalogue(items, loaded.tokenizer, eos=ranker.eos, max_target_tokens=ranker.max_target_tokens)
    path = catalogue.save(tmp_path_factory.mktemp("catalogue") / "c.npz")
    namespace = unique_namespace()
    settings = Settings(model="tiny-random", device="cpu", dtype="float32", warmup=False, redis_url=SHARED_REDIS,
                        cache_namespace=namespace, max_queue=1, max_batch_requests=1, batch_tokens=256,
                        max_wait_ms=0, catalogue=str(path))
    try:
        with ServerThread(create_app(settings)) as srv:
            srv.wait_ready()
            with Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{srv.port}") as prom, \
                    httpx.Client(base_url=srv.url, timeout=120) as client:
                prom.wait_for('up{job="instructrec"}', 1)
                total = f'sum(instructrec_request_duration_seconds_count{{route=~"{RERANK_ROUTES}"}})'
                for tag in ("first", "second"):  # the second round makes every rate non-zero
                    traffic(srv.url, client, tag)
                    prom.wait_for(total, served_requests(client))
                # every rule group evaluated at least once since the last scrape
                time.sleep(1.5)
                yield prom
    finally:
        delete_namespace(SHARED_REDIS, namespace)


def test_dashboard_expressions_return_data(scraped):
    prom = scraped
    exprs = dashboard_expressions()
    assert len(exprs) >= 30
    empty = [f"{where}: {expr}" for where, expr in exprs if not prom.query(expr)]
    assert not empty, "no data:\n" + "\n".join(empty)


def _panel_expr(title: str, legend: str | None = None) -> str:
    """One dashboard expression by panel title (and legend), with Grafana's variables filled."""
    import json

    from tests.test_deploy import DASHBOARD, _panels, grafana_to_promql

    for p in _panels(json.loads(DASHBOARD.read_text())["panels"]):
        if p["title"] == title:
            for t in p["targets"]:
                if legend is None or t.get("legendFormat") == legend:
                    return grafana_to_promql(t["expr"])
    raise AssertionError(f"no panel {title!r} / {legend!r}")


def test_dashboard_values_the_traffic_fixes(scraped):
    prom = scraped
    # a healthy service: the 5xx ratio is 0, not "No data"; the 4xx ratio counts the 422s and 429s
    assert prom.value(_panel_expr("5xx ratio")) == 0
    assert prom.value(_panel_expr("Error ratio (5xx / all, rerank routes)", "5xx ratio")) == 0
    four = prom.value(_panel_expr("Error ratio (5xx / all, rerank routes)", "4xx ratio"))
    assert four is not None and 0 < four < 1
    # every batch held one request (max_batch_requests=1): the mean says 1, exactly
    assert prom.value(_panel_expr("Batch size (requests per batch)")) == pytest.approx(1.0)
    mean_candidates = prom.value(_panel_expr("Candidates per request"))
    assert 4 <= mean_candidates <= 80
    assert prom.value(_panel_expr("429s and rejected requests by reason", "429 responses")) > 0
    hit_ratio = prom.value(_panel_expr("Cache hit ratio"))
    assert hit_ratio is not None and 0 < hit_ratio < 1
    routes = {r["metric"]["route"] for r in prom.query(_panel_expr("Request rate by route"))}
    assert {"/rerank", "/v1/rerank", "/v2/rerank", "/metrics"} <= routes


def test_alert_rules_load_evaluate_and_stay_quiet(scraped):
    prom = scraped
    rules = httpx.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    exprs = alert_expressions()
    assert {where.removeprefix("alert ") for where, _ in exprs} == set(loaded)
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert rule["state"] != "firing", name  # every rule has a `for:` of minutes
        if name not in ("InstructrecShedding", "InstructrecHighP99Latency"):  # the flood may trip these two
            assert rule["state"] == "inactive", (name, rule["state"])
    for where, expr in exprs:
        result = prom.query(expr)  # parses and evaluates
        if "absent(" in expr:
            assert result == [], where  # the target is scraped
            continue
        lhs = _threshold_removed(expr)
        assert lhs != expr.strip(), where
        values = prom.query(lhs)
        assert values, f"{where}: {lhs} has no data"
        assert all(not math.isnan(float(v["value"][1])) for v in values), (where, values)
    error_ratio = dict(exprs)["alert InstructrecHighErrorRatio"]
    assert prom.value(_threshold_removed(error_ratio)) == 0  # 0, not empty, with no 5xx
