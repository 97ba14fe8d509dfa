#!/usr/bin/env python3
"""Lint the Grafana dashboards in dashboards/ against docs/conventions section 11.

Checks, per dashboard file:
  - valid JSON; no `__inputs` and no `${DS_...}` anywhere (both break file provisioning);
  - a stable, non-empty `uid`;
  - exactly one datasource variable, named `datasource`, of type prometheus;
  - `job`, `instance` and `instance_id` query variables built on `${datasource}`;
  - every panel and every target uses `${datasource}` (no hard-coded datasource uid);
  - every selector in every target expression has `job=~"$job"` and `instance=~"$instance"` matchers;
  - `rate(`, `irate(` and `increase(` use `[$__rate_interval]`, and no other range is used;
  - every panel (except rows) has a unit; panel ids are unique;
  - the rows overview, clients, listeners, messages and delivery, errors, process and config exist.

Usage: lint_dashboards.py [FILE ...]   (default: every dashboards/*.json)
Prints one line per check and closes with `N passed, M failed`; exits 1 on any failure. Stdlib only.
"""

import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DS_REF = "${datasource}"
REQUIRED_ROWS = ["overview", "clients", "listeners", "messages and delivery", "errors", "process", "config"]
REQUIRED_VARIABLES = ["job", "instance", "instance_id"]

# PromQL words that look like identifiers but are not series selectors.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "atan2",
}
JOB_MATCHER = re.compile(r'\bjob\s*=~?\s*"\$\{?job\}?"')
INSTANCE_MATCHER = re.compile(r'\binstance\s*=~?\s*"\$\{?instance\}?"')
RATE_RANGE = "[$__rate_interval]"


class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok, what, detail=""):
        if ok:
            self.passed += 1
            print(f"ok   {what}")
        else:
            self.failed += 1
            print(f"FAIL {what}" + (f": {detail}" if detail else ""))


def strip_strings(expr):
    """Replace the contents of string literals with spaces, keeping offsets."""
    out = []
    i = 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            j = i + 1
            while j < len(expr) and expr[j] != c:
                j += 2 if expr[j] == "\\" and c != "`" else 1
            out.append(c + " " * (min(j, len(expr)) - i - 1) + (c if j < len(expr) else ""))
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def selectors(expr):
    """Yield (metric name or '', matcher text) for every series selector in a PromQL expression."""
    bare = strip_strings(expr)
    i = 0
    n = len(bare)
    while i < n:
        c = bare[i]
        if c == "[":  # a range or subquery duration: skip it
            i = bare.find("]", i) + 1 or n
            continue
        if c == "{":
            end = bare.find("}", i)
            end = n if end < 0 else end
            yield "", expr[i + 1:end]
            i = end + 1
            continue
        m = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", bare[i:])
        if not m or (i > 0 and (bare[i - 1].isalnum() or bare[i - 1] in "_.")):
            i += 1
            continue
        word = m.group(0)
        j = i + len(word)
        rest = bare[j:].lstrip()
        prev = bare[:i].rstrip()
        # A label list after by/without/on/ignoring/group_*: skip to its closing parenthesis.
        if word.lower() in KEYWORDS:
            if word.lower() in {"by", "without", "on", "ignoring", "group_left", "group_right"} and rest.startswith("("):
                i = bare.find(")", j) + 1 or n
            else:
                i = j
            continue
        if rest.startswith("(") or re.match(r"(by|without)\s*\(", rest):  # a function or aggregation
            i = j
            continue
        if prev.endswith(("by", "without")) and rest.startswith(")"):
            i = j
            continue
        if rest.startswith("{"):
            start = bare.find("{", j)
            end = bare.find("}", start)
            end = n if end < 0 else end
            yield word, expr[start + 1:end]
            i = end + 1
            continue
        # A bare metric name without matchers.
        yield word, ""
        i = j


def call_args(expr, start):
    """The text between the parenthesis at or after `start` and its match."""
    open_at = expr.find("(", start)
    depth = 0
    for k in range(open_at, len(expr)):
        if expr[k] == "(":
            depth += 1
        elif expr[k] == ")":
            depth -= 1
            if depth == 0:
                return expr[open_at + 1:k]
    return expr[open_at + 1:]


def lint_expr(expr):
    """Return a list of problems with one target expression."""
    problems = []
    found = list(selectors(expr))
    if not found:
        problems.append("no series selector")
    for name, matchers in found:
        label = name or "{…}"
        if not JOB_MATCHER.search(matchers):
            problems.append(f'{label} lacks job=~"$job"')
        if not INSTANCE_MATCHER.search(matchers):
            problems.append(f'{label} lacks instance=~"$instance"')
    bare = strip_strings(expr)
    for m in re.finditer(r"\b(rate|irate|increase)\s*\(", bare):
        args = call_args(bare, m.start())
        if RATE_RANGE not in args:
            problems.append(f"{m.group(1)}() does not use {RATE_RANGE}")
    for m in re.finditer(r"\[[^\]]*\]", bare):
        if m.group(0) != RATE_RANGE:
            problems.append(f"range {m.group(0)} instead of {RATE_RANGE}")
    return problems


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def is_ds_ref(ds):
    if isinstance(ds, str):
        return ds == DS_REF
    return isinstance(ds, dict) and ds.get("uid") == DS_REF


def lint_file(path, report):
    name = path.name
    raw = path.read_text(encoding="utf-8")
    try:
        dash = json.loads(raw)
    except json.JSONDecodeError as e:
        report.check(False, f"{name}: valid JSON", str(e))
        return
    report.check(True, f"{name}: valid JSON")
    report.check("__inputs" not in dash, f"{name}: no __inputs")
    report.check("${DS_" not in raw, f"{name}: no ${{DS_...}} references")
    uid = dash.get("uid")
    report.check(isinstance(uid, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid or "") is not None,
                 f"{name}: stable uid", repr(uid))
    report.check(bool(dash.get("title")), f"{name}: has a title")

    variables = dash.get("templating", {}).get("list", [])
    ds_vars = [v for v in variables if v.get("type") == "datasource"]
    report.check(len(ds_vars) == 1 and ds_vars[0].get("name") == "datasource" and ds_vars[0].get("query") == "prometheus",
                 f"{name}: exactly one datasource variable `datasource` (prometheus)",
                 ", ".join(v.get("name", "?") for v in ds_vars))
    by_name = {v.get("name"): v for v in variables}
    for var in REQUIRED_VARIABLES:
        v = by_name.get(var)
        report.check(v is not None and v.get("type") == "query" and is_ds_ref(v.get("datasource")),
                     f"{name}: variable `{var}` is a query on ${{datasource}}")

    panels = list(walk_panels(dash.get("panels", [])))
    ids = [p.get("id") for p in panels]
    report.check(len(ids) == len(set(ids)) and None not in ids, f"{name}: panel ids are unique")
    rows = {re.sub(r"\s+", " ", p.get("title", "")).strip().lower() for p in panels if p.get("type") == "row"}
    for row in REQUIRED_ROWS:
        report.check(row in rows, f"{name}: row `{row}` exists")

    n_targets = 0
    for p in panels:
        if p.get("type") == "row":
            if "datasource" in p and p["datasource"] is not None:
                report.check(is_ds_ref(p["datasource"]), f"{name}: row `{p.get('title')}` uses ${{datasource}}")
            continue
        title = p.get("title") or f"panel {p.get('id')}"
        where = f"{name}: panel `{title}`"
        report.check(is_ds_ref(p.get("datasource")), f"{where} uses ${{datasource}}", json.dumps(p.get("datasource")))
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
        report.check(isinstance(unit, str) and unit != "", f"{where} has a unit", repr(unit))
        targets = p.get("targets", [])
        report.check(bool(targets), f"{where} has targets")
        for t in targets:
            n_targets += 1
            ref = t.get("refId", "?")
            report.check(is_ds_ref(t.get("datasource")), f"{where} target {ref} uses ${{datasource}}",
                         json.dumps(t.get("datasource")))
            expr = t.get("expr", "")
            problems = lint_expr(expr) if expr else ["empty expr"]
            report.check(not problems, f"{where} target {ref} expr follows the conventions", "; ".join(problems))
    report.check(n_targets > 0, f"{name}: has queries ({n_targets})")


def main(argv):
    files = [pathlib.Path(a) for a in argv] or sorted((ROOT / "dashboards").glob("*.json"))
    report = Report()
    if not files:
        report.check(False, "dashboards/*.json exist")
    for f in files:
        lint_file(f, report)
    print(f"{report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
