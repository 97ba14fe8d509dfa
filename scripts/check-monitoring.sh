#!/usr/bin/env bash
# Check the monitoring artifacts: alert and recording rules, their unit tests,
# the rendered-rules consistency, runbook and test coverage per alert, the
# Grafana dashboard lint, the example Prometheus config and, given the sidecar
# binary, the end-to-end test against a real Prometheus scraping `BINARY demo`.
#
#   scripts/check-monitoring.sh [BINARY]
#
# Installs prometheus/promtool (scripts/install-tools.sh) when missing.
# Closes with `N passed, M failed`; exits 1 if any step failed.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
BINARY="${1:-}"
passed=0
failed=0
failures=()

step() {
  local name="$1"
  shift
  echo "=== $name"
  if "$@"; then
    passed=$((passed + 1))
    echo "--- ok: $name"
  else
    failed=$((failed + 1))
    failures+=("$name")
    echo "--- FAILED: $name"
  fi
}

tools() {
  if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    bash scripts/install-tools.sh
  fi
  command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1
}

# Every alert has a runbook section (its anchor is the lowercase name), and a
# unit test where it fires (non-empty exp_alerts) and one where it does not.
coverage() {
  python3 - <<'PY'
import pathlib, re, sys
rules = pathlib.Path("alerts/wxauto-sidecar.rules.yml").read_text()
alerts = re.findall(r"^\s*-\s*alert:\s*(\S+)", rules, re.M)
runbooks = pathlib.Path("docs/runbooks.md").read_text()
headings = {h.strip() for h in re.findall(r"^##\s+(.+)$", runbooks, re.M)}
fires, quiet = set(), set()
for f in sorted(pathlib.Path("alerts/tests").glob("*.y*ml")):
    text = f.read_text()
    # Each alert_rule_test item: alertname, then exp_alerts (empty `[]` or a list).
    for m in re.finditer(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:\s*(\[\])?", text):
        (quiet if m.group(2) else fires).add(m.group(1))
bad = 0
for a in alerts:
    problems = []
    if a not in headings:
        problems.append("no '## %s' section in docs/runbooks.md" % a)
    if not re.search(r"runbook_url: \S+#%s\n" % a.lower(), rules):
        problems.append("runbook_url does not end in #%s" % a.lower())
    if a not in fires:
        problems.append("no unit test where it fires")
    if a not in quiet:
        problems.append("no unit test where it does not fire or resolves")
    print(("ok   " if not problems else "FAIL ") + a + (": " + "; ".join(problems) if problems else ""))
    bad += bool(problems)
print("%d alerts, %d without full coverage" % (len(alerts), bad))
sys.exit(1 if bad or not alerts else 0)
PY
}

no_subpath() {
  if grep -rnE '^[[:space:]-]*subPath:' deploy/kubernetes/; then
    echo "deploy/kubernetes mounts with subPath; mount the ConfigMap as a directory" >&2
    return 1
  fi
}

kustomize_build() {
  if ! command -v kubectl >/dev/null 2>&1; then
    echo "kubectl not installed: skipped"
    return 0
  fi
  kubectl kustomize deploy/kubernetes >/dev/null
}

step "install prometheus and promtool" tools
step "promtool check rules" promtool check rules alerts/wxauto-sidecar.rules.yml
step "promtool test rules" promtool test rules alerts/tests/*.yml
step "rules file equals the default rendering of the template" python3 scripts/render-alerts.py --check
step "every alert has a runbook and fire/no-fire tests" coverage
step "promtool check config deploy/prometheus/prometheus.yml" promtool check config deploy/prometheus/prometheus.yml
step "promtool check metrics on the fixture" sh -c 'promtool check metrics < scripts/fixtures/metrics-sample.txt'
step "dashboard lint" python3 scripts/lint_dashboards.py
step "no subPath mounts in deploy/kubernetes" no_subpath
step "kubectl kustomize deploy/kubernetes" kustomize_build
if [ -n "$BINARY" ]; then
  step "check-config on the Kubernetes example config" \
    env WXAUTO_API_KEY=example "$BINARY" check-config --config deploy/kubernetes/config.yaml
  step "prometheus e2e against $BINARY demo" python3 scripts/prometheus_e2e.py "$BINARY"
else
  echo "=== prometheus e2e: skipped (pass the sidecar binary to run it)"
fi

if [ "$failed" -gt 0 ]; then
  printf 'failed step: %s\n' "${failures[@]}"
fi
echo "check-monitoring: ${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
