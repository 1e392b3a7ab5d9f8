"""Dashboard checks, run by .ci/lint-deploy.sh through check_deploy.py.

Every query of a Grafana dashboard must parse as PromQL and name only series and labels
that the server exports; every metric the server exports must appear on some panel; and
the metric list here must match what server/metrics.py registers.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser as promql

ROOT = Path(__file__).resolve().parents[2]
Problems = list[str]


# The server's metrics: name -> (type, labels); check_metric_list compares this with
# server/metrics.py when the server imports. Histograms expose
# <name>_bucket/_sum/_count, counters carry their _total in the name already.
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mpo_requests_total": ("counter", ("route", "status")),
    "mpo_num_requests_running": ("gauge", ()),
    "mpo_num_requests_waiting": ("gauge", ()),
    "mpo_time_to_first_token_seconds": ("histogram", ()),
    "mpo_inter_token_latency_seconds": ("histogram", ()),
    "mpo_e2e_request_latency_seconds": ("histogram", ()),
    "mpo_prompt_tokens_total": ("counter", ()),
    "mpo_generation_tokens_total": ("counter", ()),
    "mpo_batch_size": ("histogram", ()),
    "mpo_policy_forward_seconds": ("histogram", ("policy",)),
    "mpo_requests_by_profile_total": ("counter", ("profile",)),
    "mpo_fit_jobs": ("gauge", ("state",)),
    "mpo_http_requests_in_flight": ("gauge", ()),
    "mpo_speculative_drafted_tokens_total": ("counter", ()),
    "mpo_speculative_accepted_tokens_total": ("counter", ()),
}
# Labels Prometheus attaches to every scraped series (static and Kubernetes discovery).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
# Grafana variables and their stand-ins, so that a query parses as plain PromQL.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": ".*",
    "$instance": ".*",
}


def series_labels() -> dict[str, set[str]]:
    """Every series name the server exposes, with the labels each carries."""
    series: dict[str, set[str]] = {}
    for name, (kind, labels) in METRICS.items():
        base = set(labels) | TARGET_LABELS
        if kind == "histogram":
            series[f"{name}_bucket"] = base | {"le"}
            series[f"{name}_sum"] = base
            series[f"{name}_count"] = base
        else:
            series[name] = base
    return series


def metric_of(series: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series.removesuffix(suffix) in METRICS:
            return series.removesuffix(suffix)
    return series


def check_metric_list() -> Problems:
    """METRICS above must match what server/metrics.py registers (names, types, labels)."""
    try:
        from prometheus_client.metrics import MetricWrapperBase

        from server.metrics import Metrics
    except ImportError as exc:
        return unavailable("server.metrics", exc, "the metric list here is not compared")
    registered: dict[str, tuple[str, tuple[str, ...]]] = {}
    for collector in vars(Metrics()).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        # prometheus_client keeps label names private; no public accessor exists.
        labels = tuple(getattr(collector, "_labelnames", ()))
        for family in collector.describe():
            name = family.name + ("_total" if family.type == "counter" else "")
            registered[name] = (family.type, labels)
    problems = [
        f"{n}: the server has no such metric" for n in sorted(set(METRICS) - set(registered))
    ]
    problems += [
        f"{n}: exported by the server but unknown here"
        for n in sorted(set(registered) - set(METRICS))
    ]
    for name in sorted(set(METRICS) & set(registered)):
        if METRICS[name] != registered[name]:
            problems.append(f"{name}: listed as {METRICS[name]}, server has {registered[name]}")
    return problems


# ---------------------------------------------------------------------------- dashboard


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def check_query(expr: str, where: str, used: set[str]) -> Problems:
    """Parse one PromQL query; every series and label it names must exist."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    try:
        ast = promql.parse(expr)
    except ValueError as exc:
        return [f"{where}: PromQL does not parse ({exc}): {expr}"]
    known = series_labels()
    problems: Problems = []

    def visit(node: object) -> None:
        if isinstance(node, promql.VectorSelector):
            if node.name not in known:
                problems.append(f"{where}: unknown metric {node.name!r}")
                return
            used.add(metric_of(node.name))
            for matcher in node.matchers.matchers:
                if matcher.name not in known[node.name]:
                    problems.append(f"{where}: {node.name} has no label {matcher.name!r}")
        elif isinstance(node, promql.AggregateExpr) and node.modifier is not None:
            inner: set[str] = set()
            promql.walk(node.expr, lambda n: _collect_labels(n, known, inner))
            for label in node.modifier.labels:
                if label not in inner:
                    problems.append(f"{where}: aggregates by {label!r}, which it lacks")

    promql.walk(ast, visit)
    return problems


def _collect_labels(node: object, known: dict[str, set[str]], out: set[str]) -> None:
    if isinstance(node, promql.VectorSelector) and node.name in known:
        out |= known[node.name]


def check_variable(variable: dict[str, Any], used: set[str]) -> Problems:
    query = variable.get("query")
    if variable.get("type") != "query":
        return []
    text = str(query["query"] if isinstance(query, dict) else query)
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text.strip())
    if match is None:
        return [f"variable {variable['name']}: expected label_values(<selector>, <label>)"]
    selector, label = match.groups()
    where = f"variable {variable['name']}"
    problems = check_query(selector, where, used)
    metric = selector.split("{")[0].strip()
    if not problems and label not in series_labels()[metric]:
        problems.append(f"{where}: {metric} has no label {label!r}")
    return problems


def check_dashboard(path: Path, datasource_uids: set[str]) -> Problems:
    try:
        dashboard = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{path}: not valid JSON: {exc}"]
    problems: Problems = []
    used: set[str] = set()
    ids: set[object] = set()
    allowed_ds = datasource_uids | {"${datasource}"}
    for panel in iter_panels(dashboard.get("panels", [])):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("id") in ids:
            problems.append(f"{where}: duplicate panel id")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos", {})
        if grid.get("x", 0) + grid.get("w", 0) > 24:
            problems.append(f"{where}: wider than the 24-column grid")
        for target in panel.get("targets", []):
            uid = (target.get("datasource") or panel.get("datasource") or {}).get("uid")
            if uid not in allowed_ds:
                problems.append(f"{where}: data source uid {uid!r} is not provisioned")
            problems += check_query(target["expr"], where, used)
    for variable in dashboard.get("templating", {}).get("list", []):
        problems += check_variable(variable, used)
    for name in sorted(set(METRICS) - used):
        problems.append(f"{path.name}: no panel shows {name}")
    return problems


def unavailable(module: str, exc: ImportError, consequence: str) -> Problems:
    """A project module that does not import: a note locally, a failure in CI.

    .ci/run installs the project before this runs, so there a missing module means a
    check would silently not happen.
    """
    message = f"{module} does not import ({exc}): {consequence}"
    if os.environ.get("CI"):
        return [message]
    print(f"note: {message}")
    return []


# The checkout's packages, whether or not they are installed in this environment.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
