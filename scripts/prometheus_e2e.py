#!/usr/bin/env python3
"""End-to-end check of the monitoring artifacts against a real Prometheus.

  prometheus_e2e.py BINARY            start `BINARY demo --listen 127.0.0.1:<free port>` in a
                                      temporary directory and scrape it
  prometheus_e2e.py --target URL      scrape an already running exporter's /metrics instead;
                                      sidecar-only checks are skipped
  prometheus_e2e.py --fixture         serve scripts/fixtures/metrics-sample.txt (a static
                                      exposition) in-process and scrape that: for working on
                                      the dashboard and rules without the binary

Then it starts `prometheus` (Debian's package; scripts/install-tools.sh installs it when missing)
on another free loopback port, with a temporary storage directory, a 1 s scrape and evaluation
interval, job `wxauto-sidecar` and the repository's rule file, and checks:
  - the sidecar answers /-/healthy and /-/ready, and /metrics has a text-format Content-Type;
  - `promtool check metrics` has no findings on a scraped /metrics body;
  - the metrics the core dashboard panels need are exported;
  - every dashboard target expression (and variable query) evaluates without error through
    /api/v1/query, and the core panels return data;
  - every recording and alerting rule reports health "ok" after being evaluated.
One line per check, then `N passed, M failed`; exit 1 on any failure. Every child process is
stopped on exit, also on failure or Ctrl-C. Stdlib only.
"""

import argparse
import http.server
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "wxauto-sidecar.json"
FIXTURE = ROOT / "scripts" / "fixtures" / "metrics-sample.txt"
RULES = ROOT / "alerts" / "wxauto-sidecar.rules.yml"
JOB = "wxauto-sidecar"

# Panels that must return data from the first version of the sidecar on.
CORE_PANELS = [
    "Health score",
    "Health status",
    "Health deductions",
    "Listener uptime",
    "Clients up",
    "API request rate by endpoint",
    "Chat listeners by state",
    "CPU usage",
    "Resident memory",
]
# Series those panels are built from.
CORE_METRICS = [
    "wxauto_health_score",
    "wxauto_health_status",
    "wxauto_health_deduction_points",
    "wxauto_listener_start_time_seconds",
    "wxauto_listener_running",
    "wxauto_client_up",
    "wxauto_api_requests_total",
    "wxauto_listeners",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "wxauto_build_info",
]
# Grafana variables and what they become in the queries sent to Prometheus.
SUBSTITUTIONS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "job": JOB,
    "instance": ".*",
    "instance_id": ".*",
}

CHILDREN = []  # Popen objects, each the leader of its own process group


# === helpers =================================================================

class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok, what, detail=""):
        if ok:
            self.passed += 1
            print(f"ok   {what}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL {what}" + (f": {detail}" if detail else ""), flush=True)
        return ok

    def info(self, text):
        print(f"info {text}", flush=True)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5.0, headers=None):
    """(status, headers, body) for a GET; status 0 when the connection fails."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.status, res.headers, res.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()
    except (urllib.error.URLError, OSError):
        return 0, {}, b""


def start(cmd, cwd, log_path):
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log_path = log_path
    log.close()
    CHILDREN.append(proc)
    return proc


def stop_all():
    """TERM every child's process group, wait up to 15 s, then KILL what is left."""
    for proc in CHILDREN:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 15
    for proc in CHILDREN:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # also reaps stragglers left in the group
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    CHILDREN.clear()


def log_tail(proc, n=30):
    try:
        lines = pathlib.Path(proc.log_path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("     | " + line for line in lines[-n:])


def wait_until(predicate, timeout, interval=0.25, procs=()):
    """Poll predicate() until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def ensure_tools(args):
    missing = [t for t in (args.prometheus, args.promtool) if shutil.which(t) is None]
    if missing:
        print(f"info {', '.join(missing)} missing; running scripts/install-tools.sh", flush=True)
        subprocess.run(["bash", str(ROOT / "scripts" / "install-tools.sh")], check=False, timeout=900)
    return [t for t in (args.prometheus, args.promtool) if shutil.which(t) is None]


def substitute(expr):
    unknown = []

    def repl(m):
        name = m.group(1) or m.group(2)
        if name in SUBSTITUTIONS:
            return SUBSTITUTIONS[name]
        unknown.append(name)
        return m.group(0)

    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)
    return out, unknown


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def serve_fixture(path):
    """Serve a static exposition as /metrics on a free loopback port; return its URL."""
    body = path.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/metrics":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/metrics"


class Prom:
    def __init__(self, base):
        self.base = base

    def api(self, path, params=None):
        url = self.base + path
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        status, _, body = http_get(url, timeout=10)
        try:
            return status, json.loads(body or b"{}")
        except json.JSONDecodeError:
            return status, {"status": "error", "error": body[:200].decode(errors="replace")}

    def query(self, expr):
        return self.api("/api/v1/query", {"query": expr})


def result_len(doc):
    data = doc.get("data", {})
    if data.get("resultType") in ("vector", "matrix"):
        return len(data.get("result", []))
    return 1 if data.get("result") else 0


# === the checks ==============================================================

def check_sidecar(report, base, procs):
    ok = wait_until(lambda: http_get(base + "/-/ready", timeout=2)[0] == 200, 90, procs=procs)
    if not ok:
        codes = [p.poll() for p in procs]
        why = (f"exited with code {codes}" if any(c is not None for c in codes) else "not ready within 90 s")
        report.check(False, "sidecar /-/ready answers 200", why + "\n" + "\n".join(log_tail(p) for p in procs))
        return False
    report.check(True, "sidecar /-/ready answers 200")
    status, _, _ = http_get(base + "/-/healthy")
    report.check(status == 200, "sidecar /-/healthy answers 200", f"status {status}")
    return True


def check_metrics_body(report, metrics_url, promtool):
    status, headers, body = http_get(metrics_url)
    if not report.check(status == 200 and body, "GET /metrics answers 200 with a body", f"status {status}"):
        return
    ctype = headers.get("Content-Type", "") if headers else ""
    report.check(ctype.replace(" ", "").startswith("text/plain;version=0.0.4"),
                 "/metrics Content-Type is text/plain; version=0.0.4", repr(ctype))
    res = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    findings = (res.stdout + res.stderr).decode(errors="replace").strip()
    report.check(res.returncode == 0 and not findings, "promtool check metrics: no findings",
                 f"exit {res.returncode}\n{findings}")
    names = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", body.decode(errors="replace"), re.M))
    for metric in CORE_METRICS:
        present = metric in names or f"{metric}_bucket" in names
        report.check(present, f"/metrics exports {metric}")


def wait_for_scrapes(report, prom, procs):
    def enough():
        _, doc = prom.query(f'count_over_time(up{{job="{JOB}"}}[1m]) >= 5 and on () '
                            f'max(up{{job="{JOB}"}}) == 1')
        return doc.get("status") == "success" and result_len(doc) > 0

    ok = wait_until(enough, 90, interval=0.5, procs=procs)
    report.check(bool(ok), "Prometheus scraped the target successfully at least 5 times",
                 "\n".join(log_tail(p) for p in procs))
    return bool(ok)


def expected_rules(rules_path):
    text = rules_path.read_text(encoding="utf-8")
    return set(re.findall(r"^\s*-\s*(?:alert|record):\s*(\S+)", text, re.M))


def check_rules(report, prom, rules_path):
    want = expected_rules(rules_path)

    def all_evaluated():
        status, doc = prom.api("/api/v1/rules")
        if doc.get("status") != "success":
            return None
        rules = [r for g in doc["data"]["groups"] for r in g["rules"]]
        if len(rules) < len(want):
            return None
        if any(r.get("health") == "unknown" or str(r.get("lastEvaluation", "")).startswith("0001") for r in rules):
            return None
        return rules

    rules = wait_until(all_evaluated, 60, interval=0.5)
    if not report.check(rules is not None, "every rule was evaluated at least once"):
        _, doc = prom.api("/api/v1/rules")
        rules = [r for g in doc.get("data", {}).get("groups", []) for r in g["rules"]]
    loaded = {r["name"] for r in rules}
    report.check(want <= loaded, "Prometheus loaded every rule of the rule file", ", ".join(sorted(want - loaded)))
    for r in sorted(rules, key=lambda r: (r["type"], r["name"])):
        report.check(r.get("health") == "ok" and not r.get("lastError"),
                     f"rule {r['name']} ({r['type']}) health ok", f"{r.get('health')}: {r.get('lastError')}")
    _, doc = prom.api("/api/v1/alerts")
    active = [f"{a['labels'].get('alertname')}[{a.get('state')}]{{instance_id={a['labels'].get('instance_id', '')}}}"
              for a in doc.get("data", {}).get("alerts", [])]
    report.info("active alerts: " + (", ".join(sorted(active)) or "none"))


def check_dashboard(report, prom, dashboard_path):
    dash = json.loads(dashboard_path.read_text(encoding="utf-8"))
    panels = [p for p in walk_panels(dash.get("panels", [])) if p.get("type") != "row"]
    titles = {p.get("title") for p in panels}
    for title in CORE_PANELS:
        report.check(title in titles, f"dashboard has core panel `{title}`")

    # Variable queries: label_values(selector, label) -> /api/v1/label/<label>/values?match[]=selector
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q)
        if not report.check(bool(m), f"variable `{var['name']}` is a label_values() query", q):
            continue
        selector, unknown = substitute(m.group(1))
        status, doc = prom.api(f"/api/v1/label/{m.group(2)}/values", {"match[]": selector})
        report.check(doc.get("status") == "success" and not unknown,
                     f"variable `{var['name']}` query evaluates", doc.get("error", "") or f"unknown {unknown}")
        report.check(bool(doc.get("data")), f"variable `{var['name']}` has values", selector)

    for p in panels:
        core = p.get("title") in CORE_PANELS
        for t in p.get("targets", []):
            expr, unknown = substitute(t.get("expr", ""))
            what = f"panel `{p.get('title')}` target {t.get('refId')}"
            if unknown:
                report.check(False, f"{what} evaluates", f"unknown variables {unknown}")
                continue
            status, doc = prom.query(expr)
            if not report.check(doc.get("status") == "success", f"{what} evaluates without error",
                                f"{doc.get('errorType', status)}: {doc.get('error', '')}\n     expr: {expr}"):
                continue
            if core:
                # rate() over a young TSDB can be empty for a few seconds: retry for a while.
                if result_len(doc) == 0:
                    got = wait_until(lambda: result_len(prom.query(expr)[1]) > 0, 30, interval=1)
                else:
                    got = True
                report.check(bool(got), f"{what} (core) returns data", f"empty result for {expr}")
            elif result_len(doc) == 0:
                report.info(f"{what} returns no data yet (not a core panel)")


# === main ====================================================================

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary", nargs="?", help="the wxauto-sidecar binary (runs `BINARY demo`)")
    parser.add_argument("--target", help="scrape this /metrics URL instead of starting the binary")
    parser.add_argument("--fixture", nargs="?", const=FIXTURE, type=pathlib.Path, metavar="FILE",
                        help=f"serve FILE (default {FIXTURE.relative_to(ROOT)}) as /metrics and scrape it")
    parser.add_argument("--prometheus", default="prometheus", help="prometheus executable (default: from PATH)")
    parser.add_argument("--promtool", default="promtool", help="promtool executable (default: from PATH)")
    parser.add_argument("--dashboard", type=pathlib.Path, default=DASHBOARD, help="dashboard JSON to evaluate")
    parser.add_argument("--rules", type=pathlib.Path, default=RULES, help="rule file to load")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, TSDB)")
    args = parser.parse_args()
    if args.fixture:
        args.target = serve_fixture(args.fixture)
    if not args.binary and not args.target:
        parser.error("give the sidecar BINARY, --target URL or --fixture")
    dashboard_path, rules_path = args.dashboard.resolve(), args.rules.resolve()

    report = Report()
    missing = ensure_tools(args)
    if not report.check(not missing, "prometheus and promtool are installed", ", ".join(missing)):
        print(f"{report.passed} passed, {report.failed} failed")
        return 1
    prometheus = shutil.which(args.prometheus)
    promtool = shutil.which(args.promtool)

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="wxauto-e2e-"))
    try:
        procs = []
        if args.target:
            target = urllib.parse.urlsplit(args.target)
            host_port, metrics_path, scheme = target.netloc, target.path or "/metrics", target.scheme or "http"
            metrics_url = args.target
            report.info(f"scraping {metrics_url}; sidecar start and endpoint checks skipped")
        else:
            binary = str(pathlib.Path(args.binary).resolve())
            if not report.check(os.access(binary, os.X_OK), f"sidecar binary {binary} is executable"):
                return 1
            port = free_port()
            host_port, metrics_path, scheme = f"127.0.0.1:{port}", "/metrics", "http"
            workdir = tmp / "sidecar"
            workdir.mkdir()
            sidecar = start([binary, "demo", "--listen", host_port], workdir, tmp / "sidecar.log")
            procs.append(sidecar)
            report.info(f"started {binary} demo on {host_port} (pid {sidecar.pid}, cwd {workdir})")
            if not check_sidecar(report, f"http://{host_port}", procs):
                return 1
            metrics_url = f"http://{host_port}/metrics"

        check_metrics_body(report, metrics_url, promtool)

        prom_port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "rule_files:\n"
            f"  - {json.dumps(str(rules_path))}\n"
            "scrape_configs:\n"
            f"  - job_name: {JOB}\n"
            f"    scheme: {scheme}\n"
            f"    metrics_path: {json.dumps(metrics_path)}\n"
            "    static_configs:\n"
            f"      - targets: [{json.dumps(host_port)}]\n",
            encoding="utf-8",
        )
        res = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, timeout=60)
        report.check(res.returncode == 0, "promtool check config on the e2e prometheus.yml",
                     (res.stdout + res.stderr).decode(errors="replace"))
        prom_proc = start(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            tmp, tmp / "prometheus.log")
        procs.append(prom_proc)
        prom = Prom(f"http://127.0.0.1:{prom_port}")
        ok = wait_until(lambda: http_get(prom.base + "/-/ready", timeout=2)[0] == 200, 60, procs=[prom_proc])
        if not report.check(bool(ok), f"prometheus ready on 127.0.0.1:{prom_port}", log_tail(prom_proc)):
            return 1
        if not wait_for_scrapes(report, prom, procs):
            return 1
        check_dashboard(report, prom, dashboard_path)
        check_rules(report, prom, rules_path)
        for p in procs:
            report.check(p.poll() is None, f"{pathlib.Path(p.args[0]).name} still running at the end", log_tail(p))
        return 1 if report.failed else 0
    except (KeyboardInterrupt, SystemExit) as e:
        report.check(False, "the run completed", f"interrupted ({type(e).__name__} {e})")
        raise
    finally:
        stop_all()
        if args.keep:
            report.info(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"{report.passed} passed, {report.failed} failed", flush=True)


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
