"""Ciliary's Grafana dashboards (charts/ciliary/dashboards/): every PromQL expression parses
(``promtool check rules``, Debian's prometheus package) and reads only series the agent exports
(the exposition of ``flowapi.metrics_registry`` after every kind of flow). The same expressions are
queried against a real Prometheus scraping the lab's agents in e2e/test_service_map.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families
from test_hubble_convert import INTENT, event

from ciliary.nodeagent import flowapi
from ciliary.nodeagent.datapath import maps
from grafana_dashboard import DASHBOARDS, expressions, metric_names


def exported_names() -> set[str]:
    hub = flowapi.FlowHub("n1", capacity=4)
    hub.set_intent(INTENT)
    hub.publish([event(), event("forwarded", maps.Reason.OK_POLICY, flags=0x12),
                 event("forwarded", maps.Reason.OK_POLICY, direction="egress")])
    hub.lost_followers = 1
    text = prometheus_client.generate_latest(flowapi.metrics_registry(hub)).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_there_is_a_dashboard_with_panels() -> None:
    assert [p.name for p in DASHBOARDS] == ["ciliary-flows.json"]
    dashboard = json.loads(DASHBOARDS[0].read_text())
    assert dashboard["uid"] == "ciliary-flows" and len(dashboard["panels"]) >= 8
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_expression_names_only_series_the_agent_exports() -> None:
    exported = exported_names()
    for path in DASHBOARDS:
        for where, expr in expressions(path):
            names = metric_names(expr)
            assert names, f"{where}: reads no Ciliary series: {expr}"
            assert names <= exported, f"{where}: {sorted(names - exported)} not exported by the agent"


def test_every_expression_parses_with_promtool(tool: Any, tmp_path: Path) -> None:
    promtool = tool("promtool")
    rules = [{"record": f"ciliary:dashboard:expr{i}", "expr": expr}
             for path in DASHBOARDS for i, (_, expr) in enumerate(expressions(path))]
    (tmp_path / "rules.json").write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([str(promtool), "check", "rules", str(tmp_path / "rules.json")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in out.stdout, out.stdout + out.stderr
    # and promtool does refuse a broken expression (the check can fail)
    (tmp_path / "bad.json").write_text(json.dumps({"groups": [{"name": "g", "rules": [
        {"record": "x:y", "expr": "sum by (verdict (rate(hubble_drop_total[1m]))"}]}]}))
    bad = subprocess.run([str(promtool), "check", "rules", str(tmp_path / "bad.json")], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0
