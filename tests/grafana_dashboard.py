"""The PromQL of Ciliary's Grafana dashboards (charts/ciliary/dashboards/*.json), ready for Prometheus:
every panel target's and query variable's expression with Grafana's variables replaced by what they
stand for in a plain query, and the metric names each one reads. Shared by the unit test
(``promtool check rules``, names against the agent's exposition) and the e2e test (a real Prometheus)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "charts" / "ciliary" / "dashboards").glob("*.json"))
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", '"$instance"': '".*"'}
LABEL_VALUES = re.compile(r"^label_values\((?P<metric>[a-zA-Z_:][\w:]*)\s*,\s*\w+\)$")
METRIC_PREFIXES = ("hubble_", "cilium_", "ciliary_")


def expressions(path: Path) -> list[tuple[str, str]]:
    """(where, PromQL) for every target and query variable of the dashboard at ``path``."""
    dashboard: dict[str, Any] = json.loads(path.read_text())
    out = []
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            out.append((f"{path.name}: panel {panel['title']!r} {target['refId']}", plain(target["expr"])))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = LABEL_VALUES.match(query)
            assert match, f"{path.name}: variable {variable['name']}: only label_values(metric, label) is used"
            out.append((f"{path.name}: variable {variable['name']}", match["metric"]))
    return out


def plain(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The series names ``expr`` reads (Ciliary's prefixes; a bare name counts as well as ``name{...}``)."""
    return {token for token in re.findall(r"[a-zA-Z_:][\w:]*", expr) if token.startswith(METRIC_PREFIXES)}
