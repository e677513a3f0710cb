"""The benchmarks still run: each bench's ``--smoke`` mode (tiny sizes) must finish and print its table.

Figures are not asserted (the machine is shared); what is checked is that every
bench completes, prints the rows it promises (with numbers), and leaves no
network namespace, lab directory or bpffs pin of its own behind. A bench that needs a cluster runs on
the session's real-node lab (``chart_lab``, tests/realnode_lab.py; the bench's ``--lab``, and it says
``lab: attached to DIR``); none brings up a lab of its own. The kube-proxy bench's smoke runs in
``e2e/test_lab_kube_proxy.py``, on that module's peer lab (kube-proxy in iptables mode) and the session's.
The runner (bounded, SIGTERM then kill on overrun) is ``tests/bench_smoke.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench_smoke import netns, run
from realnode_lab import ChartLab, ensure_installed

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.integration


def test_datapath_bench_smoke() -> None:
    before = netns()
    out = run("bench/bench_datapath.py")
    for mode in ("crr", "rr"):
        assert re.search(rf"^\s*{mode}\s+10\s+\d+/s\s+\d+/s\s+\d+/s\s+[0-9.]+\s+[0-9.]+$", out, re.M), out
    assert re.search(r"loopback \(generator ceiling, no veth\): CRR \d+/s, RR \d+/s", out), out
    assert "clang runs during policy changes: 0" in out
    assert not {n for n in netns() - before if n.startswith("cyt-dp-")}, "the bench left network namespaces"


def test_l7_http_bench_smoke(chart_lab: ChartLab) -> None:
    ensure_installed(chart_lab)
    out = run("bench/bench_l7_http.py", lab=chart_lab)
    rows = re.findall(r"^(near|far)\s+(keepalive|new|ka-x2)\s+\d+\s+\d+\s+[0-9.]+\s.*\s[0-9.]+$", out, re.M)
    assert sorted(rows) == [(pod, mode) for pod in ("far", "near") for mode in ("ka-x2", "keepalive", "new")], out
    accounting = re.findall(r"^(near|far)\s+(keepalive|new|ka-x2)\s+(l4|l7)\s+(?:\d+/\d+\s+){4}[0-9.]+$", out, re.M)
    assert len(accounting) == 12, out
    assert not list(ROOT.glob(".lab-benchl7-*")), "the bench made a lab of its own"
    assert chart_lab.kubectl("get", "namespace", "bench-l7").returncode != 0, "the bench left its namespace"


def test_policy_change_bench_smoke(chart_lab: ChartLab) -> None:
    ensure_installed(chart_lab)
    out = run("bench/bench_policy_change.py", lab=chart_lab)
    rows = re.findall(r"^\s*(\d+)\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+) \|", out, re.M)
    assert [(size, changes) for size, changes, *_ in rows] == [("1", "4"), ("100", "4")], out
    assert "of 4 found in the log" in out, out  # the operator's stage was attributed
    assert re.search(r"target p99 < 250 ms for 1 entry: (met|NOT met)", out), out
    assert not list(ROOT.glob(".lab-benchpc-*")), "the bench made a lab of its own"
    assert chart_lab.kubectl("get", "namespace", "bench-pc").returncode != 0, "the bench left its namespace"


def test_status_bench_smoke() -> None:
    out = run("-m", "bench.bench_status")
    row = re.search(r"^\s*10\s+handover\s+(\d+)\s+.*\s([0-9.]+)\s+(\d+)$", out, re.M)
    assert row, out
    assert float(row[2]) > 0 and int(row[3]) > 0, "intents without size or entries: not resolved"
    assert "did not finish" not in out
    assert not list(ROOT.glob(".lab-benchstatus-*")), "the bench left its control plane directory"


def test_netpol_resolution_bench_smoke() -> None:
    out = run("-m", "bench.bench_netpol_resolution")
    assert re.search(r"^scale: 20 NetworkPolicies, 200 pods, 4 nodes \(200 endpoints, [1-9]\d* with ingress enforced, "
                     r"[1-9]\d* policy entries\)$", out, re.M), out
    for row in ("full resolution:", "incremental, one NetworkPolicy edit", "peak RSS:"):
        assert re.search(rf"^{row}.*\d+\.\d", out, re.M), out


def test_metrics_bench_smoke() -> None:
    out = run("bench/bench_metrics.py")
    for label in ("agent at its most series", "agent padded to --series 6000"):
        assert re.search(rf"^{label}: \d+ series, \d+ bytes; Prometheus scrape_duration_seconds over [1-9]\d* scrapes: "
                         r"median [0-9.]+ ms, .*up=1;", out, re.M), out


def test_dns_proxy_bench_smoke(chart_lab: ChartLab) -> None:
    ensure_installed(chart_lab)
    out = run("bench/bench_dns_proxy.py", lab=chart_lab)
    row = re.search(r"^\s*4\s+([0-9.]+)\s+([0-9.]+)\s+[0-9.]+\s+[0-9.]+/[0-9.]+\s+[0-9.]+/[0-9.]+\s+\d+"
                    r"\s+\d+/\d+\s+[0-9.]+/[0-9.]+\s*$", out, re.M)
    assert row, out
    assert float(row[1]) > 0 and float(row[2]) > 0, "no answer direct or through the proxy"
    assert not list(ROOT.glob(".lab-benchdns-*")), "the bench made a lab of its own"
    assert chart_lab.kubectl("get", "namespace", "benchdns").returncode != 0, "the bench left its namespace"
