"""The upstream e2e subset ``make test`` runs: ``e2e/conformance.txt`` against the session's real-node lab.

``e2e.test`` (built from ``k8s.io/kubernetes/test/e2e`` by the set-up) runs the short focus list through
``ciliary.lab.conformance`` against ``chart_lab`` (tests/realnode_lab.py: two real kubelets, kube-proxy,
CoreDNS, Ciliary installed by its Helm chart; the same lab the chart tests use, brought up once per
session). The list has at least one spec of each focus area of issue 14 (Services, EndpointSlice,
Networking, Netpol, DNS); every selected spec must pass, and none may skip itself or be cut short. The
per-area counts are printed (``pytest -s`` shows them; the log is under the lab's ``conformance/short/``).

The file name sorts before test_chart_install.py on purpose: that module ends by uninstalling the release
(``helm uninstall``, ``skaffold dev``'s cleanup), and this one then needs no reinstall.
"""

from __future__ import annotations

import time

import pytest

import suite_rules
from ciliary.lab import conformance, tools
from realnode_lab import ROOT, ChartLab

pytestmark = pytest.mark.integration
FOCUS_FILE = ROOT / "e2e" / "conformance.txt"
#: the areas the short list must cover (issue 14, item 7)
AREAS = {"Services", "EndpointSlice", "Networking", "Netpol", "DNS"}
#: the whole run may take this long (the spec's budget is 10 minutes under load; a hung spec stops here)
TIMEOUT_SECONDS = 15 * 60


def test_the_short_list_covers_every_area() -> None:
    suite_rules.require_tool("e2e.test")
    focus = conformance.parse_focus(FOCUS_FILE.read_text())
    chosen = conformance.selected(conformance.list_specs(tools.built_path("e2e.test")), focus)
    assert {conformance.topic(name) for name in chosen} >= AREAS, chosen


def test_the_upstream_short_list_passes_on_real_nodes_with_ciliary(chart_installed: ChartLab) -> None:
    suite_rules.require_tool("e2e.test")
    focus = conformance.parse_focus(FOCUS_FILE.read_text())
    want = conformance.selected(conformance.list_specs(tools.built_path("e2e.test")), focus)
    t0 = time.monotonic()
    result = conformance.run(chart_installed.lab, FOCUS_FILE, shards=2, timeout=TIMEOUT_SECONDS)
    print(f"\n{result.line()}\n" + "\n".join(result.topic_lines()) + f"\n(wall {time.monotonic() - t0:.0f} s)")
    log = chart_installed.lab.layout.state_dir / "conformance" / conformance.area_name(FOCUS_FILE)
    assert result.failed == 0 and result.interrupted == 0, f"failed: {result.failures}; see {log}"
    assert result.skipped == 0, f"specs skipped themselves: {result.specs}"
    ran = sorted(name.removeprefix("[It] ") for name, _ in result.specs)
    assert ran == sorted(want), f"ran {ran}, the list selects {want}; see {log}"
    assert result.passed == len(want)
